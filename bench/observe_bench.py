"""The observation benchmark behind ``bench/run observe``: events, sampling, /metrics, memory.

Measured in one run, each side in its own process, all on 127.0.0.1, against baselines
measured in the same run:

1. Event latency, libvirt action -> bus subscriber (``observe_events.py``), 1,000 events one at
   a time. Direct: the agent (``busagent run``) and the bench's actor are both clients of one
   private libvirtd (``scripts/libvirtd-testdriver``); the actor suspends/resumes with
   libvirt-python; baseline: libvirt's own lifecycle callback on the actor's connection, on the
   same actions. Bus: the agent embeds test:///default and the action is an RPC through it.
2. Sampling at 1,000 and 5,000 running domains (test-driver host files), with the driver
   embedded in the agent and through libvirtd: per tick, from the sample's start (the agent's
   ``busagent_sample_timestamp_seconds``) to the last of its messages at a subscriber
   (``observe_subscriber.py stats``), and the sampler's own ``Sample.duration``. Baseline: the
   community exporters' per-domain loop (``observe_baseline.py``) on the same URI.
3. ``/metrics`` scrapes at each size: the first after a new sample (the collector maps the
   sample then: what a Prometheus scrape meets) and two more (cached families). Plus a
   SYNTHETIC in-process rendering of QEMU-like statistics (``observe_synthetic.py``).
4. Agent VmRSS / VmHWM at each size against a bare python process that opened the same URI
   and listed every domain (``observe_baseline.py``).

Prints a table with ratios and PASS/MISS per target; writes ``bench/results/observe-latest.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from lean_client import proc_cpu_seconds
from observe_events import Lines, percentile
from rpc_bench import Budget, fmt, free_port, log, machine, run_json, stop_process, wait_listening

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
AGENT = str(ROOT / ".venv" / "bin" / "busagent")
LIBVIRTD = ROOT / "scripts" / "libvirtd-testdriver"
BUDGET_S = 225.0  # the whole bench ends within 4 minutes

TARGET_EVENT_P99_US = 5000.0
TARGET_SAMPLE_MS = 150.0
TARGET_SAMPLE_RATIO = 20.0
TARGET_SCRAPE_MS = 250.0
TARGET_RSS_DELTA_MIB = 150.0
TARGET_DOMAINS = 5000
PROFILE_RATE = 250


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def stats_ms(values_s: list[float]) -> dict[str, Any]:
    v = sorted(values_s)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50_ms": ms(percentile(v, 0.5)), "max_ms": ms(v[-1]), "min_ms": ms(v[0]),
            "mean_ms": ms(sum(v) / len(v))}


def read_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def host_file(path: Path, n: int) -> Path:
    """A test-driver host description with ``n`` running domains (as tests/bus/test_stats.py builds them)."""
    doms = "".join(f"<domain type='test'><name>vm{i:05d}</name><memory unit='MiB'>64</memory>"
                   f"<vcpu>1</vcpu><os><type arch='i686'>hvm</type></os></domain>" for i in range(n))
    path.write_text(f"<node><cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
                    f"<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                    f"<memory>8388608</memory>{doms}</node>")
    path.chmod(0o644)  # libvirtd may run as another user
    return path


class Agent:
    """``busagent run`` in its own process, direct mode on a free port, /metrics on another."""

    def __init__(self, uri: str, tmp: Path, tag: str, interval: float | None = None,
                 log_level: str | None = None, env_extra: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"amqp://127.0.0.1:{self.port}"
        self.log = tmp / f"agent-{tag}.log"
        cmd = [AGENT, "run", "--uri", uri, "--listen", f"127.0.0.1:{self.port}"]
        if log_level:
            cmd += ["--log-level", log_level]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUSAGENT_")}
        env["BUSAGENT_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_port}"
        if interval is not None:
            env["BUSAGENT_SAMPLE_INTERVAL"] = str(interval)
        env.update(env_extra or {})
        self.command = " ".join([*(f"{k}={v}" for k, v in (env_extra or {}).items()), "busagent", *cmd[1:]])
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env)

    def wait(self, timeout: float) -> str | None:
        """None once both ports answer, else why not."""
        t0 = time.monotonic()
        if not wait_listening(self.port, self.proc, timeout):
            return "the agent did not start listening: " + self.tail()
        if not wait_listening(self.metrics_port, self.proc, max(1.0, timeout - (time.monotonic() - t0))):
            return "the agent's /metrics did not answer: " + self.tail()
        return None

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-800:]
        return ""

    def stop(self) -> None:
        stop_process(self.proc)


# -- 1. events ------------------------------------------------------------------------------------
def bench_events(ns: argparse.Namespace, budget: Budget, tmp: Path, libvirtd_uri: str | None) -> dict[str, Any]:
    """direct (+ direct_lean: the same agent, a bare-engine subscriber) on libvirtd; bus on test:///default."""
    out: dict[str, Any] = {}
    agents: list[tuple[str, str, list[tuple[str, str]]]] = []
    if libvirtd_uri:
        runs = [("direct", "subscription")] + ([] if ns.no_lean_subscriber else [("direct_lean", "lean")])
        agents.append(("libvirt", libvirtd_uri, runs))
    else:
        out["direct"] = {"failure": "no libvirtd (see the libvirtd line)"}
    if not ns.no_bus_events:
        agents.append(("bus", "test:///default", [("bus", "subscription")]))
    for actor, uri, runs in agents:
        log(f"events ({actor}): agent on {uri}; {ns.events} suspend/resume, one at a time")
        agent = Agent(uri, tmp, f"events-{actor}", log_level=ns.agent_log_level)
        try:
            why = agent.wait(20)
            if why:
                for name, _ in runs:
                    out[name] = {"failure": why}
                continue
            for name, client in runs:
                limit = min(45.0, budget.left() - 150.0)  # leave the sampling and memory phases their time
                if limit < 10:
                    out[name] = {"skipped": f"time budget ({budget.elapsed:.0f} s used)"}
                    continue
                log(f"events ({name}): {client} subscriber")
                cmd = [PY, str(BENCH / "observe_events.py"), actor, "--url", agent.url, "--events", str(ns.events),
                       "--warmup", str(ns.event_warmup), "--time-limit", f"{limit:.0f}", "--subscriber", client]
                if actor == "libvirt":
                    cmd += ["--uri", uri]
                res = run_json(cmd, timeout=limit + 20)
                res["agent"] = agent.command
                out[name] = res
        finally:
            agent.stop()
    return out


# -- 2-4. sampling, scrapes, memory ---------------------------------------------------------------
def scrape(port: int) -> tuple[float, dict[str, Any]]:
    t = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as resp:
        body = resp.read()
    elapsed = time.perf_counter() - t
    info: dict[str, Any] = {"bytes": len(body), "series": 0}
    for line in body.split(b"\n"):
        if not line or line[:1] == b"#":
            continue
        info["series"] += 1
        if line.startswith(b"busagent_sample_timestamp_seconds "):
            info["sample_timestamp"] = float(line.split()[1])
        elif line.startswith(b"busagent_sample_duration_seconds "):
            info["sample_duration"] = float(line.split()[1])
        elif line.startswith(b"busagent_sample_missed_ticks_total "):
            info["missed_ticks"] = float(line.split()[1])
    return elapsed, info


def bench_sampling(ns: argparse.Namespace, budget: Budget, tmp: Path, n: int, driver: str, path: Path,
                   socket_path: str | None) -> dict[str, Any]:
    """One agent at ``n`` domains (``driver``: embedded | libvirtd): ticks, scrapes, memory; then its baseline."""
    uri = f"test://{path}" if driver == "embedded" else f"test+unix://{path}?socket={socket_path}"
    res: dict[str, Any] = {"domains": n, "driver": driver, "uri": uri}
    # the baseline first, alone on the CPUs: the bare process's memory, the per-domain loop
    limit = min(25.0, max(5.0, budget.left() - 60))
    log(f"sampling {n} ({driver}): baseline (bare open + list, per-domain loop)")
    res["baseline"] = run_json([PY, str(BENCH / "observe_baseline.py"), "--uri", uri, "--loops", "3",
                                "--time-limit", f"{min(10.0, limit):.0f}"], timeout=limit + 15)
    interval = 1.0 if n <= 1000 else 2.0
    ticks = ns.ticks
    need = 10 + interval * (ticks + 2)
    if budget.left() < need + 5:
        res["skipped"] = f"time budget ({budget.elapsed:.0f} s used)"
        return res
    log(f"sampling {n} ({driver}): agent, sampling every {interval:g} s; {ticks} ticks, scrapes after each")
    t_start = time.monotonic()
    agent = Agent(uri, tmp, f"{driver}-{n}", interval=interval, log_level=ns.agent_log_level)
    res["agent"] = agent.command
    res["interval_s"] = interval
    try:
        why = agent.wait(40)
        if why:
            res["failure"] = why
            return res
        res["agent_start_s"] = round(time.monotonic() - t_start, 2)  # until AMQP and /metrics answer
        spy_box: list[Any] = []
        on_ready = (lambda: spy_box.append(start_profile(ns, agent, f"{driver}-{n}"))) \
            if ns.profile and n == max(ns.sizes_list) else None
        per_tick = collect_ticks(agent, res, ticks, need, warm_scrapes=2, on_ready=on_ready)
        if per_tick is None:
            return res
        spy = spy_box[0] if spy_box else None
        res["ticks"] = per_tick
        if spy is not None:
            res["profile"] = stop_profile(spy, len(per_tick))
        res["memory_kib"] = read_status(agent.proc.pid)
        if not ns.no_snapshot and budget.left() > 40:
            res["snapshot"] = object_snapshot(agent, min(30.0, budget.left() - 35))
            res["memory_after_snapshot_kib"] = read_status(agent.proc.pid)
        if agent.proc.poll() is not None:
            res["failure"] = f"the agent exited ({agent.proc.returncode}): {agent.tail()}"
    finally:
        agent.stop()
    summarise_sampling(res)
    return res


def collect_ticks(agent: Agent, res: dict[str, Any], ticks: int, need: float, warm_scrapes: int = 2,
                  on_ready: Any = None) -> list[dict[str, Any]] | None:
    """``ticks`` sampler ticks of ``agent`` (after the first), as a stats subscriber process receives
    them: after each, one cold and ``warm_scrapes`` warm /metrics scrapes, the agent's CPU, and where
    the time from the sample's start to the last message goes. None (``res["failure"]`` set) when the
    subscriber is not ready; ``on_ready()`` runs once it is."""
    sub = subprocess.Popen([PY, str(BENCH / "observe_subscriber.py"), "stats", "--url", agent.url,
                            "--count", str(ticks + 5), "--seconds", f"{need + 30:.0f}"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        lines = Lines(sub.stdout.fileno())
        ready = lines.next(25)
        if not ready or not ready.get("ready"):
            res["failure"] = f"stats subscriber not ready: {ready}"
            return None
        if on_ready is not None:
            on_ready()
        per_tick: list[dict[str, Any]] = []
        end = time.monotonic() + need + 10
        skipped_first = False
        pid = agent.proc.pid
        cpu_mark = None  # the agent's CPU time once the previous tick's scrapes were done
        while len(per_tick) < ticks and time.monotonic() < end:
            line = lines.next(max(0.1, end - time.monotonic()))
            if line is None:
                break
            cpu_tick = proc_cpu_seconds(pid)
            if "gap" in line or "failure" in line:
                res.setdefault("subscriber_notes", []).append(line)
                continue
            if not skipped_first:  # the first complete tick may have met a subscriber still warming up
                skipped_first = True
                cpu_mark = cpu_tick
                continue
            per_tick.append(_tick(agent, line, warm_scrapes, pid, cpu_mark, cpu_tick))
            cpu_mark = proc_cpu_seconds(pid)
        return per_tick
    finally:
        with contextlib.suppress(OSError):
            sub.stdin.close()
        stop_process(sub, 5)


def _tick(agent: Agent, line: dict[str, Any], warm_scrapes: int, pid: int, cpu_mark: float | None,
          cpu_tick: float | None) -> dict[str, Any]:
    """One tick's figures: the subscriber's ``line``, then the scrapes made now."""
    cold, info = scrape(agent.metrics_port)
    cpu_scrape = proc_cpu_seconds(pid)
    warm = [scrape(agent.metrics_port)[0] for _ in range(warm_scrapes)]
    cpu_after = proc_cpu_seconds(pid)
    tick = {"duration_s": line["duration"], "messages": line["messages"], "bytes": line["bytes"],
            "max_message_bytes": line["max_message_bytes"], "chunks": line["chunks"],
            "domains": line["domains"], "mode": line["mode"],
            "receive_spread_s": line["t_last"] - line["t_first"],
            "scrape_cold_s": cold, "scrape_warm_s": warm, "scrape_bytes": info["bytes"],
            "scrape_series": info["series"], "missed_ticks": info.get("missed_ticks")}
    if None not in (cpu_mark, cpu_tick, cpu_scrape, cpu_after):
        # the agent's CPU (every thread) from the end of the last scrapes to this tick's receipt:
        # the tick's sample + publish and an idle wait; then over the first scrape, then the next ones
        tick["agent_cpu_tick_s"] = cpu_tick - cpu_mark
        tick["agent_cpu_scrape_cold_s"] = cpu_scrape - cpu_tick
        if warm_scrapes:
            tick["agent_cpu_scrape_warm_s"] = (cpu_after - cpu_scrape) / warm_scrapes
    if info.get("sample_duration") == line["duration"] and "sample_timestamp" in info:
        start = info["sample_timestamp"]
        tick["sample_publish_s"] = line["t_last"] - start
        if line.get("stamp_first") and line.get("stamp_last"):  # where the publishing time goes
            tick["end_to_first_stamp_s"] = line["stamp_first"] - (start + line["duration"])
            tick["stamp_span_s"] = line["stamp_last"] - line["stamp_first"]
            tick["last_stamp_to_receipt_s"] = line["t_last"] - line["stamp_last"]
    else:  # the scrape met a later sample: this tick has no start time
        tick["sample_publish_s"] = None
    return tick


def latency_table(lines: list[str]) -> Any:
    """Append a latency table's header (path, n, p50/p90/p99/max in us) to ``lines``; returns
    ``row(name, stats)``, which appends one row."""
    head = f"   {'path':<62} {'n':>5} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'max us':>8}"
    lines.append(head)
    lines.append("   " + "-" * (len(head) - 3))

    def row(name: str, st: dict[str, Any] | None) -> None:
        st = st or {}
        lines.append(f"   {name:<62} {fmt(st.get('n')):>5} {fmt(st.get('p50_us')):>8} {fmt(st.get('p90_us')):>8} "
                     f"{fmt(st.get('p99_us')):>8} {fmt(st.get('max_us')):>8}")

    return row


def object_snapshot(agent: Agent, timeout: float) -> dict[str, Any]:
    """``busagentResync`` (every object, read afresh, in the reply): the agent's periodic snapshot
    (first due 60 s after start, so never inside the measured ticks) at its memory peak."""
    cmd = [AGENT, "call", "--url", agent.url, "--timeout", f"{timeout:.0f}", "busagentResync"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout + 10, stdin=subprocess.DEVNULL, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"failure": f"no reply within {timeout:.0f} s"}
    out: dict[str, Any] = {"seconds": round(time.perf_counter() - t, 2), "reply_bytes": len(proc.stdout)}
    if proc.returncode != 0:
        out["failure"] = proc.stderr.decode(errors="replace")[-300:]
    return out


def start_profile(ns: argparse.Namespace, agent: Agent, tag: str) -> dict[str, Any]:
    """py-spy (GIL-holding samples, per thread) on the agent while its ticks are measured."""
    pyspy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(pyspy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    raw = RESULTS / f"observe-profile-{tag}.raw"
    proc = subprocess.Popen([pyspy, "record", "--pid", str(agent.proc.pid), "--format", "raw", "--output", str(raw),
                             "--rate", str(PROFILE_RATE), "--threads", "--gil", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    time.sleep(0.5)
    return {"proc": proc, "raw": raw, "tag": tag}


def stop_profile(spy: dict[str, Any], ticks: int) -> dict[str, Any]:
    proc = spy.get("proc")
    if proc is None:
        return spy
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    raw: Path = spy["raw"]
    if not raw.exists():
        return {"failure": "py-spy wrote nothing: " + (proc.stderr.read().decode(errors="replace")[-300:]
                                                       if proc.stderr else "")}
    from pyspy_summary import summarise

    report_file = RESULTS / f"observe-profile-{spy['tag']}.txt"
    with open(report_file, "w") as f:
        print(f"agent profile over {ticks} ticks (each: sample, publish, 3 scrapes); 'us/call' = per tick", file=f)
        summarise(str(raw), ticks or None, PROFILE_RATE, 40, out=f)
    return {"report": str(report_file.relative_to(ROOT)), "ticks": ticks}


def summarise_sampling(res: dict[str, Any]) -> None:
    ticks = res.get("ticks") or []
    sp = [t["sample_publish_s"] for t in ticks if t.get("sample_publish_s") is not None]
    res["sample_publish"] = stats_ms(sp)
    res["sample_duration"] = stats_ms([t["duration_s"] for t in ticks])
    for key in ("end_to_first_stamp", "stamp_span", "last_stamp_to_receipt", "agent_cpu_tick",
                "agent_cpu_scrape_cold", "agent_cpu_scrape_warm"):
        res[key] = stats_ms([t[f"{key}_s"] for t in ticks if t.get(f"{key}_s") is not None])
    res["scrape_cold"] = stats_ms([t["scrape_cold_s"] for t in ticks])
    res["scrape_warm"] = stats_ms([w for t in ticks for w in t["scrape_warm_s"]])
    if ticks:
        last = ticks[-1]
        res["messages_per_tick"] = last["messages"]
        res["bytes_per_tick"] = last["bytes"]
        res["scrape_bytes"] = last["scrape_bytes"]
        res["scrape_series"] = last["scrape_series"]
        res["sample_mode"] = last["mode"]
    base = res.get("baseline") or {}
    loop = base.get("loop_best_s")
    p50 = res["sample_publish"].get("p50_ms")
    res["ratio_loop_over_agent"] = round(loop * 1000 / p50, 2) if loop and p50 else None
    mem = res.get("memory_kib") or {}
    snap = res.get("memory_after_snapshot_kib") or {}
    if mem.get("VmRSS") and base.get("rss_kib"):
        res["rss_delta_mib"] = round((mem["VmRSS"] - base["rss_kib"]) / 1024, 1)
        peak = max(mem.get("VmHWM", 0), snap.get("VmHWM", 0), mem["VmRSS"])
        res["hwm_delta_mib"] = round((peak - base["rss_kib"]) / 1024, 1)
        res["rss_max_delta_mib"] = round((max(mem["VmRSS"], snap.get("VmRSS", 0)) - base["rss_kib"]) / 1024, 1)


# -- report -----------------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, what in (("direct", "busagent Subscription"), ("direct_lean", "bare-engine subscriber")):
        res = doc["events"].get(key)
        if res is None:
            continue
        p99 = (res.get("agent_subscriber") or {}).get("p99_us")
        out.append({"target": f"event p99 <= {TARGET_EVENT_P99_US / 1000:g} ms (direct: libvirtd action -> "
                              f"{what})",
                    "value": f"{fmt(p99)} us",
                    "verdict": verdict(None if p99 is None else p99 <= TARGET_EVENT_P99_US)})
    for res in doc["sampling"]:
        if res["domains"] != TARGET_DOMAINS:
            continue
        d = res["driver"]
        p50 = (res.get("sample_publish") or {}).get("p50_ms")
        out.append({"target": f"{TARGET_DOMAINS} domains sampled + published <= {TARGET_SAMPLE_MS:g} ms ({d}, p50)",
                    "value": f"{fmt(p50, 1)} ms",
                    "verdict": verdict(None if p50 is None else p50 <= TARGET_SAMPLE_MS)})
        r = res.get("ratio_loop_over_agent")
        out.append({"target": f"{TARGET_DOMAINS} domains: >= {TARGET_SAMPLE_RATIO:g}x faster than the per-domain "
                              f"loop ({d})",
                    "value": f"x{r}" if r is not None else "-",
                    "verdict": verdict(None if r is None else r >= TARGET_SAMPLE_RATIO)})
        sc = (res.get("scrape_cold") or {}).get("p50_ms")
        out.append({"target": f"/metrics scrape at {TARGET_DOMAINS} <= {TARGET_SCRAPE_MS:g} ms ({d}, first scrape "
                              f"of a sample, p50)",
                    "value": f"{fmt(sc, 1)} ms", "verdict": verdict(None if sc is None else sc <= TARGET_SCRAPE_MS)})
        if d == "embedded":
            delta = res.get("rss_max_delta_mib")
            out.append({"target": f"agent RSS at {TARGET_DOMAINS} <= driver's own + {TARGET_RSS_DELTA_MIB:g} MiB "
                                  f"(embedded; the larger of steady, after a snapshot)",
                        "value": f"+{fmt(delta, 1)} MiB" if delta is not None else "-",
                        "verdict": verdict(None if delta is None else delta <= TARGET_RSS_DELTA_MIB)})
    return out


def report(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    m = doc["machine"]
    lines.append(f"busagent observation bench — {doc['timestamp']} — {m['cpus']} CPUs ({m['cpu']}), "
                 f"Python {m['python']}, libvirt {m['libvirt']}, proton {m['proton']}")
    load = m.get("loadavg_at_start") or [0.0]
    if load[0] > 0.5:
        lines.append(f"WARNING: load average {load[0]:.2f} at start: other work shares the CPUs, figures are noisy")
    lines.append("")

    ev = doc["events"]
    lines.append("1. event latency: libvirt action -> event (lifecycle, suspend/resume of one domain), "
                 "one at a time")
    row = latency_table(lines)

    d = ev.get("direct") or {}
    if d.get("agent_subscriber"):
        row("direct: libvirtd -> agent -> bus -> subscriber process", d["agent_subscriber"])
        row("  baseline: libvirt callback in the actor (same action + conn)", d.get("libvirt_callback"))
        row("  the action's own call (dom.suspend/resume -> return)", d.get("call"))
        row("  subscriber receipt after the call returned", d.get("event_after_call_return"))
        row("  split: action -> the agent stamps the event message", d.get("action_to_agent_publish"))
        row("  split: agent stamp -> subscriber get() (AMQP + client)", d.get("agent_publish_to_subscriber"))
        a, b = d["agent_subscriber"], d.get("libvirt_callback") or {}
        if b.get("p50_us"):
            lines.append(f"   ratio agent/callback: p50 x{a['p50_us'] / b['p50_us']:.2f}  "
                         f"p99 x{a['p99_us'] / b['p99_us']:.2f};  the bus path adds "
                         f"{a['p50_us'] - b['p50_us']:,.0f} us at p50")
        lines.append(f"   ({d.get('timeouts', 0)} timeouts, {d.get('stray_events', 0)} stray events, "
                     f"{d.get('warmup', 0)} warm-up events not counted, {d.get('gap_ms')} ms pause after each)")
    else:
        lines.append(f"   direct: {d.get('failure') or d.get('skipped') or 'not run'}")
    dl = ev.get("direct_lean") or {}
    if dl.get("agent_subscriber"):
        row("direct, bare-engine subscriber (no busagent client)", dl["agent_subscriber"])
        row("  baseline: libvirt callback in the actor", dl.get("libvirt_callback"))
        row("  split: action -> the agent stamps the event message", dl.get("action_to_agent_publish"))
        row("  split: agent stamp -> subscriber reads the delivery", dl.get("agent_publish_to_subscriber"))
    elif dl:
        lines.append(f"   direct, bare-engine subscriber: {dl.get('failure') or dl.get('skipped')}")
    b = ev.get("bus") or {}
    if b.get("agent_subscriber"):
        row("bus: RPC virDomainSuspend/Resume (test:///default) -> subscr.", b["agent_subscriber"])
        row("  the RPC round trip (busagent Client)", b.get("call"))
        row("  event receipt minus RPC reply (<0: event first)", b.get("event_after_call_return"))
        row("  split: RPC sent -> the agent stamps the event message", b.get("action_to_agent_publish"))
        row("  split: agent stamp -> subscriber get() (AMQP + client)", b.get("agent_publish_to_subscriber"))
    elif b:
        lines.append(f"   bus: {b.get('failure') or b.get('skipped')}")
    lines.append("")

    lines.append("2-4. sampling, /metrics and memory (test-driver host files, every domain running)")
    head = (f"   {'domains':>7} {'driver':<9} {'sample ms':>9} {'smpl+pub p50':>12} {'max':>7} {'loop ms':>8}"
            f" {'ratio':>7} {'bulk ms':>8} {'msgs':>4} {'KiB/tick':>8} {'scrape1 p50':>11} {'max':>7}"
            f" {'scrape2':>7} {'series':>7} {'RSS MiB':>8} {'base MiB':>8} {'delta':>7}")
    lines.append(head)
    lines.append("   " + "-" * (len(head) - 3))
    for r in doc["sampling"]:
        base = r.get("baseline") or {}
        if r.get("failure") or r.get("skipped") or not r.get("ticks"):
            why = r.get("failure") or r.get("skipped") or "no ticks"
            lines.append(f"   {r['domains']:>7} {r['driver']:<9} ({why[:160]})")
            continue
        mem = r.get("memory_kib") or {}
        lines.append(
            f"   {r['domains']:>7} {r['driver']:<9} {fmt(r['sample_duration'].get('p50_ms'), 1):>9}"
            f" {fmt(r['sample_publish'].get('p50_ms'), 1):>12} {fmt(r['sample_publish'].get('max_ms'), 1):>7}"
            f" {fmt(ms(base.get('loop_best_s')), 1):>8} {'x' + fmt(r.get('ratio_loop_over_agent'), 1):>7}"
            f" {fmt(ms(base.get('bulk_best_s')), 1):>8} {fmt(r.get('messages_per_tick')):>4}"
            f" {fmt((r.get('bytes_per_tick') or 0) / 1024):>8} {fmt(r['scrape_cold'].get('p50_ms'), 1):>11}"
            f" {fmt(r['scrape_cold'].get('max_ms'), 1):>7} {fmt(r['scrape_warm'].get('p50_ms'), 1):>7}"
            f" {fmt(r.get('scrape_series')):>7} {fmt((mem.get('VmRSS') or 0) / 1024, 1):>8}"
            f" {fmt((base.get('rss_kib') or 0) / 1024, 1):>8} {'+' + fmt(r.get('rss_delta_mib'), 1):>7}")
    lines.append("   where smpl+pub goes (p50 ms): sample | sample end -> 1st message stamped by the reactor |"
                 " 1st -> last stamped | last stamped -> received;")
    lines.append("   and the agent's CPU ms (all threads, /proc, mean: 10 ms clock ticks): per tick (sample +"
                 " publish) | first scrape | next scrapes")
    for r in doc["sampling"]:
        if r.get("ticks"):
            lines.append(f"   {r['domains']:>7} {r['driver']:<9} {fmt(r['sample_duration'].get('p50_ms'), 1):>9} |"
                         f" {fmt(r['end_to_first_stamp'].get('p50_ms'), 1):>6} |"
                         f" {fmt(r['stamp_span'].get('p50_ms'), 1):>6} |"
                         f" {fmt(r['last_stamp_to_receipt'].get('p50_ms'), 1):>6}    CPU"
                         f" {fmt(r['agent_cpu_tick'].get('mean_ms'), 0):>5} |"
                         f" {fmt(r['agent_cpu_scrape_cold'].get('mean_ms'), 0):>5} |"
                         f" {fmt(r['agent_cpu_scrape_warm'].get('mean_ms'), 0):>5}"
                         + (f"   profile: {r['profile'].get('report') or r['profile']}" if r.get("profile") else ""))
    snaps = [r for r in doc["sampling"] if r.get("snapshot")]
    if snaps:
        lines.append("   memory (MiB, VmRSS): steady (after ticks + scrapes) | after a full object snapshot "
                     "(busagentResync: time, reply) | peak VmHWM | bare baseline")
        for r in snaps:
            mem, after, snap = r.get("memory_kib") or {}, r.get("memory_after_snapshot_kib") or {}, r["snapshot"]
            peak = max(mem.get("VmHWM", 0), after.get("VmHWM", 0))
            what = (f"{snap['seconds']:.2f} s, {fmt(snap['reply_bytes'] / 1e6, 1)} MB" if not snap.get("failure")
                    else f"failed: {str(snap['failure'])[:60]}")
            lines.append(f"   {r['domains']:>7} {r['driver']:<9} {fmt((mem.get('VmRSS') or 0) / 1024, 1):>7} |"
                         f" {fmt((after.get('VmRSS') or 0) / 1024, 1):>7} ({what}) | {fmt(peak / 1024, 1):>7} |"
                         f" {fmt(((r.get('baseline') or {}).get('rss_kib') or 0) / 1024, 1):>6}")
    lines.append("   sample ms: the sampler's own Sample.duration (p50).  smpl+pub: from the sample's start to the")
    lines.append("   last of its messages at a subscriber process (p50, max).  loop ms: the baseline's per-domain")
    lines.append("   loop, info()+state()+memoryStats() per domain, best pass, same URI.  ratio: loop / smpl+pub p50.")
    lines.append("   bulk ms: getAllDomainStats(0, NOWAIT) alone in the baseline process (best of 3).  scrape1: the")
    lines.append("   first /metrics GET after a new sample (maps the sample); scrape2: the next GETs (cached).")
    lines.append("   RSS: the agent's VmRSS after its ticks and scrapes; base: a bare python process that opened")
    lines.append("   the same URI and listed every domain (through libvirtd the driver lives in libvirtd).")
    keys = next((r["baseline"].get("bulk_keys") for r in doc["sampling"] if (r.get("baseline") or {}).get("bulk_keys")),
                None)
    lines.append(f"   NOTE: the test driver's bulk statistics carry only {', '.join(keys or ['state.*'])}: two series")
    lines.append("   per domain on /metrics, and tiny bus messages. A QEMU host has ~40-80 keys per domain:")
    syn = doc.get("synthetic") or {}
    if syn.get("render_cold_ms") is not None:
        lines.append(f"   SYNTHETIC (in-process, {syn['domains']} x the hand-built QEMU fixture, "
                     f"{syn['stats_keys_per_domain']:g} keys/domain): /metrics render {fmt(syn['render_cold_ms'])} ms"
                     f" first, {fmt(syn['render_warm_ms'])} ms cached; {fmt(syn['series'])} series,"
                     f" {fmt(syn['body_bytes'] / 1e6, 1)} MB;")
        lines.append(f"   bus batches: {syn['messages']} messages, {fmt(syn['bytes'] / 1e6, 1)} MB, encoded in "
                     f"{fmt(syn['batches_encode_ms'])} ms, largest {fmt(syn['max_message_bytes'] / 1024)} KiB "
                     f"(agent max_message_bytes {fmt(syn['agent_max_message_bytes'] / 1024)} KiB, "
                     f"{syn['messages_over_limit']} over); RSS growth {fmt(syn['rss_growth_mib'], 1)} MiB")
    elif syn:
        lines.append(f"   SYNTHETIC: {syn.get('failure') or syn.get('skipped')}")
    lines.append("")
    lines.append("targets")
    for t in doc["targets"]:
        lines.append(f"   {t['verdict']:<5} {t['target']:<88} {t['value']}")
    lines.append("")
    lines.append(f"results: {doc['results_file']}   elapsed: {doc['elapsed_s']:.0f} s   load average at start "
                 f"{load[0]:.2f}, at end {doc['loadavg_at_end'][0]:.2f}")
    return "\n".join(lines)


def start_libvirtd(tmp: Path) -> tuple[str | None, str | None, str | None]:
    """(uri, socket path, why not)."""
    if not shutil.which("libvirtd") and not Path("/usr/sbin/libvirtd").exists():
        return None, None, "libvirtd is not installed (Debian: libvirt-daemon)"
    start = subprocess.run([str(LIBVIRTD), "start", str(tmp / "lv")], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    if start.returncode != 0:
        return None, None, f"libvirtd did not start: {start.stderr.strip()[-600:]}"
    uri = start.stdout.strip().splitlines()[-1]
    return uri, uri.split("socket=", 1)[1], None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="busagent observation bench: events, sampling, /metrics, memory")
    p.add_argument("--events", type=int, default=1000, help="events measured per event mode")
    p.add_argument("--event-warmup", type=int, default=50)
    p.add_argument("--ticks", type=int, default=6, help="sampler ticks measured per size and driver")
    p.add_argument("--sizes", default="1000,5000", help="domain counts (comma-separated)")
    p.add_argument("--no-libvirtd-sampling", action="store_true", help="sample only with the embedded driver")
    p.add_argument("--no-bus-events", action="store_true", help="skip the event latency through an RPC action")
    p.add_argument("--no-lean-subscriber", action="store_true",
                   help="skip the second direct event run with a bare-engine subscriber")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic QEMU-like rendering")
    p.add_argument("--no-snapshot", action="store_true",
                   help="skip the object snapshot (busagentResync) before the second memory reading")
    p.add_argument("--agent-log-level", help="pass --log-level to the agents (default: the agent's own, info)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the agents at the largest size while their ticks are measured "
                        "(bench/results/observe-profile-*.txt)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (agent logs, host files)")
    p.add_argument("--quick", action="store_true", help="200 events, 3 ticks (smoke test)")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.events, ns.event_warmup, ns.ticks = 200, 20, 3
    ns.events = max(10, min(ns.events, 20_000))
    ns.event_warmup = max(0, min(ns.event_warmup, 1000))
    ns.ticks = max(1, min(ns.ticks, 30))
    sizes = sorted({max(1, min(int(s), 20_000)) for s in ns.sizes.split(",") if s.strip()})
    ns.sizes_list = sizes

    budget = Budget(BUDGET_S)
    host = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bo.", dir="/tmp"))  # short: it holds a unix socket path
    tmp.chmod(0o711)  # libvirtd may run as another user: it must reach its dir and the host files
    doc: dict[str, Any] = {}
    libvirtd: dict[str, Any] = {}
    try:
        log("libvirtd: starting a private libvirtd (test driver) on a unix socket")
        uri, sock, why = start_libvirtd(tmp)
        libvirtd = {"uri": uri, "failure": why}
        if why:
            log(f"libvirtd: {why}")
        events = bench_events(ns, budget, tmp, uri)
        sampling = []
        for n in sizes:
            path = host_file(tmp / f"host{n}.xml", n)
            drivers = ["embedded"] + (["libvirtd"] if sock and not ns.no_libvirtd_sampling else [])
            for driver in drivers:
                sampling.append(bench_sampling(ns, budget, tmp, n, driver, path, sock))
        synthetic: dict[str, Any] = {}
        if not ns.no_synthetic:
            if budget.left() > 25:
                log(f"synthetic: QEMU-like statistics x {max(sizes)} domains, rendered in-process")
                synthetic = run_json([PY, str(BENCH / "observe_synthetic.py"), "--domains", str(max(sizes)),
                                      "--renders", "2"], timeout=min(60, budget.left() - 5))
            else:
                synthetic = {"skipped": "time budget"}
    finally:
        if libvirtd.get("uri"):
            subprocess.run([str(LIBVIRTD), "stop", str(tmp / "lv")], capture_output=True, timeout=30,
                           stdin=subprocess.DEVNULL)
        if ns.keep:
            log(f"kept {tmp} (agent logs, host files)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    out_file = RESULTS / "observe-latest.json"
    doc = {
        "timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "machine": host,
        "config": {"events": ns.events, "event_warmup": ns.event_warmup, "ticks": ns.ticks, "sizes": sizes,
                   "agent_log_level": ns.agent_log_level or "info (agent default)"},
        "targets_def": {"event_p99_us_max": TARGET_EVENT_P99_US, "sample_publish_ms_max": TARGET_SAMPLE_MS,
                        "sample_ratio_min": TARGET_SAMPLE_RATIO, "scrape_ms_max": TARGET_SCRAPE_MS,
                        "rss_delta_mib_max": TARGET_RSS_DELTA_MIB, "at_domains": TARGET_DOMAINS},
        "libvirtd": libvirtd, "events": events, "sampling": sampling, "synthetic": synthetic,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(budget.elapsed, 1), "results_file": str(out_file.relative_to(ROOT)),
    }
    doc["targets"] = targets(doc)
    out_file.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    return 0 if (events.get("direct") or {}).get("agent_subscriber") and sampling else 1


if __name__ == "__main__":
    sys.exit(main())
