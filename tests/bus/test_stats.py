"""Statistics end to end: a real agent (libvirt test driver), its batches on the bus, ``/metrics``.

Plus the sampler's own behaviour against the real test driver: one bulk call for a
200-domain host, NOWAIT detection, the per-domain fallback when calls hang, the
drift-free period.
"""
from __future__ import annotations

import queue
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import libvirt
import libvirtmod
import pytest
from prometheus_client.parser import text_string_to_metric_families

from busagent.client.subscribe import Subscription
from busagent.config import Settings
from busagent.sampler import NOWAIT, HypervisorUnavailable, Sampler
from busagent.stats_wiring import attach_stats

LONG = 3600.0  # a period no test waits for: ticks happen at start and when a test asks


def host_file(path: Path, n: int, prefix: str = "vm") -> str:
    """A test-driver host description (``test:///ABS/PATH``) with ``n`` running domains."""
    doms = "".join(f"<domain type='test'><name>{prefix}{i:03d}</name><memory unit='MiB'>64</memory>"
                   f"<vcpu>1</vcpu><os><type arch='i686'>hvm</type></os></domain>" for i in range(n))
    path.write_text(f"<node><cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
                    f"<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                    f"<memory>8388608</memory>{doms}</node>")
    return f"test://{path}"


def next_docs(sub: Subscription, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        doc = sub.get(timeout=max(0.01, deadline - time.monotonic()))
        if "gap" not in doc:
            out.append(doc)
    return out


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, values


class LibvirtCalls:
    """Counts every call into libvirt's C module (libvirtmod), by function and thread name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        lock = threading.Lock()
        for name in dir(libvirtmod):
            fn = getattr(libvirtmod, name)
            if name.startswith("vir") and callable(fn):
                def wrapped(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
                    with lock:
                        self.calls[(_name, threading.current_thread().name)] += 1
                    return _fn(*args)
                monkeypatch.setattr(libvirtmod, name, wrapped)

    def count(self, function: str) -> int:
        return sum(n for (f, _), n in self.calls.items() if f == function)

    def on_threads(self, pick) -> list[tuple[str, str]]:
        return [key for key in self.calls if pick(key[1])]


# -- a real agent on test:///default ---------------------------------------------------------
@pytest.fixture(scope="module")
def stats_agent(bus):
    with bus.agent(Settings(metrics_listen="127.0.0.1:0", sample_interval=LONG), with_stats=False) as running:
        handle = attach_stats(running.agent, start=False)
        try:
            yield running, handle
        finally:
            handle.stop()


def test_one_batch_per_kind_with_every_domain(bus, stats_agent):
    running, handle = stats_agent
    host = running.host_id
    with bus.subscription(running, [f"libvirt.stats.{host}.*"]) as sub:
        assert sub.ready.wait(10)
        handle.sampler.start()  # its first tick is at once
        docs = next_docs(sub, 4)
        with pytest.raises(queue.Empty):
            sub.get(timeout=0.3)  # and nothing more: one message per kind per tick
    by_kind = {d["kind"]: d for d in docs}
    assert sorted(by_kind) == ["stats.domain", "stats.network", "stats.node", "stats.storage_pool"]
    assert {d["topic"] for d in docs} == {f"libvirt.stats.{host}.{k}" for k in
                                          ("domain", "node", "storage_pool", "network")}
    dom = by_kind["stats.domain"]
    conn = libvirt.open("test:///default")  # the same shared test-driver state
    try:
        expected = {d.name() for d in conn.listAllDomains(0)}
    finally:
        conn.close()
    assert {d["name"] for d in dom["domains"]} == expected
    assert dom["chunks"] == 1 and dom["total"] == len(expected) and dom["ok"] and dom["mode"] == "bulk"
    test = next(d for d in dom["domains"] if d["name"] == "test")
    assert test["stats"]["state.state"] == libvirt.VIR_DOMAIN_RUNNING and test["stale"] is False
    assert by_kind["stats.node"]["node"]["cpus"] > 0
    assert any(p["name"] == "default-pool" for p in by_kind["stats.storage_pool"]["pools"])
    assert any(n["name"] == "default" and n["active"] for n in by_kind["stats.network"]["networks"])


def test_metrics_endpoint(bus, stats_agent):
    running, handle = stats_agent
    handle.sampler.sample_once()
    with bus.client(running, timeout=15) as client:
        assert client.call("virConnectGetHostname")
    text, values = scrape(handle.metrics_port)
    assert "\nlibvirt_up 1.0\n" in text
    vstate = [v for (name, labels), v in values.items()
              if name == "libvirt_domain_info_vstate" and dict(labels)["domain"] == "test"]
    assert vstate == [1.0]
    assert 'libvirt_domain_info_vstate{domain="test",uuid="' in text
    ok = (("method", "virConnectGetHostname"), ("outcome", "ok"))
    assert values[("busagent_requests_total", ok)] >= 1
    assert values[("busagent_request_duration_seconds_count", (("method", "virConnectGetHostname"),))] >= 1
    assert values[("busagent_bus_connected", ())] == 1
    assert values[("busagent_hypervisor_connected", ())] == 1
    assert values[("busagent_events_published_total", (("kind", "stats.domain"),))] >= 1
    assert values[("busagent_sample_stale_domains", ())] == 0
    assert 0 <= values[("busagent_sample_age_seconds", ())] < 60
    assert values[("busagent_sample_duration_seconds", ())] > 0
    assert ("process_cpu_seconds_total", ()) in values


def test_a_scrape_never_calls_libvirt(stats_agent, monkeypatch):
    running, handle = stats_agent
    calls = LibvirtCalls(monkeypatch)
    handle.sampler.sample_once()  # the sampler does call libvirt (control: the counting works)
    assert calls.count("virConnectGetAllDomainStats") == 1
    before = set(calls.calls)
    for _ in range(3):
        scrape(handle.metrics_port)  # on the HTTP server's request threads
    list(handle.collector.collect())  # and directly, on this thread
    new = [key for key in calls.calls if key not in before]
    scrapers = [key for key in new if "process_request" in key[1] or key[1] == threading.current_thread().name]
    assert scrapers == [], f"a scrape called libvirt: {scrapers}"
    assert handle.collector.scrapes >= 4


def test_metrics_disabled_and_stop(bus):
    with bus.agent(Settings(metrics_listen="", sample_interval=LONG), with_stats=False) as running:
        handle = attach_stats(running.agent)
        assert handle.metrics_port is None
        deadline = time.monotonic() + 5
        while handle.sampler.latest is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handle.sampler.latest is not None
        handle.stop()
        assert handle.sampler._thread is None  # noqa: SLF001


# -- 200 domains: one bulk call ---------------------------------------------------------------
def test_200_domains_sampled_in_one_bulk_call(bus, tmp_path, monkeypatch):
    uri = host_file(tmp_path / "host200.xml", 200)
    settings = Settings(uri=uri, metrics_listen="127.0.0.1:0", sample_interval=LONG)
    with bus.agent(settings, with_stats=False) as running:
        handle = attach_stats(running.agent, start=False)
        try:
            calls = LibvirtCalls(monkeypatch)
            with bus.subscription(running, [f"libvirt.stats.{running.host_id}.domain"]) as sub:
                assert sub.ready.wait(10)
                durations = [handle.sampler.sample_once().duration for _ in range(5)]
                docs = next_docs(sub, 5)
            sample = handle.sampler.latest
            assert calls.count("virConnectGetAllDomainStats") == 5  # one per tick
            assert calls.count("virDomainListGetStats") == 0  # never domain by domain
            assert calls.count("virConnectListAllDomains") == 0
            assert len(sample.domains) == 200 and sample.mode == "bulk" and not sample.stale
            assert all(len(d["domains"]) == 200 and d["chunks"] == 1 for d in docs)
            _, values = scrape(handle.metrics_port)
            assert values[("libvirt_domains", ())] == 200
            assert sum(1 for (n, _) in values if n == "libvirt_domain_info_vstate") == 200
            best = min(durations)
            print(f"\nsample of 200 domains (test driver): best {best * 1000:.2f} ms, "
                  f"median {sorted(durations)[2] * 1000:.2f} ms")
            assert best < 1.0
        finally:
            handle.stop()


# -- the sampler against slow or refusing calls ------------------------------------------------
class Wrapped:
    """A real test-driver connection with chosen calls made slow or refused."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.release = threading.Event()
        self.block_bulk = False
        self.slow_domains: set[str] = set()
        self.refuse_nowait = False
        self.bulk_flags: list[int] = []
        self.per_domain: Counter[str] = Counter()

    def getAllDomainStats(self, stats: int = 0, flags: int = 0):  # noqa: N802
        self.bulk_flags.append(flags)
        if self.refuse_nowait and flags & NOWAIT:
            return self.conn.getAllDomainStats(stats, flags | (1 << 20))  # a genuine 'unsupported flags' error
        if self.block_bulk:
            self.release.wait(10)
        return self.conn.getAllDomainStats(stats, flags)

    def domainListGetStats(self, doms, stats: int = 0, flags: int = 0):  # noqa: N802
        name = doms[0].name()
        self.per_domain[name] += 1
        if name in self.slow_domains:
            self.release.wait(10)
        return self.conn.domainListGetStats(doms, stats, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


@pytest.fixture
def host20(tmp_path):
    conn = libvirt.open(host_file(tmp_path / "host20.xml", 20, prefix="g"))
    wrapped = Wrapped(conn)
    yield wrapped
    wrapped.release.set()
    time.sleep(0.05)
    conn.close()


def test_nowait_refused_is_detected_once(host20):
    host20.refuse_nowait = True
    sampler = Sampler(lambda: host20, LONG)
    first = sampler.sample_once()
    assert first.ok and first.mode == "bulk" and len(first.domains) == 20
    assert sampler.nowait is False
    sampler.sample_once()
    assert host20.bulk_flags == [NOWAIT, 0, 0]  # tried once, then never again


def test_nowait_used_when_accepted(host20):
    sampler = Sampler(lambda: host20, LONG)
    sampler.sample_once()
    sampler.sample_once()
    assert sampler.nowait is True and host20.bulk_flags == [NOWAIT, NOWAIT]


def test_hung_domains_do_not_hold_up_the_rest(host20):
    sampler = Sampler(lambda: host20, LONG, call_timeout=0.3, domain_timeout=0.3)
    fresh = sampler.sample_once()
    slow = next(d for d in fresh.domains if d.name == "g007")
    host20.block_bulk = True
    host20.slow_domains = {"g007"}

    second = sampler.sample_once()  # bulk call hangs -> per-domain, g007 hangs -> stale
    assert second.mode == "per-domain" and second.ok
    assert second.stale == {slow.uuid}
    assert len(second.domains) == 20
    kept = next(d for d in second.domains if d.uuid == slow.uuid)
    assert kept is slow  # its last statistics, kept
    assert all(d.taken > slow.taken for d in second.domains if d.uuid != slow.uuid)
    assert second.duration < 1.5
    assert sampler.counters.timeouts["domain"] == 1 and sampler.counters.timeouts["domain_one"] == 1

    time.sleep(0.05)
    third = sampler.sample_once()  # both still hung: neither is called again
    assert third.stale == {slow.uuid} and third.age_of(kept) >= 0.3
    assert len(host20.bulk_flags) == 2  # the hung bulk call was not repeated
    assert host20.per_domain["g007"] == 1 and host20.per_domain["g001"] == 2
    assert third.duration < 0.5  # nothing waited for the hung calls a second time

    host20.release.set()
    host20.block_bulk, host20.slow_domains = False, set()
    time.sleep(0.1)
    fourth = sampler.sample_once()
    assert fourth.mode == "bulk" and not fourth.stale


def test_hypervisor_down_keeps_last_values_stale(host20):
    up = {"yes": True}

    def conn():
        if not up["yes"]:
            raise HypervisorUnavailable("down")
        return host20

    sampler = Sampler(conn, LONG)
    first = sampler.sample_once()
    up["yes"] = False
    second = sampler.sample_once()
    assert not second.ok and second.mode == "failed"
    assert second.stale == {d.uuid for d in first.domains}
    assert sampler.counters.failures["domain"] == 1
    up["yes"] = True
    assert sampler.sample_once().ok


def test_period_is_drift_free_and_skips_missed_ticks(host20):
    interval, starts = 0.1, []
    slow_tick = 4

    def on_sample(sample):
        starts.append(time.monotonic() - sample.duration)
        if len(starts) == slow_tick:
            time.sleep(0.35)  # this tick overruns: the next 3 deadlines are skipped

    sampler = Sampler(lambda: host20, interval, on_sample=on_sample)
    sampler.start()
    time.sleep(1.25)
    sampler.stop()
    assert sampler.counters.missed_ticks == 3
    offsets = [(t - starts[0]) / interval for t in starts]
    # every tick starts on the grid start + k * interval, however long the ticks before took
    assert all(abs(o - round(o)) < 0.3 for o in offsets), offsets
    grid = [round(o) for o in offsets]
    assert grid[:slow_tick] == [0, 1, 2, 3] and grid[slow_tick] == 7, grid
