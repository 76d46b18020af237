"""A lean AMQP 1.0 load client for the agent's direct mode (one process, one connection).

One connection, one dynamic receiver for the replies, one sender whose transfers
are pre-settled; credit is topped up in bulk. The request is encoded once and only
its message-id bytes change per call. Replies are not decoded as messages: the
correlation id is read straight from the properties section, and the body is
only checked for a ``{"result"`` start.

Two ways to drive proton (``--loop``):

* ``container``: a bare ``proton.Handler`` subclass on proton's ``Container``
  (no MessagingHandler).
* ``engine``: no reactor and no events at all: proton's engine (Connection +
  Transport) pumped by a ``poll`` loop on a plain socket. Far less Python per call,
  so the figure is closer to the agent's own cost.

Phases: warm-up (sequential, then pipelined), sequential latency, pipelined
throughput. Prints one JSON object on stdout. Every phase is bounded in count,
and the whole run by ``--time-limit`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

from proton import Connection, Endpoint, Handler, Link, Message, Transport, symbol
from proton.reactor import Container

CREDIT = 2000
ID_PREFIX = "bench-"
ID_DIGITS = 10
ID_MARK = ID_PREFIX + "@" * ID_DIGITS
RESULT_MARK = b'{"result"'
RPC_PROPERTY = symbol("busagent-rpc")


# -- just enough AMQP 1.0 decoding to find the correlation id --------------------------------
def _skip(data: bytes, i: int) -> int:
    """Index just past the encoded value starting at ``i`` (AMQP 1.0 type encodings)."""
    c = data[i]
    if c == 0x00:  # described: descriptor, then value
        return _skip(data, _skip(data, i + 1))
    width = c >> 4
    if width == 0x4:
        return i + 1
    if 0x5 <= width <= 0x9:  # fixed width: 1, 2, 4, 8, 16 bytes
        return i + 1 + (1, 2, 4, 8, 16)[width - 0x5]
    if width in (0xA, 0xC, 0xE):  # one-byte size
        return i + 2 + data[i + 1]
    if width in (0xB, 0xD, 0xF):  # four-byte size
        return i + 5 + int.from_bytes(data[i + 1:i + 5], "big")
    raise ValueError(f"unknown AMQP constructor 0x{c:02x}")


def _string(data: bytes, i: int) -> str | None:
    c = data[i]
    if c == 0xA1:
        return data[i + 2:i + 2 + data[i + 1]].decode()
    if c == 0xB1:
        n = int.from_bytes(data[i + 1:i + 5], "big")
        return data[i + 5:i + 5 + n].decode()
    if c == 0x40:
        return None
    raise ValueError("not a string")


def correlation_id(data: bytes) -> Any:
    """The correlation-id of an encoded message (falls back to proton's decoder)."""
    try:
        i, n = 0, len(data)
        while i < n:
            if data[i] != 0x00:
                break
            c = data[i + 1]
            if c == 0x53:
                code, j = data[i + 2], i + 3
            elif c == 0x80:
                code, j = int.from_bytes(data[i + 2:i + 10], "big"), i + 10
            else:
                code, j = None, _skip(data, i + 1)
            if code != 0x73:  # not the properties section: skip it
                i = _skip(data, j)
                continue
            c = data[j]
            if c == 0xC0:
                count, k = data[j + 2], j + 3
            elif c == 0xD0:
                count, k = int.from_bytes(data[j + 5:j + 9], "big"), j + 9
            else:
                return None
            if count < 6:
                return None
            for _ in range(5):  # message-id, user-id, to, subject, reply-to
                k = _skip(data, k)
            return _string(data, k)
    except (ValueError, IndexError):
        pass
    msg = Message()
    msg.decode(data)
    return msg.correlation_id


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def proc_cpu_seconds(pid: int | None) -> float | None:
    """utime+stime of a process from /proc (None when unavailable)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the measurement, independent of how proton is driven --------------------------------------
class Phases:
    """Counts, timestamps and the per-phase results; ``send`` puts one request on the wire."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.plan = [(name, count, window) for name, count, window in (
            ("warmup_seq", ns.warmup, 1),
            ("warmup_pipelined", ns.warmup_pipelined, ns.window),
            ("sequential", ns.sequential, 1),
            ("pipelined", ns.pipelined, ns.window),
        ) if count > 0]
        self.results: dict[str, Any] = {}
        self.prefix = self.suffix = b""
        self.next_id = 0
        self.first_id = 0
        self.errors = 0
        self.replies = 0
        self.index = -1
        self.name, self.count, self.window = "", 0, 1
        self.sent = self.received = 0
        self.sent_at: list[float] = []
        self.latencies: list[float] = []
        self.t0 = 0.0
        self.cpu0: tuple[float, float | None] = (0.0, None)
        self.done = False
        self.started = False

    def prepare(self, reply_to: str) -> None:
        """Encode the request once; only the message-id digits change per call."""
        template = Message(id=ID_MARK, reply_to=reply_to, subject=self.ns.method,
                           content_type="application/json", body=self.ns.body.encode(), inferred=True)
        data = template.encode()
        mark = ID_MARK.encode()
        at = data.index(mark)
        self.prefix, self.suffix = data[:at + len(ID_PREFIX)], data[at + len(mark):]

    def start(self, sender: Any) -> None:
        self.started = True
        self.next_phase(sender)

    def next_phase(self, sender: Any) -> None:
        self.index += 1
        if self.index >= len(self.plan):
            self.done = True
            return
        self.name, self.count, self.window = self.plan[self.index]
        self.sent = self.received = 0
        self.first_id = self.next_id
        self.sent_at = [0.0] * self.count
        self.latencies = []
        self.cpu0 = (own_cpu_seconds(), proc_cpu_seconds(self.ns.agent_pid))
        self.t0 = time.perf_counter()
        self.fill(sender)

    def fill(self, sender: Any) -> None:
        """Send while the phase has calls left, the window has room and the link has credit."""
        if self.done or not self.started:
            return
        count, window, prefix, suffix = self.count, self.window, self.prefix, self.suffix
        now = time.perf_counter
        while self.sent < count and self.sent - self.received < window and sender.credit > 0:
            n = self.next_id
            self.next_id = n + 1
            dlv = sender.delivery(b"%d" % n)
            sender.send(prefix + b"%010d" % n + suffix)
            sender.advance()
            dlv.settle()
            self.sent_at[self.sent] = now()
            self.sent += 1

    def reply(self, data: bytes, sender: Any) -> None:
        t = time.perf_counter()
        self.replies += 1
        if RESULT_MARK not in data:
            self.errors += 1
            if "first_error" not in self.results:
                msg = Message()
                msg.decode(data)
                body = msg.body
                self.results["first_error"] = bytes(body).decode(errors="replace") if body else repr(msg)
        cid = correlation_id(data)
        try:
            index = int(str(cid)[len(ID_PREFIX):]) - self.first_id
        except (TypeError, ValueError):
            self.errors += 1
            return
        if self.done or not 0 <= index < self.count:
            return  # not of this phase
        self.latencies.append(t - self.sent_at[index])
        self.received += 1
        if self.received >= self.count:
            self.end_phase(t)
            self.next_phase(sender)
        else:
            self.fill(sender)

    def end_phase(self, t: float) -> None:
        elapsed = t - self.t0
        lat = sorted(self.latencies)
        out: dict[str, Any] = {
            "calls": self.count, "window": self.window, "seconds": round(elapsed, 4),
            "calls_per_s": round(self.count / elapsed, 1) if elapsed > 0 else None,
            "p50_us": round(percentile(lat, 0.50) * 1e6, 1),
            "p99_us": round(percentile(lat, 0.99) * 1e6, 1),
            "mean_us": round(sum(lat) / len(lat) * 1e6, 1) if lat else None,
            "client_cpu_us_per_call": round((own_cpu_seconds() - self.cpu0[0]) / self.count * 1e6, 1),
        }
        agent_now, agent0 = proc_cpu_seconds(self.ns.agent_pid), self.cpu0[1]
        if agent_now is not None and agent0 is not None:
            out["agent_cpu_us_per_call"] = round((agent_now - agent0) / self.count * 1e6, 1)
        self.results[self.name] = out


# -- loop 1: a bare Handler on proton's Container ----------------------------------------------
class LeanHandler(Handler):
    def __init__(self, ns: argparse.Namespace, phases: Phases) -> None:
        super().__init__()
        self.ns = ns
        self.p = phases
        self.container: Any = None
        self.conn: Any = None
        self.session: Any = None
        self.receiver: Any = None
        self.sender: Any = None
        self.deadline_task: Any = None
        self.failure: str | None = None

    def on_reactor_init(self, event: Any) -> None:
        self.container = event.container
        self.deadline_task = self.container.schedule(self.ns.time_limit, self)
        self.conn = self.container.connect(self.ns.url, handler=self, reconnect=False)
        self.session = self.conn.session()
        self.session.open()
        self.receiver = self.session.receiver("bench-replies")
        self.receiver.source.dynamic = True
        self.receiver.open()
        self.receiver.flow(CREDIT)

    def on_connection_remote_open(self, event: Any) -> None:
        address = (event.connection.remote_properties or {}).get(RPC_PROPERTY)
        if address is None:
            self.fail("the agent did not tell its rpc address (busagent-rpc)")
            return
        self.sender = self.session.sender("bench-requests")
        self.sender.target.address = str(address)
        self.sender.snd_settle_mode = Link.SND_SETTLED
        self.sender.open()

    def on_link_remote_open(self, event: Any) -> None:
        if event.link == self.receiver:
            address = self.receiver.remote_source.address
            if not address:
                self.fail("no address for the dynamic receiver")
                return
            self.p.prepare(address)
        self.maybe_start()

    def on_link_flow(self, event: Any) -> None:
        if event.link == self.sender:
            if self.p.started:
                self.p.fill(self.sender)
            else:
                self.maybe_start()

    def maybe_start(self) -> None:
        if not self.p.started and self.sender is not None and self.p.prefix and self.sender.credit > 0:
            self.p.start(self.sender)
            self.check_done()

    def on_delivery(self, event: Any) -> None:
        dlv = event.delivery
        link = dlv.link
        if link != self.receiver:
            dlv.settle()
            return
        if dlv.partial:
            return
        data = link.recv(dlv.pending)
        link.advance()
        dlv.settle()
        if link.credit < CREDIT // 2:
            link.flow(CREDIT - link.credit)
        self.p.reply(data, self.sender)
        self.check_done()

    def check_done(self) -> None:
        if self.p.done:
            self.finish()

    def on_timer_task(self, event: Any) -> None:
        self.fail(f"time limit of {self.ns.time_limit} s reached in phase {self.p.name or 'connect'}")

    def on_transport_error(self, event: Any) -> None:
        cond = event.transport.condition
        self.fail(f"transport error: {cond.name}: {cond.description}" if cond else "transport error")

    def on_link_remote_close(self, event: Any) -> None:
        cond = event.link.remote_condition
        self.fail(f"link closed by the agent: {cond.name}: {cond.description}" if cond else "link closed")

    def on_connection_remote_close(self, event: Any) -> None:
        if not self.p.done:
            self.fail("connection closed by the agent")

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.finish()

    def finish(self) -> None:
        if self.deadline_task is not None:
            self.deadline_task.cancel()
            self.deadline_task = None
        if self.conn is not None:
            self.conn.close()
        self.container.stop()


def run_container(ns: argparse.Namespace, phases: Phases) -> str | None:
    handler = LeanHandler(ns, phases)
    Container(handler).run()
    return handler.failure


# -- loop 2: proton's engine on a poll loop, no reactor, no events -----------------------------
def run_engine(ns: argparse.Namespace, p: Phases) -> str | None:
    url = urlsplit(ns.url if "://" in ns.url else f"amqp://{ns.url}")
    host, port = url.hostname or "127.0.0.1", url.port or 5672
    deadline = time.monotonic() + ns.time_limit
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    conn = Connection()
    conn.container = f"bench-{uuid.uuid4().hex[:8]}"
    conn.hostname = host
    transport = Transport()
    transport.sasl().allowed_mechs("ANONYMOUS")
    transport.bind(conn)
    conn.open()
    session = conn.session()
    session.open()
    rcv = session.receiver("bench-replies")
    rcv.source.dynamic = True
    rcv.open()
    rcv.flow(CREDIT)
    snd = None
    poller = select.poll()
    fd = sock.fileno()
    failure = None
    writing = False

    def flush() -> bool:
        """Write what the transport has; False when the socket would block."""
        while True:
            pending = transport.pending()
            if pending <= 0:
                return True
            try:
                n = sock.send(transport.peek(pending))
            except BlockingIOError:
                return False
            transport.pop(n)

    try:
        while True:
            if not p.started:  # set-up: wait for the open, the reply address and credit
                if snd is None and conn.state & Endpoint.REMOTE_ACTIVE:
                    address = (conn.remote_properties or {}).get(RPC_PROPERTY)
                    if address is None:
                        return "the agent did not tell its rpc address (busagent-rpc)"
                    snd = session.sender("bench-requests")
                    snd.target.address = str(address)
                    snd.snd_settle_mode = Link.SND_SETTLED
                    snd.open()
                if not p.prefix and rcv.state & Endpoint.REMOTE_ACTIVE:
                    if not rcv.remote_source.address:
                        return "no address for the dynamic receiver"
                    p.prepare(rcv.remote_source.address)
                if snd is not None and p.prefix and snd.credit > 0:
                    p.start(snd)
            else:
                while True:  # every complete reply
                    dlv = rcv.current
                    if dlv is None or dlv.partial:
                        break
                    data = rcv.recv(dlv.pending)
                    rcv.advance()
                    dlv.settle()
                    p.reply(data, snd)
                if rcv.credit < CREDIT // 2:
                    rcv.flow(CREDIT - rcv.credit)
                p.fill(snd)  # credit may have come
                if p.done:
                    break
            for link in (rcv, snd):
                if link is not None and link.state & Endpoint.REMOTE_CLOSED:
                    cond = link.remote_condition
                    return f"link closed by the agent: {cond.name}: {cond.description}" if cond else "link closed"
            if conn.state & Endpoint.REMOTE_CLOSED:
                return "connection closed by the agent"
            writing = not flush()
            left = deadline - time.monotonic()
            if left <= 0:
                return f"time limit of {ns.time_limit} s reached in phase {p.name or 'connect'}"
            poller.register(fd, select.POLLIN | (select.POLLOUT if writing else 0))
            if not poller.poll(min(left, 1.0) * 1000):
                transport.tick(time.monotonic())
                continue
            while transport.capacity() > 0:
                try:
                    data = sock.recv(min(transport.capacity(), 1 << 16))
                except BlockingIOError:
                    break
                if not data:
                    transport.close_tail()
                    return "the agent closed the socket"
                transport.push(data)
        conn.close()
        flush()
        return failure
    except OSError as exc:
        return f"socket error: {exc}"
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="amqp://127.0.0.1:5672")
    p.add_argument("--loop", choices=["engine", "container"], default="engine")
    p.add_argument("--method", default="virDomainGetInfo")
    p.add_argument("--body", default='{"domain":{"name":"test"}}')
    p.add_argument("--warmup", type=int, default=500, help="sequential warm-up calls")
    p.add_argument("--warmup-pipelined", type=int, default=2000, help="pipelined warm-up calls")
    p.add_argument("--sequential", type=int, default=2000)
    p.add_argument("--pipelined", type=int, default=20000)
    p.add_argument("--window", type=int, default=100, help="calls outstanding in the pipelined phases")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for the whole run")
    p.add_argument("--agent-pid", type=int, help="read this process's CPU time per phase")
    ns = p.parse_args(argv)
    for name in ("warmup", "warmup_pipelined", "sequential", "pipelined"):
        setattr(ns, name, max(0, min(getattr(ns, name), 1_000_000)))
    ns.window = max(1, min(ns.window, CREDIT // 2))
    phases = Phases(ns)
    failure = (run_engine if ns.loop == "engine" else run_container)(ns, phases)
    out = {"client": f"python-{ns.loop}", "url": ns.url, "method": ns.method, "errors": phases.errors,
           "replies": phases.replies, "failure": failure, **phases.results}
    print(json.dumps(out))
    return 0 if failure is None and not phases.errors else 1


if __name__ == "__main__":
    sys.exit(main())
