"""The agent survives its libvirtd: loss detected, reported, reconnected, events registered again.

A private unprivileged libvirtd serving the test driver (scripts/libvirtd-testdriver: the
``libvirtd`` fixture of tests/bus/conftest.py) stands between the agent and the hypervisor.
The test driver's state lives in that daemon and starts afresh with it, so nothing here relies
on state across a restart (only on the stock guest ``test``, running, that every fresh test
driver has).
"""
from __future__ import annotations

import contextlib
import gc
import os
import queue
import shutil
import signal
import time
import weakref
from functools import partial
from typing import Any

import libvirt
import pytest

import busagent.agent
from busagent.client import LibvirtError
from busagent.config import Settings
from busagent.events import load_events
from busagent.testing import RunningAgent
from busagent.virt.connection import HypervisorConnection

HAVE_LIBVIRTD = bool(shutil.which("libvirtd") or os.access("/usr/sbin/libvirtd", os.X_OK))

pytestmark = [pytest.mark.libvirtd,
              pytest.mark.skipif(not HAVE_LIBVIRTD, reason="libvirtd is not installed (Debian: libvirt-daemon)")]

LOSS_BOUND = 5.0  # s from SIGKILL to agent.hypervisor_lost: the socket's EOF, no keepalive needed
RECONNECT_BOUND = 5.0  # s from the daemon's return to agent.hypervisor_connected (first retries: 0.5 s, 1 s, 2 s)
KEEPALIVE = (1, 2)  # interval, count for the hung-daemon test: a dead peer is declared after ~3 s


def relevant(msg: dict[str, Any]) -> bool:
    """Guest events and the hypervisor markers (not whatever else the agent may publish as events)."""
    return msg["kind"].startswith(("domain.", "agent.hypervisor_"))


class Stream:
    """A Subscription on the agent's events: the next relevant message, with when it arrived."""

    def __init__(self, bus: Any, running: RunningAgent) -> None:
        self.sub = bus.subscription(running, [f"libvirt.event.{running.host_id}.#"])
        assert self.sub.ready.wait(10), "subscription not attached"
        self.messages: list[dict[str, Any]] = []  # everything received, for the stream checks
        self.gaps: list[dict[str, Any]] = []

    def _get(self, deadline: float) -> dict[str, Any] | None:
        while True:
            try:
                item = self.sub.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if "gap" in item:
                self.gaps.append(item["gap"])
                continue
            self.messages.append(item)
            if relevant(item):
                return item

    def next(self, timeout: float) -> tuple[dict[str, Any], float]:
        msg = self._get(time.monotonic() + timeout)
        if msg is None:
            pytest.fail(f"no event within {timeout} s")
        return msg, time.monotonic()

    def quiet(self, seconds: float) -> None:
        msg = self._get(time.monotonic() + seconds)
        assert msg is None, f"unexpected event: {msg}"

    def check(self, host: str) -> None:
        """The bus lost nothing: seq strictly increasing, kind_seq without holes, no gap reported."""
        assert not self.gaps
        seqs = [m["seq"] for m in self.messages]
        assert seqs == sorted(set(seqs))
        assert len({m["epoch"] for m in self.messages}) == 1  # the agent itself did not restart
        last: dict[str, int] = {}
        for m in self.messages:
            assert m["host"] == host and m["topic"] == f"libvirt.event.{host}.{m['kind']}"
            if m["topic"] in last:
                assert m["kind_seq"] == last[m["topic"]] + 1
            last[m["topic"]] = m["kind_seq"]

    def close(self) -> None:
        self.sub.close()


def lifecycle(msg: dict[str, Any]) -> tuple[str, str, str]:
    assert msg["kind"] == "domain.lifecycle", msg
    return msg["object"]["domain"]["name"], msg["data"]["event_name"], msg["data"]["detail_name"]


@contextlib.contextmanager
def serve(libvirtd: Any, bus: Any):
    """An agent on the private libvirtd, a client and an event stream (in the bus mode of the run)."""
    settings = Settings(uri=libvirtd.uri, metrics_listen="", host_id=bus.host_id("lvd-host"))
    with bus.agent(settings) as running, bus.client(running, timeout=15) as client:
        stream = Stream(bus, running)
        try:
            yield running, client, stream
        finally:
            stream.close()


@pytest.fixture
def served(libvirtd, bus):
    with serve(libvirtd, bus) as served:
        yield served


@pytest.fixture
def served_short_keepalive(libvirtd, bus, monkeypatch):
    """Its connections use KEEPALIVE (libvirt takes a connection's keepalive settings only once,
    so they must be in place before the agent opens it)."""
    monkeypatch.setattr(busagent.agent, "HypervisorConnection", partial(HypervisorConnection, keepalive=KEEPALIVE))
    with serve(libvirtd, bus) as served:
        yield served


SUSPENDED = ("test", "VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_PAUSED")
RESUMED = ("test", "VIR_DOMAIN_EVENT_RESUMED", "VIR_DOMAIN_EVENT_RESUMED_UNPAUSED")


def test_libvirtd_killed_and_restarted(libvirtd, served):
    running, client, stream = served
    agent = running.agent
    registered = len(load_events()) - len(agent.events.unsupported)
    client.call("virDomainSuspend", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == SUSPENDED
    client.call("virDomainResume", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == RESUMED
    first = weakref.ref(agent.hypervisor.get())

    # loss: SIGKILL, no goodbye; the agent notices from the socket, at once
    killed = time.monotonic()
    libvirtd.kill()
    lost, at = stream.next(LOSS_BOUND)
    detect = at - killed
    assert lost["kind"] == "agent.hypervisor_lost"
    assert lost["data"]["uri"] == libvirtd.uri and lost["data"]["generation"] == 1
    assert f"reason {libvirt.VIR_CONNECT_CLOSE_REASON_EOF}" in lost["data"]["why"]
    assert not agent.hypervisor.alive
    # while it is away, calls fail fast with libvirt's error (they do not hang)
    began = time.monotonic()
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainGetInfo", domain={"name": "test"})
    assert exc.value.code_name == "VIR_ERR_SYSTEM_ERROR" and time.monotonic() - began < 2

    # back: the supervisor reconnects and registers the events again
    restarted = time.monotonic()
    uri = libvirtd.start()
    assert uri == libvirtd.uri
    connected, at = stream.next(RECONNECT_BOUND)
    reconnect = at - restarted
    assert connected["kind"] == "agent.hypervisor_connected"
    assert connected["data"] == {"uri": libvirtd.uri, "generation": 2, "events": registered}
    assert agent.hypervisor.alive and agent.hypervisor.generation == 2 and agent.hypervisor.losses == 1

    # a fresh test driver: the guest runs again (the suspension before the kill is gone), calls work
    assert client.call("virDomainGetInfo", domain={"name": "test"})["state_name"] == "VIR_DOMAIN_RUNNING"
    client.call("virDomainSuspend", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == SUSPENDED
    client.call("virDomainResume", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == RESUMED
    stream.quiet(0.3)  # each event once: no callbacks left behind on the dead connection

    # the hypervisor-side gap is marked in the stream itself, between the lifecycle events:
    # lost (generation 1) ... connected (generation 2); the bus stream itself has no hole
    kinds = [m["kind"] for m in stream.messages if relevant(m)]
    assert kinds == ["domain.lifecycle"] * 2 + ["agent.hypervisor_lost", "agent.hypervisor_connected"] + \
        ["domain.lifecycle"] * 2
    stream.check(running.host_id)

    # the dead connection was released: nothing (close callback, event callbacks) holds it
    gc.collect()
    assert first() is None, "the lost connection is still referenced"
    print(f"\nlibvirtd SIGKILL -> agent.hypervisor_lost: {detect * 1000:.1f} ms; "
          f"libvirtd restart -> agent.hypervisor_connected: {reconnect * 1000:.0f} ms")
    assert detect < LOSS_BOUND and reconnect < RECONNECT_BOUND


def test_hung_libvirtd_detected_by_keepalive(libvirtd, served_short_keepalive):
    """A daemon that stops answering (SIGSTOP) is declared dead by keepalive, then reconnected.

    With the agent's default keepalive (5 s, 3) the same takes 5 * (3 + 1) = 20 s.
    """
    running, client, stream = served_short_keepalive
    assert running.agent.hypervisor.keepalive == KEEPALIVE
    interval, count = KEEPALIVE
    bound = interval * (count + 1) + 3  # keepalive's own deadline, plus the event loop's and the bus's latency

    stopped = time.monotonic()
    libvirtd.signal(signal.SIGSTOP)
    try:
        lost, at = stream.next(bound + 2)
        detect = at - stopped
        assert lost["kind"] == "agent.hypervisor_lost"
        why = lost["data"]["why"]
        assert f"reason {libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE}" in why or "isAlive" in why, why
    finally:
        libvirtd.signal(signal.SIGCONT)
    resumed = time.monotonic()
    connected, at = stream.next(RECONNECT_BOUND)
    reconnect = at - resumed
    assert connected["kind"] == "agent.hypervisor_connected" and connected["data"]["generation"] == 2
    client.call("virDomainSuspend", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == SUSPENDED
    client.call("virDomainResume", domain={"name": "test"})
    assert lifecycle(stream.next(10)[0]) == RESUMED
    stream.check(running.host_id)
    print(f"\nlibvirtd SIGSTOP -> agent.hypervisor_lost: {detect:.2f} s (keepalive {interval} s x {count}); "
          f"SIGCONT -> agent.hypervisor_connected: {reconnect * 1000:.0f} ms")
    assert detect < bound
