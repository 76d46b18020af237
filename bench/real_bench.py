"""The real-guest benchmark behind ``bench/run real``: the agent on a real QEMU hypervisor.

It brings up its own ``scripts/realhv`` (a private libvirtd with the QEMU driver under TCG, in its
own namespaces; the production ``qemu:///system`` is the same system-mode driver, reached here
through the private daemon's socket: ``qemu+unix:///system?socket=...``), starts 10 tiny guests
(``scripts/tinyguest``: 96 MiB, 1 vCPU, a qcow2 disk, a virtio NIC on an isolated network with
DHCP, a balloon with statistics), waits until they have booted, and measures, each side in its
own process, against baselines measured in the same run:

1. Sample + publish for the 10 running guests: the agent samples every second (one
   ``getAllDomainStats`` + node, pools, networks) and publishes; per tick, from the sample's start
   (``busagent_sample_timestamp_seconds`` on /metrics) to the last of its messages at a subscriber
   process (``observe_subscriber.py stats``). Baseline (``real_bench.py loop``, alone before the
   agent starts): the per-domain loop of the community exporters, the same statistics call by
   call: ``XMLDesc`` (to find the disks and NICs), ``info``, ``state``, ``memoryStats``, ``vcpus``,
   ``getCPUStats(total)``, ``blockStats`` per disk, ``interfaceStats`` per NIC; and the bulk call
   alone, with every group (as the sampler asks) and with only the groups the loop reads.
2. Event latency of real lifecycle changes: suspend/resume of one running guest, one at a time
   (``observe_events.py``): the agent and the actor are both clients of the libvirtd; baseline:
   libvirt's own lifecycle callback in the acting process. Also with a bare-engine subscriber,
   and with the action itself sent through the bus.
3. ``virDomainGetInfo`` on a running guest, as ``bench/run`` measures it (``lean_client.py``:
   p50/p99 sequential, calls/s with 100 outstanding), against libvirt's remote protocol straight
   to the same libvirtd (``libvirt_calls.py``, sequential and 8 threads on one connection).

Prints a table with ratios and writes ``bench/results/real-latest.json``; stops the hypervisor.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lean_client import proc_cpu_seconds
from observe_bench import Agent, collect_ticks, latency_table, summarise_sampling
from rpc_bench import Budget, client_cmd, fmt, gfmt, log, machine, ratio, row_of, run_json

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
REALHV = ROOT / "scripts" / "realhv"
BUDGET_S = 330.0  # the whole bench ends within 6 minutes (about 3 when the guests boot quickly)
NET = "rb-net"
NET_XML = (f"<network><name>{NET}</name><bridge name='rbnet0'/>"
           "<ip address='192.168.160.1' netmask='255.255.255.0'><dhcp>"
           "<range start='192.168.160.10' end='192.168.160.100'/></dhcp></ip></network>")


def realkit() -> Any:
    """tests/real/realkit.py: the tiny guest's XML and its console, as the real tests use them."""
    sys.path.insert(0, str(ROOT / "tests" / "real"))
    import realkit as kit

    return kit


# -- the hypervisor and its guests ------------------------------------------------------------------
def realhv(cmd: str, d: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(REALHV), cmd, str(d)], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


def guest_names(n: int) -> list[str]:
    return [f"rb{i:02d}" for i in range(n)]


def start_guests(env: dict[str, Any], ns: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """The network, one qcow2 disk per guest, the guests started together; then their boot awaited."""
    import libvirt

    kit = realkit()
    conn = libvirt.open(env["qemu_uri"])
    try:
        net = conn.networkDefineXML(NET_XML)
        net.create()
        names = guest_names(ns.guests)
        t0 = time.monotonic()
        for i, name in enumerate(names):
            disk = Path(env["images"]) / f"{name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True, timeout=30)
            xml = kit.qemu_guest_xml(env, name, disk=str(disk), nics=((NET, f"52:54:00:b6:00:{i:02x}"),),
                                     memory_mib=ns.memory, vcpus=1, max_vcpus=1)
            conn.defineXML(xml).create()
        started = time.monotonic() - t0
        consoles = {name: kit.Console(kit.console_path(env, name)) for name in names}
        deadline = time.monotonic() + min(ns.boot_timeout, max(10.0, budget.left() - 150))
        booted: dict[str, float] = {}
        while len(booted) < len(names) and time.monotonic() < deadline:
            for name, console in consoles.items():
                if name not in booted and console.count("BUSAGENT-READY"):
                    booted[name] = round(time.monotonic() - t0, 1)
            time.sleep(0.2)
        leases = sum(1 for c in consoles.values() if "BUSAGENT-LEASE" in c.text())
        running = sum(1 for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING))
        pids = []
        for name in names:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int((Path(env["dir"]) / "run" / "qemu" / f"{name}.pid").read_text().strip()))
        return {"pids": pids, "guests": names, "memory_mib": ns.memory, "vcpus": 1, "start_s": round(started, 2),
                "booted": len(booted), "boot_s_max": max(booted.values()) if booted else None,
                "not_booted": [n for n in names if n not in booted], "dhcp_leases": leases, "running": running,
                "hypervisor": f"QEMU {fmt_version(conn.getVersion())}, libvirtd {fmt_version(conn.getLibVersion())}"}
    finally:
        conn.close()


class CpuMeter:
    """Cores in use over a phase: the guests' QEMU processes, and the whole machine (/proc/stat)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0, self.guests0, self.busy0 = time.monotonic(), self.guests(), machine_busy()

    def guests(self) -> float:
        return sum(proc_cpu_seconds(pid) or 0.0 for pid in self.pids)

    def done(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        return {"seconds": round(wall, 1), "guests_cores": round((self.guests() - self.guests0) / wall, 3),
                "machine_busy_cores": round((machine_busy() - self.busy0) / wall, 3)}


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle (every process, ours and others')."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def fmt_version(v: int) -> str:
    return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"


# -- 1. sampling ------------------------------------------------------------------------------------
def bench_sampling(ns: argparse.Namespace, budget: Budget, tmp: Path, uri: str) -> dict[str, Any]:
    res: dict[str, Any] = {"domains": ns.guests, "driver": "qemu (libvirtd)", "uri": uri, "interval_s": 1.0}
    log(f"sampling: baseline (exporter-style per-domain loop, {ns.loops} passes; the bulk call alone)")
    res["baseline"] = run_json([PY, str(Path(__file__)), "loop", "--uri", uri, "--loops", str(ns.loops)],
                               timeout=min(40.0, budget.left()))
    need = 10 + 1.0 * (ns.ticks + 2)
    if budget.left() < need + 60:
        res["skipped"] = f"time budget ({budget.elapsed:.0f} s used)"
        return res
    log(f"sampling: agent, sampling every 1 s; {ns.ticks} ticks, a /metrics scrape after each")
    groups = {"BUSAGENT_STATS_GROUPS": ns.stats_groups} if ns.stats_groups else None
    agent = Agent(uri, tmp, "sampling", interval=1.0, log_level=ns.agent_log_level, env_extra=groups)
    res["agent"] = agent.command
    try:
        why = agent.wait(40)
        if why:
            res["failure"] = why
            return res
        ticks = collect_ticks(agent, res, ns.ticks, need, warm_scrapes=0)
        if ticks is None:
            return res
        res["ticks"] = ticks
        if agent.proc.poll() is not None:
            res["failure"] = f"the agent exited ({agent.proc.returncode}): {agent.tail()}"
    finally:
        agent.stop()
    summarise_sampling(res)
    return res


def baseline_loop(argv: list[str]) -> int:
    """``real_bench.py loop``: the exporters' per-domain loop, then the bulk call alone; one JSON line."""
    import libvirt
    from lxml import etree

    p = argparse.ArgumentParser(prog="real_bench.py loop")
    p.add_argument("--uri", required=True)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--bulk", type=int, default=5)
    p.add_argument("--time-limit", type=float, default=20.0)
    ns = p.parse_args(argv)
    libvirt.registerErrorHandler(lambda *_: None, None)
    deadline = time.monotonic() + ns.time_limit
    conn = libvirt.open(ns.uri)
    doms = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)

    def one_pass() -> tuple[float, int, int]:
        calls = errors = 0
        t0 = time.perf_counter()
        for dom in doms:
            try:
                root = etree.fromstring(dom.XMLDesc(0).encode())
                dom.info()
                dom.state()
                dom.memoryStats()
                dom.vcpus()
                dom.getCPUStats(True)
                calls += 6
                for dev in root.findall("./devices/disk/target"):
                    dom.blockStats(dev.get("dev"))
                    calls += 1
                for dev in root.findall("./devices/interface/target"):
                    dom.interfaceStats(dev.get("dev"))
                    calls += 1
            except libvirt.libvirtError:
                errors += 1
        return time.perf_counter() - t0, calls, errors

    passes, calls, errors = [], 0, 0
    for _ in range(max(1, min(ns.loops, 50))):
        s, calls, errors = one_pass()
        passes.append(s)
        if time.monotonic() > deadline:
            break
    flags = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
    bulk, keys = [], 0
    for _ in range(max(1, min(ns.bulk, 50))):
        t = time.perf_counter()
        records = conn.getAllDomainStats(0, flags)
        bulk.append(time.perf_counter() - t)
        keys = max(len(stats) for _, stats in records) if records else 0
        groups = sorted({k.split(".")[0] for _, stats in records for k in stats})
    groups_mask = 0
    for group in ("STATE", "CPU_TOTAL", "BALLOON", "VCPU", "INTERFACE", "BLOCK"):  # what the loop reads
        groups_mask |= getattr(libvirt, f"VIR_DOMAIN_STATS_{group}")
    bulk_loop_groups = []
    for _ in range(max(1, min(ns.bulk, 50))):
        t = time.perf_counter()
        conn.getAllDomainStats(groups_mask, flags)
        bulk_loop_groups.append(time.perf_counter() - t)
    conn.close()
    print(json.dumps({
        "uri": ns.uri, "domains": len(doms), "loop_s": [round(s, 5) for s in passes],
        "loop_best_s": round(min(passes), 5), "loop_median_s": round(sorted(passes)[len(passes) // 2], 5),
        "loop_calls": calls, "loop_errors": errors, "bulk_s": [round(s, 5) for s in bulk],
        "bulk_best_s": round(min(bulk), 5), "bulk_keys_per_domain": keys, "bulk_groups": groups,
        "bulk_loop_groups_s": [round(s, 5) for s in bulk_loop_groups],
        "bulk_loop_groups_best_s": round(min(bulk_loop_groups), 5)}))
    return 0


def agent_libvirt_work(argv: list[str]) -> int:
    """``real_bench.py lookup``: the libvirt part of one agent request, alone: with libvirt's event loop
    running (as in the agent), ``dom.info()`` on a held reference, and ``lookupByName(name).info()``
    (the agent resolves the request's reference on every call: a second round trip). One JSON line."""
    import threading

    import libvirt

    p = argparse.ArgumentParser(prog="real_bench.py lookup")
    p.add_argument("--uri", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--calls", type=int, default=2000)
    ns = p.parse_args(argv)
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    conn = libvirt.open(ns.uri)
    calls = max(10, min(ns.calls, 100_000))

    def timed(fn: Any) -> dict[str, Any]:
        for _ in range(max(10, calls // 10)):
            fn()
        lat, c0 = [], time.process_time()
        for _ in range(calls):
            t = time.perf_counter()
            fn()
            lat.append(time.perf_counter() - t)
        cpu = time.process_time() - c0
        lat.sort()
        return {"calls": calls, "p50_us": round(lat[calls // 2] * 1e6, 1),
                "p99_us": round(lat[min(calls - 1, round(calls * 0.99))] * 1e6, 1),
                "cpu_us_per_call": round(cpu / calls * 1e6, 1)}

    dom = conn.lookupByName(ns.domain)
    out = {"info": timed(dom.info), "lookup_info": timed(lambda: conn.lookupByName(ns.domain).info())}
    conn.close()
    print(json.dumps(out))
    return 0


# -- 2. events --------------------------------------------------------------------------------------
def bench_events(ns: argparse.Namespace, budget: Budget, agent: Agent, uri: str, domain: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [("direct", "libvirt", "subscription"), ("direct_lean", "libvirt", "lean"), ("bus", "bus", "subscription")]
    for name, actor, client in runs:
        limit = min(60.0, budget.left() - 70.0)  # leave the RPC phase its time
        if limit < 10:
            out[name] = {"skipped": f"time budget ({budget.elapsed:.0f} s used)"}
            continue
        log(f"events ({name}): {ns.events} suspend/resume of {domain}, one at a time, {client} subscriber")
        cmd = [PY, str(BENCH / "observe_events.py"), actor, "--url", agent.url, "--domain", domain,
               "--events", str(ns.events), "--warmup", str(ns.event_warmup), "--time-limit", f"{limit:.0f}",
               "--subscriber", client]
        if actor == "libvirt":
            cmd += ["--uri", uri]
        out[name] = run_json(cmd, timeout=limit + 20)
    return out


# -- 3. RPC -----------------------------------------------------------------------------------------
def bench_rpc(ns: argparse.Namespace, budget: Budget, agent: Agent, uri: str, domain: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps({"domain": {"name": domain}}, separators=(",", ":"))
    limit = min(60.0, budget.left() - 45)
    log(f"rpc: agent-over-bus, python-engine client, virDomainGetInfo {body} ({ns.sequential} sequential, "
        f"{ns.pipelined} with {ns.window} outstanding)")
    bus = run_json(client_cmd("python-engine", agent.url, agent.proc.pid, ns, max(10.0, limit)) + ["--body", body],
                   timeout=max(15.0, limit + 10))
    limit = min(40.0, budget.left() - 5)
    log(f"rpc: libvirtd-remote baseline, python dom.info() on {domain} ({ns.threads} threads on one connection)")
    remote = run_json([PY, str(BENCH / "libvirt_calls.py"), "--uri", uri, "--domain", domain, "--warmup",
                       str(ns.warmup), "--sequential", str(ns.sequential), "--threads", str(ns.threads),
                       "--shared-connection", "--threaded-calls", str(ns.pipelined), "--time-limit",
                       f"{max(5.0, limit - 10):.0f}"], timeout=max(10.0, limit))
    if budget.left() > 20:
        log("rpc: the agent's libvirt work alone (event loop running; a held reference, and a lookup + call)")
        remote["agent_libvirt_work"] = run_json([PY, str(Path(__file__)), "lookup", "--uri", uri, "--domain", domain,
                                                 "--calls", str(ns.sequential)], timeout=min(30.0, budget.left()))
    return bus, remote


# -- report -----------------------------------------------------------------------------------------
def ms(x: Any) -> Any:
    return None if x is None else x * 1000


def report(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    m, g = doc["machine"], doc["guests"]
    lines.append(f"busagent real-guest bench — {doc['timestamp']} — {m['cpus']} CPUs ({m['cpu']}), "
                 f"Python {m['python']}, libvirt-python {m['libvirt']}, proton {m['proton']}")
    lines.append(f"hypervisor: {g.get('hypervisor', '?')}, TCG; scripts/realhv's private system-mode libvirtd "
                 f"({doc['uri']}),")
    lines.append("  standing in for qemu:///system (the same driver and daemon, reached through its socket)")
    lines.append(f"guests: {g.get('running', 0)} running of {len(g.get('guests', []))} (tiny Linux, "
                 f"{g.get('memory_mib')} MiB, 1 vCPU, qcow2 disk, virtio NIC with DHCP, balloon); "
                 f"{g.get('booted', 0)} booted in {fmt(g.get('boot_s_max'), 1)} s, {g.get('dhcp_leases', 0)} leases")
    cpu = doc.get("cpu_by_phase") or {}
    if cpu:
        per = ";  ".join(f"{k} {v['guests_cores']:.2f} | {v['machine_busy_cores']:.2f}" for k, v in cpu.items())
        lines.append("cores in use per phase, the guests' QEMU (idle TCG) | the whole machine (this bench, the "
                     f"guests, other users): {per} of {m['cpus']}")
    load0, load1 = m.get("loadavg_at_start") or [0.0], doc.get("loadavg_at_end") or [0.0]
    if max(load0[0], load1[0]) > 0.5:
        lines.append(f"WARNING: load average {load0[0]:.2f} at start, {load1[0]:.2f} at end: the CPUs are shared "
                     f"(the guests' TCG idle load included), figures are noisy")
    lines.append("")

    s = doc["sampling"]
    base = s.get("baseline") or {}
    lines.append(f"1. sample + publish, {g.get('running', 0)} running guests (sampler every 1 s, "
                 f"{len(s.get('ticks') or [])} ticks after the first)")
    head = f"   {'what':<74} {'p50 ms':>8} {'max ms':>8}"
    lines.append(head)
    lines.append("   " + "-" * (len(head) - 3))
    if s.get("ticks"):
        sp, sd = s["sample_publish"], s["sample_duration"]
        lines.append(f"   {'agent: sample start -> last message at a subscriber process':<74} "
                     f"{fmt(sp.get('p50_ms'), 2):>8} {fmt(sp.get('max_ms'), 2):>8}")
        lines.append(f"   {'  the sample (getAllDomainStats NOWAIT + node, pools, networks)':<74} "
                     f"{fmt(sd.get('p50_ms'), 2):>8} {fmt(sd.get('max_ms'), 2):>8}")
        for key, what in (("end_to_first_stamp", "  sample end -> the reactor stamps the 1st message"),
                          ("stamp_span", "  1st -> last message stamped"),
                          ("last_stamp_to_receipt", "  last stamped -> received")):
            lines.append(f"   {what:<74} {fmt(s[key].get('p50_ms'), 2):>8} {fmt(s[key].get('max_ms'), 2):>8}")
        lines.append(f"   {'  agent CPU per tick (all threads, /proc; mean, 10 ms ticks)':<74} "
                     f"{fmt(s['agent_cpu_tick'].get('mean_ms'), 1):>8}")
        lines.append(f"   {'  /metrics: first scrape after a sample':<74} "
                     f"{fmt(s['scrape_cold'].get('p50_ms'), 2):>8} {fmt(s['scrape_cold'].get('max_ms'), 2):>8}")
    else:
        lines.append(f"   agent: {s.get('failure') or s.get('skipped') or 'no ticks'}")
    if base.get("loop_best_s") is not None:
        lines.append(f"   {'baseline: per-domain loop, ' + str(base.get('loop_calls')) + ' calls (best pass)':<74} "
                     f"{fmt(ms(base['loop_best_s']), 2):>8} {fmt(ms(max(base['loop_s'])), 2):>8}")
        lines.append(f"   {'  the bulk call alone, getAllDomainStats(0, NOWAIT) (best)':<74} "
                     f"{fmt(ms(base['bulk_best_s']), 2):>8} {fmt(ms(max(base['bulk_s'])), 2):>8}")
        what = "  the bulk call, the loop's groups only (state cpu balloon vcpu net block)"
        lines.append(f"   {what:<74} {fmt(ms(base['bulk_loop_groups_best_s']), 2):>8} "
                     f"{fmt(ms(max(base['bulk_loop_groups_s'])), 2):>8}")
        lines.append(f"   ratio loop / agent sample+publish p50: x{gfmt(s.get('ratio_loop_over_agent'))};  "
                     f"messages/tick {s.get('messages_per_tick')}, {fmt((s.get('bytes_per_tick') or 0) / 1024, 1)} "
                     f"KiB; {base.get('bulk_keys_per_domain')} stats keys per guest ({', '.join(base['bulk_groups'])});"
                     f" {fmt(s.get('scrape_series'))} series on /metrics")
    else:
        lines.append(f"   baseline: {base.get('failure') or 'not run'}")
    lines.append("")

    ev = doc["events"]
    lines.append(f"2. event latency: suspend/resume of running guest {doc['event_domain']}, one at a time "
                 f"(action -> event)")
    row = latency_table(lines)

    for key, what in (("direct", "libvirtd -> agent -> bus -> Subscription process"),
                      ("direct_lean", "libvirtd -> agent -> bus -> bare-engine subscriber")):
        d = ev.get(key) or {}
        if not d.get("agent_subscriber"):
            lines.append(f"   {key}: {d.get('failure') or d.get('skipped') or 'not run'}")
            continue
        row(what, d["agent_subscriber"])
        row("  baseline: libvirt callback in the actor (same action, conn)", d.get("libvirt_callback"))
        if key == "direct":
            row("  the action's own call (dom.suspend/resume -> return)", d.get("call"))
            row("  split: action -> the agent stamps the event message", d.get("action_to_agent_publish"))
            row("  split: agent stamp -> subscriber get()", d.get("agent_publish_to_subscriber"))
        a, b = d["agent_subscriber"], d.get("libvirt_callback") or {}
        if b.get("p50_us"):
            lines.append(f"   ratio agent/callback: p50 x{a['p50_us'] / b['p50_us']:.2f}  p99 x"
                         f"{a['p99_us'] / b['p99_us']:.2f}; the bus path adds {a['p50_us'] - b['p50_us']:,.0f} us "
                         f"at p50 ({d.get('timeouts', 0)} timeouts, {d.get('stray_events', 0)} stray events)")
    b = ev.get("bus") or {}
    if b.get("agent_subscriber"):
        row("bus: RPC virDomainSuspend/Resume -> event at Subscription", b["agent_subscriber"])
        row("  the RPC round trip (busagent Client)", b.get("call"))
        row("  event receipt minus RPC reply (<0: event first)", b.get("event_after_call_return"))
    else:
        lines.append(f"   bus: {b.get('failure') or b.get('skipped') or 'not run'}")
    lines.append("")

    lines.append(f"3. RPC virDomainGetInfo on running guest {doc['rpc_domain']} (QEMU driver); "
                 f"{doc['config']['sequential']} sequential after warm-up, {doc['config']['pipelined']} concurrent")
    head = (f"   {'path':<40} {'p50 us':>9} {'p99 us':>9} {'seq calls/s':>12} {'calls/s':>10}  {'concurrency':<26}"
            f" {'agent CPU us/call':>18}")
    lines.append(head)
    lines.append("   " + "-" * (len(head) - 3))
    for r in doc["rpc"]["table"]:
        if r["p50_us"] is None:
            lines.append(f"   {r['path']:<40} ({str(r['failure'])[:150]})")
            continue
        acpu = f"{fmt(r['agent_cpu_seq'])} / {fmt(r['agent_cpu_pipe'])}" if r["agent_cpu_seq"] is not None else ""
        lines.append(f"   {r['path']:<40} {fmt(r['p50_us']):>9} {fmt(r['p99_us']):>9} "
                     f"{fmt(r['seq_calls_per_s']):>12} {fmt(r['calls_per_s']):>10}  {r['concurrency']:<26} {acpu:>18}")
    work = (doc["rpc"]["libvirtd_remote"] or {}).get("agent_libvirt_work") or {}
    for key, what in (("info", "  py + event loop, held dom: info()"),
                      ("lookup_info", "  py + event loop, lookupByName().info()")):
        if (work.get(key) or {}).get("p50_us") is not None:
            lines.append(f"   {what:<40} {fmt(work[key]['p50_us']):>9} {fmt(work[key]['p99_us']):>9}   "
                         f"(sequential; client CPU {fmt(work[key]['cpu_us_per_call'])} us/call)")
    rr = doc["rpc"]["ratios"]
    if rr:
        lines.append(f"   ratio agent-over-bus / libvirtd-remote: p50 x{gfmt(rr.get('p50'))}  "
                     f"p99 x{gfmt(rr.get('p99'))}  calls/s x{gfmt(rr.get('calls_per_s'))}"
                     "   (latency >1 = slower; calls/s <1 = fewer)")
    lines.append("")
    lines.append(f"results: {doc['results_file']}   elapsed: {doc['elapsed_s']:.0f} s (guests' boot "
                 f"{fmt(g.get('boot_s_max'), 0)} s)   load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loop"]:
        return baseline_loop(argv[1:])
    if argv[:1] == ["lookup"]:
        return agent_libvirt_work(argv[1:])
    p = argparse.ArgumentParser(description="busagent real-guest bench: 10 QEMU guests on a private libvirtd")
    p.add_argument("--guests", type=int, default=10)
    p.add_argument("--memory", type=int, default=96, help="MiB per guest")
    p.add_argument("--boot-timeout", type=float, default=150.0, help="seconds to wait for the guests to boot")
    p.add_argument("--ticks", type=int, default=8, help="sampler ticks measured")
    p.add_argument("--loops", type=int, default=5, help="baseline per-domain loop passes")
    p.add_argument("--events", type=int, default=200, help="events measured per event mode")
    p.add_argument("--event-warmup", type=int, default=20)
    p.add_argument("--sequential", type=int, default=2000)
    p.add_argument("--pipelined", type=int, default=20000)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--warmup-pipelined", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--agent-log-level", help="pass --log-level to the agents (default: the agent's own, info)")
    p.add_argument("--stats-groups", help="the sampling agent's [stats] groups, e.g. state,cpu-total,balloon,vcpu,"
                                          "interface,block (default: every group)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent logs) and the hypervisor")
    p.add_argument("--quick", action="store_true", help="3 guests, 50 events, 3 ticks, a tenth of the calls")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.guests, ns.events, ns.ticks, ns.event_warmup = min(ns.guests, 3), 50, 3, 5
        for k in ("sequential", "pipelined", "warmup", "warmup_pipelined"):
            setattr(ns, k, max(10, getattr(ns, k) // 10))
    ns.guests = max(2, min(ns.guests, 40))
    ns.memory = max(64, min(ns.memory, 1024))
    if os.geteuid() != 0:
        print("bench/run real needs root (scripts/realhv: namespaces, bridges, QEMU)", file=sys.stderr)
        return 2

    budget = Budget(BUDGET_S)
    host = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="brb.", dir="/tmp"))  # short: it holds libvirtd's socket
    hvdir = tmp / "hv"
    doc: dict[str, Any] = {"timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(), "machine": host}
    guests: dict[str, Any] = {}
    sampling: dict[str, Any] = {"skipped": "not reached"}
    events: dict[str, Any] = {}
    bus: dict[str, Any] = {"skipped": "not reached"}
    remote: dict[str, Any] = {"skipped": "not reached"}
    uri = ""
    cpu: dict[str, Any] = {}
    try:
        log(f"hypervisor: scripts/realhv start {hvdir}")
        start = realhv("start", hvdir, 240)
        if start.returncode != 0:
            print(f"scripts/realhv start failed: {start.stderr.strip()[-800:]}", file=sys.stderr)
            return 1
        env = json.loads((hvdir / "env.json").read_text())
        uri = env["qemu_uri"]
        log(f"hypervisor: {uri}; starting {ns.guests} guests ({ns.memory} MiB, 1 vCPU, TCG)")
        guests = start_guests(env, ns, budget)
        log(f"guests: {guests['booted']} of {ns.guests} booted in {guests['boot_s_max']} s "
            f"({guests['dhcp_leases']} DHCP leases)")
        time.sleep(2.0)  # let the last boot settle (udhcpc, modules)
        meter = CpuMeter(guests["pids"])
        sampling = bench_sampling(ns, budget, tmp, uri)
        cpu["sampling"] = meter.done()
        names = guest_names(ns.guests)
        rpc_domain, event_domain = names[0], names[1]
        agent = Agent(uri, tmp, "events-rpc", log_level=ns.agent_log_level)
        try:
            why = agent.wait(30)
            if why:
                events = {"direct": {"failure": why}}
                bus = remote = {"failure": why}
            else:
                meter = CpuMeter(guests["pids"])
                events = bench_events(ns, budget, agent, uri, event_domain)
                cpu["events"] = meter.done()
                meter = CpuMeter(guests["pids"])
                bus, remote = bench_rpc(ns, budget, agent, uri, rpc_domain)
                cpu["rpc"] = meter.done()
        finally:
            agent.stop()
    finally:
        if not ns.keep:
            log("hypervisor: scripts/realhv stop")
            with contextlib.suppress(subprocess.TimeoutExpired):
                realhv("stop", hvdir, 120)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept: {tmp} (stop the hypervisor with scripts/realhv stop {hvdir})")

    window_desc = f"{ns.window} outstanding, 1 conn"
    table = [row_of("agent-over-bus (python-engine client)", bus, "pipelined", window_desc),
             row_of("libvirtd-remote (python, unix socket)", remote, "threaded", f"{ns.threads} threads, 1 conn")]
    ratios: dict[str, Any] = {}
    if bus.get("sequential") and remote.get("sequential"):
        ratios = {"p50": ratio(bus["sequential"].get("p50_us"), remote["sequential"].get("p50_us")),
                  "p99": ratio(bus["sequential"].get("p99_us"), remote["sequential"].get("p99_us")),
                  "calls_per_s": ratio((bus.get("pipelined") or {}).get("calls_per_s"),
                                       (remote.get("threaded") or {}).get("calls_per_s"))}
    out_file = RESULTS / "real-latest.json"
    doc.update({
        "uri": uri or "(realhv did not start)", "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "config": {"guests": ns.guests, "memory_mib": ns.memory, "ticks": ns.ticks, "events": ns.events,
                   "event_warmup": ns.event_warmup, "sequential": ns.sequential, "pipelined": ns.pipelined,
                   "window": ns.window, "warmup": ns.warmup, "warmup_pipelined": ns.warmup_pipelined,
                   "threads": ns.threads, "agent_log_level": ns.agent_log_level or "info (agent default)"},
        "guests": guests, "cpu_by_phase": cpu, "sampling": sampling, "events": events,
        "event_domain": guest_names(ns.guests)[1], "rpc_domain": guest_names(ns.guests)[0],
        "rpc": {"agent_over_bus": bus, "libvirtd_remote": remote, "table": table, "ratios": ratios},
        "elapsed_s": round(budget.elapsed, 1), "results_file": str(out_file.relative_to(ROOT)),
    })
    out_file.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    ok = bool(sampling.get("ticks")) and bool((events.get("direct") or {}).get("agent_subscriber")) \
        and bool(bus.get("sequential"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
