"""A subscriber for ``bench/observe``: busagent's own ``Subscription`` client, one JSON line per observation.

Runs in its own process (the agent and the bench's actor are other processes). Modes:

* ``events``: subscribes to ``<ns>.event.*.domain.lifecycle``; for every event, prints
  ``{"t": <CLOCK_MONOTONIC when get() returned it>, "t_wall": <the same, wall clock>, "stamp": <the
  agent's publish time>, "event": ..., "domain": ..., "seq": ...}``. CLOCK_MONOTONIC is system-wide
  on Linux, so the actor process compares it with its own.
* ``stats``: subscribes to ``<ns>.stats.*.*``; prints one line per complete sampler tick (every
  domain chunk, and the node, storage_pool and network messages of one sample, told apart by the
  sample's ``duration``): wall-clock receipt of its first and last message, the agent's publish
  stamps of the first and last, the message count and bytes, the domain total.

``--client lean`` (events only) takes the same subscription on proton's bare engine driven by a
poll loop instead, timed as each complete delivery is read: the bus path without the cost of
busagent's client (its reactor, its hand-off to the reading thread).

The first line is ``{"ready": true}`` once every link is attached. The process ends after
``--count`` lines, after ``--seconds``, or when stdin closes (the bench went away).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from proton import Connection, Delivery, Endpoint, Message, Transport

from busagent.client.subscribe import Subscription

KINDS_AFTER_DOMAINS = ("stats.node", "stats.storage_pool", "stats.network")
LEAN_CREDIT = 1000


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def watch_stdin(stop: threading.Event) -> None:
    """The bench closes our stdin (or dies): stop."""
    while not stop.is_set():
        r, _, _ = select.select([sys.stdin], [], [], 0.5)
        if r and not os.read(sys.stdin.fileno(), 4096):
            stop.set()


def event_line(t: float, wall: float, doc: dict[str, Any]) -> dict[str, Any]:
    data = doc.get("data") or {}
    return {"t": t, "t_wall": wall, "stamp": doc.get("timestamp"), "event": data.get("event_name"),
            "detail": data.get("detail_name"), "domain": ((doc.get("object") or {}).get("domain") or {}).get("name"),
            "seq": doc.get("seq")}


def lean_events(ns: argparse.Namespace, pattern: str, deadline: float, stop: threading.Event) -> int:
    """The same subscription on proton's bare engine (a poll loop, no reactor, no events, no
    worker thread): what the bus path costs without busagent's Subscription client."""
    url = urlsplit(ns.url if "://" in ns.url else f"amqp://{ns.url}")
    sock = socket.create_connection((url.hostname or "127.0.0.1", url.port or 5672), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    conn = Connection()
    conn.container = f"observe-{uuid.uuid4().hex[:8]}"
    conn.hostname = url.hostname or "127.0.0.1"
    transport = Transport()
    transport.sasl().allowed_mechs("ANONYMOUS")
    transport.bind(conn)
    conn.open()
    ssn = conn.session()
    ssn.open()
    rcv = ssn.receiver(f"watch-{uuid.uuid4().hex[:8]}")
    rcv.source.address = pattern
    rcv.open()
    rcv.flow(LEAN_CREDIT)
    poller = select.poll()
    ready = False
    n = 0
    try:
        while n < ns.count and not stop.is_set():
            if not ready and rcv.state & Endpoint.REMOTE_ACTIVE:
                ready = True
                emit({"ready": True, "pattern": pattern, "client": "lean"})
            while (dlv := rcv.current) is not None and not dlv.partial:
                t, wall = time.monotonic(), time.time()
                data = rcv.recv(dlv.pending)
                rcv.advance()
                dlv.update(Delivery.ACCEPTED)
                dlv.settle()
                msg = Message()
                msg.decode(data)
                body = msg.body
                emit(event_line(t, wall, json.loads(bytes(body) if isinstance(body, (memoryview, bytearray))
                                                    else body)))
                n += 1
            if rcv.credit < LEAN_CREDIT // 2:
                rcv.flow(LEAN_CREDIT - rcv.credit)
            if rcv.state & Endpoint.REMOTE_CLOSED or conn.state & Endpoint.REMOTE_CLOSED:
                emit({"failure": "the agent closed the subscription"})
                return n
            writing = False
            while (pending := transport.pending()) > 0:
                try:
                    transport.pop(sock.send(transport.peek(pending)))
                except BlockingIOError:
                    writing = True
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                return n
            poller.register(sock.fileno(), select.POLLIN | (select.POLLOUT if writing else 0))
            if not poller.poll(min(left, 0.5) * 1000):
                transport.tick(time.monotonic())
                continue
            while transport.capacity() > 0:
                try:
                    chunk = sock.recv(min(transport.capacity(), 1 << 16))
                except BlockingIOError:
                    break
                if not chunk:
                    transport.close_tail()
                    emit({"failure": "the agent closed the socket"})
                    return n
                transport.push(chunk)
        return n
    finally:
        sock.close()


def run_events(sub: Subscription, ns: argparse.Namespace, deadline: float, stop: threading.Event) -> int:
    n = 0
    while n < ns.count and time.monotonic() < deadline and not stop.is_set():
        try:
            doc = sub.get(timeout=0.5)
        except queue.Empty:
            continue
        t, wall = time.monotonic(), time.time()
        if "gap" in doc:
            emit({"gap": doc["gap"]})
            continue
        emit(event_line(t, wall, doc))
        n += 1
    return n


class Tick:
    __slots__ = ("first", "last", "docs", "chunks", "chunks_seen", "others", "total", "stamp_first",
                 "stamp_last", "mode")

    def __init__(self, now: float) -> None:
        self.first = self.last = now
        self.docs: list[dict[str, Any]] = []
        self.chunks: int | None = None
        self.chunks_seen: set[int] = set()
        self.others: set[str] = set()
        self.total = 0
        self.stamp_first: float | None = None
        self.stamp_last: float | None = None
        self.mode: str | None = None

    def complete(self) -> bool:
        return (self.chunks is not None and len(self.chunks_seen) == self.chunks
                and self.others.issuperset(KINDS_AFTER_DOMAINS))


def run_stats(sub: Subscription, ns: argparse.Namespace, deadline: float, stop: threading.Event) -> int:
    ticks: dict[float, Tick] = {}
    n = 0
    while n < ns.count and time.monotonic() < deadline and not stop.is_set():
        try:
            doc = sub.get(timeout=0.5)
        except queue.Empty:
            continue
        now = time.time()
        if "gap" in doc:
            emit({"gap": doc["gap"]})
            continue
        key = doc.get("duration")
        if key is None:
            continue
        tick = ticks.get(key)
        if tick is None:
            tick = ticks[key] = Tick(now)
            tick.stamp_first = doc.get("timestamp")
        tick.last = now
        tick.stamp_last = doc.get("timestamp")
        tick.docs.append(doc)
        kind = doc.get("kind")
        if kind == "stats.domain":
            tick.mode = doc.get("mode")
            tick.chunks = doc.get("chunks")
            tick.chunks_seen.add(doc.get("chunk"))
            tick.total = doc.get("total", 0)
        else:
            tick.others.add(kind)
        if tick.complete():
            del ticks[key]
            # sizes after the last receipt was timed: about the JSON bodies on the wire
            sizes = [len(json.dumps(d, separators=(",", ":"))) for d in tick.docs]
            emit({"duration": key, "t_first": tick.first, "t_last": now, "messages": len(sizes),
                  "bytes": sum(sizes), "max_message_bytes": max(sizes), "domains": tick.total, "chunks": tick.chunks,
                  "stamp_first": tick.stamp_first, "stamp_last": tick.stamp_last, "mode": tick.mode})
            n += 1
        for k in [k for k, t in ticks.items() if now - t.first > 30]:
            del ticks[k]  # a tick we joined half-way: never complete
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["events", "stats"])
    p.add_argument("--url", required=True)
    p.add_argument("--namespace", default="libvirt")
    p.add_argument("--client", choices=["subscription", "lean"], default="subscription",
                   help="busagent's Subscription (default), or proton's bare engine on a poll loop (events only)")
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=120.0)
    ns = p.parse_args(argv)
    deadline = time.monotonic() + max(1.0, min(ns.seconds, 600.0))
    ns.count = max(1, min(ns.count, 1_000_000))
    pattern = (f"{ns.namespace}.event.*.domain.lifecycle" if ns.mode == "events"
               else f"{ns.namespace}.stats.*.*")
    stop = threading.Event()
    threading.Thread(target=watch_stdin, args=(stop,), daemon=True).start()
    if ns.client == "lean":
        if ns.mode != "events":
            emit({"failure": "the lean client only takes events"})
            return 2
        lean_events(ns, pattern, deadline, stop)
        return 0
    with Subscription(ns.url, [pattern]) as sub:
        if not sub.ready.wait(20):
            emit({"failure": f"subscription to {pattern} not attached within 20 s"})
            return 1
        emit({"ready": True, "pattern": pattern})
        run = run_events if ns.mode == "events" else run_stats
        try:
            run(sub, ns, deadline, stop)
        except Exception as exc:  # report, do not hang the bench
            emit({"failure": f"{type(exc).__name__}: {exc}"})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
