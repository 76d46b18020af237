"""Faults through RabbitMQ, each test asserting counts: nothing accepted is lost, nothing runs twice.

* The broker restarts (``scripts/rabbitmq stop`` and ``start`` on the same directory and port:
  a module broker of its own, so that the session's is not disturbed) under sustained load:
  five callers, each call a write with a message id of its own (``virDomainDefineXML`` of a
  uniquely named guest), retried with the same id until answered; a monitoring subscription
  on the guests' events. Then: every call answered, every guest defined exactly once (the
  hypervisor's list, the agent's executions and the DEFINED events agree), every event either
  received or reported missed by a gap, and agent, callers and subscription back by themselves.
* A request sent while no agent consumes it waits in the durable queue, across a broker
  restart, and is answered once the agent is back.
* ``kill -9`` of an agent process: no ``death`` message; its presence expires within the
  heartbeat's ttl; restarted, it answers again (including a call sent while it was dead).
* The private libvirtd stops and comes back under a call load: calls during the outage get
  libvirt's error (none waits past its timeout), calls after it succeed.
"""
from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from proton import Message
from proton.utils import BlockingConnection

from busagent.client import CallError, CallTimeout, Client, ConnectionFailed, LibvirtError
from busagent.client.subscribe import Subscription
from busagent.client.view import live_hosts
from busagent.config import Settings
from busagent.testing import RunningAgent

pytestmark = pytest.mark.rabbitmq

PROFILE = "rabbitmq3"
ROOT = Path(__file__).resolve().parents[2]
HAVE_LIBVIRTD = bool(shutil.which("libvirtd") or os.access("/usr/sbin/libvirtd", os.X_OK))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return result


class PrivateBroker:
    """A RabbitMQ node of this module (scripts/rabbitmq), stopped and started on the same
    directory and port: its durable queues and persistent messages survive a restart."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="busagent-faults-rabbitmq.")
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}"

    def _script(self, *args: str) -> None:
        out = subprocess.run([str(ROOT / "scripts" / "rabbitmq"), *args], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, f"scripts/rabbitmq {args[0]} failed: {out.stderr[-2000:]}"

    def start(self) -> None:
        self._script("start", self.dir, str(self.port))

    def stop(self) -> None:
        self._script("stop", self.dir)

    def remove(self) -> None:
        subprocess.run([str(ROOT / "scripts" / "rabbitmq"), "stop", self.dir], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def private_broker(broker_url):
    """Needs what the session broker needs (``broker_url`` skips without it)."""
    broker = PrivateBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.remove()


def host_xml(path: Path) -> str:
    """A test-driver host of the agent's own (``test:///ABS/PATH``): no other agent of this process
    shares its state, so its guests are exactly what the test defined."""
    path.write_text("<node><domain type='test'><name>stock</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                    "<os><type arch='i686'>hvm</type></os></domain></node>")
    return f"test://{path}"


def guest_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>"
            f"<os><type arch='i686'>hvm</type></os></domain>")


class Events:
    """A monitoring subscription (reconnecting by itself) on one topic: kind_seq received, missed."""

    def __init__(self, url: str, topic: str) -> None:
        self.sub = Subscription(url, [topic], profile=PROFILE, reconnect=True)
        assert self.sub.ready.wait(10), "subscription not attached"
        self.seen: Counter[int] = Counter()
        self.messages: list[dict[str, Any]] = []
        self.missed = 0
        self.gaps = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self.sub.get(timeout=0.1)
            except queue.Empty:
                continue
            if "gap" in item:
                self.gaps += 1
                self.missed += item["gap"]["missed"]
            else:
                self.seen[item["kind_seq"]] += 1
                self.messages.append(item)

    def until(self, last: int, timeout: float) -> None:
        wait_for(lambda: last in self.seen, timeout, f"event {last}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sub.close()


def test_broker_restart_under_load(private_broker, tmp_path):
    """Five callers and a subscriber while RabbitMQ stops and starts again: counts."""
    broker = private_broker
    settings = Settings(uri=host_xml(tmp_path / "host.xml"), mode="broker", broker_urls=(broker.url,),
                        profile=PROFILE, host_id=f"node-{uuid.uuid4().hex[:8]}", metrics_listen="",
                        presence_interval=1.0, snapshot_interval=3600, reconnect_max_delay=1.0)
    callers, run = 5, uuid.uuid4().hex[:6]
    attempt_timeout, retries = 3.0, 20
    with RunningAgent(settings) as running:
        host = running.host_id
        topic = f"libvirt.event.{host}.domain.lifecycle"
        events = Events(broker.url, topic)
        stop = threading.Event()
        answered: list[list[str]] = [[] for _ in range(callers)]
        failures: list[str] = []
        slowest = [0.0]

        def caller(n: int) -> None:
            with Client(broker.url, host=host, profile=PROFILE, timeout=attempt_timeout, reconnect=True) as client:
                i = 0
                while not stop.is_set():
                    name = f"f{run}-{n}-{i}"
                    began = time.monotonic()
                    try:
                        ref = client.call("virDomainDefineXML", xml=guest_xml(name), retries=retries)
                        assert ref["name"] == name
                        answered[n].append(name)
                    except (CallError, CallTimeout, ConnectionFailed) as exc:
                        failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    slowest[0] = max(slowest[0], time.monotonic() - began)
                    i += 1
                resent[n] = client.resent

        resent = [0] * callers
        threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
        for t in threads:
            t.start()
        wait_for(lambda: sum(map(len, answered)) >= 50, 20, "calls before the restart")
        before = sum(map(len, answered))
        stopped = time.monotonic()
        broker.stop()
        broker.start()
        restarted = time.monotonic()
        down = restarted - stopped
        wait_for(lambda: running.agent.bus.broker_ready.is_set(), 30, "the agent back on the broker")
        agent_back = time.monotonic() - restarted
        wait_for(lambda: events.sub.ready.is_set(), 30, "the subscription back")
        sub_back = time.monotonic() - restarted
        resumed = sum(map(len, answered))
        wait_for(lambda: sum(map(len, answered)) >= resumed + 100, 60, "calls after the restart")
        stop.set()
        for t in threads:
            t.join(retries * attempt_timeout + 10)
        assert not any(t.is_alive() for t in threads)

        calls = sum(map(len, answered))
        names = {name for done in answered for name in done}
        # every call answered (0 lost), each with its own guest
        assert failures == [] and len(names) == calls
        # the hypervisor has exactly those guests, each defined once
        conn = running.agent.hypervisor.get()
        defined = {d.name() for d in conn.listAllDomains(0) if d.name().startswith(f"f{run}-")}
        assert defined == names
        executed = running.stats.calls[("virDomainDefineXML", "ok")]
        assert executed == calls  # 0 executed twice
        duplicates = running.stats.rejected["duplicate"]
        # the monitoring subscription: every DEFINED event received or reported missed, none twice
        # as an update (a second run of a define would be DEFINED_UPDATED)
        published = running.agent.bus.stamper.kind_seq[f"libvirt.event.{host}.domain.lifecycle"]
        assert published == calls
        events.until(published, 30)
        events.close()
        received = len(events.seen)
        assert received + events.missed == published
        assert set(events.seen) <= set(range(1, published + 1))
        details = Counter(m["data"]["detail_name"] for m in events.messages)
        assert set(details) == {"VIR_DOMAIN_EVENT_DEFINED_ADDED"}
        assert max(events.seen) == published and events.sub.reconnects >= 1
        bus = running.agent.bus
        print(f"\nbroker restart under load: {calls} calls ({before} before the restart) by {callers} callers, "
              f"0 lost, 0 run twice; {sum(resent)} sent again by the callers, {duplicates} answered from the "
              f"deduplication window; guests defined {len(defined)}; events {published} published, {received} "
              f"received, {events.missed} reported missed in {events.gaps} gaps, "
              f"{sum(events.seen.values()) - received} received twice; agent: {bus.unconfirmed} unconfirmed "
              f"at the loss, {bus.resent} sent after reconnecting; broker stopped and started in {down:.1f} s, "
              f"back on it after {agent_back:.1f} s (agent), {sub_back:.1f} s (subscription); slowest call "
              f"{slowest[0]:.1f} s")


def test_request_waits_in_the_durable_queue_across_a_broker_restart(private_broker, tmp_path):
    """Nobody consumes the agent's queue; a request goes in (the broker confirms it), the broker
    restarts, then the agent comes back: it answers the request, once."""
    broker = private_broker
    settings = Settings(uri=host_xml(tmp_path / "host.xml"), mode="broker", broker_urls=(broker.url,),
                        profile=PROFILE, host_id=f"node-{uuid.uuid4().hex[:8]}", metrics_listen="",
                        presence_interval=30, snapshot_interval=3600)
    with RunningAgent(settings):
        pass  # the agent made its durable queue, and left
    reply_to = f"/exchange/amq.direct/waiting-{uuid.uuid4().hex}"
    conn = BlockingConnection(broker.url, timeout=10, allowed_mechs="PLAIN", allow_insecure_mechs=True)
    try:
        sender = conn.create_sender(f"/amq/queue/libvirt.rpc.{settings.host_id}")
        sender.send(Message(subject="virDomainDefineXML", body=f'{{"xml": "{guest_xml("waited")}"}}'.encode(),
                            content_type="application/json", id="waiting-1", reply_to=reply_to, durable=True))
    finally:
        conn.close()
    broker.stop()
    broker.start()
    conn = BlockingConnection(broker.url, timeout=10, allowed_mechs="PLAIN", allow_insecure_mechs=True)
    try:
        replies = conn.create_receiver(reply_to)
        with RunningAgent(settings) as running:
            reply = replies.receive(timeout=15)
            assert reply.correlation_id == "waiting-1"
            assert b'"name":"waited"' in bytes(reply.body)
            assert running.stats.calls[("virDomainDefineXML", "ok")] == 1
            assert [d.name() for d in running.agent.hypervisor.get().listAllDomains(0)].count("waited") == 1
    finally:
        conn.close()


# -- kill -9 of an agent ------------------------------------------------------------------------------


def start_agent_process(broker_url: str, host: str, presence: float) -> subprocess.Popen:
    env = {**os.environ, "BUSAGENT_HOST_ID": host, "BUSAGENT_PRESENCE_INTERVAL": str(presence),
           "BUSAGENT_METRICS_LISTEN": "", "BUSAGENT_SNAPSHOT_INTERVAL": "3600"}
    return subprocess.Popen([sys.executable, "-m", "busagent", "run", "--mode", "broker", "--broker-url", broker_url,
                             "--profile", PROFILE], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_agent_expires_from_presence_and_serves_again_after_a_restart(broker_url):
    presence = 0.5
    ttl = 3 * presence
    host = f"killed-{uuid.uuid4().hex[:8]}"
    seen: dict[str, tuple[dict[str, Any], float]] = {}
    states: list[str] = []
    proc = start_agent_process(broker_url, host, presence)
    try:
        with Subscription(broker_url, [f"libvirt.presence.{host}"], profile=PROFILE) as sub, \
                Client(broker_url, host=host, profile=PROFILE, timeout=20) as client:
            assert sub.ready.wait(10)

            def take(timeout: float) -> dict[str, Any] | None:
                try:
                    doc = sub.get(timeout=timeout)
                except queue.Empty:
                    return None
                if "gap" not in doc:
                    seen[doc["host"]] = (doc, time.monotonic())
                    states.append(doc["state"])
                return doc

            wait_for(lambda: take(0.5) is not None and host in seen, 30, "the agent's presence")
            first_epoch = seen[host][0]["epoch"]
            assert client.call("virConnectGetHostname")
            assert [h["host"] for h in live_hosts(seen)] == [host]

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()
            while take(0.1) is not None:  # whatever was on its way
                pass
            last_heard = seen[host][1]
            while time.monotonic() < killed + ttl + 0.5:
                assert take(0.1) is None, "a presence message after SIGKILL"
            gone_at = last_heard + ttl
            assert live_hosts(seen) == []  # its last heartbeat outlived its ttl
            assert "death" not in states  # no goodbye: SIGKILL
            assert gone_at - killed <= ttl

            pending = client.call_async("virConnectGetHostname")  # waits in the agent's durable queue
            time.sleep(0.5)
            assert not pending.done()
            restarted = time.monotonic()
            proc = start_agent_process(broker_url, host, presence)
            assert pending.result(30)  # answered by the restarted agent
            answered = time.monotonic() - restarted
            wait_for(lambda: take(0.5) is not None and seen[host][0]["epoch"] != first_epoch, 15, "a new birth")
            assert seen[host][0]["state"] in ("birth", "alive")
            assert [h["host"] for h in live_hosts(seen)] == [host]
            assert client.call("virDomainGetInfo", domain={"name": "test"})["state_name"] == "VIR_DOMAIN_RUNNING"
            print(f"\nkill -9: last heartbeat {killed - last_heard:.2f} s before the kill, gone from presence "
                  f"{gone_at - killed:.2f} s after it (ttl {ttl} s), no death message; restarted, the call "
                  f"sent while it was dead answered after {answered:.1f} s")
    finally:
        proc.kill()
        proc.wait(10)


# -- the hypervisor goes away under load -------------------------------------------------------------


@pytest.mark.libvirtd
@pytest.mark.skipif(not HAVE_LIBVIRTD, reason="libvirtd is not installed (Debian: libvirt-daemon)")
def test_libvirtd_restart_under_call_load(broker_url, libvirtd):
    callers, timeout = 4, 5.0
    settings = Settings(uri=libvirtd.uri, mode="broker", broker_urls=(broker_url,), profile=PROFILE,
                        host_id=f"lvd-{uuid.uuid4().hex[:8]}", metrics_listen="", presence_interval=30,
                        snapshot_interval=3600)
    with RunningAgent(settings) as running:
        stop = threading.Event()
        outcomes: list[tuple[float, float, str]] = []  # (began, took, outcome)
        lock = threading.Lock()

        def caller() -> None:
            with Client(broker_url, host=running.host_id, profile=PROFILE, timeout=timeout) as client:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        client.call("virDomainGetInfo", domain={"name": "test"})
                        outcome = "ok"
                    except LibvirtError as exc:
                        outcome = exc.code_name
                    except CallTimeout:
                        outcome = "timeout"
                    with lock:
                        outcomes.append((began, time.monotonic() - began, outcome))
                    time.sleep(0.005)

        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 100, 20, "calls before the outage")
        killed = time.monotonic()
        libvirtd.kill()
        wait_for(lambda: sum(1 for b, _, o in outcomes if b > killed and o != "ok") >= 20, 10,
                 "calls during the outage")
        restarted = time.monotonic()
        libvirtd.start()
        wait_for(lambda: running.agent.hypervisor.alive and running.agent.hypervisor.generation == 2, 10,
                 "the agent back on libvirtd")
        back = time.monotonic()
        wait_for(lambda: sum(1 for b, _, o in outcomes if b > back and o == "ok") >= 100, 20, "calls after it")
        stop.set()
        for t in threads:
            t.join(timeout + 5)

    by = Counter(o for _, _, o in outcomes)
    during = Counter(o for b, _, o in outcomes if killed < b and b + 0.001 < restarted)
    after = Counter(o for b, _, o in outcomes if b > back)
    slowest = max(took for _, took, _ in outcomes)
    assert by["timeout"] == 0 and slowest < timeout  # nothing hangs
    assert set(by) <= {"ok", "VIR_ERR_SYSTEM_ERROR", "VIR_ERR_INTERNAL_ERROR", "VIR_ERR_NO_CONNECT",
                       "VIR_ERR_RPC"}, by
    assert during["ok"] == 0 and sum(during.values()) >= 20  # during the outage: libvirt's error, every one
    assert set(after) == {"ok"} and after["ok"] >= 100  # after it: all succeed
    assert sum(by.values()) == len(outcomes)
    print(f"\nlibvirtd killed under {callers} callers: {len(outcomes)} calls, {dict(by)}; during the outage "
          f"{dict(during)}; after it {dict(after)}; slowest call {slowest * 1000:.0f} ms (timeout {timeout:g} s); "
          f"agent back on libvirtd {back - restarted:.2f} s after the restart")
