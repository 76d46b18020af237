"""Subscriptions to published events, objects, statistics and presence."""
from __future__ import annotations

import json
import queue
import threading
import uuid
from typing import Any

from proton import Delivery, Endpoint, Handler
from proton.reactor import ApplicationEvent, Container, EventInjector

from busagent.bus.addressing import profile as get_profile
from busagent.client.errors import ConnectionFailed
from busagent.client.gaps import Gap, GapTracker

CREDIT = 1000


class _SubHandler(Handler):
    def __init__(self, sub: Subscription) -> None:
        super().__init__()
        self.s = sub
        self.conn = None

    def on_reactor_init(self, event: Any) -> None:
        s = self.s
        event.container.selectable(s._injector)
        kwargs: dict[str, Any] = {"reconnect": s.reconnect, "handler": self}
        if s.user:
            kwargs.update(user=s.user, password=s.password, allowed_mechs="PLAIN", allow_insecure_mechs=True)
        self.conn = event.container.connect(s.url, **kwargs)
        for pattern in s.patterns:
            ssn = self.conn.session()
            ssn.open()
            rcv = ssn.receiver(f"watch-{uuid.uuid4().hex[:8]}")
            rcv.source.address = s.profile.topic(pattern)
            rcv.open()
            rcv.flow(CREDIT)

    def on_link_remote_open(self, event: Any) -> None:
        self.s._attached += 1
        if self.s._attached >= len(self.s.patterns):
            self.s.ready.set()

    def on_link_remote_close(self, event: Any) -> None:
        cond = event.link.remote_condition
        self.s._queue.put(ConnectionFailed(f"subscription refused: {cond.description if cond else 'closed'}"))
        event.link.close()

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self.s._queue.put(ConnectionFailed(f"{cond.name}: {cond.description}" if cond else "transport error"))

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
        if self.conn is not None and self.conn.state & Endpoint.LOCAL_ACTIVE:
            self.conn.close()
        self.s._container.stop()


class Subscription:
    """Receive published messages matching topic patterns (``libvirt.event.#``); detects gaps.

    Iterate for message dicts; a dict with ``"gap"`` reports missed messages or an agent restart.
    """

    def __init__(self, url: str, patterns: list[str], profile: str = "direct", user: str | None = None,
                 password: str | None = None, reconnect: bool = False) -> None:
        self.url, self.patterns, self.profile = url, list(patterns), get_profile(profile)
        self.user, self.password, self.reconnect = user, password, reconnect
        self.gaps = GapTracker()
        self.received = 0
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
