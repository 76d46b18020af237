"""getAllDomainStats samples -> Prometheus metric families (pure: no libvirt, no agent).

The QEMU fixture is hand-built from libvirt's documented key layout, not recorded
(see its ``_provenance``); the test driver only yields ``state.*``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from busagent.metrics import DOMAIN_GROUPS, DOMAIN_STATS, POOL_STATS, StatsCollector, libvirt_families, make_registry
from busagent.rpc import RpcStats
from busagent.sampler import DomainStats, Sample, SamplerCounters, batches

FIXTURE = Path(__file__).parent.parent / "fixtures" / "domstats-qemu.json"
WEB = ("web-1", "4b1e0c5e-8f3c-4c1a-9c57-3a0d7c2f5b11")
DB = ("db-2", "9a3f6d21-0b7e-4e55-8d0c-6f1e2a4b7c93")


def load_sample(stale: frozenset[str] = frozenset()) -> Sample:
    doc = json.loads(FIXTURE.read_text())
    now = time.time()
    domains = tuple(DomainStats(d["name"], d["uuid"], MappingProxyType(d["stats"]), now - 30 * (d["uuid"] in stale))
                    for d in doc["domains"])
    node = MappingProxyType({"model": "x86_64", "memory_bytes": 64 << 30, "cpus": 16, "mhz": 2400, "numa_nodes": 1,
                             "sockets": 1, "cores": 8, "threads": 2,
                             "cpu": {"user": 1_500_000_000, "kernel": 250_000_000, "idle": 9_000_000_000,
                                     "iowait": 1_000_000},
                             "memory": {"total": 65_536_000, "free": 32_000_000, "buffers": 1024, "cached": 2048}})
    pools = (MappingProxyType({"name": "default", "uuid": "p-1", "state": 2, "capacity": 100 << 30,
                               "allocation": 40 << 30, "available": 60 << 30}),)
    networks = (MappingProxyType({"name": "default", "uuid": "n-1", "active": True}),
                MappingProxyType({"name": "isolated", "uuid": "n-2", "active": False}))
    return Sample(timestamp=now, duration=0.004, domains=domains, node=node, pools=pools, networks=networks,
                  stale=stale)


def series(families) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, over every family."""
    out = {}
    for fam in families:
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def dom(name_uuid: tuple[str, str], **extra: str) -> tuple:
    return tuple(sorted({"domain": name_uuid[0], "uuid": name_uuid[1], **extra}.items()))


@pytest.fixture(scope="module")
def got():
    return series(libvirt_families(load_sample()))


def test_fixture_is_marked_hand_built():
    doc = json.loads(FIXTURE.read_text())
    assert "HAND-BUILT, NOT RECORDED" in doc["_provenance"]


@pytest.mark.parametrize("metric,labels,value", [
    ("libvirt_up", (), 1.0),
    ("libvirt_domains", (), 2.0),
    ("libvirt_domain_info_vstate", dom(WEB), 1.0),
    ("libvirt_domain_info_vstate", dom(DB), 5.0),
    ("libvirt_domain_info_vstate_reason", dom(WEB), 1.0),
    # ns -> s
    ("libvirt_domain_info_cpu_time_seconds_total", dom(WEB), 123.456789012),
    ("libvirt_domain_info_cpu_user_seconds_total", dom(WEB), 100.0),
    ("libvirt_domain_info_cpu_system_seconds_total", dom(WEB), 20.0),
    # KiB -> bytes
    ("libvirt_domain_info_maximum_memory_bytes", dom(WEB), 4194304 * 1024),
    ("libvirt_domain_info_memory_usage_bytes", dom(WEB), 2097152 * 1024),
    ("libvirt_domain_info_memory_usage_bytes", dom(DB), 1 << 30),
    ("libvirt_domain_info_virtual_cpus", dom(WEB), 2.0),
    ("libvirt_domain_vcpu_current", dom(WEB), 2.0),
    ("libvirt_domain_vcpu_maximum", dom(WEB), 4.0),
    ("libvirt_domain_memory_stats_actual_balloon_bytes", dom(WEB), 2097152 * 1024),
    ("libvirt_domain_memory_stats_major_fault_total", dom(WEB), 312.0),
    ("libvirt_domain_memory_stats_minor_fault_total", dom(WEB), 1648223.0),
    ("libvirt_domain_memory_stats_unused_bytes", dom(WEB), 1572864 * 1024),
    ("libvirt_domain_memory_stats_available_bytes", dom(WEB), 2015232 * 1024),
    ("libvirt_domain_memory_stats_usable_bytes", dom(WEB), 1703936 * 1024),
    ("libvirt_domain_memory_stats_rss_bytes", dom(WEB), 1250000 * 1024),
    ("libvirt_domain_memory_stats_disk_cache_bytes", dom(WEB), 98304 * 1024),
    ("libvirt_domain_memory_stats_swap_in_bytes", dom(WEB), 0.0),
    ("libvirt_domain_memory_stats_last_update_timestamp_seconds", dom(WEB), 1732700000.0),
    ("libvirt_domain_memory_stats_used_percent", dom(WEB), (2015232 - 1703936) / 2015232 * 100),
    # vcpu array: sparse (0 and 2), labelled by index; bool -> 0/1
    ("libvirt_domain_vcpu_time_seconds_total", dom(WEB, vcpu="0"), 61.5),
    ("libvirt_domain_vcpu_time_seconds_total", dom(WEB, vcpu="2"), 58.25),
    ("libvirt_domain_vcpu_state", dom(WEB, vcpu="2"), 1.0),
    ("libvirt_domain_vcpu_wait_seconds_total", dom(WEB, vcpu="0"), 0.001),
    ("libvirt_domain_vcpu_delay_seconds_total", dom(WEB, vcpu="0"), 0.025),
    ("libvirt_domain_vcpu_halted", dom(WEB, vcpu="0"), 0.0),
    ("libvirt_domain_vcpu_halted", dom(WEB, vcpu="2"), 1.0),
    # block array: labelled by block.N.name
    ("libvirt_domain_block_stats_read_bytes_total", dom(WEB, target_device="vda"), 491520000.0),
    ("libvirt_domain_block_stats_read_requests_total", dom(WEB, target_device="vda"), 12000.0),
    ("libvirt_domain_block_stats_read_time_seconds_total", dom(WEB, target_device="vda"), 4.5),
    ("libvirt_domain_block_stats_write_bytes_total", dom(WEB, target_device="vda"), 245760000.0),
    ("libvirt_domain_block_stats_write_requests_total", dom(WEB, target_device="vda"), 6000.0),
    ("libvirt_domain_block_stats_write_time_seconds_total", dom(WEB, target_device="vda"), 9.0),
    ("libvirt_domain_block_stats_flush_requests_total", dom(WEB, target_device="vda"), 300.0),
    ("libvirt_domain_block_stats_flush_time_seconds_total", dom(WEB, target_device="vda"), 0.75),
    ("libvirt_domain_block_stats_allocation", dom(WEB, target_device="vda"), 1073741824.0),
    ("libvirt_domain_block_stats_capacity_bytes", dom(WEB, target_device="vda"), 21474836480.0),
    ("libvirt_domain_block_stats_physicalsize_bytes", dom(WEB, target_device="vda"), 1074003968.0),
    ("libvirt_domain_block_stats_threshold_bytes", dom(WEB, target_device="vda"), 16106127360.0),
    ("libvirt_domain_block_stats_read_bytes_total", dom(WEB, target_device="sda"), 163840.0),
    ("libvirt_domain_block_stats_capacity_bytes", dom(DB, target_device="vda"), 10737418240.0),
    # net array: labelled by net.N.name
    ("libvirt_domain_interface_stats_receive_bytes_total", dom(WEB, target_device="vnet0"), 104857600.0),
    ("libvirt_domain_interface_stats_receive_packets_total", dom(WEB, target_device="vnet0"), 80000.0),
    ("libvirt_domain_interface_stats_receive_errors_total", dom(WEB, target_device="vnet0"), 0.0),
    ("libvirt_domain_interface_stats_receive_drops_total", dom(WEB, target_device="vnet0"), 3.0),
    ("libvirt_domain_interface_stats_transmit_bytes_total", dom(WEB, target_device="vnet0"), 52428800.0),
    ("libvirt_domain_interface_stats_transmit_packets_total", dom(WEB, target_device="vnet0"), 40000.0),
    ("libvirt_domain_interface_stats_transmit_errors_total", dom(WEB, target_device="vnet0"), 1.0),
    ("libvirt_domain_interface_stats_transmit_drops_total", dom(WEB, target_device="vnet0"), 0.0),
    ("libvirt_domain_interface_stats_transmit_packets_total", dom(WEB, target_device="vnet1"), 8.0),
    # node, pools, networks
    ("libvirt_node_info_cpus", (), 16.0),
    ("libvirt_node_info_memory_bytes", (), float(64 << 30)),
    ("libvirt_node_info_cpu_frequency_hertz", (), 2.4e9),
    ("libvirt_node_cpu_seconds_total", (("mode", "user"),), 1.5),
    ("libvirt_node_cpu_seconds_total", (("mode", "idle"),), 9.0),
    ("libvirt_node_memory_stats_bytes", (("kind", "free"),), 32_000_000 * 1024),
    ("libvirt_storage_pool_capacity_bytes", (("storage_pool", "default"), ("uuid", "p-1")), float(100 << 30)),
    ("libvirt_storage_pool_allocation_bytes", (("storage_pool", "default"), ("uuid", "p-1")), float(40 << 30)),
    ("libvirt_storage_pool_available_bytes", (("storage_pool", "default"), ("uuid", "p-1")), float(60 << 30)),
    ("libvirt_storage_pool_state", (("storage_pool", "default"), ("uuid", "p-1")), 2.0),
    ("libvirt_network_active", (("network", "default"), ("uuid", "n-1")), 1.0),
    ("libvirt_network_active", (("network", "isolated"), ("uuid", "n-2")), 0.0),
])
def test_mapping(got, metric, labels, value):
    assert got[(metric, labels)] == pytest.approx(value, rel=1e-12)


def test_exact_unit_conversions(got):
    """ns -> s by division: whole and decimal seconds come out exact, not 9.797400000000001."""
    assert got[("libvirt_domain_vcpu_time_seconds_total", dom(WEB, vcpu="2"))] == 58.25
    assert got[("libvirt_domain_info_cpu_time_seconds_total", dom(WEB))] == 123.456789012


def test_no_series_for_labels_or_unknown_keys(got):
    names = {name for name, _ in got}
    assert not any("path" in n or "haltpoll" in n or "count" in n for n in names)
    assert ("libvirt_domain_vcpu_time_seconds_total", dom(WEB, vcpu="1")) not in got  # sparse: no vcpu 1
    # a shut-off domain has no runtime counters
    assert ("libvirt_domain_info_cpu_time_seconds_total", dom(DB)) not in got
    assert ("libvirt_domain_block_stats_read_bytes_total", dom(DB, target_device="vda")) not in got


def test_every_table_row_is_exercised_by_the_fixture(got):
    names = {name for name, _ in got}
    rows = [*DOMAIN_STATS, *(s for g in DOMAIN_GROUPS for s in g.stats), *POOL_STATS]
    missing = [s.name for s in rows if s.name not in names and s.key != "errors"]  # block.N.errors: Xen only
    assert not missing


def test_table_names_follow_the_rules():
    for s in [*DOMAIN_STATS, *(s for g in DOMAIN_GROUPS for s in g.stats)]:
        assert s.name.startswith("libvirt_domain_"), s.name
        assert s.counter == s.name.endswith("_total")
        assert "_total" not in s.name[:-len("_total")], s.name


def test_duplicate_devices_keep_one_series():
    stats = {"block.count": 2, "block.0.name": "vda", "block.0.rd.bytes": 1, "block.1.name": "vda",
             "block.1.rd.bytes": 2}
    sample = Sample(timestamp=time.time(), duration=0.0, domains=(DomainStats("d", "u", stats, time.time()),))
    got = series(libvirt_families(sample))
    assert got[("libvirt_domain_block_stats_read_bytes_total", dom(("d", "u"), target_device="vda"))] == 1


def test_libvirt_down_and_no_sample():
    assert series(libvirt_families(None)) == {("libvirt_up", ()): 0.0}
    assert series(libvirt_families(load_sample(), up=False))[("libvirt_up", ())] == 0.0
    failed = Sample(timestamp=time.time(), duration=0.0, ok=False, mode="failed")
    assert series(libvirt_families(failed))[("libvirt_up", ())] == 0.0


# -- the whole exposition: agent metrics too, then lint -------------------------------------
class FakeSampler:
    def __init__(self, sample: Sample) -> None:
        self.latest = sample
        self.interval = 10.0
        self.nowait = True
        self.counters = SamplerCounters(ticks=3, missed_ticks=1)
        self.counters.failures["storage_pool"] += 1
        self.counters.timeouts["domain"] += 2


@pytest.fixture(scope="module")
def exposition() -> str:
    rpc = RpcStats()
    for method, outcome, seconds in [("virDomainGetInfo", "ok", 0.0004), ("virDomainGetInfo", "ok", 0.003),
                                     ("virDomainGetInfo", "libvirt", 0.02), ("virNoSuch", "unknown_method", 0.0001),
                                     ("virMadeUp", "unknown_method", 0.0001)]:
        rpc.count(method, outcome)
        rpc.observe(method, outcome, seconds)
    rpc.reject("undecodable")
    published = {"domain.lifecycle": 4, "stats.domain": 2, "presence": 1, "dropped": 5}
    sample = load_sample(stale=frozenset({DB[1]}))
    collector = StatsCollector(FakeSampler(sample), rpc, published, lambda: True, lambda: True)
    return generate_latest(make_registry(collector)).decode()


def parsed(text: str) -> dict[tuple[str, tuple], float]:
    return series(text_string_to_metric_families(text))


def test_agent_metrics(exposition):
    got = parsed(exposition)
    assert got[("busagent_requests_total", (("method", "virDomainGetInfo"), ("outcome", "ok")))] == 2
    assert got[("busagent_requests_total", (("method", "virDomainGetInfo"), ("outcome", "libvirt")))] == 1
    # client-made-up method names are folded, never a label of their own
    assert got[("busagent_requests_total", (("method", "(unknown)"), ("outcome", "unknown_method")))] == 2
    assert not any(dict(labels).get("method") == "virMadeUp" for _, labels in got)
    assert got[("busagent_rejected_total", (("reason", "undecodable"),))] == 1
    assert got[("busagent_events_published_total", (("kind", "stats.domain"),))] == 2
    assert got[("busagent_events_dropped_total", ())] == 5
    assert ("busagent_events_published_total", (("kind", "dropped"),)) not in got
    assert got[("busagent_bus_connected", ())] == 1
    assert got[("busagent_hypervisor_connected", ())] == 1
    assert got[("busagent_sample_duration_seconds", ())] == pytest.approx(0.004)
    assert 0 <= got[("busagent_sample_age_seconds", ())] < 60
    assert got[("busagent_sample_stale_domains", ())] == 1
    assert got[("busagent_sample_stale_domain_age_seconds", dom(DB))] == pytest.approx(30, abs=1)
    assert got[("busagent_samples_total", ())] == 3
    assert got[("busagent_sample_missed_ticks_total", ())] == 1
    assert got[("busagent_sample_failures_total", (("section", "storage_pool"),))] == 1
    assert got[("busagent_sample_timeouts_total", (("section", "domain"),))] == 2


def test_latency_histogram(exposition):
    got = parsed(exposition)
    m = (("method", "virDomainGetInfo"),)

    def bucket(le: str) -> float:
        return got[("busagent_request_duration_seconds_bucket", (("le", le), *m))]

    assert (bucket("0.0005"), bucket("0.001"), bucket("0.005"), bucket("0.025"), bucket("+Inf")) == (1, 1, 2, 3, 3)
    assert got[("busagent_request_duration_seconds_count", m)] == 3
    assert got[("busagent_request_duration_seconds_sum", m)] == pytest.approx(0.0234)


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_NON_BASE_UNITS = ("_milliseconds", "_microseconds", "_nanoseconds", "_kilobytes", "_megabytes", "_kib", "_mib",
                   "_minutes", "_hours", "_percent_ratio")


def test_exposition_lint(exposition):
    """Our own lint (the rules promtool's ``check metrics`` applies), over the parsed text."""
    families = list(text_string_to_metric_families(exposition))
    assert families
    seen = set()
    for fam in families:
        assert _NAME.match(fam.name), fam.name
        assert fam.documentation, f"{fam.name} has no HELP"
        assert fam.name not in seen
        seen.add(fam.name)
        if not fam.name.startswith(("libvirt_", "busagent_")):
            continue
        assert not fam.name.endswith(_NON_BASE_UNITS), fam.name
        assert fam.name == fam.name.lower(), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        else:
            assert "_total" not in fam.name, f"{fam.name} is a {fam.type} but named like a counter"
        for s in fam.samples:
            assert all(_LABEL.match(k) and not k.startswith("__") for k in s.labels), s
    series(families)  # no duplicate series


def promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool")


@pytest.mark.skipif(promtool() is None, reason="promtool not installed (Debian package 'prometheus')")
def test_promtool_check_metrics(exposition):
    run = subprocess.run([promtool(), "check", "metrics"], input=exposition.encode(), capture_output=True,
                         timeout=30)
    problems = (run.stdout + run.stderr).decode()
    assert run.returncode == 0, problems
    assert problems.strip() == "", problems


# -- what goes on the bus --------------------------------------------------------------------
def test_batches_one_message_per_kind():
    sample = load_sample()
    out = list(batches(sample, "h1"))
    assert [k for k, _ in out] == ["domain", "node", "storage_pool", "network"]
    doc = out[0][1]
    assert doc["kind"] == "stats.domain" and doc["host"] == "h1" and doc["chunks"] == 1
    assert [d["name"] for d in doc["domains"]] == ["web-1", "db-2"]
    assert doc["domains"][0]["stats"]["cpu.time"] == 123456789012
    json.dumps([d for _, d in out])  # everything serialisable


def test_batches_chunk_large_hosts():
    doms = tuple(DomainStats(f"vm{i}", f"u{i}", {"state.state": 1}, time.time()) for i in range(1201))
    sample = Sample(timestamp=time.time(), duration=0.0, domains=doms, stale=frozenset({"u7"}))
    chunks = [d for k, d in batches(sample, "h1") if k == "domain"]
    assert [len(c["domains"]) for c in chunks] == [500, 500, 201]
    assert {c["chunks"] for c in chunks} == {3} and [c["chunk"] for c in chunks] == [0, 1, 2]
    assert sum(d["stale"] for c in chunks for d in c["domains"]) == 1


def test_fast_renderer_writes_what_prometheus_client_writes():
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from busagent.metrics import _OneShot, render_families, sample_families

    families = sample_families(load_sample())
    families.append(GaugeMetricFamily("x_odd", 'a "quoted"\\ help\nline', labels=["l"]))
    families[-1].add_metric(['va"l\\ue\n'], float("inf"))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OneShot(families))
    assert render_families(families) == generate_latest(registry)
