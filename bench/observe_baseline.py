"""Baselines for ``bench/observe``'s sampling and memory figures, in a bare python process.

1. Memory: open the URI (a test-driver host file, in-process or through libvirtd), list every
   domain, and read this process's VmRSS / VmHWM: the driver's own footprint, nothing of the agent.
2. The per-domain loop the community exporters run every scrape: for each domain ``dom.info()``,
   ``dom.state()`` and ``dom.memoryStats()`` (block and interface statistics too when the domain
   has devices; the bench's domains have none). Timed over ``--loops`` passes, within ``--time-limit``.
3. For reference, the bulk call alone: ``getAllDomainStats(0, NOWAIT)`` as the agent's sampler makes it.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import libvirt


def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])  # KiB
    return out


def per_domain_pass(doms: list[Any]) -> tuple[float, int, int]:
    """One exporter-style pass over every domain; returns (seconds, calls, errors)."""
    calls = errors = 0
    t0 = time.perf_counter()
    for dom in doms:
        try:
            dom.info()
            dom.state()
            dom.memoryStats()
            calls += 3
        except libvirt.libvirtError:
            errors += 1
    return time.perf_counter() - t0, calls, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uri", required=True)
    p.add_argument("--loops", type=int, default=3)
    p.add_argument("--bulk", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=20.0)
    ns = p.parse_args(argv)
    deadline = time.monotonic() + max(1.0, ns.time_limit)
    libvirt.registerErrorHandler(lambda *_: None, None)  # no stderr noise
    t = time.perf_counter()
    conn = libvirt.open(ns.uri)
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    doms = conn.listAllDomains(0)
    list_s = time.perf_counter() - t
    mem = proc_status()
    bulk = []  # first: cheap, and the loop may use up the time limit
    flags = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
    for _ in range(max(0, min(ns.bulk, 20))):
        t = time.perf_counter()
        records = conn.getAllDomainStats(0, flags)
        bulk.append(time.perf_counter() - t)
        keys = sorted({k for _, stats in records for k in stats})
        records = None
    passes = []
    calls = errors = 0
    for _ in range(max(1, min(ns.loops, 20))):
        s, calls, errors = per_domain_pass(doms)
        passes.append(s)
        if time.monotonic() + s > deadline:
            break
    conn.close()
    print(json.dumps({
        "uri": ns.uri, "domains": len(doms), "open_s": round(open_s, 3), "list_s": round(list_s, 4),
        "rss_kib": mem.get("VmRSS"), "hwm_kib": mem.get("VmHWM"),
        "loop_s": [round(s, 4) for s in passes], "loop_best_s": round(min(passes), 4),
        "loop_calls": calls, "loop_errors": errors,
        "bulk_s": [round(s, 4) for s in bulk], "bulk_best_s": round(min(bulk), 4) if bulk else None,
        "bulk_keys": keys if bulk else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
