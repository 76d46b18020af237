"""A thread-safe AMQP 1.0 client for method calls: one reactor thread, futures for callers.

With ``reconnect=True`` the client opens a fresh connection (and reply receiver) after
losing one, with a capped backoff; calls in flight then fail with ``ConnectionFailed``
and calls made meanwhile wait for the new connection. ``call(..., retries=N)`` sends a
call again with the same message id when no reply came in time or the connection was
lost: an agent answers a redelivered write request with its first reply and never runs
it twice (deduplication by message id), so a retried call is not executed twice.
"""
from __future__ import annotations

import collections
import itertools
import json
import threading
import uuid
from concurrent.futures import Future, InvalidStateError
from typing import Any
from urllib.parse import unquote, urlsplit

from proton import Delivery, Endpoint, Handler, Message, Terminus, symbol
from proton.reactor import ApplicationEvent, Container, EventInjector

from busagent.bus.addressing import Profile, rpc_name
from busagent.bus.addressing import profile as get_profile
from busagent.bus.envelope import encode_request
from busagent.client.connecting import connect, reconnect_delays
from busagent.client.errors import CallError, CallTimeout, ConnectionFailed

CREDIT = 1000


def _fail(fut: Future, exc: Exception) -> None:
    """Fail ``fut`` unless it is done (or its caller gave up on it meanwhile)."""
    try:
        if not fut.done():
            fut.set_exception(exc)
    except InvalidStateError:
        pass


class _ClientHandler(Handler):
    """Runs on the client's reactor thread; the only code touching proton objects."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.c = client
        self.conn = None
        self.receiver = None
        self.reply_to: str | None = None
        self.remote_host: str | None = None
        self.senders: dict[str, Any] = {}
        self.tags = itertools.count()
        self.ready = False
        self.lost = False
        self.closing = False
        self.container: Any = None
        self.delays = reconnect_delays()

    def on_reactor_init(self, event: Any) -> None:
        event.container.selectable(self.c._injector)
        self.container = event.container
        self._open()

    def _open(self) -> None:
        """Open a connection and its reply receiver (at start, and on each reconnection)."""
        c = self.c
        self.ready, self.reply_to, self.senders, self.lost = False, None, {}, False
        try:
            self.conn = connect(self.container, c.url, self, c.user, c.password)
        except Exception as exc:  # bad URL and the like
            c._fail_all(ConnectionFailed(str(exc)))
            return
        session = self.conn.session()
        session.open()
        self.receiver = session.receiver(f"replies-{c.client_id}")
        address = c.profile.reply_address(c.client_id)
        if address is None:
            self.receiver.source.dynamic = True
        else:
            self.receiver.source.address = address
        self.receiver.open()
        self.receiver.flow(CREDIT)

    def _lost(self, conn: Any, exc: ConnectionFailed, permanent: bool = False) -> None:
        """The connection (or its reply link) is gone: fail for good, or reconnect."""
        if conn != self.conn or self.lost or self.closing:
            return
        c = self.c
        self.lost, self.ready = True, False
        if not c.reconnect or permanent:
            c._fail_all(exc)
            return
        c._connected.clear()
        c._fail_pending(exc)
        if conn.state & Endpoint.LOCAL_ACTIVE:
            conn.close()
        self.container.schedule(next(self.delays), self)

    def on_timer_task(self, _event: Any) -> None:
        if not self.closing:
            c = self.c
            c.reconnects += 1
            self._open()

    def on_connection_remote_open(self, event: Any) -> None:
        if event.connection != self.conn:
            return
        props = event.connection.remote_properties or {}
        host = props.get(symbol("busagent-host"))
        self.remote_host = str(host) if host is not None else None
        self._maybe_ready()

    def on_link_remote_open(self, event: Any) -> None:
        if event.link.is_receiver and event.link == self.receiver:
            self.reply_to = self.receiver.remote_source.address or self.receiver.source.address
            self._maybe_ready()

    def _maybe_ready(self) -> None:
        if self.reply_to and self.conn.state & Endpoint.REMOTE_ACTIVE and not self.ready:
            self.ready = True
            self.delays = reconnect_delays()
            self.c._connected.set()
            self.on_client_send(None)

    def on_link_remote_close(self, event: Any) -> None:
        link = event.link
        cond = link.remote_condition
        why = f"{cond.name}: {cond.description}" if cond else "link closed by peer"
        if link.connection != self.conn:
            return
        if link.is_receiver:
            self._lost(link.connection, ConnectionFailed(f"reply link closed: {why}"))
        else:
            for host, s in list(self.senders.items()):
                if s == link:
                    del self.senders[host]
                    self.c._fail_host(host, ConnectionFailed(f"no agent serves host {host!r}: {why}"))
        link.close()

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        why = f"{cond.name}: {cond.description}" if cond else "transport error"
        self._lost(event.connection, ConnectionFailed(why),
                   permanent=bool(cond and cond.name == "amqp:unauthorized-access"))

    def on_transport_closed(self, event: Any) -> None:
        self._lost(event.connection, ConnectionFailed("connection closed"))

    def on_connection_remote_close(self, event: Any) -> None:
        conn = event.connection
        self._lost(conn, ConnectionFailed("connection closed by peer"))
        if conn.state & Endpoint.LOCAL_ACTIVE:
            conn.close()

    def on_client_send(self, _event: Any) -> None:
        if not self.ready:
            return
        out = self.c._outbox
        while out:
            host, data_fn, fut = out.popleft()
            if fut.done():  # given up (timed out) before it could be sent: do not send it late
                continue
            host = host or self.remote_host
            if host is None:
                data_fn(None, None)
                continue
            sender = self.senders.get(host)
            if sender is None:
                sender = self.conn.session().sender(f"requests-{host}-{self.c.client_id}")
                sender.target.address = self.c.profile.request_target(rpc_name(self.c.namespace, host))
                if self.c.profile.durable_queue:  # the agent's queue is durable (were we first to name it)
                    sender.target.durability = Terminus.CONFIGURATION
                sender.session.open()
                sender.open()
                self.senders[host] = sender
            data = data_fn(self.reply_to, host)
            if data is None:
                continue
            dlv = sender.delivery(str(next(self.tags)).encode())
            sender.send(data)
            sender.advance()
            dlv.settle()  # at-most-once on the way out: the reply (or timeout) is the acknowledgement

    def on_client_close(self, event: Any) -> None:
        self.closing = True
        if self.conn is not None and self.conn.state & Endpoint.LOCAL_ACTIVE:
            self.conn.close()
        self.c._container.stop()

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if not link.is_receiver:
            dlv.settle()
            return
        if dlv.partial:
            return
        data = link.recv(dlv.pending)
        link.advance()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)
        msg = Message()
        msg.decode(data)
        self.c._complete(msg.correlation_id, msg.body)


class Client:
    """Calls libvirt C functions on agents by name.

    ``url``: the agent (direct mode) or the broker. ``host``: default host id
    (direct mode learns it from the agent). ``reconnect``: open a new connection after
    losing one (else the first loss fails every later call). Use as a context manager.
    """

    def __init__(self, url: str = "amqp://127.0.0.1:5672", host: str | None = None, profile: str = "direct",
                 namespace: str = "libvirt", timeout: float = 30.0, user: str | None = None,
                 password: str | None = None, reconnect: bool = False) -> None:
        self.url, self.host_id, self.namespace, self.timeout = url, host, namespace, timeout
        self.profile: Profile = get_profile(profile)
        self.user, self.password = user, password
        # every request names its sender's user (``user``, else the URL's): a broker validates it
        # against the authenticated user, and an agent in broker mode authorizes by it
        url_user = urlsplit(url).username
        sender = user or (unquote(url_user) if url_user else None)
        self._user_id = sender.encode() if sender else None
        self.reconnect = reconnect
        self.reconnects = 0  # connections opened again after a loss
        self.resent = 0  # calls sent again (same message id) by call(..., retries=N)
        self.client_id = uuid.uuid4().hex
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[Future, str | None]] = {}
        self._lock = threading.Lock()
        self._outbox: collections.deque = collections.deque()
        self._injector = EventInjector()
        self._connected = threading.Event()
        self._failure: Exception | None = None
        self._handler = _ClientHandler(self)
        self._container = Container(self._handler)
        self._thread = threading.Thread(target=self._container.run, name="busagent-client", daemon=True)
        self._thread.start()
        self._closed = False

    # -- calls ------------------------------------------------------------------------------
    def new_message_id(self) -> str:
        return f"{self.client_id}:{next(self._ids)}"

    def call_async(self, method: str, args: dict[str, Any] | None = None, host: str | None = None,
                   ttl: float | None = None, message_id: str | None = None) -> Future:
        """Send one call; the future resolves to the result or raises CallError.

        ``message_id``: send with this id (a retry of an earlier call: the agent answers a
        write it already ran with that run's reply); by default a new one."""
        fut: Future = Future()
        msg_id = message_id or self.new_message_id()
        body = args or {}
        host = host or self.host_id

        def build(reply_to: str | None, target_host: str | None) -> bytes | None:
            if reply_to is None:
                self._complete_error(msg_id, ConnectionFailed("the agent did not say its host id; pass host"))
                return None
            with self._lock:
                self._pending[msg_id] = (fut, target_host)
            return encode_request(method, body, msg_id, reply_to, ttl=ttl, user_id=self._user_id)

        if self._failure is not None:
            fut.set_exception(self._failure)
            return fut
        self._outbox.append((host, build, fut))
        self._injector.trigger(ApplicationEvent("client_send"))
        fut.message_id = msg_id  # type: ignore[attr-defined]
        return fut

    def call(self, method: str, host: str | None = None, timeout: float | None = None, retries: int = 0,
             **args: Any) -> Any:
        """Call ``method`` with keyword arguments; returns the result, raises CallError.

        ``timeout`` bounds each attempt; ``retries``: how many times to send the call again, with
        the same message id, after a timeout or a lost connection (with ``reconnect=True``)."""
        timeout = timeout if timeout is not None else self.timeout
        msg_id = self.new_message_id()
        for attempt in range(retries + 1):
            if attempt:
                self.resent += 1
            fut = self.call_async(method, args, host=host, message_id=msg_id)
            try:
                return fut.result(timeout)
            except TimeoutError:
                with self._lock:
                    self._pending.pop(msg_id, None)
                fut.cancel()  # not sent yet (no connection): it never will be
                if attempt == retries:
                    raise CallTimeout(f"no reply to {method} within {timeout} s"
                                      + (f" ({retries + 1} attempts)" if retries else "")) from None
            except ConnectionFailed:
                if attempt == retries or not self.reconnect or self._failure is not None:
                    raise
        raise AssertionError("unreachable")

    def host(self, host_id: str | None = None):
        """A proxy of one host (``client.host("node1").domain(name="test").suspend()``)."""
        from busagent.client.proxy import HostProxy
        return HostProxy(self, host_id or self.host_id)

    # -- completion (reactor thread) ----------------------------------------------------------
    def _complete(self, correlation_id: Any, body: Any) -> None:
        with self._lock:
            entry = self._pending.pop(str(correlation_id), None)
        if entry is None:
            return  # late reply after a timeout
        fut = entry[0]
        try:
            doc = json.loads(bytes(body) if isinstance(body, memoryview) else body)
        except (TypeError, ValueError) as exc:
            doc = {"error": {"kind": "bad_reply", "message": f"undecodable reply: {exc}"}}
        try:
            if "error" in doc:
                fut.set_exception(CallError.from_data(doc["error"]))
            else:
                fut.set_result(doc.get("result"))
        except InvalidStateError:  # the caller gave up on it (timed out) just now
            pass

    def _complete_error(self, msg_id: str, exc: Exception) -> None:
        with self._lock:
            entry = self._pending.pop(msg_id, None)
        if entry is not None:
            _fail(entry[0], exc)

    def _fail_host(self, host: str, exc: Exception) -> None:
        with self._lock:
            victims = [k for k, (_, h) in self._pending.items() if h == host]
            entries = [self._pending.pop(k) for k in victims]
        for fut, _ in entries:
            _fail(fut, exc)

    def _fail_pending(self, exc: Exception) -> None:
        """The connection was lost (reconnecting): calls in flight fail, queued ones wait."""
        with self._lock:
            entries = list(self._pending.values())
            self._pending.clear()
        for fut, _ in entries:
            _fail(fut, exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            entries = list(self._pending.values())
            self._pending.clear()
        self._failure = exc
        while self._outbox:
            entries.append((self._outbox.popleft()[2], None))
        for fut, _ in entries:
            _fail(fut, exc)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._injector.trigger(ApplicationEvent("client_close"))
        self._thread.join(5)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
