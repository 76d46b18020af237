"""The agent's bus side: serves method calls and publishes on proton's engine.

Lean by design: no per-event Python objects (see engine.py); credit topped up
in bulk; replies sent pre-settled; a request is settled once its reply is on
the wire. libvirt work runs on ``ReactorWorkers``.
"""
from __future__ import annotations

import collections
import itertools
import json
import threading
import uuid
from collections import OrderedDict
from typing import Any

import structlog
from proton import Condition, Connection, Delivery, Endpoint, Message, Transport, symbol
from proton import Link as PnLink

from busagent.api.errors import Internal
from busagent.bus.addressing import Profile, rpc_name
from busagent.bus.engine import Application, Engine, Link, _redact
from busagent.bus.envelope import decode_request, encode_reply, reply_body
from busagent.bus.topics import Stamper, pattern_regex, presence_name
from busagent.bus.workers import ReactorWorkers
from busagent.config import Settings
from busagent.rpc import Outcome, RpcService

log = structlog.get_logger("busagent.bus")
ANONYMOUS_RELAY = symbol("ANONYMOUS-RELAY")
MAX_REPLY_SENDERS = 1024
MAX_QUEUED_PER_SUBSCRIBER = 10_000
BATCH = 8  # at most this many requests per worker hand-off (only when more are waiting than workers)
UNINIT, ACTIVE, CLOSED = Endpoint.LOCAL_UNINIT, Endpoint.LOCAL_ACTIVE, Endpoint.LOCAL_CLOSED
R_ACTIVE, R_CLOSED = Endpoint.REMOTE_ACTIVE, Endpoint.REMOTE_CLOSED


class Job:
    """A request in flight: its delivery (reactor-only) and its decoded request."""

    __slots__ = ("delivery", "request")

    def __init__(self, delivery: Delivery, request: Any) -> None:
        self.delivery = delivery
        self.request = request


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
        self.rpc_address = profile.request_queue(rpc_name(settings.namespace, host_id))
        self.service = service
        self.engine = Engine(self)
        self.workers = ReactorWorkers(settings.workers, self.engine.call_soon_threadsafe, self._on_results)
        self.credit = settings.credit
        self.stamper = Stamper()
        self.published = collections.Counter()
        self._tags = itertools.count()
        self._batch: list[Job] = []
        self._dynamic: dict[str, PnLink] = {}  # direct mode: reply address -> sender link
        self._subscriptions: list[tuple[Any, PnLink]] = []  # direct mode: (pattern regex, sender)
        self._senders: OrderedDict[str, PnLink] = OrderedDict()  # broker mode: per-address cache
        self._relay: PnLink | None = None
        self._rpc_receiver: PnLink | None = None
        self._broker: Link | None = None
        self._outbox: collections.deque[tuple[str, str, dict]] = collections.deque()
        self._outbox_lock = threading.Lock()
        self._outbox_pending = False
        self.listening: tuple[str, int] | None = None
        self.broker_ready = threading.Event()

    @property
    def properties(self) -> dict[Any, Any]:
        return {symbol("busagent-host"): self.host_id, symbol("busagent-rpc"): self.rpc_address,
                symbol("busagent-epoch"): self.stamper.epoch}

    # -- start-up -------------------------------------------------------------------------
    def start(self) -> None:
        """Listen or connect (before ``run``)."""
        if self.settings.mode == "direct":
            host, _, port = self.settings.listen.rpartition(":")
            self.listening = self.engine.listen(host.strip("[]") or "127.0.0.1", int(port))
            log.info("listening", address=f"{self.listening[0]}:{self.listening[1]}", rpc=self.rpc_address)
            return
        conn = Connection()
        conn.container = f"busagent-{self.host_id}-{uuid.uuid4().hex[:8]}"
        conn.properties = self.properties
        conn.open()
        urls = tuple(self.settings.broker_urls)
        self._broker = self.engine.connect(conn, urls)
        log.info("connecting", urls=[_redact(u) for u in urls], rpc=self.rpc_address)

    def run(self) -> None:
        self.engine.run()

    def stop_threadsafe(self) -> None:
        self.engine.call_soon_threadsafe(self.stop)

    def stop(self) -> None:
        """Close connections and stop the loop (reactor thread)."""
        if getattr(self, "_presence", None):
            self._presence_beat("death")
        if self._broker is not None:
            self.engine.close_link(self._broker)
        for link in list(self.engine.links.values()):
            if link.connection.state & ACTIVE:
                link.connection.close()
        self.engine.stop()

    # -- engine callbacks -----------------------------------------------------------------
    def configure_server_transport(self, transport: Transport, conn: Connection) -> None:
        transport.sasl().allowed_mechs("ANONYMOUS")
        conn.container = f"busagent-{self.host_id}"
        conn.properties = self.properties

    def connected(self, link: Link) -> None:
        link.app["remote_open"] = False

    def connection_lost(self, link: Link, reason: str) -> None:
        conn = link.connection
        for address, snd in list(self._dynamic.items()):
            if snd.connection == conn:
                del self._dynamic[address]
        self._subscriptions = [(rx, s) for rx, s in self._subscriptions if s.connection != conn]
        if link is self._broker:
            self.broker_ready.clear()
            log.warning("broker connection lost", reason=reason)
        elif not reason.startswith("amqp:connection:forced"):
            log.debug("peer disconnected", reason=reason)

    def process(self, link: Link) -> None:
        conn = link.connection
        if conn.state & UNINIT:
            conn.open()
        if link is self._broker and not link.app.get("remote_open") and conn.state & R_ACTIVE:
            link.app["remote_open"] = True
            self._resume_broker(conn)
        for ssn in _each(conn.session_head, UNINIT | R_ACTIVE):
            ssn.open()
        for lnk in _each(conn.link_head, UNINIT | R_ACTIVE):
            self._attach(lnk, link)
        for rcv in _each(conn.link_head, ACTIVE | R_ACTIVE) if link.app.get("has_receivers") else ():
            if rcv.is_receiver:
                self._receive(rcv)
        if self._batch:
            self._submit_batch()
        for lnk in _each(conn.link_head, ACTIVE | R_CLOSED):
            self._forget(lnk)
            lnk.close()
        for ssn in _each(conn.session_head, ACTIVE | R_CLOSED):
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
            link.source.address = pattern
            link.snd_settle_mode = PnLink.SND_SETTLED
            self._subscriptions.append((pattern_regex(pattern), link))
            link.open()
            return
        self._refuse(link, f"no such source: {pattern!r}")

    def _refuse(self, link: PnLink, why: str) -> None:
        link.condition = Condition("amqp:not-found", why)
        link.open()
        link.close()

    def _forget(self, link: PnLink) -> None:
        address = link.source.address
        if address and self._dynamic.get(address) == link:
            del self._dynamic[address]
        self._subscriptions = [(rx, s) for rx, s in self._subscriptions if s != link]
        if link == self._relay:
            self._relay = None

    def _resume_broker(self, conn: Connection) -> None:
        """(Re)connected to the broker: make sure this agent's requests are consumed.

        On the first connection, attach the request receiver. On a reconnection, proton
        re-attaches what is still open locally; what the broker ended ('end' with
        'shutdown' when RabbitMQ stops) stays closed and is made anew. Reply senders
        that proton re-attached are cached again rather than leaked.
        """
        def usable(lnk: PnLink | None) -> bool:
            return lnk is not None and bool(lnk.state & ACTIVE) and bool(lnk.session.state & ACTIVE)

        rcv = self._rpc_receiver
        if usable(rcv):
            if rcv.credit < self.credit:
                rcv.flow(self.credit - rcv.credit)
        else:
            if rcv is not None and rcv.state & ACTIVE:
                rcv.close()
            session = conn.session()
            session.open()
            rcv = session.receiver(f"rpc-{self.rpc_address}")
            rcv.source.address = self.rpc_address
            rcv.target.address = self.rpc_address
            rcv.open()
            rcv.flow(self.credit)
            self._rpc_receiver = rcv
            self._broker.app["has_receivers"] = True
        self._senders.clear()
        self._relay = None
        offered = list(conn.remote_offered_capabilities or [])
        for lnk in _each(conn.link_head, ACTIVE):
            if not lnk.is_sender:
                continue
            if not usable(lnk):
                lnk.close()
            elif lnk.name == "busagent-relay":
                self._relay = lnk
            elif lnk.target.address:
                self._senders[lnk.target.address] = lnk
        if ANONYMOUS_RELAY in offered and self._relay is None:
            self._relay = self._new_sender(conn, "busagent-relay", None)
        self.broker_ready.set()
        log.info("broker connected", url=_redact(self._broker.url), relay=self._relay is not None)

    def _new_sender(self, conn: Connection, name: str, address: str | None) -> PnLink:
        ssn = conn.session()
        ssn.open()
        snd = ssn.sender(name)
        snd.snd_settle_mode = PnLink.SND_SETTLED
        snd.target.address = address
        snd.open()
        return snd

    # -- requests -------------------------------------------------------------------------
    def _receive(self, link: PnLink) -> None:
        """Take every complete message waiting on a receiver."""
        while True:
            dlv = link.current
            if dlv is None or not dlv.readable:
                return
            if dlv.partial:
                if dlv.pending > self.settings.max_message_bytes:
                    link.condition = Condition("amqp:link:message-size-exceeded", "message too large")
                    link.close()
                return
            self._delivery(dlv, link)

    def _delivery(self, dlv: Delivery, link: PnLink) -> None:
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
        self._batch.append(Job(dlv, request))

    def _submit_batch(self) -> None:
        """Hand what one read brought to the workers, a few requests per hand-off."""
        jobs, self._batch = self._batch, []
        per = max(1, min(BATCH, -(-len(jobs) // self.settings.workers)))
        for i in range(0, len(jobs), per):
            self.workers.submit_many(self._handle, jobs[i:i + per])

    def _handle(self, job: Job) -> Outcome:
        return self.service.handle(job.request)  # on a worker thread: never touches job.delivery

    def _on_results(self, results: list[tuple[Job, Any]]) -> None:
        for job, outcome in results:
            if not isinstance(outcome, Outcome):  # a bug escaped RpcService: still answer
                outcome = Outcome(reply_body(error=Internal(f"{outcome!r}")), "(unknown)", "internal", 0.0)
            self._reply(job, outcome)

    def _reply(self, job: Job, outcome: Outcome) -> None:
        req = job.request
        if req.reply_to:
            sender = self._sender_for(req.reply_to)
            if sender is None:
                self.service.stats.reject("reply_unroutable")
            else:
                to = req.reply_to if sender == self._relay else None
                self._send(sender, encode_reply(outcome.body, req.correlation_id, to))
        else:
            self.service.stats.reject("no_reply_to")
        dlv = job.delivery
        if not dlv.settled and dlv.link.state & ACTIVE:
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()

    def _send(self, sender: PnLink, data: bytes) -> None:
        dlv = sender.delivery(str(next(self._tags)).encode())
        sender.send(data)
        sender.advance()
        dlv.settle()

    def _sender_for(self, address: str) -> PnLink | None:
        link = self._dynamic.get(address)
        if link is not None:
            return link
        if self._broker is None or not self._broker.connected:
            return None
        if self._relay is not None:
            return self._relay
        link = self._senders.get(address)
        if link is not None and (link.state & (CLOSED | R_CLOSED) or link.session.state & (CLOSED | R_CLOSED)):
            # The broker refused or dropped it (RabbitMQ ends the whole session of a refused
            # attach): forget it and attach anew, or every later reply here would be lost.
            del self._senders[address]
            _close_with_session(link)
            link = None
        if link is None:
            # One session per reply sender, so that a refused attach ends only its own.
            link = self._new_sender(self._broker.connection, f"reply-{address}", address)
            self._senders[address] = link
            while len(self._senders) > MAX_REPLY_SENDERS:
                _, old = self._senders.popitem(last=False)
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
        """Stamp (epoch, seq) and send one message on ``name`` (reactor thread); returns receivers."""
        doc.update(self.stamper.stamp(name))
        body = json.dumps(doc, separators=(",", ":"), default=str).encode()
        sent = 0
        if ttl is not None:
            return self._publish_with_ttl(name, subject, body, ttl)
        if self._broker is not None:
            if self._broker.connected:
                address = self.profile.topic(name)
                sender = self._sender_for(address)
                if sender is not None:
                    self._send(sender, encode_reply(body, None, address if sender == self._relay else None, subject))
                    sent = 1
        else:
            data = None
            for rx, link in self._subscriptions:
                if rx.match(name) is None:
                    continue
                if link.queued > MAX_QUEUED_PER_SUBSCRIBER:  # a stalled consumer: it sees the gap in seq
                    self.published["dropped"] += 1
                    continue
                data = data or encode_reply(body, None, None, subject)
                self._send(link, data)
                sent += 1
        self.published[subject] += 1
        return sent

    def _publish_with_ttl(self, name: str, subject: str, body: bytes, ttl: float) -> int:
        """Publish with an AMQP time-to-live (presence): proton's encoder, rare enough."""
        msg = Message(body=body, inferred=True, subject=subject, content_type="application/json", ttl=ttl,
                      durable=False)
        sent = 0
        if self._broker is not None:
            address = self.profile.topic(name)
            sender = self._sender_for(address) if self._broker.connected else None
            if sender is not None:
                if sender == self._relay:
                    msg.address = address
                self._send(sender, msg.encode())
                sent = 1
        else:
            data = msg.encode()
            for rx, link in self._subscriptions:
                if rx.match(name) is not None and link.queued <= MAX_QUEUED_PER_SUBSCRIBER:
                    self._send(link, data)
                    sent += 1
        self.published[subject] += 1
        return sent

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
        if state != "death" and not self.engine._stopping:  # noqa: SLF001
            self.engine.call_later(interval, lambda: self._presence_beat("alive"))
