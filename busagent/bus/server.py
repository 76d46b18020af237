"""The agent's bus side: serves method calls and publishes on proton's engine.

Lean by design: no per-event Python objects (see engine.py); credit topped up
in bulk. libvirt work runs on ``ReactorWorkers``.

Delivery guarantees:

* **direct mode**: replies and published messages go pre-settled (the peer is the
  consumer itself); a request is settled once its reply is on the wire.
* **broker mode**: requests come from a durable queue and are accepted only once the
  broker has taken their reply (replies go unsettled; the broker settles them): a
  request whose reply the broker may not have is delivered again (at-least-once).
  Published messages go unsettled too; what the broker had not settled when the
  connection dropped, and what was published while it was down, is sent again, in
  order, after the reconnection (``publish_buffer`` messages at most: beyond it the
  oldest are dropped, and consumers see the hole in ``kind_seq``).
* **write requests** (access ``write`` in the method table) are deduplicated by message
  id within a window (``dedup_ids``, ``dedup_seconds``): a redelivered request gets the
  first reply again and is never run twice; one arriving while the first still runs
  waits for it and gets the same reply.
* **deadlines**: a request past its ``ttl``/``absolute-expiry-time`` when a worker picks
  it up is answered ``expired`` and not run (``RpcService.handle``).
"""
from __future__ import annotations

import collections
import itertools
import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import structlog
from proton import Condition, Connection, Delivery, Endpoint, Message, Terminus, Transport, symbol
from proton import Link as PnLink

from busagent import credentials
from busagent.api.errors import AgentError, BadRequest, Internal, TooLarge
from busagent.api.table import load_table
from busagent.bus import tls
from busagent.bus.addressing import Profile, rpc_name
from busagent.bus.engine import Application, Engine, Link, _redact
from busagent.bus.envelope import decode_head, decode_request, encode_reply, reply_body
from busagent.bus.topics import Stamper, pattern_regex, presence_name
from busagent.bus.workers import ReactorWorkers
from busagent.config import ConfigError, Settings
from busagent.rpc import Deduplicator, Outcome, RpcService

log = structlog.get_logger("busagent.bus")
ANONYMOUS_RELAY = symbol("ANONYMOUS-RELAY")
MAX_REPLY_SENDERS = 1024
MAX_QUEUED_PER_SUBSCRIBER = 10_000
BATCH = 8  # at most this many requests per worker hand-off (only when more are waiting than workers)
UNINIT, ACTIVE, CLOSED = Endpoint.LOCAL_UNINIT, Endpoint.LOCAL_ACTIVE, Endpoint.LOCAL_CLOSED
R_ACTIVE, R_CLOSED = Endpoint.REMOTE_ACTIVE, Endpoint.REMOTE_CLOSED
_PUB, _REPLY = 0, 1  # kinds of unsettled deliveries (broker mode)
_TERMINAL = frozenset((Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED))


class Job:
    """A request in flight: its delivery (reactor-only), its decoded request, the broker
    connection it came on (``gen``) and its deduplication key (write requests)."""

    __slots__ = ("delivery", "request", "gen", "key")

    def __init__(self, delivery: Delivery, request: Any, gen: int = 0) -> None:
        self.delivery = delivery
        self.request = request
        self.gen = gen
        self.key = None


def write_methods(table: Any = None) -> frozenset[str]:
    """The C names whose access class is ``write`` (deduplicated by message id)."""
    table = table if table is not None else load_table()
    return frozenset(name for name, m in table.methods.items() if m.access == "write")


def _each(head: Any, mask: int) -> list[Any]:
    """Every session or link of a connection whose state has all bits of ``mask``."""
    out, endpoint = [], head(mask)
    while endpoint is not None:
        out.append(endpoint)
        endpoint = endpoint.next(mask)
    return out


def _close_with_session(link: Any) -> None:
    """Close a broker-mode reply sender and the session it has to itself."""
    if not link.state & CLOSED:
        link.close()
    if not link.session.state & CLOSED:
        link.session.close()


class AgentBus(Application):
    """Accepts (direct mode) or opens (broker mode) AMQP connections; serves and publishes."""

    def __init__(self, settings: Settings, profile: Profile, host_id: str, service: RpcService) -> None:
        self.settings = settings
        self.profile = profile
        self.host_id = host_id
        logical = rpc_name(settings.namespace, host_id)
        self.rpc_address = profile.request_queue(logical)  # consumed here
        self.rpc_target = profile.request_target(logical)  # where clients send
        self.service = service
        self.engine = Engine(self)
        self.workers = ReactorWorkers(settings.workers, self.engine.call_soon_threadsafe, self._on_results)
        self.credit = settings.credit
        self.stamper = Stamper()
        self.published = collections.Counter()
        self._tags = itertools.count()
        self._batch: list[Job] = []
        self._running: dict[int, Job] = {}  # job number -> Job, while a worker runs its request
        self._job_numbers = itertools.count()
        self._writes = write_methods(getattr(service.dispatcher, "table", None))
        self.dedup = Deduplicator(settings.dedup_ids, settings.dedup_seconds)
        self._dynamic: dict[str, PnLink] = {}  # direct mode: reply address -> sender link
        self._subscriptions: list[tuple[Any, PnLink]] = []  # direct mode: (pattern regex, sender)
        # broker mode: everything below belongs to the current connection and goes with it
        self._broker: Link | None = None
        self._gen = 0  # broker connections lost so far: a job from an older one has no delivery to settle
        self._up = False  # connected, and this connection's endpoints made
        self._senders: OrderedDict[str, PnLink] = OrderedDict()  # reply senders, one session each
        self._topics: dict[str, PnLink] = {}  # publishing senders, all in one session (one order)
        self._pub_session: Any = None
        self._relay: PnLink | None = None
        self._rpc_receiver: PnLink | None = None
        self._rpc_fallback = False  # the durable request queue was refused: consume the existing one
        # tag -> (_PUB, entry, sender, delivery) | (_REPLY, job, sender, delivery), in the order sent
        self._unsettled: OrderedDict[bytes, tuple] = OrderedDict()
        self._resend: collections.deque[tuple] = collections.deque()  # (address, body, subject, ttl)
        self._held: collections.deque[tuple] = collections.deque()  # (entry, sender): waiting for credit
        self._overflow = 0  # messages dropped from a full publish buffer since the last reconnection
        self.resent = 0  # published messages sent from the buffer once (re)connected
        self.unconfirmed = 0  # published messages the broker had not settled when a connection dropped
        self._outbox: collections.deque[tuple[str, str, dict]] = collections.deque()
        self._outbox_lock = threading.Lock()
        self._outbox_pending = False
        self._stopped = False
        self.listening: tuple[str, int] | None = None
        self._server_mechs = "ANONYMOUS"
        self.last_broker_error = ""  # why the last broker connection ended (or failed to start)
        self.broker_ready = threading.Event()

    @property
    def properties(self) -> dict[Any, Any]:
        return {symbol("busagent-host"): self.host_id, symbol("busagent-rpc"): self.rpc_target,
                symbol("busagent-epoch"): self.stamper.epoch}

    # -- start-up -------------------------------------------------------------------------
    def start(self) -> None:
        """Listen or connect (before ``run``)."""
        if self.settings.mode == "direct":
            self.engine.ssl_server = tls.server_domain(self.settings)
            self._server_mechs = tls.server_mechanisms(self.settings)
            host, _, port = self.settings.listen.rpartition(":")
            self.listening = self.engine.listen(host.strip("[]") or "127.0.0.1", int(port))
            log.info("listening", address=f"{self.listening[0]}:{self.listening[1]}", rpc=self.rpc_address,
                     tls=self.engine.ssl_server is not None, sasl=self._server_mechs)
            return
        urls = tuple(self.settings.broker_urls)
        self._configure_client_security(urls)
        self._broker = self.engine.connect(self._new_connection, urls, self.settings.reconnect_max_delay)
        log.info("connecting", urls=[_redact(u) for u in urls], rpc=self.rpc_address)

    def _configure_client_security(self, urls: tuple[str, ...]) -> None:
        """Broker mode: TLS for amqps:// URLs, SASL credentials from the file or the environment."""
        try:
            creds = credentials.load(self.settings.credentials_file or None)
        except credentials.CredentialsError as exc:
            raise ConfigError(str(exc)) from None
        if creds is not None:
            self.engine.credentials = (creds.user, creds.password)
        if any(u.startswith("amqps:") for u in urls):
            self.engine.ssl_client = tls.client_domain(self.settings)
            self.engine.client_certificate = bool(self.settings.tls_cert)
        for url in urls:
            if url.startswith("amqp:") and (creds is not None or urlsplit(url).password):
                log.warning("password sent in clear: use amqps:// to protect it", url=_redact(url))

    def _new_connection(self) -> Connection:
        """A fresh connection for each attempt (the engine's factory)."""
        conn = Connection()
        conn.container = f"busagent-{self.host_id}-{uuid.uuid4().hex[:8]}"
        conn.properties = self.properties
        conn.open()
        return conn

    def run(self) -> None:
        self.engine.run()

    def stop_threadsafe(self) -> None:
        self.engine.call_soon_threadsafe(self.stop)

    def stop(self, grace: float = 2.0) -> None:
        """Say death, let the broker settle what is unsettled (``grace`` s at most), close, stop
        the loop (reactor thread)."""
        if self._stopped:
            return
        self._stopped = True
        if getattr(self, "_presence", None):
            self._presence_beat("death")
        deadline = time.monotonic() + grace

        def finish() -> None:
            if self._up and (self._unsettled or self._held) and time.monotonic() < deadline:
                self.engine.call_later(0.01, finish)
                return
            if self._broker is not None:
                self.engine.close_link(self._broker)
            for link in list(self.engine.links.values()):
                if link.connection.state & ACTIVE:
                    link.connection.close()
            self.engine.stop()

        finish()

    # -- engine callbacks -----------------------------------------------------------------
    def configure_server_transport(self, transport: Transport, conn: Connection) -> None:
        transport.sasl().allowed_mechs(self._server_mechs)
        conn.container = f"busagent-{self.host_id}"
        conn.properties = self.properties

    def connected(self, link: Link) -> None:
        link.app["remote_open"] = False

    def connection_lost(self, link: Link, reason: str) -> None:
        conn = link.connection
        if link is self._broker:
            self._broker_lost(reason)
            return
        for address, snd in list(self._dynamic.items()):
            if snd.connection == conn:
                del self._dynamic[address]
        self._subscriptions = [(rx, s) for rx, s in self._subscriptions if s.connection != conn]
        if "principal" not in link.app and self.engine.ssl_server is not None:
            # never got past TLS and SASL: a refused peer (bad, expired or unknown certificate,
            # no certificate, or not speaking TLS), counted and logged for the operator
            why = "connection_tls" if "SSL" in reason else "connection_auth"
            self.service.stats.reject(why)
            log.warning("peer refused", reason=reason, rejected=why)
        elif not reason.startswith("amqp:connection:forced"):
            log.debug("peer disconnected", reason=reason)

    def _broker_lost(self, reason: str) -> None:
        """Forget the lost connection's endpoints; keep what the broker had not settled for resending.

        Requests it delivered and that were not accepted go back to their queue at the broker
        (and come again); jobs still running on them finish, answer through the next connection
        if there is one, and settle nothing (``gen``).
        """
        self._gen += 1
        self.last_broker_error = reason
        self._up = False
        self.broker_ready.clear()
        unsent = [rec[1] for rec in self._unsettled.values() if rec[0] == _PUB]  # in the order sent
        self.unconfirmed += len(unsent)
        unsent += [entry for entry, _ in self._held]
        self._unsettled.clear()
        self._held.clear()
        if unsent:
            self._resend.extendleft(reversed(unsent))
            self._trim_resend()
        self._senders.clear()
        self._topics.clear()
        self._pub_session = self._relay = self._rpc_receiver = None
        (log.info if self._stopped else log.warning)(
            "broker connection lost", reason=reason, unsettled_published=len(unsent), to_resend=len(self._resend))

    def process(self, link: Link) -> None:
        conn = link.connection
        if conn.state & UNINIT:
            conn.open()
        if link.server and "principal" not in link.app and conn.state & R_ACTIVE:
            link.app["principal"] = tls.authenticated_principal(link.transport)  # SASL is done by now
        if link is self._broker:
            if not link.app.get("remote_open") and conn.state & R_ACTIVE:
                link.app["remote_open"] = True
                self._resume_broker(link, conn)
            if self._held:
                self._release_held()
            if self._unsettled:
                self._settlements()
        for ssn in _each(conn.session_head, UNINIT | R_ACTIVE):
            ssn.open()
        for lnk in _each(conn.link_head, UNINIT | R_ACTIVE):
            self._attach(lnk, link)
        for rcv in _each(conn.link_head, ACTIVE | R_ACTIVE) if link.app.get("has_receivers") else ():
            if rcv.is_receiver:
                self._receive(rcv, link)
        if self._batch:
            self._submit_batch()
        for lnk in _each(conn.link_head, ACTIVE | R_CLOSED):
            self._forget(lnk)
            lnk.close()
        for ssn in _each(conn.session_head, ACTIVE | R_CLOSED):
            if link is self._broker:
                self._session_ended(ssn)
            ssn.close()
        if conn.state & R_CLOSED and conn.state & ACTIVE:
            conn.close()

    # -- endpoints ------------------------------------------------------------------------
    def _attach(self, link: PnLink, owner: Link) -> None:
        if link.is_receiver:
            owner.app["has_receivers"] = True
            address = link.remote_target.address
            if address != self.rpc_address:
                self._refuse(link, f"this agent serves {self.rpc_address}, not {address}")
                return
            link.target.address = address
            link.open()
            link.flow(self.credit)
            return
        source = link.remote_source
        if source.dynamic:
            address = f"{self.rpc_address}.reply.{uuid.uuid4().hex}"
            link.source.address = address
            link.snd_settle_mode = PnLink.SND_SETTLED
            self._dynamic[address] = link
            link.open()
            return
        pattern = source.address or ""
        if pattern.startswith(f"{self.settings.namespace}.") or pattern.startswith("#"):
            policy = self.service.policy
            if policy is not None:  # direct mode: what is published is for principals with a role
                try:
                    policy.role_of(owner.app.get("principal"))
                except AgentError as exc:
                    self.service.stats.reject("unauthorized_subscription")
                    self._refuse(link, str(exc), "amqp:unauthorized-access")
                    return
            link.source.address = pattern
            link.snd_settle_mode = PnLink.SND_SETTLED
            self._subscriptions.append((pattern_regex(pattern), link))
            link.open()
            return
        self._refuse(link, f"no such source: {pattern!r}")

    def _refuse(self, link: PnLink, why: str, condition: str = "amqp:not-found") -> None:
        link.condition = Condition(condition, why)
        link.open()
        link.close()

    def _session_ended(self, ssn: Any) -> None:
        """The broker ended a session (RabbitMQ does, rather than detach, when it refuses an attach):
        its links are as good as closed."""
        cond = ssn.remote_condition
        mine = [self._rpc_receiver, self._relay, *self._topics.values(), *self._senders.values()]
        for lnk in mine:
            if lnk is not None and lnk.session == ssn and lnk.state & ACTIVE:
                self._forget(lnk, cond)
                lnk.close()

    def _forget(self, link: PnLink, cond: Condition | None = None) -> None:
        """The peer closed ``link`` (or its session, with ``cond``) (reactor thread)."""
        address = link.source.address
        if address and self._dynamic.get(address) == link:
            del self._dynamic[address]
        if self._subscriptions:
            self._subscriptions = [(rx, s) for rx, s in self._subscriptions if s != link]
        if self._broker is None or link.connection != self._broker.connection:
            return
        if link == self._relay:
            self._relay = None
        if link == self._rpc_receiver:
            self._rpc_refused(link.remote_condition or cond)
        if link.is_sender and (self._unsettled or self._held):
            self._abandon(link)

    def _abandon(self, link: PnLink) -> None:
        """A sender the broker closed: its unsettled deliveries will never be settled.

        A reply's request is accepted all the same (its reply address is gone: running it again
        would not help); a published message whose sender failed (not a lost connection) is
        dropped, counted, and shows as a hole in ``kind_seq``.
        """
        for tag, rec in [(t, r) for t, r in self._unsettled.items() if r[2] == link]:
            del self._unsettled[tag]
            if rec[0] == _REPLY:
                self._accept(rec[1])
            else:
                self.published["dropped"] += 1
        if self._held and any(snd == link for _, snd in self._held):
            kept = collections.deque((e, snd) for e, snd in self._held if snd != link)
            self.published["dropped"] += len(self._held) - len(kept)
            self._held = kept
        if link.session == self._pub_session:
            self._pub_session = None
            self._topics = {a: s for a, s in self._topics.items() if s != link and s.session != link.session}
        for address, snd in list(self._senders.items()):
            if snd == link:
                del self._senders[address]

    def _rpc_refused(self, cond: Condition | None) -> None:
        """The broker refused (or ended) the request receiver: attach again, once per second.

        RabbitMQ 3 refuses a durable /queue/ attach when a non-durable queue of that name
        exists (an older agent, or a client that made it): then consume the existing queue
        (/amq/queue/NAME declares nothing), and say that its requests do not survive a restart.
        """
        why = f"{cond.name}: {cond.description}" if cond else "closed by the broker"
        self._rpc_receiver = None
        if "inequivalent" in why and self.profile.durable_queue and not self._rpc_fallback:
            self._rpc_fallback = True
            log.error("the request queue exists and is not durable: consuming it as it is (its requests do not "
                      "survive a broker restart; delete it to have it made durable)", queue=self.rpc_address)
        else:
            log.error("request receiver closed by the broker; attaching again in 1 s", reason=why)
        gen = self._gen

        def again() -> None:
            if self._up and self._gen == gen and self._rpc_receiver is None:
                self._attach_rpc_receiver(self._broker.connection)
                self.engine.mark_work(self._broker)
        self.engine.call_later(0 if self._rpc_fallback and "inequivalent" in why else 1.0, again)

    def _resume_broker(self, link: Link, conn: Connection) -> None:
        """Connected (again) to the broker: consume requests, then send what waits to be sent again."""
        self._attach_rpc_receiver(conn)
        offered = list(conn.remote_offered_capabilities or [])
        if ANONYMOUS_RELAY in offered:
            self._relay = self._publishing_sender(conn, "busagent-relay", None)
        self._up = True
        self.engine.reset_backoff(link)
        self.broker_ready.set()
        resend, self._resend = self._resend, collections.deque()
        for entry in resend:
            self._publish_entry(entry)
        self.resent += len(resend)
        log.info("broker connected", url=_redact(link.url), relay=self._relay is not None, resent=len(resend),
                 dropped=self._overflow)
        self._overflow = 0

    def _attach_rpc_receiver(self, conn: Connection) -> None:
        session = conn.session()
        session.open()
        rcv = session.receiver(f"rpc-{self.rpc_address}")
        if self._rpc_fallback:
            rcv.source.address = self.rpc_target
        else:
            rcv.source.address = self.rpc_address
            if self.profile.durable_queue:
                rcv.source.durability = Terminus.CONFIGURATION
        rcv.target.address = self.rpc_address
        rcv.open()
        rcv.flow(self.credit)
        self._rpc_receiver = rcv
        self._broker.app["has_receivers"] = True

    def _publishing_sender(self, conn: Connection, name: str, address: str | None) -> PnLink:
        """A sender in the one publishing session (unsettled deliveries: the broker settles them)."""
        if self._pub_session is None:
            self._pub_session = conn.session()
            self._pub_session.open()
        snd = self._pub_session.sender(name)
        snd.target.address = address
        snd.open()
        return snd

    def _new_sender(self, conn: Connection, name: str, address: str | None) -> PnLink:
        """A reply sender with a session of its own (RabbitMQ ends the session of a refused attach)."""
        ssn = conn.session()
        ssn.open()
        snd = ssn.sender(name)
        snd.target.address = address
        snd.open()
        return snd

    def _settlements(self) -> None:
        """Deliveries the broker settled, oldest first: a published message is done, a reply's
        request is accepted. (RabbitMQ settles in order; one still unsettled holds back the
        ones behind it, which are only looked at once it is settled.)"""
        unsettled = self._unsettled
        while unsettled:
            tag, rec = next(iter(unsettled.items()))
            dlv = rec[3]
            state = dlv.remote_state
            if not dlv.settled and state not in _TERMINAL:
                return
            del unsettled[tag]
            dlv.settle()
            if rec[0] == _REPLY:
                self._accept(rec[1])
            elif state != Delivery.ACCEPTED:
                self.published["not_accepted"] += 1

    # -- requests -------------------------------------------------------------------------
    OVERSIZE_PREFIX = 64 << 10  # bytes kept of a message over max_message_bytes: its properties come first
    OVERSIZE_HARD_CAP = 1 << 30  # backstop: a message still streaming past this closes its link

    def _receive(self, link: PnLink, owner: Link) -> None:
        """Take every message waiting on a receiver (``owner``: its connection).

        What has come of a message still arriving is read at once into a buffer of ours: proton
        keeps a settled delivery's buffer at its largest size for reuse within the connection,
        so letting whole messages pile up there would pin that memory for the connection's life.
        A message over ``max_message_bytes`` is read and dropped as it streams (only its first
        bytes are kept), then answered ``too_large``: the link and the requests behind it go on."""
        limit = self.settings.max_message_bytes
        while True:
            dlv = link.current
            if dlv is None or not dlv.readable:
                return
            if dlv.aborted:
                self._aborted(dlv, link, owner)
                continue
            streams = owner.app.get("streams")
            if dlv.partial or dlv.pending > limit or (streams and link.name in streams):
                if not self._stream(dlv, link, owner):
                    return
                continue
            self._delivery(dlv, link, owner)

    def _stream(self, dlv: Delivery, link: PnLink, owner: Link) -> bool:
        """Read what has come of a message arriving in pieces; once it is all in, serve it (or answer
        ``too_large``, keeping only its first OVERSIZE_PREFIX bytes past the limit). True when done."""
        streams = owner.app.setdefault("streams", {})
        state = streams.get(link.name)
        if state is None or state[0] != dlv:
            state = streams[link.name] = [dlv, bytearray(), 0]  # delivery, bytes kept, bytes seen
        buf, limit = state[1], self.settings.max_message_bytes
        while chunk := link.recv(1 << 16):
            state[2] += len(chunk)
            if state[2] <= limit:
                buf += chunk
            elif len(buf) < self.OVERSIZE_PREFIX:
                buf += chunk[:self.OVERSIZE_PREFIX - len(buf)]
            elif len(buf) > self.OVERSIZE_PREFIX:
                del buf[self.OVERSIZE_PREFIX:]
        if state[2] > self.OVERSIZE_HARD_CAP:
            del streams[link.name]
            self.service.stats.reject("too_large")
            link.condition = Condition("amqp:link:message-size-exceeded",
                                       f"message over {self.OVERSIZE_HARD_CAP} bytes")
            link.close()
            return False
        if dlv.partial:
            return False
        del streams[link.name]
        link.advance()
        self._top_up(link)
        if state[2] <= limit:
            self._request(dlv, bytes(buf), owner)
            return True
        err = TooLarge(f"the message is {state[2]} bytes, over max_message_bytes = {limit}",
                       limit="max_message_bytes", max=limit)
        self._refuse_unread(dlv, bytes(buf), owner, err, "too_large")
        return True

    def _aborted(self, dlv: Delivery, link: PnLink, owner: Link) -> None:
        """The sender gave up a message midway: drop it (settling it moves the link past it)."""
        streams = owner.app.get("streams")
        if streams:
            streams.pop(link.name, None)
        self.service.stats.reject("aborted")
        dlv.settle()
        self._top_up(link)

    def _top_up(self, link: PnLink) -> None:
        if link.credit < self.credit // 2:
            link.flow(self.credit - link.credit)

    def _refuse_unread(self, dlv: Delivery, data: bytes, owner: Link, err: AgentError, reason: str) -> None:
        """A message refused before it could be read whole (oversized, undecodable; ``data``: what
        there is of it): counted by ``reason``; answered with ``err`` when its properties give a
        reply address, else rejected."""
        self.service.stats.reject(reason)
        try:
            request = decode_head(data)
        except Exception:
            request = None
        if request is None or not request.reply_to:
            dlv.local.condition = Condition("amqp:link:message-size-exceeded" if reason == "too_large"
                                            else "amqp:decode-error", err.message)
            dlv.update(Delivery.REJECTED)
            dlv.settle()
            return
        request.principal = self._principal(owner, request)
        self._reply(Job(dlv, request, self._gen), Outcome(reply_body(error=err), "(unknown)", err.kind, 0.0))

    def _principal(self, owner: Link, request: Any) -> str | None:
        """Who sent a request: the connection's authenticated identity (direct mode) or the
        user-id the broker validated (broker mode); None when unauthenticated."""
        if owner is self._broker:
            uid = request.user_id
            if isinstance(uid, (bytes, memoryview)):
                try:
                    return bytes(uid).decode("utf-8") or None
                except UnicodeDecodeError:
                    return None
            return uid or None
        return owner.app.get("principal")

    def _delivery(self, dlv: Delivery, link: PnLink, owner: Link) -> None:
        """A message that arrived whole in one read."""
        data = link.recv(dlv.pending)
        link.advance()
        self._top_up(link)
        self._request(dlv, data, owner)

    def _request(self, dlv: Delivery, data: bytes, owner: Link) -> None:
        """Decode one request and queue it for the workers (or answer it from the dedup window)."""
        try:
            request = decode_request(data)
        except Exception as exc:  # undecodable: answered if its properties still give a reply address
            self._refuse_unread(dlv, data, owner, BadRequest(f"the message does not decode: {type(exc).__name__}"),
                                "undecodable")
            return
        request.principal = self._principal(owner, request)
        job = Job(dlv, request, self._gen)
        if request.message_id is not None and request.subject in self._writes:
            # the principal is part of the key: another peer reusing a message id neither gets
            # this one's reply nor has its own request answered with it
            key = (request.principal, request.subject, request.message_id)
            what, body = self.dedup.begin(key, job)
            if what is not Deduplicator.RUN:
                self.service.stats.reject("duplicate")
                if body is not None:
                    self._reply(job, Outcome(body, request.subject, "duplicate", 0.0))
                return  # else it waits for the first one
            job.key = key
        self._batch.append(job)

    def _submit_batch(self) -> None:
        """Hand what one read brought to the workers, a few requests per hand-off.

        Workers get (job number, request) only: the Job, which holds a proton delivery, stays
        here. A worker thread holding the last reference to a proton wrapper would free it
        there (pn_decref), racing the reactor's use of the same connection."""
        jobs, self._batch = self._batch, []
        items = []
        for job in jobs:
            number = next(self._job_numbers)
            self._running[number] = job
            items.append((number, job.request))
        per = max(1, min(BATCH, -(-len(items) // self.settings.workers)))
        for i in range(0, len(items), per):
            self.workers.submit_many(self._handle, items[i:i + per])

    def _handle(self, item: tuple[int, Any]) -> Outcome:
        return self.service.handle(item[1])  # on a worker thread: plain data only

    def _on_results(self, results: list[tuple[tuple[int, Any], Any]]) -> None:
        for (number, _request), outcome in results:
            job = self._running.pop(number)
            if not isinstance(outcome, Outcome):  # a bug escaped RpcService: still answer
                outcome = Outcome(reply_body(error=Internal(f"{outcome!r}")), "(unknown)", "internal", 0.0)
            self._reply(job, outcome)
            if job.key is not None:
                for waiting in self.dedup.finish(job.key, outcome.body):
                    self._reply(waiting, outcome)

    def _reply(self, job: Job, outcome: Outcome) -> None:
        req = job.request
        if req.reply_to:
            if self._broker is None:  # direct mode: the reply goes pre-settled on the caller's link
                sender = self._dynamic.get(req.reply_to)
                if sender is None:
                    self.service.stats.reject("reply_unroutable")
                else:
                    self._send(sender, encode_reply(outcome.body, req.correlation_id, None))
            else:
                sender = self._sender_for(req.reply_to)
                if sender is None:
                    self.service.stats.reject("reply_unroutable")
                else:
                    to = req.reply_to if sender == self._relay else None
                    tag = str(next(self._tags)).encode()
                    dlv = sender.delivery(tag)
                    sender.send(encode_reply(outcome.body, req.correlation_id, to))
                    sender.advance()
                    self._unsettled[tag] = (_REPLY, job, sender, dlv)
                    return  # accepted when the broker settles the reply
        else:
            self.service.stats.reject("no_reply_to")
        self._accept(job)

    def _accept(self, job: Job) -> None:
        """Settle a request (accepted), unless it came on a broker connection since lost.

        A request the peer sent pre-settled (``dlv.settled``: settled at the remote end) is
        settled here too: until both ends have, proton keeps the delivery and its buffer."""
        dlv = job.delivery
        if job.gen != self._gen:
            return
        if not dlv.settled and dlv.link.state & ACTIVE:
            dlv.update(Delivery.ACCEPTED)
        dlv.settle()

    def _send(self, sender: PnLink, data: bytes) -> None:
        """Send pre-settled (direct mode)."""
        dlv = sender.delivery(str(next(self._tags)).encode())
        sender.send(data)
        sender.advance()
        dlv.settle()

    def _sender_for(self, address: str) -> PnLink | None:
        """Broker mode: the sender for a reply address (the relay, else one per address)."""
        if not self._up:
            return None
        if self._relay is not None:
            return self._relay
        link = self._senders.get(address)
        if link is not None and (link.state & (CLOSED | R_CLOSED) or link.session.state & (CLOSED | R_CLOSED)):
            # The broker refused or dropped it (RabbitMQ ends the whole session of a refused
            # attach): forget it and attach anew, or every later reply here would be lost.
            self._abandon(link)
            self._senders.pop(address, None)
            _close_with_session(link)
            link = None
        if link is None:
            # One session per reply sender, so that a refused attach ends only its own.
            link = self._new_sender(self._broker.connection, f"reply-{address}", address)
            self._senders[address] = link
            while len(self._senders) > MAX_REPLY_SENDERS:
                _, old = self._senders.popitem(last=False)
                self._abandon(old)
                _close_with_session(old)  # its session too: sessions are channels at the broker
        else:
            self._senders.move_to_end(address)
        return link

    # -- publishing -----------------------------------------------------------------------
    def publish_threadsafe(self, name: str, subject: str, doc: dict[str, Any]) -> None:
        """Queue a message for ``name`` from any thread (stamped and sent on the reactor)."""
        self._outbox.append((name, subject, doc))
        with self._outbox_lock:
            if self._outbox_pending:
                return
            self._outbox_pending = True
        self.engine.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            self._outbox_pending = False
        box = self._outbox
        while box:
            self.publish(*box.popleft())

    def publish(self, name: str, subject: str, doc: dict[str, Any], ttl: float | None = None) -> int:
        """Stamp (epoch, seq) and send one message on ``name`` (reactor thread).

        Returns how many receivers it went to (direct mode), or 1 when it went to the broker or
        waits to (broker mode: sent when connected, else kept for the reconnection).
        """
        doc.update(self.stamper.stamp(name))
        body = json.dumps(doc, separators=(",", ":"), default=str).encode()
        self.published[subject] += 1
        if self._broker is not None:
            entry = (self.profile.topic(name), body, subject, ttl)
            if self._up:
                self._publish_entry(entry)
            else:
                self._resend.append(entry)
                self._trim_resend()
            return 1
        sent, data = 0, None
        for rx, link in self._subscriptions:
            if rx.match(name) is None:
                continue
            if link.queued > MAX_QUEUED_PER_SUBSCRIBER:  # a stalled consumer: it sees the gap in seq
                self.published["dropped"] += 1
                continue
            if data is None:
                data = _encode_published(body, subject, None, ttl)
            self._send(link, data)
            sent += 1
        return sent

    def _publish_entry(self, entry: tuple) -> None:
        """Broker mode, connected: send one published message unsettled and remember it until settled.

        One sender per name: a new one has no credit until the broker answers its attach, and
        what it holds would be overtaken by messages on older senders. So a message waits (in
        ``_held``) while its sender has no credit, and every later one waits behind it: the
        broker gets them all in the order stamped.
        """
        address = entry[0]
        sender = self._relay
        if sender is None:
            sender = self._topics.get(address)
            if sender is None:
                sender = self._topics[address] = self._publishing_sender(self._broker.connection,
                                                                         f"publish-{address}", address)
        if self._held or sender.credit <= 0:
            self._held.append((entry, sender))
            return
        self._transmit(entry, sender)

    def _release_held(self) -> None:
        """Send the held messages, in order, as far as their senders have credit (reactor thread)."""
        held = self._held
        while held:
            entry, sender = held[0]
            if sender.credit <= 0:
                return
            held.popleft()
            self._transmit(entry, sender)

    def _transmit(self, entry: tuple, sender: PnLink) -> None:
        address, body, subject, ttl = entry
        tag = str(next(self._tags)).encode()
        dlv = sender.delivery(tag)
        sender.send(_encode_published(body, subject, address if sender is self._relay else None, ttl))
        sender.advance()
        self._unsettled[tag] = (_PUB, entry, sender, dlv)

    def _trim_resend(self) -> None:
        limit = self.settings.publish_buffer
        drop = len(self._resend) - limit
        if drop > 0:
            for _ in range(drop):
                self._resend.popleft()
            self.published["dropped"] += drop
            if not self._overflow:
                log.warning("publish buffer full: dropping the oldest messages", limit=limit)
            self._overflow += drop

    # -- presence -------------------------------------------------------------------------
    def start_presence(self, interval: float, info: dict[str, Any]) -> None:
        """Birth now, a heartbeat every ``interval`` (each lives three intervals)."""
        self._presence = (interval, info)
        self.engine.call_soon_threadsafe(lambda: self._presence_beat("birth"))

    def _presence_beat(self, state: str) -> None:
        interval, info = self._presence
        self.publish(presence_name(self.settings.namespace, self.host_id), "presence",
                     {"kind": "presence", "host": self.host_id, "state": state, "ttl": interval * 3, **info},
                     ttl=interval * 3)
        if state != "death" and not self._stopped:
            self.engine.call_later(interval, lambda: self._presence_beat("alive"))


def _encode_published(body: bytes, subject: str, address: str | None, ttl: float | None) -> bytes:
    """A published message: the fast encoder, or proton's for a time-to-live (presence; rare)."""
    if ttl is None:
        return encode_reply(body, None, address, subject)
    msg = Message(body=body, inferred=True, subject=subject, content_type="application/json", ttl=ttl,
                  durable=False, address=address)
    return msg.encode()
