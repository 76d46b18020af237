"""``busagent monitor`` through a real RabbitMQ: six agents, one monitor, one ``/metrics``.

Five agents run in this process (broker mode, each on its own test-driver host file with
its own domains: in one process every ``test:///default`` connection shares one
hypervisor), a sixth in a subprocess so that it can be killed with SIGKILL. The fleet
uses a namespace of its own, so agents of other tests on the same broker stay out of it.
Presence every 0.5 s (a heartbeat lives 1.5 s; the subprocess's 3 s), statistics every 0.5 s.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from busagent.client import Client
from busagent.config import Settings
from busagent.monitor import Monitor, MonitorSettings
from busagent.testing import RunningAgent

pytestmark = pytest.mark.rabbitmq

PROFILE = "rabbitmq3"
PRESENCE = 0.5  # in-process agents: ttl 1.5 s
KILLED_PRESENCE = 1.0  # the subprocess agent: ttl 3 s
SAMPLE = 0.5
IN_PROCESS = 5


def host_file(path: Path, host: str, n: int) -> str:
    """A test-driver host (``test:///ABS/PATH``) with ``n`` running domains, a network and a storage
    pool, all named after the host."""
    doms = "".join(f"<domain type='test'><name>{host}-vm{i}</name><memory unit='MiB'>64</memory>"
                   f"<vcpu>{i + 1}</vcpu><os><type arch='i686'>hvm</type></os></domain>" for i in range(n))
    path.write_text(f"<node><cpu><mhz>2000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
                    f"<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                    f"<memory>8388608</memory>{doms}"
                    f"<network><name>{host}-net</name><bridge name='virbr9'/><forward/>"
                    f"<ip address='192.168.122.1' netmask='255.255.255.0'/></network>"
                    f"<pool type='dir'><name>{host}-pool</name><capacity unit='GiB'>100</capacity>"
                    f"<target><path>/{host}-pool</path></target></pool></node>")
    return f"test://{path}"


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def series(values: dict, name: str, **labels: str) -> dict[tuple, float]:
    """The series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {k: v for k, v in values.items() if k[0] == name and want <= set(k[1])}


class Fleet:
    """The agents (name -> RunningAgent or Popen), their domains, the monitor."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.namespace = f"mon{uuid.uuid4().hex[:8]}"
        self.domains: dict[str, set[str]] = {}
        self.agents: dict[str, RunningAgent] = {}
        self.uris: dict[str, str] = {}
        self.killed: subprocess.Popen | None = None
        self.killed_host = ""
        self.monitor: Monitor | None = None

    def settings(self, host: str) -> Settings:
        return Settings(uri=self.uris[host], mode="broker", broker_urls=(self.url,), profile=PROFILE, host_id=host,
                        namespace=self.namespace, presence_interval=PRESENCE, sample_interval=SAMPLE,
                        metrics_listen="127.0.0.1:0")

    def add_host(self, n_domains: int) -> str:
        host = f"h{len(self.domains)}-{uuid.uuid4().hex[:6]}"
        self.uris[host] = host_file(self.tmp / f"{host}.xml", host, n_domains)
        self.domains[host] = {f"{host}-vm{i}" for i in range(n_domains)}
        return host

    def start_agent(self, host: str) -> RunningAgent:
        running = RunningAgent(self.settings(host))
        running.__enter__()
        self.agents[host] = running
        return running

    def stop_agent(self, host: str) -> None:
        self.agents.pop(host).__exit__(None, None, None)

    def start_subprocess_agent(self) -> None:
        host = self.killed_host = self.add_host(2)
        env = {**os.environ, "BUSAGENT_PRESENCE_INTERVAL": str(KILLED_PRESENCE),
               "BUSAGENT_SAMPLE_INTERVAL": str(SAMPLE), "BUSAGENT_METRICS_LISTEN": "", "BUSAGENT_LOG_LEVEL": "warning"}
        self.killed = subprocess.Popen(
            [sys.executable, "-m", "busagent", "run", "--mode", "broker", "--broker-url", self.url,
             "--profile", PROFILE, "--host-id", host, "--uri", self.uris[host], "--namespace", self.namespace],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def all_up(self, hosts: list[str]) -> bool:
        for host in hosts:
            st = self.monitor.status(host)
            if st is None or not st["up"] or st["stale"] or "domain" not in st["stats"]:
                return False
        return True

    def close(self) -> None:
        if self.killed is not None and self.killed.poll() is None:
            self.killed.kill()
            self.killed.wait(10)
        for host in list(self.agents):
            self.stop_agent(host)
        if self.monitor is not None:
            self.monitor.stop()


@pytest.fixture(scope="module")
def fleet(broker_url, tmp_path_factory):
    fl = Fleet(broker_url, tmp_path_factory.mktemp("monitor"))
    try:
        fl.start_subprocess_agent()  # its interpreter starts while the others do
        early = [fl.add_host(i + 1) for i in range(3)]
        for host in early:  # running before the monitor: it learns them from their messages and resyncs
            fl.start_agent(host)
        fl.monitor = Monitor(MonitorSettings(url=broker_url, profile=PROFILE, namespace=fl.namespace,
                                             metrics_listen="127.0.0.1:0", resync_timeout=5.0, resync_retry=0.5))
        fl.monitor.start()
        assert fl.monitor.wait_ready(10), "the monitor's subscription was not attached"
        for i in range(3, IN_PROCESS):  # born while the monitor listens
            fl.start_agent(fl.add_host(i + 1))
        wait_for(lambda: fl.all_up(list(fl.domains)), 20, "every host up with its objects and statistics")
        yield fl
    finally:
        fl.close()


def test_every_host_up_with_its_domains_from_objects(fleet):
    mon = fleet.monitor
    assert len(fleet.domains) == IN_PROCESS + 1
    for host, names in fleet.domains.items():
        st = mon.status(host)
        assert st["up"] and st["why"] == "alive" and st["state"] in ("birth", "alive")
        assert st["resyncs"] >= 1 and not st["stale"]
        assert {d["ref"]["name"] for d in mon.objects(host, "domain")} == names
        assert all(d["state_name"] == "VIR_DOMAIN_RUNNING" for d in mon.objects(host, "domain"))
    assert set(mon.hosts) == set(fleet.domains)  # nothing from outside the namespace


def test_one_endpoint_for_the_fleet(fleet):
    mon = fleet.monitor
    values = scrape(mon.metrics_port)
    assert values[("busagent_monitor_hosts_up", ())] == len(fleet.domains)
    for host, names in fleet.domains.items():
        assert values[("busagent_monitor_host_up", (("host", host),))] == 1
        assert values[("libvirt_up", (("host", host),))] == 1
        assert values[("libvirt_domains", (("host", host),))] == len(names)
        vstate = series(values, "libvirt_domain_info_vstate", host=host)
        assert {dict(labels)["domain"] for _, labels in vstate} == names
        assert set(vstate.values()) == {1.0}  # running
        uuids = {d["ref"]["name"]: d["ref"]["uuid"] for d in mon.objects(host, "domain")}
        assert {dict(labels)["uuid"] for _, labels in vstate} == set(uuids.values())  # the test driver: state.*
        assert values[("libvirt_node_info_cpus", (("host", host),))] == 4
        assert series(values, "libvirt_storage_pool_capacity_bytes", host=host, storage_pool=f"{host}-pool")
        assert series(values, "libvirt_network_active", host=host, network=f"{host}-net")
        lag = values[("busagent_monitor_lag_seconds", (("host", host),))]
        assert -0.5 < lag < 2.0, f"lag {lag} s for {host}"
        assert values[("busagent_monitor_gaps_total", (("host", host),))] == 0
        assert values[("busagent_monitor_objects", (("host", host), ("kind", "domain")))] == len(names)
    for family in ("stats", "presence"):  # events and objects: when something changes (below)
        assert values[("busagent_monitor_messages_total", (("family", family),))] > 0, family
    assert values[("busagent_monitor_bus_connected", ())] == 1
    # the same names (and every label but host) as an agent's own exporter
    agent = next(iter(fleet.agents.values()))
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.agent.stats.metrics_port}/metrics", timeout=5) as resp:
        own = {s.name for fam in text_string_to_metric_families(resp.read().decode()) for s in fam.samples
               if s.name.startswith("libvirt_")}
    fleet_names = {name for name, labels in values if name.startswith("libvirt_")
                   and ("host", agent.host_id) in labels}
    assert own == fleet_names


def test_changes_reach_the_view_and_the_metrics(fleet):
    mon = fleet.monitor
    host = next(iter(fleet.agents))
    name = sorted(fleet.domains[host])[0]
    with Client(fleet.url, host=host, profile=PROFILE, namespace=fleet.namespace, timeout=10) as client:
        client.call("virDomainSuspend", domain={"name": name})
        try:
            wait_for(lambda: any(d["ref"]["name"] == name and d["state_name"] == "VIR_DOMAIN_PAUSED"
                                 for d in mon.objects(host, "domain")), 5, "the paused domain in the view")
            wait_for(lambda: series(scrape(mon.metrics_port), "libvirt_domain_info_vstate", host=host,
                                    domain=name) == {("libvirt_domain_info_vstate",
                                                      tuple(sorted({"host": host, "domain": name,
                                                                    "uuid": _uuid(mon, host, name)}.items()))): 3.0},
                     5, "vstate 3 in /metrics")
        finally:
            client.call("virDomainResume", domain={"name": name})
    values = scrape(mon.metrics_port)
    for family in ("event", "object", "stats", "presence"):
        assert values[("busagent_monitor_messages_total", (("family", family),))] > 0, family


def _uuid(mon: Monitor, host: str, name: str) -> str:
    return next(d["ref"]["uuid"] for d in mon.objects(host, "domain") if d["ref"]["name"] == name)


def test_gap_on_objects_makes_a_resync(fleet):
    mon = fleet.monitor
    host = next(iter(fleet.agents))
    before = mon.status(host)["resyncs"]
    mon.handle({"gap": {"host": host, "topic": f"{fleet.namespace}.object.{host}.domain", "missed": 1,
                        "restarted": False}})
    assert mon.status(host)["stale"]
    wait_for(lambda: mon.status(host)["resyncs"] > before and not mon.status(host)["stale"], 5,
             "a resync after the gap")
    assert mon.status(host)["gaps"] >= 1
    assert {d["ref"]["name"] for d in mon.objects(host, "domain")} == fleet.domains[host]


def test_clean_stop_is_death_and_restart_resyncs(fleet):
    mon = fleet.monitor
    host = list(fleet.agents)[-1]
    resyncs = mon.status(host)["resyncs"]
    fleet.stop_agent(host)
    st = wait_for(lambda: (s := mon.status(host)) and not s["up"] and s, 3, "the host gone")
    assert st["why"] == "death" and st["state"] == "death"
    values = scrape(mon.metrics_port)
    assert values[("busagent_monitor_host_up", (("host", host),))] == 0
    assert values[("libvirt_up", (("host", host),))] == 0
    assert not series(values, "libvirt_domain_info_vstate", host=host)  # a gone host's statistics are not served
    # the same host again: a new epoch, seen as a restart, and a resync
    fleet.start_agent(host)
    wait_for(lambda: mon.status(host)["up"] and mon.status(host)["resyncs"] > resyncs
             and not mon.status(host)["stale"], 10, "the restarted host up and resynced")
    assert mon.status(host)["gaps"] >= 1  # the restart


def test_killed_agent_expires_within_its_ttl(fleet):
    mon = fleet.monitor
    host, proc = fleet.killed_host, fleet.killed
    assert mon.status(host)["up"]
    ttl = KILLED_PRESENCE * 3
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait(10)
    st = wait_for(lambda: (s := mon.status(host)) and not s["up"] and s, ttl + 2, "the killed host gone")
    elapsed = time.monotonic() - killed_at
    assert st["why"] == "expired" and st["state"] in ("birth", "alive")
    assert elapsed <= ttl + 0.3, f"marked gone {elapsed:.2f} s after the kill (ttl {ttl} s)"
    values = scrape(mon.metrics_port)
    assert values[("busagent_monitor_host_up", (("host", host),))] == 0
    assert values[("busagent_monitor_hosts_up", ())] == sum(1 for h in fleet.domains if mon.status(h)["up"])


def test_monitor_command(fleet):
    """``busagent monitor`` as a process: the same endpoint from the command line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "busagent", "monitor", "--url", fleet.url, "--profile", PROFILE, "--namespace",
         fleet.namespace, "--metrics-listen", f"127.0.0.1:{port}", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        up = set(fleet.agents)

        def all_seen() -> bool:
            try:
                values = scrape(port)
            except OSError:
                return False
            return all(values.get(("busagent_monitor_host_up", (("host", h),))) == 1
                       and values.get(("libvirt_domains", (("host", h),))) == len(fleet.domains[h]) for h in up)

        wait_for(all_seen, 15, "every live host in the command's /metrics", interval=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()


# -- the monitor's bookkeeping, fed by hand (no broker) ----------------------------------------
class FakeClient:
    """Answers nothing by itself: the test completes each ``busagentResync`` future."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Future]] = []

    def call_async(self, method: str, args: Any = None, host: str | None = None, ttl: float | None = None) -> Future:
        fut: Future = Future()
        self.calls.append((method, host, fut))
        return fut


def stamped(host: str, family: str, suffix: str, n: int, epoch: str = "e1", **doc: Any) -> dict[str, Any]:
    topic = f"libvirt.{family}.{host}" + (f".{suffix}" if suffix else "")
    return {"host": host, "topic": topic, "epoch": epoch, "seq": n, "kind_seq": n, "timestamp": time.time(), **doc}


def dom(name: str, state: int = 1) -> dict[str, Any]:
    return {"ref": {"name": name, "uuid": f"uuid-{name}", "id": 1}, "state": state}


def test_resync_holds_object_messages_back_until_its_reply():
    client = FakeClient()
    mon = Monitor(MonitorSettings(), client=client)
    mon.handle(stamped("n1", "presence", "", 1, state="birth", ttl=15))
    assert [c[:2] for c in client.calls] == [("busagentResync", "n1")]
    # object messages while the resync is under way: #2 is older than the reply's position, #3 newer
    mon.handle(stamped("n1", "object", "domain", 2, kind="domain", object=dom("a", 3)))
    mon.handle(stamped("n1", "object", "domain", 3, kind="domain", object=dom("b")))
    assert mon.objects("n1", "domain") == []
    client.calls[0][2].set_result({"host": "n1", "position": {"epoch": "e1", "kind_seq": {
        "libvirt.object.n1.domain": 2}}, "objects": {"domain": [dom("a", 1)]}})
    mon.poll()
    by_name = {d["ref"]["name"]: d for d in mon.objects("n1", "domain")}
    assert sorted(by_name) == ["a", "b"] and by_name["a"]["state"] == 1  # #2 skipped: the reply reflects it
    st = mon.status("n1")
    assert st["resyncs"] == 1 and not st["stale"] and len(client.calls) == 1


def test_failed_resync_is_retried_later_and_gaps_make_one():
    client = FakeClient()
    mon = Monitor(MonitorSettings(resync_retry=0.5), client=client)
    mon.handle(stamped("n1", "stats", "node", 1, kind="stats.node", node={"cpus": 2}), now=100.0)
    client.calls[0][2].set_exception(RuntimeError("no agent"))
    mon.poll(now=100.1)
    mon.handle(stamped("n1", "stats", "node", 2, kind="stats.node", node={"cpus": 2}), now=100.2)
    assert len(client.calls) == 1  # not before resync_retry
    mon.handle(stamped("n1", "stats", "node", 3, kind="stats.node", node={"cpus": 2}), now=100.7)
    assert len(client.calls) == 2
    client.calls[1][2].set_result({"host": "n1", "position": {"epoch": "e1", "kind_seq": {}}, "objects": {}})
    mon.poll(now=100.8)
    assert not mon.status("n1")["stale"]
    mon.handle({"gap": {"host": "n1", "topic": "libvirt.stats.n1.node", "missed": 1}}, now=101.0)
    mon.handle(stamped("n1", "stats", "node", 5, kind="stats.node"), now=101.0)
    assert len(client.calls) == 2 and mon.status("n1")["gaps"] == 1  # statistics: counted, no resync
    mon.handle({"gap": {"host": "n1", "topic": "libvirt.object.n1.domain", "missed": 2}}, now=101.1)
    mon.handle(stamped("n1", "object", "domain", 9, kind="domain", object=dom("a")), now=101.1)
    assert len(client.calls) == 3 and mon.status("n1")["gaps"] == 2


def test_liveness_from_presence():
    mon = Monitor(MonitorSettings(), client=FakeClient())
    mon.handle(stamped("n1", "presence", "", 1, state="birth", ttl=1.5), now=10.0)
    mon.handle(stamped("n2", "presence", "", 1, state="alive", ttl=1.5), now=10.0)
    mon.handle(stamped("n2", "presence", "", 2, state="death", ttl=1.5), now=10.2)
    assert mon.status("n1", now=11.4)["up"] and mon.status("n1", now=11.4)["why"] == "alive"
    assert mon.status("n1", now=11.6)["why"] == "expired" and not mon.status("n1", now=11.6)["up"]
    assert mon.status("n2", now=10.3)["why"] == "death"
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for fam in mon.collect(now=10.5) for s in fam.samples}
    assert values[("busagent_monitor_hosts_up", ())] == 1
    assert values[("busagent_monitor_host_up", (("host", "n2"),))] == 0


def test_domain_chunks_make_one_sample():
    mon = Monitor(MonitorSettings(), client=FakeClient())

    def chunk(n: int, i: int, names: list[str]) -> dict[str, Any]:
        return stamped("n1", "stats", "domain", n, kind="stats.domain", ok=True, chunk=i, chunks=2,
                       domains=[{"name": x, "uuid": f"u-{x}", "stats": {"state.state": 1}} for x in names])

    mon.handle(stamped("n1", "presence", "", 1, state="birth", ttl=15))
    mon.handle(chunk(2, 0, ["a", "b"]))

    def domains() -> dict[str, float]:
        return {dict(s.labels)["domain"]: s.value for fam in mon.collect() for s in fam.samples
                if s.name == "libvirt_domain_info_vstate"}

    assert domains() == {}  # half a sample is not served
    mon.handle(chunk(3, 1, ["c"]))
    assert sorted(domains()) == ["a", "b", "c"]
    mon.handle(chunk(4, 1, ["z"]))  # a second chunk without its first: dropped, the last whole sample stays
    assert sorted(domains()) == ["a", "b", "c"]
