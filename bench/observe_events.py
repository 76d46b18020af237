"""Event latency for ``bench/observe``: a libvirt action, then the event at a bus subscriber.

The actor (this process) suspends and resumes one domain, one action at a time; a subscriber
process (``observe_subscriber.py events``, busagent's ``Subscription``) prints the CLOCK_MONOTONIC
time at which each lifecycle event came out of ``get()``; CLOCK_MONOTONIC is system-wide on
Linux, so the two processes' times compare directly. The agent is a third process.

Modes:

* ``libvirt`` (direct): the agent and this process are both clients of one private libvirtd;
  the action is ``dom.suspend()`` / ``dom.resume()`` with libvirt-python, timed from just before
  the call. Baseline, on the same actions: a lifecycle callback registered with libvirt-python on
  this same connection (libvirt's own event delivery, action -> callback in this process).
* ``bus``: the agent embeds test:///default, so the action goes through the bus
  (``virDomainSuspend`` / ``virDomainResume`` with busagent's ``Client``); the RPC round trip is
  reported next to the event latency, and their per-event difference.

Both modes split the latency at the agent's publish stamp (the ``timestamp`` the agent's reactor
puts on each message as it sends it; wall clock, compared across processes): action -> agent
publishes, and agent publishes -> subscriber ``get()``.

Prints one JSON object. Bounded: ``--events`` actions, each waited for at most ``--timeout``
seconds, and the whole run by ``--time-limit``.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
EXPECTED = ("VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_RESUMED")


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def summary(values_s: list[float]) -> dict[str, Any]:
    v = sorted(values_s)
    if not v:
        return {"n": 0}
    us = 1e6
    return {"n": len(v), "p50_us": round(percentile(v, 0.5) * us, 1), "p90_us": round(percentile(v, 0.9) * us, 1),
            "p99_us": round(percentile(v, 0.99) * us, 1), "max_us": round(v[-1] * us, 1),
            "min_us": round(v[0] * us, 1), "mean_us": round(sum(v) / len(v) * us, 1)}


class Lines:
    """JSON lines from a pipe, each waited for with a timeout (no buffered-reader surprises)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.closed = False

    def next(self, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or self.closed:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if r:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.closed = True
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def start_subscriber(url: str, count: int, seconds: float, client: str) -> tuple[subprocess.Popen, Lines]:
    cmd = [sys.executable, str(BENCH / "observe_subscriber.py"), "events", "--url", url, "--count", str(count),
           "--seconds", f"{seconds:.0f}", "--client", client]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, Lines(proc.stdout.fileno())


def stop_subscriber(proc: subprocess.Popen) -> str:
    try:
        proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return proc.stderr.read().decode(errors="replace")[-600:] if proc.stderr else ""


class LibvirtActor:
    """Actions with libvirt-python on a libvirtd connection; a lifecycle callback is the baseline."""

    def __init__(self, uri: str, domain: str) -> None:
        import libvirt

        self.libvirt = libvirt
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._loop, name="libvirt-events", daemon=True).start()
        self.conn = libvirt.open(uri)
        self.dom = self.conn.lookupByName(domain)
        self.fired = threading.Event()
        self.t_cb = 0.0
        self.cb_event = None
        self.conn.domainEventRegisterAny(self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)

    def _loop(self) -> None:
        while True:
            self.libvirt.virEventRunDefaultImpl()

    def _on_event(self, _conn: Any, _dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        self.t_cb = time.monotonic()
        self.cb_event = event
        self.fired.set()

    def paused(self) -> bool:
        return self.dom.state()[0] == self.libvirt.VIR_DOMAIN_PAUSED

    def act(self, suspend: bool) -> tuple[float, float, float]:
        self.fired.clear()
        wall, t0 = time.time(), time.monotonic()
        if suspend:
            self.dom.suspend()
        else:
            self.dom.resume()
        return wall, t0, time.monotonic()


class BusActor:
    """Actions through the agent: ``virDomainSuspend`` / ``virDomainResume`` with busagent's Client."""

    def __init__(self, url: str, domain: str) -> None:
        from busagent.client import Client

        self.client = Client(url, timeout=10)
        if not self.client.wait_connected(15):
            raise RuntimeError(f"no connection to {url}")
        self.args = {"domain": {"name": domain}}
        self.fired = threading.Event()
        self.fired.set()  # no in-process callback in this mode
        self.t_cb = 0.0
        self.cb_event = None

    def paused(self) -> bool:
        info = self.client.call("virDomainGetInfo", **self.args)
        state = info[0] if isinstance(info, list) else (info or {}).get("state")
        return state == 3

    def act(self, suspend: bool) -> tuple[float, float, float]:
        method = "virDomainSuspend" if suspend else "virDomainResume"
        wall, t0 = time.time(), time.monotonic()
        self.client.call(method, **self.args)
        return wall, t0, time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["libvirt", "bus"])
    p.add_argument("--url", required=True, help="the agent (direct mode AMQP URL)")
    p.add_argument("--uri", help="libvirt mode: the libvirtd URI the agent also uses")
    p.add_argument("--domain", default="test")
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--gap-ms", type=float, default=2.0, help="pause after each event, so each one is alone")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for one event")
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--subscriber", choices=["subscription", "lean"], default="subscription",
                   help="the subscriber process's client (observe_subscriber.py --client)")
    ns = p.parse_args(argv)
    events = max(1, min(ns.events, 100_000))
    warmup = max(0, min(ns.warmup, 10_000))
    deadline = time.monotonic() + max(5.0, ns.time_limit)
    out: dict[str, Any] = {"mode": ns.mode, "domain": ns.domain, "gap_ms": ns.gap_ms, "subscriber": ns.subscriber}

    sub, lines = start_subscriber(ns.url, events + warmup + 100, ns.time_limit + 20, ns.subscriber)
    try:
        ready = lines.next(25)
        if not ready or not ready.get("ready"):
            out["failure"] = f"subscriber not ready: {ready or stop_subscriber(sub)}"
            print(json.dumps(out))
            return 1
        actor = LibvirtActor(ns.uri, ns.domain) if ns.mode == "libvirt" else BusActor(ns.url, ns.domain)
        suspend = not actor.paused()
        # an event from before (the initial resume, if any) must not be taken for ours
        while lines.next(0.2) is not None:
            pass
        agent_lat, cb_lat, call_lat, event_minus_call, to_stamp, from_stamp = [], [], [], [], [], []
        mismatched = timeouts = stray = 0
        done = 0
        while done < events + warmup and time.monotonic() < deadline:
            wall0, t0, t1 = actor.act(suspend)
            want = EXPECTED[0] if suspend else EXPECTED[1]
            suspend = not suspend
            got = None
            while True:  # skip anything that is not the event of this action (bounded by the timeout)
                got = lines.next(ns.timeout)
                if got is None or got.get("event") == want:
                    break
                stray += 1
            cb_ok = actor.fired.wait(ns.timeout)
            measured = done >= warmup
            done += 1
            if got is None:
                timeouts += 1
                continue
            if measured:
                agent_lat.append(got["t"] - t0)
                call_lat.append(t1 - t0)
                event_minus_call.append(got["t"] - t1)
                if got.get("stamp"):  # wall clock: the agent stamps each message as it publishes it
                    to_stamp.append(got["stamp"] - wall0)
                    from_stamp.append(got["t_wall"] - got["stamp"])
                if ns.mode == "libvirt":
                    if cb_ok:
                        cb_lat.append(actor.t_cb - t0)
                    else:
                        mismatched += 1
            if ns.gap_ms > 0:
                time.sleep(ns.gap_ms / 1000)
        out.update({
            "events": len(agent_lat), "warmup": warmup, "timeouts": timeouts, "stray_events": stray,
            "callback_missing": mismatched, "timed_out": time.monotonic() >= deadline,
            "agent_subscriber": summary(agent_lat),
            "call": summary(call_lat),
            "event_after_call_return": summary(event_minus_call),
            "action_to_agent_publish": summary(to_stamp),
            "agent_publish_to_subscriber": summary(from_stamp),
        })
        if ns.mode == "libvirt":
            out["libvirt_callback"] = summary(cb_lat)
    finally:
        err = stop_subscriber(sub)
        if err.strip() and "failure" in out:
            out["subscriber_stderr"] = err
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
