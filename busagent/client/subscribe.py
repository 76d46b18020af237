"""Subscriptions to published events, objects, statistics and presence."""
from __future__ import annotations

import json
import queue
import threading
import uuid
from typing import Any

import structlog
from proton import Delivery, Endpoint, Handler
from proton.reactor import ApplicationEvent, Container, EventInjector

from busagent.bus.addressing import profile as get_profile
from busagent.client.connecting import connect, reconnect_delays
from busagent.client.errors import ConnectionFailed
from busagent.client.gaps import Gap, GapTracker

log = structlog.get_logger("busagent.client")
CREDIT = 1000


class _SubHandler(Handler):
    def __init__(self, sub: Subscription) -> None:
        super().__init__()
        self.s = sub
        self.conn = None
        self.container: Any = None
        self.lost = False
        self.closing = False
        self.delays = reconnect_delays()

    def on_reactor_init(self, event: Any) -> None:
        event.container.selectable(self.s._injector)
        self.container = event.container
        self._open()

    def _open(self) -> None:
        """Connect and attach one receiver per pattern (at start, and on each reconnection)."""
        s = self.s
        self.lost, s._attached = False, 0
        self.conn = connect(self.container, s.url, self, s.user, s.password)
        for pattern in s.patterns:
            ssn = self.conn.session()
            ssn.open()
            rcv = ssn.receiver(f"watch-{uuid.uuid4().hex[:8]}")
            rcv.source.address = s.profile.topic(pattern)
            rcv.open()
            rcv.flow(CREDIT)

    def _lost(self, conn: Any, why: str) -> None:
        """Report the failure (the consumer's ``get`` raises it), or reconnect (``reconnect=True``):
        a fresh connection and receivers after a pause; what was missed meanwhile shows as gaps."""
        if conn != self.conn or self.lost or self.closing:
            return
        self.lost = True
        s = self.s
        s.ready.clear()
        if not s.reconnect:
            s._queue.put(ConnectionFailed(why))
            return
        delay = next(self.delays)
        log.warning("subscription lost, reconnecting", why=why, retry_in=delay)
        if conn.state & Endpoint.LOCAL_ACTIVE:
            conn.close()
        self.container.schedule(delay, self)

    def on_timer_task(self, _event: Any) -> None:
        if not self.closing:
            self.s.reconnects += 1
            self._open()

    def on_link_remote_open(self, event: Any) -> None:
        if event.connection != self.conn:
            return
        self.s._attached += 1
        if self.s._attached >= len(self.s.patterns):
            self.delays = reconnect_delays()
            self.s.ready.set()

    def on_link_remote_close(self, event: Any) -> None:
        cond = event.link.remote_condition
        event.link.close()
        self._lost(event.connection, f"subscription refused: {cond.description if cond else 'closed'}")

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self._lost(event.connection, f"{cond.name}: {cond.description}" if cond else "transport error")

    def on_transport_closed(self, event: Any) -> None:
        self._lost(event.connection, "connection closed")

    def on_connection_remote_close(self, event: Any) -> None:
        cond = event.connection.remote_condition
        self._lost(event.connection, f"connection closed by peer: {cond.description if cond else ''}")

    def on_delivery(self, event: Any) -> None:
        dlv, link = event.delivery, event.link
        if dlv.partial or not link.is_receiver:
            return
        data = link.recv(dlv.pending)
        link.advance()
        dlv.update(Delivery.ACCEPTED)
        dlv.settle()
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)
        self.s._deliver(data)

    def on_sub_close(self, _event: Any) -> None:
        self.closing = True
        if self.conn is not None and self.conn.state & Endpoint.LOCAL_ACTIVE:
            self.conn.close()
        self.s._container.stop()


class Subscription:
    """Receive published messages matching topic patterns (``libvirt.event.#``); detects gaps.

    Iterate for message dicts; a dict with ``"gap"`` reports missed messages or an agent restart.
    ``reconnect=True``: after losing the connection (a broker restart), connect and subscribe
    again by itself (with a capped backoff) instead of raising ``ConnectionFailed``; what was
    published meanwhile is reported as gaps by the next messages.
    """

    def __init__(self, url: str, patterns: list[str], profile: str = "direct", user: str | None = None,
                 password: str | None = None, reconnect: bool = False) -> None:
        self.url, self.patterns, self.profile = url, list(patterns), get_profile(profile)
        self.user, self.password, self.reconnect = user, password, reconnect
        self.gaps = GapTracker()
        self.received = 0
        self.reconnects = 0
        self.ready = threading.Event()
        self._attached = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._injector = EventInjector()
        self._container = Container(_SubHandler(self))
        self._thread = threading.Thread(target=self._container.run, name="busagent-watch", daemon=True)
        self._thread.start()

    def _deliver(self, data: bytes) -> None:
        from proton import Message

        msg = Message()
        msg.decode(data)
        body = msg.body
        try:
            doc = json.loads(bytes(body) if isinstance(body, (memoryview, bytearray)) else body)
        except (TypeError, ValueError):
            doc = {"undecodable": True, "subject": msg.subject}
        self.received += 1
        gap = self.gaps.observe(doc) if isinstance(doc, dict) else None
        if gap is not None:
            self._queue.put({"gap": gap.__dict__})
        self._queue.put(doc)

    def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message (or gap report); raises queue.Empty on timeout."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def __iter__(self):
        while True:
            yield self.get()

    def seed(self, host: str, position: dict[str, Any]) -> None:
        """Start gap detection from a resync position (``epoch`` and ``kind_seq``)."""
        self.gaps.seed(host, position["epoch"], position.get("kind_seq", {}))

    def close(self) -> None:
        self._injector.trigger(ApplicationEvent("sub_close"))
        self._thread.join(5)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Gap", "Subscription"]
