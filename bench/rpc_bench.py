"""The RPC benchmark behind ``bench/run``: the agent over the bus against libvirt's own paths.

Measured in one run, each in its own process:

* agent-over-bus: ``busagent run --listen 127.0.0.1:PORT`` (test:///default), driven by
  lean load clients (``lean_client.py`` with ``--loop engine`` and ``--loop container``, and
  ``rhea_client.js`` when Node.js is there): p50/p99 of sequential calls after a
  warm-up, and calls/s with a window of calls outstanding.
* libvirtd-remote: libvirt's remote protocol to a private unprivileged libvirtd
  (``scripts/libvirtd-testdriver``), python ``dom.info()`` sequential and threaded.
* in-process: python ``dom.info()`` on test:///default.

Prints a table with ratios and the targets, and writes ``bench/results/rpc-latest.json``.
Every step is bounded in count and time; everything stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
TARGET_P50_US = 1000.0
TARGET_CALLS_PER_S = 5000.0
BUDGET_S = 170.0  # the whole bench must end within 3 minutes


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.seconds = seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed


def run_json(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a measuring process; its last stdout line is JSON."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), env=env,
                              cwd=ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"failure": f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} did not finish in {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"failure": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"}
    if proc.returncode and not out.get("failure"):
        out["failure"] = f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# -- the three paths ------------------------------------------------------------------------------
def bench_in_process(ns: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    log("in-process libvirt: dom.info() on test:///default")
    return run_json([PY, str(BENCH / "libvirt_calls.py"), "--uri", "test:///default",
                     "--warmup", "1000", "--sequential", str(ns.sequential), "--threads", str(ns.threads),
                     "--threaded-calls", str(ns.pipelined), "--time-limit", "20"],
                    timeout=min(40, budget.left()))


def bench_libvirtd(ns: argparse.Namespace, budget: Budget, tmp: Path) -> dict[str, Any]:
    script = ROOT / "scripts" / "libvirtd-testdriver"
    if not shutil.which("libvirtd") and not Path("/usr/sbin/libvirtd").exists():
        return {"failure": "libvirtd is not installed (Debian: libvirt-daemon)"}
    state = tmp / "libvirtd"
    log("libvirtd-remote: starting a private libvirtd (test driver) on a unix socket")
    try:
        start = subprocess.run([str(script), "start", str(state)], capture_output=True, text=True, timeout=30,
                               stdin=subprocess.DEVNULL)
        if start.returncode != 0:
            return {"failure": f"libvirtd did not start: {start.stderr.strip()[-600:]}"}
        uri = start.stdout.strip().splitlines()[-1]
        log(f"libvirtd-remote: {uri}")
        out = run_json([PY, str(BENCH / "libvirt_calls.py"), "--uri", uri, "--warmup", "500",
                        "--sequential", str(ns.sequential), "--threads", str(ns.threads), "--shared-connection",
                        "--threaded-calls", str(ns.pipelined), "--time-limit", "30"],
                       timeout=min(50, budget.left()))
        out["uri"] = uri
        return out
    finally:
        subprocess.run([str(script), "stop", str(state)], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def ensure_rhea(budget: Budget) -> str | None:
    """Install rhea into bench/node_modules when missing; returns why not usable, or None."""
    if not shutil.which("node"):
        return "node is not installed"
    if (BENCH / "node_modules" / "rhea" / "package.json").exists():
        return None
    npm = shutil.which("npm")
    if not npm:
        return "npm is not installed"
    log("node: installing rhea into bench/node_modules")
    cmd = [npm, "ci" if (BENCH / "package-lock.json").exists() else "install", "--no-audit", "--no-fund",
           "--loglevel=error"]
    try:
        proc = subprocess.run(cmd, cwd=BENCH, capture_output=True, text=True, timeout=min(90, budget.left() - 60),
                              stdin=subprocess.DEVNULL)
    except (subprocess.TimeoutExpired, ValueError):
        return "npm install took too long"
    if proc.returncode != 0:
        return f"npm failed: {proc.stderr.strip()[-300:]}"
    return None


def client_cmd(kind: str, url: str, agent_pid: int, ns: argparse.Namespace, time_limit: float,
               **phases: int) -> list[str]:
    counts = {"warmup": ns.warmup, "warmup-pipelined": ns.warmup_pipelined, "sequential": ns.sequential,
              "pipelined": ns.pipelined}
    counts.update({k.replace("_", "-"): v for k, v in phases.items()})
    if kind == "node-rhea":
        cmd = ["node", str(BENCH / "rhea_client.js")]
    else:
        cmd = [PY, str(BENCH / "lean_client.py"), "--loop", kind.split("-", 1)[1]]
    cmd += ["--url", url, "--agent-pid", str(agent_pid), "--window", str(ns.window),
            "--time-limit", f"{time_limit:.0f}"]
    for k, v in counts.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def bench_agent(ns: argparse.Namespace, budget: Budget, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    port = free_port()
    url = f"amqp://127.0.0.1:{port}"
    agent_log = tmp / "agent.log"
    cmd = [str(ROOT / ".venv" / "bin" / "busagent"), "run", "--listen", f"127.0.0.1:{port}"]
    if ns.agent_log_level:
        cmd += ["--log-level", ns.agent_log_level]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUSAGENT_")}
    log(f"agent: {' '.join(cmd[1:])} (log: {agent_log})")
    clients: dict[str, Any] = {}
    info: dict[str, Any] = {"url": url, "command": " ".join(["busagent"] + cmd[1:])}
    with open(agent_log, "wb") as logf:
        agent = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=ROOT, env=env)
    try:
        if not wait_listening(port, agent, 20):
            info["failure"] = "the agent did not start listening: " + agent_log.read_text()[-800:]
            return info, clients
        kinds = ["python-engine"]
        if not ns.no_container:
            kinds.append("python-container")
        if not ns.no_node:
            why = ensure_rhea(budget)
            if why is None:
                kinds.append("node-rhea")
            else:
                clients["node-rhea"] = {"skipped": why}
                log(f"node-rhea client skipped: {why}")
        for i, kind in enumerate(kinds):
            reserve = 25.0 * (len(kinds) - i - 1) + 5.0  # leave room for the clients after this one
            limit = min(60.0, budget.left() - reserve)
            if i > 0 and limit < 20:
                clients[kind] = {"skipped": f"time budget ({budget.elapsed:.0f} s used)"}
                log(f"{kind} client skipped: time budget")
                continue
            log(f"agent-over-bus: {kind} client ({ns.sequential} sequential, {ns.pipelined} pipelined "
                f"with {ns.window} outstanding)")
            clients[kind] = run_json(client_cmd(kind, url, agent.pid, ns, max(10.0, limit)),
                                     timeout=max(15.0, limit + 10))
            if agent.poll() is not None:
                info["failure"] = f"the agent exited ({agent.returncode}): " + agent_log.read_text()[-800:]
                break
        if ns.profile and agent.poll() is None:
            info["profile"] = profile_agent(ns, budget, url, agent.pid)
        return info, clients
    finally:
        stop_process(agent)
        info["log_lines"] = sum(1 for _ in open(agent_log, "rb"))


def profile_agent(ns: argparse.Namespace, budget: Budget, url: str, agent_pid: int) -> dict[str, Any]:
    """py-spy (GIL-holding samples, per thread) of the agent over a sequential and a pipelined run."""
    pyspy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(pyspy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    sys.path.insert(0, str(BENCH))
    from pyspy_summary import summarise

    out: dict[str, Any] = {}
    rate = 250
    for phase, counts in (("sequential", {"sequential": ns.sequential, "pipelined": 0}),
                          ("pipelined", {"sequential": 0, "pipelined": ns.pipelined})):
        if budget.left() < 30:
            out[phase] = {"skipped": "time budget"}
            continue
        raw = RESULTS / f"agent-profile-{phase}.raw"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(agent_pid), "--format", "raw", "--output", str(raw),
                                "--rate", str(rate), "--threads", "--gil", "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        time.sleep(1.0)
        limit = min(60.0, budget.left() - 10)
        res = run_json(client_cmd("python-engine", url, agent_pid, ns, limit, warmup=0, warmup_pipelined=0,
                                  **counts), timeout=limit + 10)
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
        calls = (res.get(phase) or {}).get("calls")
        report = RESULTS / f"agent-profile-{phase}.txt"
        if raw.exists():
            with open(report, "w") as f:
                summarise(str(raw), calls, rate, 40, out=f)
            out[phase] = {"report": str(report.relative_to(ROOT)), "calls": calls, "client": res.get(phase)}
        else:
            err = spy.stderr.read().decode(errors="replace")[-300:] if spy.stderr else ""
            out[phase] = {"failure": f"py-spy wrote nothing: {err}"}
    return out


# -- report -----------------------------------------------------------------------------------
def fmt(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{digits}f}"


def gfmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


def ratio(a: Any, b: Any) -> float | None:
    try:
        return float(f"{a / b:.3g}") if a is not None and b else None
    except TypeError:
        return None


def row_of(name: str, res: dict[str, Any], conc_key: str, conc_desc: str) -> dict[str, Any]:
    seq = res.get("sequential") or {}
    conc = res.get(conc_key) or {}
    return {
        "path": name, "p50_us": seq.get("p50_us"), "p99_us": seq.get("p99_us"),
        "seq_calls_per_s": seq.get("calls_per_s"), "calls_per_s": conc.get("calls_per_s"),
        "concurrency": conc_desc, "agent_cpu_seq": seq.get("agent_cpu_us_per_call"),
        "agent_cpu_pipe": conc.get("agent_cpu_us_per_call"), "client_cpu_seq": seq.get("client_cpu_us_per_call"),
        "client_cpu_pipe": conc.get("client_cpu_us_per_call"),
        "failure": res.get("failure") or res.get("skipped"),
    }


def report(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    m = doc["machine"]
    lines.append(f"busagent RPC bench — {doc['timestamp']} — {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, "
                 f"libvirt {m['libvirt']}, proton {m['proton']}")
    lines.append(f"method virDomainGetInfo {{\"domain\":{{\"name\":\"test\"}}}} / dom.info() on the test driver; "
                 f"{doc['config']['sequential']} sequential calls after warm-up, "
                 f"{doc['config']['pipelined']} calls with {doc['config']['window']} outstanding")
    load = m.get("loadavg_at_start") or [0.0]
    if load[0] > 0.5:
        lines.append(f"WARNING: load average {load[0]:.2f} at start: other work shares the CPUs, figures are noisy")
    lines.append("")
    head = (f"{'path':<40} {'p50 us':>9} {'p99 us':>9} {'seq calls/s':>12} {'calls/s':>10}  {'concurrency':<26}"
            f" {'agent CPU us/call':>18} {'client CPU us/call':>19}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in doc["table"]:
        if r["failure"] and r["p50_us"] is None:
            lines.append(f"{r['path']:<40} {'(' + str(r['failure'])[:150] + ')'}")
            continue
        acpu = (f"{fmt(r['agent_cpu_seq'])} / {fmt(r['agent_cpu_pipe'])}"
                if r["agent_cpu_seq"] is not None else "")
        ccpu = (f"{fmt(r['client_cpu_seq'])} / {fmt(r['client_cpu_pipe'])}"
                if r["client_cpu_seq"] is not None else "")
        digits = 1 if (r["p50_us"] or 0) < 100 else 0
        lines.append(f"{r['path']:<40} {fmt(r['p50_us'], digits):>9} {fmt(r['p99_us'], digits):>9} "
                     f"{fmt(r['seq_calls_per_s']):>12} {fmt(r['calls_per_s']):>10}  {r['concurrency']:<26}"
                     f" {acpu:>18} {ccpu:>19}")
        if r["failure"]:
            lines.append(f"{'':<40} ! {str(r['failure'])[:200]}")
    lines.append("(CPU us/call: sequential / concurrent phase; the agent's from /proc, the client's from getrusage)")
    lines.append("")
    primary = doc["ratios"].get("client")
    if primary:
        lines.append(f"ratios, agent-over-bus ({primary} client) / baseline   "
                     f"(latency: >1 = slower; calls/s: <1 = fewer)")
        for base in ("libvirtd-remote", "in-process"):
            r = doc["ratios"].get(base) or {}
            lines.append(f"  agent / {base:<16} p50 x{gfmt(r.get('p50')):<8} p99 x{gfmt(r.get('p99')):<8} "
                         f"calls/s x{gfmt(r.get('calls_per_s'))}")
        lines.append("")
    lines.append(f"targets (agent-over-bus): p50 <= {TARGET_P50_US:,.0f} us sequential, "
                 f">= {TARGET_CALLS_PER_S:,.0f} calls/s pipelined")
    for client, t in doc["targets"].items():
        lines.append(f"  {client:<18} p50 {fmt(t['p50_us']):>7} us: {t['p50']:<5}  "
                     f"pipelined {fmt(t['calls_per_s']):>7} calls/s: {t['throughput']}")
    lines.append("")
    lines.append(f"results: {doc['results_file']}   elapsed: {doc['elapsed_s']:.0f} s")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import libvirt
        v = libvirt.getVersion()
        lv = f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
    except Exception:  # only for the header line
        lv = "?"
    try:
        import proton
        pv = ".".join(map(str, proton.VERSION))
    except Exception:  # only for the header line
        pv = "?"
    return {"cpus": os.cpu_count(), "cpu": cpu, "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "libvirt": lv, "proton": pv,
            "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="busagent RPC bench: agent over the bus vs libvirtd vs in-process")
    p.add_argument("--sequential", type=int, default=2000, help="sequential calls measured (after warm-up)")
    p.add_argument("--pipelined", type=int, default=20000, help="calls in the concurrent phase")
    p.add_argument("--window", type=int, default=100, help="bus calls outstanding in the pipelined phase")
    p.add_argument("--warmup", type=int, default=500, help="sequential warm-up calls per bus client")
    p.add_argument("--warmup-pipelined", type=int, default=2000, help="pipelined warm-up calls per bus client")
    p.add_argument("--threads", type=int, default=8, help="threads for the libvirt baselines' concurrent phase")
    p.add_argument("--no-node", action="store_true", help="skip the Node.js rhea client")
    p.add_argument("--no-container", action="store_true", help="skip the Container-driven python client")
    p.add_argument("--agent-log-level", help="pass --log-level to the agent (default: the agent's own, info)")
    p.add_argument("--profile", action="store_true",
                   help="also py-spy the agent over a sequential and a pipelined run (bench/results/agent-profile-*)")
    p.add_argument("--quick", action="store_true", help="a tenth of the calls (smoke test)")
    ns = p.parse_args(argv)
    if ns.quick:
        for k in ("sequential", "pipelined", "warmup", "warmup_pipelined"):
            setattr(ns, k, max(10, getattr(ns, k) // 10))
    for k in ("sequential", "pipelined", "warmup", "warmup_pipelined"):
        setattr(ns, k, max(0, min(getattr(ns, k), 200_000)))
    ns.sequential = max(1, ns.sequential)
    ns.pipelined = max(1, ns.pipelined)
    ns.window = max(1, min(ns.window, 1000))
    ns.threads = max(1, min(ns.threads, 64))

    budget = Budget(BUDGET_S)
    host = machine()  # before anything of ours runs: the load average says whether the box was quiet
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bb.", dir="/tmp"))  # short: it holds a unix socket path
    tmp.chmod(0o711)  # libvirtd may run as another user (root starts it as nobody): it must reach its dir
    try:
        inproc = bench_in_process(ns, budget)
        remote = bench_libvirtd(ns, budget, tmp)
        agent_info, clients = bench_agent(ns, budget, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    window_desc = f"{ns.window} outstanding, 1 conn"
    table = [row_of(f"agent-over-bus ({kind} client)", res, "pipelined", window_desc)
             for kind, res in clients.items()]
    if agent_info.get("failure"):
        table.insert(0, {"path": "agent-over-bus", "p50_us": None, "failure": agent_info["failure"]})
    table.append(row_of("libvirtd-remote (python, unix socket)", remote, "threaded",
                        f"{ns.threads} threads, 1 conn"))
    table.append(row_of("in-process (python, test:///default)", inproc, "threaded",
                        f"{ns.threads} threads, 1 conn each"))

    primary = next((k for k in ("python-engine", "python-container", "node-rhea")
                    if (clients.get(k) or {}).get("sequential")), None)
    ratios: dict[str, Any] = {"client": primary}
    if primary:
        a = clients[primary]
        for base, res, key in (("libvirtd-remote", remote, "threaded"), ("in-process", inproc, "threaded")):
            seq = res.get("sequential") or {}
            ratios[base] = {
                "p50": ratio(a["sequential"].get("p50_us"), seq.get("p50_us")),
                "p99": ratio(a["sequential"].get("p99_us"), seq.get("p99_us")),
                "calls_per_s": ratio((a.get("pipelined") or {}).get("calls_per_s"),
                                     (res.get(key) or {}).get("calls_per_s")),
            }
    targets = {}
    for kind, res in clients.items():
        if not res.get("sequential"):
            continue
        p50 = res["sequential"].get("p50_us")
        cps = (res.get("pipelined") or {}).get("calls_per_s")
        targets[kind] = {"p50_us": p50, "calls_per_s": cps,
                         "p50": "PASS" if p50 is not None and p50 <= TARGET_P50_US else "MISS",
                         "throughput": "PASS" if cps is not None and cps >= TARGET_CALLS_PER_S else "MISS"}

    out_file = RESULTS / "rpc-latest.json"
    doc = {
        "timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "machine": host,
        "config": {"sequential": ns.sequential, "pipelined": ns.pipelined, "window": ns.window,
                   "warmup": ns.warmup, "warmup_pipelined": ns.warmup_pipelined, "threads": ns.threads,
                   "agent_log_level": ns.agent_log_level or "info (agent default)"},
        "targets_def": {"p50_us_max": TARGET_P50_US, "calls_per_s_min": TARGET_CALLS_PER_S},
        "agent": agent_info, "agent_over_bus": clients, "libvirtd_remote": remote, "in_process": inproc,
        "table": table, "ratios": ratios, "targets": targets,
        "elapsed_s": round(budget.elapsed, 1), "results_file": str(out_file.relative_to(ROOT)),
    }
    out_file.write_text(json.dumps(doc, indent=2) + "\n")
    print(report(doc))
    if agent_info.get("profile"):
        for phase, prof in agent_info["profile"].items():
            print(f"agent profile ({phase}): {prof.get('report') or prof}")
    ok = primary is not None and not agent_info.get("failure")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
