"""The metric mapping on RECORDED QEMU statistics (pure: no hypervisor, no agent; not marked ``real``).

tests/fixtures/real-domstats-qemu.json holds what ``virConnectGetAllDomainStats`` returned for
real guests (test_real_sampler.py::test_record_fixture writes it). Every key real QEMU returns is
either turned into a metric, with its unit converted, or named here as deliberately left out, so
a key the mapping misses (or a new one from a newer libvirt) shows up as a failure.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import MappingProxyType

import libvirt
import pytest

from busagent.metrics import DOMAIN_GROUPS, DOMAIN_STATS, libvirt_families
from busagent.sampler import DomainStats, Sample

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "real-domstats-qemu.json"
NS, KIB = 1e-9, 1024.0

# keys real QEMU returns that are not metrics, and why
NOT_METRICS = {
    r"(block|net)\.count": "sizes of the arrays, implied by the series",
    r"(block|net)\.\d+\.name": "the target_device label",
    r"block\.\d+\.path": "a file path: not a value",
    r"block\.\d+\.backingIndex": "an index into the backing chain: not a value",
    r"cpu\.cache\.monitor\.count": "resctrl cache monitors (none here)",
    r"cpu\.haltpoll\.(success|fail)\.time": "KVM halt-polling: not mapped by the community exporters",
    r"dirtyrate\..*": "dirty-rate calculation status (virDomainStartDirtyRateCalc)",
}
WHOLE: dict[str, list] = {}
for _s in DOMAIN_STATS:  # one key may give several metrics (vcpu.current, balloon.current)
    WHOLE.setdefault(_s.key, []).append(_s)
GROUPS = {g.prefix: (g, {s.key: s for s in g.stats}) for g in DOMAIN_GROUPS}


def records() -> list[dict]:
    return json.loads(FIXTURE.read_text())["domains"]


def sample_of(recs: list[dict]) -> Sample:
    now = time.time()
    return Sample(timestamp=now, duration=0.01, domains=tuple(
        DomainStats(r["name"], r["uuid"], MappingProxyType(r["stats"]), now) for r in recs))


def series(sample: Sample) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in libvirt_families(sample) for s in fam.samples}


def expected_series(rec: dict) -> dict[tuple[str, tuple], float]:
    """What the table says one record must give: (metric, labels) -> converted value."""
    stats, base = rec["stats"], {"domain": rec["name"], "uuid": rec["uuid"]}
    out = {}
    for key, raw in stats.items():
        if isinstance(raw, str):
            continue
        if key.startswith("cpu.") and stats.get("state.state") == libvirt.VIR_DOMAIN_SHUTOFF:
            continue  # libvirtd's own CPU time, not the domain's (see test_shut_off_domain_has_no_cpu_time)
        stats_of, labels = WHOLE.get(key, []), dict(base)
        if not stats_of:
            m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", key)
            if not m or m.group(1) not in GROUPS:
                continue
            group, by_suffix = GROUPS[m.group(1)]
            if m.group(3) not in by_suffix:
                continue
            stats_of = [by_suffix[m.group(3)]]
            labels[group.label] = m.group(2) if group.label_key is None else \
                stats[f"{m.group(1)}.{m.group(2)}.{group.label_key}"]
        for stat in stats_of:
            out[(stat.name, tuple(sorted(labels.items())))] = stat.unit(float(raw))
    return out


def test_fixture_is_recorded():
    doc = json.loads(FIXTURE.read_text())
    assert doc["_provenance"].startswith("RECORDED")
    names = {(r["name"], r["round"]) for r in doc["domains"]}
    assert {("alpha", 0), ("alpha", 1), ("db-off", 0)} <= names
    assert not any("/tmp/" in json.dumps(r) for r in doc["domains"])  # sanitized


@pytest.mark.parametrize("rec", records(), ids=lambda r: f"{r['name']}-{r['round']}")
def test_every_key_is_a_metric_or_named_as_not_one(rec):
    unmapped = []
    for key in rec["stats"]:
        if key in WHOLE:
            continue
        m = re.fullmatch(r"(\w+)\.(\d+)\.(.+)", key)
        if m and m.group(1) in GROUPS and m.group(3) in GROUPS[m.group(1)][1]:
            continue
        if any(re.fullmatch(p, key) for p in NOT_METRICS):
            continue
        unmapped.append(key)
    assert unmapped == [], f"keys real QEMU returns that the mapping neither maps nor names: {unmapped}"


@pytest.mark.parametrize("rec", records(), ids=lambda r: f"{r['name']}-{r['round']}")
def test_each_record_maps_to_its_series(rec):
    got = series(sample_of([rec]))
    want = expected_series(rec)
    assert want, "no series expected"
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    extra = {name for name, _ in got} - {name for name, _ in want} - {
        "libvirt_up", "libvirt_domains", "libvirt_domain_memory_stats_used_percent"}
    assert not extra, extra


def test_running_guest_values():
    alpha = next(r for r in records() if r["name"] == "alpha" and r["round"] == 0)
    s, got = alpha["stats"], series(sample_of([alpha]))
    labels = (("domain", "alpha"), ("uuid", alpha["uuid"]))

    def metric(name: str, **extra: str) -> float:
        return got[(name, tuple(sorted((*labels, *extra.items()))))]

    assert metric("libvirt_domain_info_vstate") == libvirt.VIR_DOMAIN_RUNNING
    assert metric("libvirt_domain_info_maximum_memory_bytes") == 128 * 1024 * 1024
    assert metric("libvirt_domain_info_cpu_time_seconds_total") == pytest.approx(s["cpu.time"] * NS)
    assert metric("libvirt_domain_vcpu_current") == 1 and metric("libvirt_domain_vcpu_maximum") == 2
    assert ("libvirt_domain_vcpu_time_seconds_total", tuple(sorted((*labels, ("vcpu", "1"))))) not in got
    assert metric("libvirt_domain_block_stats_read_bytes_total", target_device="vda") == s["block.0.rd.bytes"] > 0
    assert metric("libvirt_domain_block_stats_capacity_bytes", target_device="vda") == 64 * 1024 * 1024
    # the empty cdrom: counters but no capacity
    assert ("libvirt_domain_block_stats_capacity_bytes", tuple(sorted((*labels, ("target_device", "hdc"))))) \
        not in got
    for i in range(s["net.count"]):
        tap = s[f"net.{i}.name"]
        assert metric("libvirt_domain_interface_stats_receive_packets_total", target_device=tap) \
            == s[f"net.{i}.rx.pkts"] > 0
    assert metric("libvirt_domain_memory_stats_rss_bytes") == s["balloon.rss"] * KIB


def test_counters_do_not_go_back_between_rounds():
    first, second = (series(sample_of([r])) for r in sorted(
        (r for r in records() if r["name"] == "alpha"), key=lambda r: r["round"]))
    counters = [k for k in first if k[0].endswith("_total")]
    assert counters
    for key in counters:
        assert second[key] >= first[key], key
    cpu = ("libvirt_domain_info_cpu_time_seconds_total",)
    assert any(second[k] > first[k] for k in first if k[0] == cpu[0])


def test_shut_off_domain_state():
    off = next(r for r in records() if r["name"] == "db-off")
    got = series(sample_of([off]))
    labels = (("domain", "db-off"), ("uuid", off["uuid"]))
    assert got[("libvirt_domain_info_vstate", labels)] == libvirt.VIR_DOMAIN_SHUTOFF
    assert got[("libvirt_domain_info_maximum_memory_bytes", labels)] == 256 * 1024 * 1024
    assert not any(name.startswith(("libvirt_domain_block_", "libvirt_domain_interface_")) for name, _ in got)


def test_shut_off_domain_has_no_cpu_time():
    """libvirt 9.0's QEMU driver reports a shut-off domain's cpu.* from libvirtd's own process
    (recorded in the fixture); the mapping must not export it as the domain's CPU time."""
    off = next(r for r in records() if r["name"] == "db-off")
    assert "cpu.time" in off["stats"]  # what libvirt 9.0 returns
    got = series(sample_of([off]))
    assert not any(name == "libvirt_domain_info_cpu_time_seconds_total" for name, _ in got)
