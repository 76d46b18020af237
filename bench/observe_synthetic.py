"""SYNTHETIC figures for ``bench/observe``: QEMU-like statistics at N domains, in-process, no libvirt.

The test driver's bulk statistics carry only ``state.*``, so a scrape of a test-driver agent
renders two series per domain. To see the cost with the keys a QEMU host returns, this takes
``tests/fixtures/domstats-qemu.json`` (hand-built from libvirt's documented key layout, NOT
recorded from real guests), replicates its domains to ``--domains`` (distinct names and uuids),
and times, with busagent's own code:

* the ``/metrics`` rendering: ``StatsCollector`` on a registry, ``generate_latest`` the first
  time a Sample is seen (it is mapped to families then) and again (the families are cached);
* the bus batches: ``sampler.batches`` plus the JSON encoding the reactor does per message,
  with the largest message next to the agent's ``max_message_bytes``.

Prints one JSON object.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from prometheus_client import generate_latest

from busagent.config import Settings
from busagent.metrics import StatsCollector, make_registry
from busagent.sampler import DomainStats, Sample, SamplerCounters, batches

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "domstats-qemu.json"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class FixedSampler:
    """What StatsCollector reads of a sampler, over one fixed Sample."""

    def __init__(self, sample: Sample) -> None:
        self.latest = sample
        self.counters = SamplerCounters(ticks=1, last_duration=sample.duration)
        self.interval = 10.0
        self.nowait = True


def build(n: int) -> Sample:
    doc = json.loads(FIXTURE.read_text())
    templates = [MappingProxyType(dict(d["stats"])) for d in doc["domains"]]
    now = time.time()
    domains = tuple(DomainStats(f"vm{i:05d}", f"00000000-0000-4000-8000-{i:012x}", templates[i % len(templates)], now)
                    for i in range(n))
    node = MappingProxyType({"model": "x86_64", "memory_bytes": 256 << 30, "cpus": 64, "mhz": 2400, "numa_nodes": 2,
                             "sockets": 2, "cores": 16, "threads": 2})
    return Sample(timestamp=now, duration=0.1, domains=domains, node=node)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", type=int, default=5000)
    p.add_argument("--renders", type=int, default=3)
    ns = p.parse_args(argv)
    n = max(1, min(ns.domains, 50_000))
    rss0 = rss_kib()
    sample = build(n)
    keys_per_domain = sum(len(d.stats) for d in sample.domains) / n
    collector = StatsCollector(sampler=FixedSampler(sample))
    registry = make_registry(collector, process=False)
    t = time.perf_counter()
    body = generate_latest(registry)
    cold = time.perf_counter() - t
    warm = []
    for _ in range(max(1, min(ns.renders, 20))):
        t = time.perf_counter()
        generate_latest(registry)
        warm.append(time.perf_counter() - t)
    rss1 = rss_kib()
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

    t = time.perf_counter()
    sizes: list[int] = []
    for _, message in batches(sample, "bench-host"):
        sizes.append(len(json.dumps(message, separators=(",", ":"), default=str).encode()))
    encode = time.perf_counter() - t
    limit = Settings().max_message_bytes
    out: dict[str, Any] = {
        "synthetic": True, "fixture": str(FIXTURE.relative_to(ROOT)), "domains": n,
        "stats_keys_per_domain": round(keys_per_domain, 1),
        "render_cold_ms": round(cold * 1000, 1), "render_warm_ms": round(min(warm) * 1000, 1),
        "body_bytes": len(body), "series": series,
        "rss_growth_mib": round((rss1 - rss0) / 1024, 1),
        "batches_encode_ms": round(encode * 1000, 1), "messages": len(sizes), "bytes": sum(sizes),
        "max_message_bytes": max(sizes), "agent_max_message_bytes": limit,
        "messages_over_limit": sum(1 for s in sizes if s > limit),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
