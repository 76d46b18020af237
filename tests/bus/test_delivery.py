"""Delivery guarantees end to end: deduplicated write requests, deadlines checked right before a
call runs, and, through RabbitMQ, requests accepted only once their reply is with the broker,
published messages sent again after a lost connection, failover over broker URLs.

The first tests run in each bus mode; the broker-only ones put a cuttable TCP relay
(``tcp_proxy``) between an agent and the session's RabbitMQ: a network failure, with the
broker (and the consumers on it) untouched. ``Executions`` counts what the agent's dispatcher
actually ran (on its worker threads), and can hold one method's calls until released.
"""
from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from proton import ProtonException, Timeout
from proton.utils import BlockingConnection, LinkDetached

from busagent.client import CallError, Client, LibvirtError
from busagent.client.subscribe import Subscription
from busagent.config import Settings
from busagent.testing import RunningAgent

PROFILE = "rabbitmq3"


class Executions:
    """What the agent's dispatcher runs, by method; calls of ``hold`` wait for ``release``."""

    def __init__(self, running: RunningAgent, monkeypatch: pytest.MonkeyPatch, hold: str | None = None) -> None:
        dispatcher = running.agent.bus.service.dispatcher
        real = dispatcher.call
        self.calls: Counter[str] = Counter()
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        lock = threading.Lock()

        def call(name: str, args: Any) -> Any:
            with lock:
                self.calls[name] += 1
            if name == self.hold:
                self.entered.set()
                self.release.wait(30)
            return real(name, args)

        monkeypatch.setattr(dispatcher, "call", call)


@pytest.fixture
def executions(agent, monkeypatch):
    ex = Executions(agent, monkeypatch)
    yield ex
    ex.release.set()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)
    return result


def host_xml(path: Path, *names: str) -> str:
    """A test-driver host of its own (``test:///ABS/PATH``) with these guests, running."""
    doms = "".join(f"<domain type='test'><name>{n}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                   f"<os><type arch='i686'>hvm</type></os></domain>" for n in names)
    path.write_text(f"<node>{doms}</node>")
    return f"test://{path}"


def metadata(description: str) -> dict[str, Any]:
    return {"domain": {"name": "g1"}, "type": "VIR_DOMAIN_METADATA_DESCRIPTION", "metadata": description,
            "key": None, "uri": None}


# -- in each bus mode -----------------------------------------------------------------------------


def test_redelivered_write_gets_the_first_reply_and_runs_once(agent, client, persistent_domain, executions):
    duplicates = agent.stats.rejected["duplicate"]
    msg_id = client.new_message_id()
    first = client.call_async("virDomainCreate", {"domain": persistent_domain}, message_id=msg_id).result(15)
    again = client.call_async("virDomainCreate", {"domain": persistent_domain}, message_id=msg_id).result(15)
    assert again == first == 0
    assert executions.calls["virDomainCreate"] == 1
    assert agent.stats.rejected["duplicate"] == duplicates + 1
    # under a new message id it runs again, and libvirt says the guest already runs
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainCreate", domain=persistent_domain)
    assert "already running" in exc.value.error["message"]
    assert executions.calls["virDomainCreate"] == 2


def test_duplicate_of_a_running_write_waits_for_its_reply(bus, agent, client, persistent_domain, executions):
    executions.hold = "virDomainSetMetadata"
    args = {"domain": persistent_domain, "type": "VIR_DOMAIN_METADATA_TITLE", "metadata": "once", "key": None,
            "uri": None}
    msg_id = client.new_message_id()
    with bus.client(agent, timeout=15) as other:  # one pending call per message id and client
        first = client.call_async("virDomainSetMetadata", args, message_id=msg_id)
        assert executions.entered.wait(10)
        duplicate = other.call_async("virDomainSetMetadata", args, message_id=msg_id)
        time.sleep(0.3)
        assert not first.done() and not duplicate.done()  # the duplicate waits for the first
        executions.release.set()
        assert first.result(15) == duplicate.result(15) == 0
    assert executions.calls["virDomainSetMetadata"] == 1


def test_reads_are_not_deduplicated(client, executions):
    msg_id = client.new_message_id()
    for _ in range(2):
        assert client.call_async("virDomainGetInfo", {"domain": {"name": "test"}}, message_id=msg_id).result(15)
    assert executions.calls["virDomainGetInfo"] == 2


def test_deadline_is_checked_when_a_worker_picks_the_call_up(bus, monkeypatch):
    """One worker, held by a slow call: a call whose deadline passes while it waits for the worker
    is answered ``expired`` then, and never runs (the check is not only at receipt)."""
    with bus.agent(Settings(workers=1, metrics_listen="", presence_interval=30)) as running, \
            bus.client(running, timeout=15) as client:
        ex = Executions(running, monkeypatch, hold="virConnectGetHostname")
        try:
            slow = client.call_async("virConnectGetHostname")
            assert ex.entered.wait(10)
            late = client.call_async("virConnectGetVersion", ttl=0.3)
            time.sleep(0.6)
            assert not late.done()  # received long ago, but not answered before a worker took it
        finally:
            ex.release.set()
        assert slow.result(15)
        with pytest.raises(CallError) as exc:
            late.result(15)
        assert exc.value.kind == "expired"
        assert ex.calls["virConnectGetVersion"] == 0
        assert client.call("virConnectGetVersion") > 0  # a call in time runs


# -- through RabbitMQ, with a network failure between agent and broker ---------------------------


def broker_settings(url: str, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(uri=host_xml(tmp_path / "host.xml", "g1"), mode="broker", broker_urls=(url,), profile=PROFILE,
                    host_id=f"node-{uuid.uuid4().hex[:8]}", metrics_listen="", presence_interval=30,
                    reconnect_max_delay=0.5, **kw)


def agent_generation(running: RunningAgent) -> int:
    return running.on_reactor(lambda: running.agent.bus._gen)  # noqa: SLF001


@pytest.mark.rabbitmq
def test_request_lost_before_its_accept_comes_again_and_runs_once(broker_url, tcp_proxy, tmp_path, monkeypatch):
    """The agent runs a write; its broker connection dies before it accepted the request: the broker
    delivers the request again on the next connection, where it waits for the first run and gets
    its reply. One execution, and the caller gets its reply."""
    settings = broker_settings(tcp_proxy.url(broker_url), tmp_path)
    with RunningAgent(settings) as running, \
            Client(broker_url, host=running.host_id, profile=PROFILE, timeout=20) as client:
        ex = Executions(running, monkeypatch, hold="virDomainSetMetadata")
        try:
            reply = client.call_async("virDomainSetMetadata", metadata("written once"))
            assert ex.entered.wait(10)
            tcp_proxy.cut()
            wait_for(lambda: running.agent.bus.dedup.duplicates == 1, 15, "the request to come again")
            assert agent_generation(running) == 1
        finally:
            ex.release.set()
        assert reply.result(20) == 0
        assert client.call("virDomainGetMetadata", domain={"name": "g1"}, type="VIR_DOMAIN_METADATA_DESCRIPTION",
                           uri=None) == "written once"
        time.sleep(0.3)  # nothing more comes: the second delivery was accepted
        assert ex.calls["virDomainSetMetadata"] == 1 and running.agent.bus.dedup.duplicates == 1
        assert running.stats.rejected["duplicate"] == 1


class TopicWatch:
    """Every message on one topic, by ``kind_seq``, and the gaps reported."""

    def __init__(self, url: str, topic: str) -> None:
        self.sub = Subscription(url, [topic], profile=PROFILE)
        assert self.sub.ready.wait(10)
        self.seen: Counter[int] = Counter()
        self.missed = 0

    def until(self, last: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while last not in self.seen:
            try:
                item = self.sub.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"message {last} did not come; got {len(self.seen)}, missed {self.missed}")
            if "gap" in item:
                self.missed += item["gap"]["missed"]
            else:
                self.seen[item["kind_seq"]] += 1

    def close(self) -> None:
        self.sub.close()


def publish(running: RunningAgent, n: int) -> None:
    for i in range(n):
        running.agent.publish_event("test.burst", {"data": {"i": i}})


def unsettled(running: RunningAgent) -> int:
    bus = running.agent.bus
    return running.on_reactor(lambda: len(bus._unsettled) + len(bus._held))  # noqa: SLF001


@pytest.mark.rabbitmq
def test_published_messages_survive_a_lost_connection(broker_url, tcp_proxy, tmp_path):
    """Half a burst goes out, the connection dies (and stays down a while), the other half is
    published meanwhile: after the reconnection a consumer on the broker has every message,
    no gap (what the broker had not settled, and what waited, was sent again)."""
    n = 2000
    with RunningAgent(broker_settings(tcp_proxy.url(broker_url), tmp_path)) as running:
        topic = f"libvirt.event.{running.host_id}.test.burst"
        watch = TopicWatch(broker_url, topic)
        try:
            publish(running, 1)  # the topic's sender is attached (has credit) from here on
            watch.until(1)
            publish(running, n // 2 - 1)
            tcp_proxy.cut(refuse=True)
            wait_for(lambda: not running.agent.bus.broker_ready.is_set(), 5, "the agent to see the loss")
            publish(running, n // 2)
            tcp_proxy.accept()
            watch.until(n)
            assert wait_for(lambda: running.agent.bus.broker_ready.is_set(), 10, "the reconnection")
        finally:
            watch.close()
        bus = running.agent.bus
        assert set(watch.seen) == set(range(1, n + 1)) and watch.missed == 0
        assert bus.resent >= n // 2 and bus.published["dropped"] == 0
        duplicates = sum(watch.seen.values()) - n
        print(f"\n{n} published, connection cut after {n // 2}: {bus.unconfirmed} not yet settled by the broker "
              f"then, {bus.resent} sent after the reconnection, {duplicates} received twice, 0 missed")


@pytest.mark.rabbitmq
def test_publish_buffer_is_bounded(broker_url, tcp_proxy, tmp_path):
    """While the broker is away, at most ``publish_buffer`` messages wait: the oldest go, and the
    consumer sees exactly that many missed."""
    with RunningAgent(broker_settings(tcp_proxy.url(broker_url), tmp_path, publish_buffer=100)) as running:
        topic = f"libvirt.event.{running.host_id}.test.burst"
        watch = TopicWatch(broker_url, topic)
        try:
            publish(running, 10)
            watch.until(10)
            wait_for(lambda: unsettled(running) == 0, 5, "the broker to settle everything")
            tcp_proxy.cut(refuse=True)
            wait_for(lambda: not running.agent.bus.broker_ready.is_set(), 5, "the agent to see the loss")
            publish(running, 300)
            tcp_proxy.accept()
            watch.until(310)
        finally:
            watch.close()
        assert running.agent.bus.published["dropped"] == 200
        assert set(watch.seen) == set(range(1, 11)) | set(range(211, 311)) and watch.missed == 200


@pytest.mark.rabbitmq
def test_failover_from_a_dead_url(broker_url, tmp_path):
    """The first URL has no broker (connection refused): the agent goes on to the next one."""
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead_url = f"amqp://guest:guest@127.0.0.1:{dead.getsockname()[1]}"
        settings = replace(broker_settings(dead_url, tmp_path), broker_urls=(dead_url, broker_url))
        began = time.monotonic()
        with RunningAgent(settings) as running, \
                Client(broker_url, host=running.host_id, profile=PROFILE, timeout=10) as client:
            attached = time.monotonic() - began
            assert client.call("virConnectGetHostname")
            assert running.agent.bus._broker.url == broker_url  # noqa: SLF001
    assert attached < 5


@pytest.mark.rabbitmq
def test_failover_when_the_broker_in_use_goes_away(broker_url, tcp_proxies, tmp_path):
    """Two routes to the broker; the one in use dies for good: the agent serves through the other."""
    first, second = tcp_proxies(), tcp_proxies()
    urls = (first.url(broker_url), second.url(broker_url))
    settings = replace(broker_settings(urls[0], tmp_path), broker_urls=urls)
    with RunningAgent(settings) as running, \
            Client(broker_url, host=running.host_id, profile=PROFILE, timeout=10) as client:
        assert running.agent.bus._broker.url == urls[0] and second.accepted == 0  # noqa: SLF001
        first.cut(refuse=True)
        assert client.call("virConnectGetHostname", timeout=2, retries=5)
        assert running.agent.bus._broker.url == urls[1] and second.accepted == 1  # noqa: SLF001


def attach_refusal(broker_url: str, address: str) -> str | None:
    """Attach a plain (non-durable) receiver to ``address``: None, or why the broker refused it
    (RabbitMQ ends the session of a refused attach: the attach then times out)."""
    conn = BlockingConnection(broker_url, timeout=2, allowed_mechs="PLAIN", allow_insecure_mechs=True)
    try:
        conn.create_receiver(address)
        return None
    except (LinkDetached, Timeout, ProtonException) as exc:
        return str(exc)
    finally:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - the broker may have closed it already
            pass


@pytest.mark.rabbitmq
def test_request_queue_is_durable(broker_url, tmp_path):
    """The agent declares its request queue durable: a non-durable declaration of the same queue is
    refused (RabbitMQ: 'inequivalent arg durable')."""
    with RunningAgent(broker_settings(broker_url, tmp_path)) as running:
        why = attach_refusal(broker_url, running.agent.bus.rpc_address)
    assert why is not None


@pytest.mark.rabbitmq
def test_an_existing_non_durable_request_queue_is_consumed_as_it_is(broker_url, tmp_path):
    """A non-durable queue of the agent's name exists already (an older agent made it): the durable
    attach is refused, and the agent consumes the queue as it is rather than not at all."""
    settings = broker_settings(broker_url, tmp_path)
    assert attach_refusal(broker_url, f"/queue/libvirt.rpc.{settings.host_id}") is None  # made non-durable
    with RunningAgent(settings, attach_timeout=10) as running, \
            Client(broker_url, host=running.host_id, profile=PROFILE, timeout=10) as client:
        assert client.call("virConnectGetHostname")
        assert running.agent.bus._rpc_fallback  # noqa: SLF001
