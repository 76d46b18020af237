"""Fleet benchmark: N agents x M domains on one throwaway RabbitMQ, one monitor.

Reports the monitor's lag (receipt - publish stamp of each host's latest statistics, from its
own ``busagent_monitor_lag_seconds``) and its CPU, against a baseline measured in the same
run: the same monitor with one agent. Bounded in time; loopback only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from observe_bench import host_file  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def gauges(text: str, name: str) -> dict[str, float]:
    out = {}
    for m in re.finditer(rf'^{name}{{host="([^"]+)"}} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def run_fleet(url: str, tmp: Path, agents: int, domains: int, interval: float, seconds: float, ns: str) -> dict:
    env = {**os.environ, "BUSAGENT_SAMPLE_INTERVAL": str(interval), "BUSAGENT_METRICS_LISTEN": "",
           "BUSAGENT_PRESENCE_INTERVAL": "2", "BUSAGENT_LOG_LEVEL": "warning"}
    procs = []
    mport = free_port()
    monitor = subprocess.Popen([str(VENV_BIN / "busagent"), "monitor", "--url", url, "--profile", "rabbitmq3",
                                "--namespace", ns, "--metrics-listen", f"127.0.0.1:{mport}", "--log-level",
                                "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i in range(agents):
            uri = f"test://{host_file(tmp / f'host{i}.xml', domains)}"
            procs.append(subprocess.Popen(
                [str(VENV_BIN / "busagent"), "run", "--mode", "broker", "--broker-url", url, "--profile",
                 "rabbitmq3", "--namespace", ns, "--host-id", f"h{i:02d}", "--uri", uri],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline, up = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                up = gauges(scrape(mport), "busagent_monitor_host_up")
            except OSError:
                up = {}
            if sum(up.values()) >= agents:
                break
            time.sleep(1)
        hosts_up = int(sum(up.values()))
        lags: list[float] = []
        cpu0, t0 = cpu_seconds(monitor.pid), time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            time.sleep(interval / 2)
            lags += [v for v in gauges(scrape(mport), "busagent_monitor_lag_seconds").values() if v >= 0]
        cpu = (cpu_seconds(monitor.pid) - cpu0) / (time.monotonic() - t0)
        lags.sort()
        return {"agents": agents, "domains": domains, "hosts_up": hosts_up, "samples": len(lags),
                "lag_p50_ms": statistics.median(lags) * 1000 if lags else None,
                "lag_p95_ms": lags[int(len(lags) * 0.95)] * 1000 if lags else None,
                "lag_max_ms": lags[-1] * 1000 if lags else None, "monitor_cpu_percent": cpu * 100}
    finally:
        for p in [*procs, monitor]:
            p.terminate()
        for p in [*procs, monitor]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=20)
    ap.add_argument("--domains", type=int, default=200)
    ap.add_argument("--interval", type=float, default=5.0, help="agents' sample interval (s)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per run")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="busagent-fleet-") as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)
        port = free_port()
        subprocess.run([str(ROOT / "scripts" / "rabbitmq"), "start", str(tmp / "broker"), str(port)], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            url = f"amqp://guest:guest@127.0.0.1:{port}"
            base = run_fleet(url, tmp, 1, ns.domains, ns.interval, ns.seconds, "fleetbase")
            fleet = run_fleet(url, tmp, ns.agents, ns.domains, ns.interval, ns.seconds, "fleet")
        finally:
            subprocess.run([str(ROOT / "scripts" / "rabbitmq"), "stop", str(tmp / "broker")], check=False,
                           stdout=subprocess.DEVNULL)
    print(f"busagent fleet bench: {ns.agents} agents x {ns.domains} domains on one RabbitMQ, one monitor, "
          f"stats every {ns.interval:g} s, {ns.seconds:g} s window; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'run':<10} {'hosts up':>8} {'lag p50 ms':>11} {'p95 ms':>8} {'max ms':>8} {'monitor CPU %':>14}")
    for name, r in (("baseline", base), ("fleet", fleet)):
        fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
        print(f"{name:<10} {r['hosts_up']:>5}/{r['agents']:<2} {fmt(r['lag_p50_ms']):>11} {fmt(r['lag_p95_ms']):>8} "
              f"{fmt(r['lag_max_ms']):>8} {r['monitor_cpu_percent']:>14.1f}")
    if base["lag_p50_ms"] and fleet["lag_p50_ms"]:
        print(f"ratio fleet/baseline: lag p50 x{fleet['lag_p50_ms'] / base['lag_p50_ms']:.2f}, monitor CPU "
              f"x{fleet['monitor_cpu_percent'] / max(base['monitor_cpu_percent'], 0.1):.1f}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "fleet-latest.json").write_text(json.dumps({"baseline": base, "fleet": fleet}, indent=2))
    return 0 if fleet["hosts_up"] == ns.agents else 1


if __name__ == "__main__":
    sys.exit(main())
