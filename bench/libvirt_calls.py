"""Baseline: libvirt-python ``dom.info()`` on a URI, sequential latency and threaded throughput.

``test:///default`` measures libvirt in-process (the test driver inside this process);
``test+unix:///default?socket=...`` measures libvirt's own remote protocol to a libvirtd.
Prints one JSON object. Every loop is bounded in count and by ``--time-limit`` seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import libvirt


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def sequential(dom: Any, calls: int, deadline: float) -> dict[str, Any]:
    lat = []
    now = time.perf_counter
    t0 = now()
    for _ in range(calls):
        t = now()
        dom.info()
        lat.append(now() - t)
        if t > deadline:
            break
    elapsed = now() - t0
    lat.sort()
    return {
        "calls": len(lat), "window": 1, "seconds": round(elapsed, 4),
        "calls_per_s": round(len(lat) / elapsed, 1),
        "p50_us": round(percentile(lat, 0.50) * 1e6, 2), "p99_us": round(percentile(lat, 0.99) * 1e6, 2),
        "mean_us": round(sum(lat) / len(lat) * 1e6, 2),
    }


def threaded(uri: str, name: str, threads: int, calls: int, shared: Any, deadline: float) -> dict[str, Any]:
    """``calls`` calls split over ``threads`` threads (one connection each unless ``shared``)."""
    per_thread = max(1, calls // threads)
    done = [0] * threads
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        try:
            conn = shared or libvirt.open(uri)
            dom = conn.lookupByName(name)
            dom.info()
        except libvirt.libvirtError as exc:
            errors.append(str(exc))
            barrier.abort()
            return
        try:
            barrier.wait(30)
        except threading.BrokenBarrierError:
            return
        n = 0
        while n < per_thread:
            dom.info()
            n += 1
            if n % 256 == 0 and time.monotonic() > deadline:
                break
        done[i] = n
        if shared is None:
            conn.close()

    pool = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        barrier.wait(30)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for t in pool:
        t.join(max(0.1, deadline - time.monotonic() + 5))
    elapsed = time.perf_counter() - t0
    total = sum(done)
    out: dict[str, Any] = {"calls": total, "threads": threads, "shared_connection": shared is not None,
                           "seconds": round(elapsed, 4), "calls_per_s": round(total / elapsed, 1) if elapsed else None}
    if errors:
        out["error"] = errors[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", default="test:///default")
    p.add_argument("--domain", default="test")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--sequential", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--threaded-calls", type=int, default=20000)
    p.add_argument("--shared-connection", action="store_true", help="all threads on one connection")
    p.add_argument("--time-limit", type=float, default=30.0)
    ns = p.parse_args(argv)
    deadline = time.monotonic() + ns.time_limit
    t_open = time.perf_counter()
    conn = libvirt.open(ns.uri)
    open_s = time.perf_counter() - t_open
    dom = conn.lookupByName(ns.domain)
    warm = sequential(dom, max(1, min(ns.warmup, 1_000_000)), deadline)
    seq = sequential(dom, max(1, min(ns.sequential, 1_000_000)), deadline)
    thr = threaded(ns.uri, ns.domain, max(1, min(ns.threads, 64)), max(1, min(ns.threaded_calls, 1_000_000)),
                   conn if ns.shared_connection else None, deadline)
    out = {"uri": ns.uri, "open_ms": round(open_s * 1000, 2), "warmup": warm, "sequential": seq,
           "threaded": thr, "timed_out": time.monotonic() > deadline}
    conn.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
