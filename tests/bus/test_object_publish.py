"""Objects on the bus: a message per change, periodic snapshots one message per kind,
``busagentResync`` for late consumers, automatic resync on a gap, and the ``watch`` and
``hosts`` commands against an agent run as a process (in each bus mode)."""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from busagent.client import CallError, CallTimeout, Client, ConnectionFailed
from busagent.client.subscribe import Subscription
from busagent.client.view import FleetView, identity
from busagent.config import Settings

PUBLISHED_KINDS = {"node", "domain", "storage_pool", "network", "interface", "node_device"}  # no secrets: test driver


def next_matching(sub: Subscription, pred, timeout: float = 8.0) -> dict[str, Any]:
    """The first message (after any others) for which ``pred`` holds."""
    deadline, seen = time.monotonic() + timeout, []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            doc = sub.get(timeout=remaining)
        except queue.Empty:
            break
        seen.append({k: doc.get(k) for k in ("topic", "kind", "reason", "removed")})
        if pred(doc):
            return doc
    raise AssertionError(f"no matching message within {timeout} s; saw {seen}")


def domain_named(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The domain ``name`` in a single-object or a snapshot message."""
    objs = doc.get("objects") or ([doc["object"]] if "object" in doc else [])
    return next((o for o in objs if o["ref"]["name"] == name), None) if doc.get("kind") == "domain" else None


@pytest.fixture
def domain_topic(agent):
    return f"libvirt.object.{agent.host_id}.domain"


@pytest.fixture
def subscription(bus, agent):
    with bus.subscription(agent, [f"libvirt.object.{agent.host_id}.#"]) as sub:
        assert sub.ready.wait(5)
        yield sub


# -- on change ----------------------------------------------------------------------------------


def test_suspend_publishes_the_new_state(client, running_domain, subscription, domain_topic):
    name = running_domain["name"]
    client.call("virDomainSuspend", domain=running_domain)
    doc = next_matching(subscription, lambda d: "object" in d and d["object"]["ref"]["name"] == name
                        and d["object"]["state_name"] == "VIR_DOMAIN_PAUSED")
    assert doc["topic"] == domain_topic and doc["kind"] == "domain" and doc["reason"] == "domain.lifecycle"
    obj = doc["object"]
    assert obj["reason_name"] == "VIR_DOMAIN_PAUSED_USER" and obj["active"] and obj["persistent"]
    assert obj["info"]["state_name"] == "VIR_DOMAIN_PAUSED" and obj["info"]["maxMem"] == 64 * 1024
    assert {"epoch", "seq", "kind_seq", "timestamp"} <= set(doc)


def test_define_then_undefine_is_upsert_then_removed(client, cleanup, uniq, domain_xml, subscription):
    name = uniq("objdef")
    ref = client.call("virDomainDefineXML", xml=domain_xml(name))
    cleanup.add("virDomainUndefine", domain={"name": name})
    doc = next_matching(subscription, lambda d: "object" in d and d["object"]["ref"]["name"] == name)
    obj = doc["object"]
    assert obj["ref"]["uuid"] == ref["uuid"] and obj["state_name"] == "VIR_DOMAIN_SHUTOFF"
    assert obj["persistent"] and not obj["active"] and not obj["autostart"]

    client.call("virDomainUndefine", domain={"name": name})
    doc = next_matching(subscription, lambda d: d.get("removed") and d["ref"]["uuid"] == ref["uuid"])
    assert doc["kind"] == "domain" and doc["reason"] == "domain.lifecycle" and "object" not in doc


# -- periodic snapshot ----------------------------------------------------------------------------


def snapshot_batches(sub: Subscription, timeout: float = 8.0) -> dict[str, dict[str, Any]]:
    """The first snapshot message of every published kind."""
    batches: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while set(batches) != PUBLISHED_KINDS and time.monotonic() < deadline:
        try:
            doc = sub.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if doc.get("snapshot"):
            batches.setdefault(doc["kind"], doc)
    assert set(batches) == PUBLISHED_KINDS
    return batches


def test_periodic_snapshot_is_one_message_per_kind(bus):
    with bus.agent(Settings(snapshot_interval=0.4, presence_interval=30, metrics_listen="")) as running, \
            bus.subscription(running, [f"libvirt.object.{running.host_id}.#"]) as sub, \
            bus.client(running, timeout=10) as client:
        assert sub.ready.wait(5)
        batches = snapshot_batches(sub)
        fresh = client.call("busagentResync")
    assert "secret" in fresh["unsupported"] and "secret" not in fresh["objects"]
    for kind, doc in batches.items():
        assert doc["reason"] == "periodic" and doc["topic"] == f"libvirt.object.{running.host_id}.{kind}"
        assert isinstance(doc["objects"], list) and "object" not in doc
        assert sorted(identity(kind, o["ref"]) for o in doc["objects"]) == \
            sorted(identity(kind, o["ref"]) for o in fresh["objects"][kind])
    assert domain_named(batches["domain"], "test")["state_name"] == "VIR_DOMAIN_RUNNING"
    node = batches["node"]["objects"][0]
    assert node["info"]["cpus"] == 16 and node["libvirt"]["version"] > 0 and node["uri"] == "test:///default"
    pool = batches["storage_pool"]["objects"][0]
    assert pool["ref"]["name"] == "default-pool" and pool["active"] and isinstance(pool["volumes"], list)
    assert batches["network"]["objects"][0]["bridge"] == "virbr0"


def test_reconnect_publishes_a_full_snapshot(bus):
    with bus.agent(Settings(snapshot_interval=3600, presence_interval=30, metrics_listen="")) as running, \
            bus.subscription(running, [f"libvirt.object.{running.host_id}.#"]) as sub:
        assert sub.ready.wait(5)
        running.agent.hypervisor._mark_lost("simulated by the test")  # the supervisor reopens it
        batches = snapshot_batches(sub)
    assert {doc["reason"] for doc in batches.values()} == {"reconnect"}
    assert domain_named(batches["domain"], "test") is not None


# -- resync ---------------------------------------------------------------------------------------


def comparable(objects: dict[str, list[dict[str, Any]]]) -> dict[tuple[str, str], Any]:
    """Objects by identity, less what moves on its own (a running guest's CPU time)."""
    out = {}
    for kind, objs in objects.items():
        for o in objs:
            o = dict(o)
            if kind == "domain":
                o["info"] = {k: v for k, v in o["info"].items() if k != "cpuTime"}
            out[(kind, identity(kind, o["ref"]))] = o
    return out


def test_late_consumer_resyncs_then_follows(bus, agent, client, cleanup, uniq, domain_xml):
    a, b, c = uniq("late-a"), uniq("late-b"), uniq("late-c")
    for name in (a, b, c):
        cleanup.add("virDomainUndefine", domain={"name": name})
        cleanup.add("virDomainDestroy", domain={"name": name})
    client.call("virDomainDefineXML", xml=domain_xml(a))
    client.call("virDomainCreate", domain={"name": a})
    client.call("virDomainSuspend", domain={"name": a})
    client.call("virDomainDefineXML", xml=domain_xml(b))

    with bus.subscription(agent, [f"libvirt.object.{agent.host_id}.#"]) as sub:
        assert sub.ready.wait(5)
        fleet = FleetView(client, sub)
        view = fleet.resync()
        assert view.host == agent.host_id and view.resyncs == 1
        client.call("virDomainResume", domain={"name": a})
        client.call("virDomainUndefine", domain={"name": b})
        client.call("virDomainDefineXML", xml=domain_xml(c))
        client.call("virDomainCreate", domain={"name": c})

        def settled(f: FleetView) -> bool:
            va, vb, vc = (view.find("domain", name=n) for n in (a, b, c))
            return (va is not None and va["state_name"] == "VIR_DOMAIN_RUNNING" and vb is None
                    and vc is not None and vc["state_name"] == "VIR_DOMAIN_RUNNING")

        assert fleet.follow(until=settled, timeout=10), view.snapshot().get("domain")
        fleet.follow(timeout=0.5)  # whatever is still on its way
        fresh = client.call("busagentResync")
    assert comparable(view.snapshot()) == comparable(fresh["objects"])
    assert view.resyncs == 1 and view.applied > 0


def test_gap_triggers_a_resync(bus, agent, client, running_domain, domain_topic):
    name = running_domain["name"]
    with bus.subscription(agent, [f"libvirt.object.{agent.host_id}.#"]) as sub:
        assert sub.ready.wait(5)
        fleet = FleetView(client, sub)
        view = fleet.resync()
        client.call("virDomainSuspend", domain=running_domain)
        assert fleet.follow(until=lambda f: (view.find("domain", name=name) or {}).get("state_name")
                            == "VIR_DOMAIN_PAUSED", timeout=10)
        # pretend the last domain message never arrived: the next one reveals a gap
        sub.gaps.seed(agent.host_id, view.epoch, {domain_topic: view.kind_seq[domain_topic] - 1})
        client.call("virDomainResume", domain=running_domain)
        assert fleet.follow(until=lambda f: view.resyncs == 2 and (view.find("domain", name=name) or {})
                            .get("state_name") == "VIR_DOMAIN_RUNNING", timeout=10)
    gap = fleet.gaps[-1]
    assert gap["host"] == agent.host_id and gap["topic"] == domain_topic and gap["missed"] >= 1


def test_resync_reply_shape(client, agent):
    reply = client.call("busagentResync")
    assert reply["host"] == agent.host_id
    pos = reply["position"]
    assert set(pos) == {"epoch", "seq", "kind_seq"} and isinstance(pos["seq"], int)
    assert set(reply["objects"]) == PUBLISHED_KINDS
    test = next(o for o in reply["objects"]["domain"] if o["ref"]["name"] == "test")
    assert {"state", "state_name", "reason", "reason_name", "info", "active", "persistent", "autostart"} <= set(test)
    assert test["info"]["nrVirtCpu"] == 2 and test["persistent"]
    assert {i["ref"]["name"] for i in reply["objects"]["interface"]} >= {"eth1"}
    devices = {d["ref"]["name"]: d for d in reply["objects"]["node_device"]}
    assert devices["computer"]["parent"] is None and devices["scsi_host1"]["caps"] == ["scsi_host"]


# -- the command line against an agent process ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines_of(stream) -> queue.SimpleQueue:
    q: queue.SimpleQueue = queue.SimpleQueue()

    def pump() -> None:
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def read_until(q: queue.SimpleQueue, pred, timeout: float) -> list[str]:
    deadline, got = time.monotonic() + timeout, []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = q.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            break
        got.append(line)
        if pred(line):
            return got
    raise AssertionError(f"nothing matching within {timeout} s; got {got[-10:]}")


@dataclass
class AgentProcess:
    """``busagent run`` as a process, in the run's bus mode, and how the CLI reaches it."""

    url: str  # the agent (direct) or the broker
    profile: str
    namespace: str  # its own on a shared broker, so that ``hosts`` sees it alone
    host: str

    def cli(self, *args: str) -> list[str]:
        return ["--url", self.url, "--profile", self.profile, "--namespace", self.namespace, *args]


@pytest.fixture(scope="module")
def agent_process(bus):
    port = free_port()
    namespace = "libvirt" if bus.mode == "direct" else f"cli{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "BUSAGENT_PRESENCE_INTERVAL": "0.5", "BUSAGENT_METRICS_LISTEN": "",
           "BUSAGENT_HOST_ID": "cli-agent", "BUSAGENT_NAMESPACE": namespace}
    if bus.mode == "direct":
        args, url = ["--listen", f"127.0.0.1:{port}"], f"amqp://127.0.0.1:{port}"
    else:
        args, url = ["--mode", "broker", "--broker-url", bus.broker_url, "--profile", bus.profile], bus.broker_url
    proc = subprocess.Popen([sys.executable, "-m", "busagent", "run", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process = AgentProcess(url, bus.profile, namespace, "cli-agent")
    try:
        deadline = time.monotonic() + 20
        while True:
            if serving(process):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent process did not start")
            time.sleep(0.1)
        yield process
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serving(process: AgentProcess) -> bool:
    """Whether the agent answers (a broker queues calls until it consumes them: a short timeout)."""
    try:
        with Client(process.url, host=process.host, profile=process.profile, namespace=process.namespace,
                    timeout=1) as client:
            return bool(client.call("busagentPing"))
    except (CallError, CallTimeout, ConnectionFailed):
        return False


def busagent_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "busagent", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_watch_prints_messages(agent_process):
    """Both patterns' messages come out. Through RabbitMQ each pattern is a queue of its own, and
    nothing orders messages across queues: the event and the object may come either way round."""
    ns = agent_process.namespace
    watch = busagent_cli("watch", *agent_process.cli("--seconds", "20", f"{ns}.object.cli-agent.#",
                                                      f"{ns}.event.cli-agent.#"))

    def suspended_event(d: dict[str, Any]) -> bool:
        return d["kind"] == "domain.lifecycle" and d["data"]["event_name"] == "VIR_DOMAIN_EVENT_SUSPENDED"

    def paused_object(d: dict[str, Any]) -> bool:
        return d["kind"] == "domain" and d.get("object", {}).get("state_name") == "VIR_DOMAIN_PAUSED"

    docs: list[dict[str, Any]] = []

    def both(line: str) -> bool:
        docs.append(json.loads(line))
        return any(map(suspended_event, docs)) and any(map(paused_object, docs))

    try:
        read_until(lines_of(watch.stderr), lambda line: line.startswith("watching "), 15)
        out = lines_of(watch.stdout)
        with Client(agent_process.url, host=agent_process.host, profile=agent_process.profile, namespace=ns,
                    timeout=10) as client:
            client.call("virDomainSuspend", domain={"name": "test"})
            read_until(out, both, 10)
            client.call("virDomainResume", domain={"name": "test"})
    finally:
        watch.terminate()
        watch.wait(10)
    assert all(d["host"] == "cli-agent" for d in docs)
    obj = next(filter(paused_object, docs))
    assert obj["topic"] == f"{ns}.object.cli-agent.domain" and obj["object"]["ref"]["name"] == "test"
    assert next(filter(suspended_event, docs))["topic"] == f"{ns}.event.cli-agent.domain.lifecycle"


def test_hosts_lists_the_live_agent(agent_process):
    hosts = subprocess.run([sys.executable, "-m", "busagent", "hosts", *agent_process.cli("--wait", "1.2", "--json")],
                           capture_output=True, text=True, timeout=30)
    assert hosts.returncode == 0, hosts.stderr
    rows = [json.loads(line) for line in hosts.stdout.splitlines()]
    assert [r["host"] for r in rows] == ["cli-agent"]
    assert rows[0]["state"] in ("birth", "alive") and rows[0]["ttl"] == 1.5 and rows[0]["uri"] == "test:///default"
