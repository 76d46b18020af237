"""Real statistics: the sampler on a real QEMU guest, its batches on the bus, ``/metrics``.

The session's agent samples every second from before ``alpha`` was started (conftest.hv), and a
recorder has kept every ``stats.domain`` batch since: the boot is in there. The guest reads 4 MiB
from its disk at boot and runs DHCP on both NICs, so its block and interface counters must move.

``BUSAGENT_REAL_RECORD=1`` also (re)writes tests/fixtures/real-domstats-qemu.json: real
``virConnectGetAllDomainStats`` records of the running guest (two, a few seconds apart) and of a
defined, shut-off one, with the set-up's paths and the UUIDs replaced (test_real_mapping.py uses it).
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import libvirt
from prometheus_client.parser import text_string_to_metric_families
from realkit import ALPHA, REPO, qemu_guest_xml, wait_until

from busagent.sampler import NOWAIT, Sampler, stats_flags

FIXTURE = REPO / "tests" / "fixtures" / "real-domstats-qemu.json"
MIB = 1 << 20


def alpha_samples(hv) -> list[tuple[float, dict[str, Any]]]:
    """(timestamp, stats) of alpha in every recorded batch, oldest first."""
    out = []
    for doc in hv.stats.since(0):
        assert doc["kind"] == "stats.domain" and doc["host"] == hv.host
        for d in doc["domains"]:
            if d["name"] == ALPHA and not d["stale"]:
                out.append((doc["timestamp"], d["stats"]))
    return out


def first_run(samples: list[tuple[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """alpha's samples of its first run: from its start until it first stops (counters restart then)."""
    run: list[dict[str, Any]] = []
    for _, s in samples:
        if s.get("state.state") != libvirt.VIR_DOMAIN_RUNNING or (
                run and s.get("cpu.time", 0) < run[-1].get("cpu.time", 0)):
            if run:
                break
            continue
        if "block.0.rd.bytes" in s and "net.0.rx.bytes" in s:  # NOWAIT: partial while a job runs
            run.append(s)
    return run


def by_name(stats: dict[str, Any], group: str, name: str) -> dict[str, Any]:
    """{'rd.bytes': ...} of the ``group`` element called ``name`` (block.N.name / net.N.name)."""
    for i in range(int(stats.get(f"{group}.count", 0))):
        if stats.get(f"{group}.{i}.name") == name:
            prefix = f"{group}.{i}."
            return {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
    raise AssertionError(f"no {group} {name} in {sorted(k for k in stats if k.startswith(group))}")


def test_domain_stats_on_the_bus(hv, alpha):
    wait_until("a few samples of alpha", lambda: len(alpha_samples(hv)) >= 5, timeout=30)
    docs = hv.stats.since(0)
    assert all(d["topic"] == f"libvirt.stats.{hv.host}.domain" and d["chunks"] == 1 for d in docs)
    # one bulk call per tick; a tick whose call missed its deadline (libvirtd busy starting or
    # stopping QEMU: the deadline is half the 1 s period here) is published as such, not skipped
    modes = [d["mode"] for d in docs]
    assert set(modes) <= {"bulk", "per-domain", "failed"}
    assert modes.count("bulk") >= 0.7 * len(modes), modes
    assert all(d["ok"] == (d["mode"] != "failed") for d in docs)
    stats = alpha_samples(hv)[-1][1]
    # every group the QEMU driver has for a running guest
    assert stats["state.state"] == libvirt.VIR_DOMAIN_RUNNING
    assert stats["cpu.time"] > 0 and "cpu.user" in stats and "cpu.system" in stats
    assert stats["balloon.maximum"] == 131072 and stats["balloon.current"] > 0
    assert "balloon.rss" in stats and "balloon.available" in stats  # the guest's own statistics (period 1 s)
    assert stats["vcpu.current"] == 1 and stats["vcpu.maximum"] == 2 and "vcpu.0.time" in stats
    assert stats["net.count"] == 2
    assert stats["block.count"] == 2  # vda and the cdrom hdc
    assert by_name(stats, "block", "vda")["capacity"] == 64 * MIB


def test_chosen_groups_only(hv, alpha):
    """``stats.groups`` reaches libvirt: a sampler asking for two groups gets those and no others."""
    wait_until("alpha sampled", lambda: len(alpha_samples(hv)) >= 1, timeout=30)
    conn = libvirt.open(hv.env["qemu_uri"])
    try:
        sampler = Sampler(lambda: conn, 1.0, stats=stats_flags(("cpu-total", "balloon")))
        sample = sampler.sample_once()
    finally:
        conn.close()
    [stats] = [d.stats for d in sample.domains if d.name == ALPHA]
    assert {k.split(".", 1)[0] for k in stats} == {"cpu", "balloon"}, sorted(stats)
    assert stats["cpu.time"] > 0 and stats["balloon.current"] > 0


def test_counters_move_at_boot_and_after_dhcp(hv, alpha):
    run = first_run(alpha_samples(hv))
    assert len(run) >= 3, f"only {len(run)} samples of alpha's first run"
    first, last = run[0], run[-1]
    # block: the guest reads 4 MiB of vda at boot
    rd = [by_name(s, "block", "vda")["rd.bytes"] for s in run]
    assert rd == sorted(rd), rd  # a counter
    assert rd[0] < 4 * MIB <= rd[-1], rd
    assert by_name(last, "block", "vda")["rd.reqs"] > by_name(first, "block", "vda")["rd.reqs"]
    # net: DHCP on both NICs (discover/request out, offer/ack in)
    for i in range(2):
        name = last[f"net.{i}.name"]
        before, after = by_name(first, "net", name), by_name(last, "net", name)
        assert after["tx.pkts"] >= before["tx.pkts"] + 2 and after["tx.bytes"] > before["tx.bytes"], (before, after)
        assert after["rx.pkts"] >= before["rx.pkts"] + 2 and after["rx.bytes"] > before["rx.bytes"], (before, after)
    assert last["cpu.time"] > first["cpu.time"]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_serves_the_latest_sample(hv, alpha):
    sampler = hv.running.agent.stats.sampler
    for _ in range(20):  # a scrape between two ticks: the sample it served is the one still latest
        before = sampler.latest
        got = scrape(hv.metrics_port)
        if sampler.latest is before:
            break
    else:
        raise AssertionError("no scrape between two ticks")
    dom = next(d for d in before.domains if d.name == ALPHA)
    s = dom.stats
    base = (("domain", ALPHA), ("uuid", dom.uuid))

    def metric(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted((*base, *labels.items()))))]

    assert got[("libvirt_up", ())] == 1
    assert metric("libvirt_domain_info_vstate") == 1
    assert metric("libvirt_domain_info_cpu_time_seconds_total") == s["cpu.time"] / 1e9
    assert metric("libvirt_domain_info_maximum_memory_bytes") == 128 * MIB
    assert metric("libvirt_domain_info_memory_usage_bytes") == s["balloon.current"] * 1024
    assert metric("libvirt_domain_vcpu_maximum") == 2
    assert metric("libvirt_domain_vcpu_time_seconds_total", vcpu="0") == s["vcpu.0.time"] / 1e9
    vda = by_name(s, "block", "vda")
    assert metric("libvirt_domain_block_stats_read_bytes_total", target_device="vda") == vda["rd.bytes"]
    assert metric("libvirt_domain_block_stats_capacity_bytes", target_device="vda") == 64 * MIB
    for i in range(s["net.count"]):
        tap = s[f"net.{i}.name"]
        assert metric("libvirt_domain_interface_stats_receive_bytes_total", target_device=tap) \
            == s[f"net.{i}.rx.bytes"]
        assert metric("libvirt_domain_interface_stats_transmit_packets_total", target_device=tap) \
            == s[f"net.{i}.tx.pkts"]
    assert metric("libvirt_domain_memory_stats_rss_bytes") == s["balloon.rss"] * 1024
    assert got[("busagent_hypervisor_connected", ())] == 1


# -- recording the fixture ---------------------------------------------------------------------
def sanitize(stats: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in stats.items():
        if isinstance(v, str):
            v = v.replace(env["images"], "/var/lib/libvirt/images").replace(env["dir"], "/var/lib/libvirt")
        out[k] = v
    return out


def test_record_fixture(hv, alpha):
    """Only with BUSAGENT_REAL_RECORD=1: write the recorded fixture (else check the one on disk)."""
    if os.environ.get("BUSAGENT_REAL_RECORD") != "1":
        if FIXTURE.exists():
            doc = json.loads(FIXTURE.read_text())
            assert "RECORDED" in doc["_provenance"] and len(doc["domains"]) >= 2
        return
    conn = libvirt.open(hv.env["qemu_uri"])
    off = "db-off"
    try:
        conn.defineXML(qemu_guest_xml(hv.env, off, memory_mib=256, vcpus=2, max_vcpus=2))
        records = []
        for round_ in range(2):
            if round_:
                time.sleep(3)
            for dom, stats in conn.getAllDomainStats(0, NOWAIT):
                if dom.name() == ALPHA or (dom.name() == off and round_ == 0):
                    records.append((dom.name(), round_, stats))
        version = conn.getLibVersion()
        qemu = conn.getVersion()
    finally:
        conn.lookupByName(off).undefine()
        conn.close()
    uuids = {ALPHA: "7f9b1c2e-5a41-4d0e-9b8e-2f6c3a1d0e11", off: "3c2d8e4f-1b6a-4f7e-8a9d-5e0b7c6a2f22"}
    doc = {
        "_provenance": (
            "RECORDED from real QEMU guests (TCG) by tests/real/test_real_sampler.py::test_record_fixture "
            "(BUSAGENT_REAL_RECORD=1): conn.getAllDomainStats(0, NOWAIT) on the private libvirtd of "
            "scripts/realhv. 'alpha' is the tiny guest (128 MiB, 1 of 2 vCPUs, virtio disk vda, empty IDE "
            "cdrom hdc, two virtio NICs, balloon statistics every second), recorded twice a few seconds apart "
            "(round 0, 1); 'db-off' is defined and shut off. Sanitized: paths of the set-up replaced by "
            "/var/lib/libvirt/..., UUIDs replaced; values as libvirt returned them."),
        "libvirt_version": f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
        "qemu_version": f"{qemu // 1000000}.{qemu // 1000 % 1000}.{qemu % 1000}",
        "units": "cpu.*, vcpu.N.time/wait/delay, block.N.*.times: nanoseconds; balloon.* memory sizes: KiB; "
                 "byte and packet counters: as-is",
        "domains": [{"name": name, "uuid": uuids[name], "round": r, "stats": sanitize(s, hv.env)}
                    for name, r, s in records],
    }
    FIXTURE.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    assert Path(FIXTURE).exists()
