"""The agent's one proton handler: serves method calls on the reactor thread.

Lean by design: a bare ``proton.Handler`` (no MessagingHandler child chain),
credit topped up in bulk, replies sent pre-settled, requests settled once
their reply is on the wire. libvirt work runs on ``ReactorWorkers``.
"""
from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import structlog
from proton import Condition, Delivery, Endpoint, Handler, Link, symbol
from proton.reactor import Backoff

from busagent.api.errors import Internal
from busagent.bus.addressing import Profile, rpc_name
from busagent.bus.envelope import decode_request, encode_reply, reply_body
from busagent.bus.workers import ReactorWorkers
from busagent.config import Settings
from busagent.rpc import Outcome, RpcService

log = structlog.get_logger("busagent.bus")
ANONYMOUS_RELAY = symbol("ANONYMOUS-RELAY")
MAX_REPLY_SENDERS = 1024


class Job:
    """A request in flight: its delivery (reactor-only) and its decoded request."""

    __slots__ = ("delivery", "request")

    def __init__(self, delivery: Delivery, request: Any) -> None:
        self.delivery = delivery
        self.request = request


class AgentBus(Handler):
    """Accepts (direct mode) or opens (broker mode) AMQP connections and serves requests."""

    def __init__(self, settings: Settings, profile: Profile, host_id: str, service: RpcService) -> None:
        super().__init__()
        self.settings = settings
        self.profile = profile
        self.host_id = host_id
        self.rpc_address = profile.request_queue(rpc_name(settings.namespace, host_id))
        self.service = service
        self.workers = ReactorWorkers(settings.workers, "rpc_done")
        self.credit = settings.credit
        self._tags = itertools.count()
        self._dynamic: dict[str, Link] = {}  # direct mode: reply address -> sender link
        self._senders: OrderedDict[str, Link] = OrderedDict()  # broker mode: per-address cache
        self._relay: Link | None = None
        self._broker_conn = None
        self.container = None
        self.acceptor = None
        self.listening = None  # (host, port) once listening

    # -- start-up -------------------------------------------------------------------------
    def on_reactor_init(self, event: Any) -> None:
        self.container = event.container
        self.container.selectable(self.workers.injector)
        if self.settings.mode == "direct":
            host, _, port = self.settings.listen.rpartition(":")
            self.acceptor = self.container.acceptor(host or "127.0.0.1", int(port))
            sock = self.acceptor._selectable._delegate  # noqa: SLF001 - the bound port, for port 0
            self.listening = sock.getsockname()[:2]
            log.info("listening", address=f"{self.listening[0]}:{self.listening[1]}", rpc=self.rpc_address)
        else:
            urls = list(self.settings.broker_urls)
            auth: dict[str, Any] = {}
            if any(urlsplit(u).username for u in urls):
                # Credentials in the URL: insist on PLAIN. Left to choose, proton takes the
                # ANONYMOUS that RabbitMQ offers first, and the credentials go unused.
                auth = {"allowed_mechs": "PLAIN", "allow_insecure_mechs": True}
            self._broker_conn = self.container.connect(
                url=urls[0], urls=urls, reconnect=Backoff(initial=0.2, max_delay=10.0),
                container_id=f"busagent-{uuid.uuid4().hex[:8]}", handler=self, **auth)
            session = self._broker_conn.session()
            session.open()
            rcv = session.receiver(f"rpc-{self.rpc_address}")
            rcv.source.address = self.rpc_address
            rcv.target.address = self.rpc_address
            rcv.open()
            rcv.flow(self.credit)
            log.info("connecting", urls=urls, rpc=self.rpc_address)

    def on_connection_bound(self, event: Any) -> None:
        if self.settings.mode == "direct":  # every connection is an accepted one
            event.transport.sasl().allowed_mechs("ANONYMOUS")

    # -- endpoints ------------------------------------------------------------------------
    def on_connection_remote_open(self, event: Any) -> None:
        conn = event.connection
        if conn.state & Endpoint.LOCAL_UNINIT:
            conn.container = f"busagent-{self.host_id}"
            conn.properties = {symbol("busagent-host"): self.host_id, symbol("busagent-rpc"): self.rpc_address}
            conn.open()
        if conn == self._broker_conn:
            offered = conn.remote_offered_capabilities or []
            if ANONYMOUS_RELAY in list(offered) and self._relay is None:
                self._relay = conn.session().sender("busagent-relay")
                self._relay.snd_settle_mode = Link.SND_SETTLED
                self._relay.target.address = None
                self._relay.session.open()
                self._relay.open()
            log.info("broker connected", relay=self._relay is not None)

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        if link.is_receiver:
            address = link.remote_target.address
            if address != self.rpc_address:
                self._refuse(link, f"this agent serves {self.rpc_address}, not {address}")
                return
            link.target.address = address
            link.open()
            link.flow(self.credit)
            return
        if link.remote_source.dynamic:
            address = f"{self.rpc_address}.reply.{uuid.uuid4().hex}"
            link.source.address = address
            link.snd_settle_mode = Link.SND_SETTLED
            self._dynamic[address] = link
            link.open()
            return
        self._refuse(link, f"no such source: {link.remote_source.address}")

    def _refuse(self, link: Link, why: str) -> None:
        link.condition = Condition("amqp:not-found", why)
        link.open()
        link.close()

    def on_link_remote_close(self, event: Any) -> None:
        self._forget(event.link)
        if not event.link.state & Endpoint.LOCAL_CLOSED:
            event.link.close()

    def on_session_remote_close(self, event: Any) -> None:
        if not event.session.state & Endpoint.LOCAL_CLOSED:
            event.session.close()

    def on_connection_remote_close(self, event: Any) -> None:
        self._forget_connection(event.connection)
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        if event.connection is not None:
            self._forget_connection(event.connection)

    def _forget(self, link: Link) -> None:
        address = link.source.address
        if address and self._dynamic.get(address) == link:
            del self._dynamic[address]
        if link == self._relay:
            self._relay = None

    def _forget_connection(self, conn: Any) -> None:
        for address, link in list(self._dynamic.items()):
            if link.connection == conn:
                del self._dynamic[address]
        for address, link in list(self._senders.items()):
            if link.connection == conn:
                del self._senders[address]
        if self._relay is not None and self._relay.connection == conn:
            self._relay = None

    # -- requests -------------------------------------------------------------------------
    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if not link.is_receiver:
            if dlv.remote_state or dlv.remote_settled:
                dlv.settle()
            return
        if dlv.partial:
            if dlv.pending > self.settings.max_message_bytes:
                link.condition = Condition("amqp:link:message-size-exceeded", "message too large")
                link.close()
            return
        data = link.recv(dlv.pending)
        link.advance()
        if link.credit < self.credit // 2:
            link.flow(self.credit - link.credit)
        try:
            request = decode_request(data)
        except Exception:  # undecodable: no reply address to answer
            self.service.stats.reject("undecodable")
            dlv.update(Delivery.REJECTED)
            dlv.settle()
            return
        self.workers.submit(self._handle, Job(dlv, request))

    def _handle(self, job: Job) -> Outcome:
        return self.service.handle(job.request)  # on a worker thread: never touches job.delivery

    def on_rpc_done(self, event: Any) -> None:
        for job, outcome in self.workers.drain():
            if not isinstance(outcome, Outcome):  # a bug escaped RpcService: still answer
                body = reply_body(error=Internal(f"{outcome!r}"))
                outcome = Outcome(body, "(unknown)", "internal", 0.0)
            self._reply(job, outcome)

    def _reply(self, job: Job, outcome: Outcome) -> None:
        req = job.request
        if req.reply_to:
            sender = self._sender_for(req.reply_to)
            if sender is None:
                self.service.stats.reject("reply_unroutable")
            else:
                address = req.reply_to if sender == self._relay else None
                data = encode_reply(outcome.body, req.correlation_id, address)
                dlv = sender.delivery(str(next(self._tags)).encode())
                sender.send(data)
                sender.advance()
                dlv.settle()
        else:
            self.service.stats.reject("no_reply_to")
        dlv = job.delivery
        if not dlv.settled and dlv.link.state & Endpoint.LOCAL_ACTIVE:
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()

    def _sender_for(self, address: str) -> Link | None:
        link = self._dynamic.get(address)
        if link is not None:
            return link
        if self._broker_conn is None:
            return None
        if self._relay is not None:
            return self._relay
        link = self._senders.get(address)
        if link is not None and (link.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED)
                                 or link.session.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED)):
            # The broker refused or dropped it (a refused attach ends its whole session): try anew.
            del self._senders[address]
            self._close_sender(link)
            link = None
        if link is None:
            # One session per reply sender: a refused attach ends only its own session.
            link = self._broker_conn.session().sender(f"reply-{address}")
            link.snd_settle_mode = Link.SND_SETTLED
            link.target.address = address
            link.session.open()
            link.open()
            self._senders[address] = link
            while len(self._senders) > MAX_REPLY_SENDERS:
                _, old = self._senders.popitem(last=False)
                self._close_sender(old)
        else:
            self._senders.move_to_end(address)
        return link

    @staticmethod
    def _close_sender(link: Link) -> None:
        """Close a cached reply sender and its session (each has its own)."""
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()
        if not link.session.state & Endpoint.LOCAL_CLOSED:
            link.session.close()

    def on_agent_stop(self, event: Any) -> None:
        self.stop()
        self.container.stop()

    def stop(self) -> None:
        """Close listeners and connections (call on the reactor thread)."""
        if self.acceptor is not None:
            self.acceptor.close()
        if self._broker_conn is not None:
            self._broker_conn.close()
        self.workers.injector.close()
