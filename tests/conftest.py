"""Shared fixtures: a real agent on the libvirt test driver, and a real client, in each bus mode.

The bus-level suite runs twice, once per ``bus`` mode:

* ``direct``: the agent listens on a loopback port; clients and subscriptions connect to it.
* ``rabbitmq``: the agent runs in broker mode on the RabbitMQ 3.x (AMQP 1.0 plugin) that
  scripts/test starts and names in BUSAGENT_TEST_BROKER_URL; clients and subscriptions meet
  it there (profile ``rabbitmq3``: requests through a durable queue, replies through
  ``/exchange/amq.direct/<client>``, published messages through ``/topic/<name>``, where
  RabbitMQ's topic exchange gives ``*`` and ``#`` the same meaning as the agent's patterns).

Without BUSAGENT_TEST_BROKER_URL the ``rabbitmq`` half is skipped; with it, an unreachable
broker is a failure. Every agent of the ``rabbitmq`` half gets a host id of its own
(``node-<random>``): agents of one test session share the broker, and a host's request queue
is durable (it outlives its agent). Tests need no mode of their own: ``agent``, ``client`` and
``bus`` (which makes more agents, clients and subscriptions in the same mode) do the work.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from busagent.client import Client
from busagent.client.subscribe import Subscription
from busagent.config import Settings
from busagent.testing import RunningAgent

BUS_MODES = ("direct", "rabbitmq")
BROKER_PROFILE = "rabbitmq3"


@pytest.fixture(scope="session", autouse=True)
def test_driver_keeper():
    """One connection to ``test:///default`` held for the whole session.

    Every in-process agent of the session shares libvirt's in-process test driver, which
    is torn down when its last connection closes. When several agents stop together at the
    end of the session, that teardown could race libvirt's event-loop thread still
    dispatching the driver's events (a C-level abort was seen once there); with this
    connection open, the driver outlives them all and goes away with the process."""
    import libvirt

    from busagent.virt.eventloop import ensure_event_loop

    ensure_event_loop()
    keeper = libvirt.open("test:///default")
    yield keeper


@pytest.fixture(scope="session")
def broker_url() -> str:
    """The test broker (scripts/test starts one); skips without it, fails when it is unreachable."""
    url = os.environ.get("BUSAGENT_TEST_BROKER_URL")
    if not url:
        pytest.skip("BUSAGENT_TEST_BROKER_URL is not set (scripts/test starts a RabbitMQ and sets it)")
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"BUSAGENT_TEST_BROKER_URL={url} is set but the broker is unreachable: {exc}")
    return url


@dataclass(frozen=True)
class Bus:
    """One bus mode: how agents, clients and subscriptions of a test meet."""

    mode: str  # 'direct' | 'rabbitmq'
    broker_url: str | None = None

    @property
    def profile(self) -> str:
        return BROKER_PROFILE if self.mode == "rabbitmq" else "direct"

    def host_id(self, prefix: str = "node") -> str:
        """A host id for a new agent: ``prefix`` itself in direct mode (the agent is alone on its
        port), unique on the shared broker."""
        return f"{prefix}-{uuid.uuid4().hex[:8]}" if self.mode == "rabbitmq" else prefix

    def settings(self, settings: Settings | None = None, **overrides: Any) -> Settings:
        """``settings`` (default: the defaults) for an agent in this mode."""
        settings = replace(settings or Settings(), **overrides)
        if self.mode == "direct":
            return settings
        return replace(settings, mode="broker", broker_urls=(self.broker_url,), profile=BROKER_PROFILE,
                       host_id=settings.host_id or self.host_id())

    def agent(self, settings: Settings | None = None, **kw: Any) -> RunningAgent:
        """An agent on its own reactor thread (use as a context manager)."""
        return RunningAgent(self.settings(settings), **kw)

    def url(self, running: RunningAgent) -> str:
        """Where a client or a subscription connects to reach ``running``."""
        return running.url if self.mode == "direct" else self.broker_url

    def client(self, running: RunningAgent, **kw: Any) -> Client:
        """A client whose default host is ``running``'s."""
        if self.mode == "direct":
            return Client(running.url, **kw)
        return Client(self.broker_url, host=running.host_id, profile=BROKER_PROFILE, **kw)

    def subscription(self, running: RunningAgent, patterns: list[str], **kw: Any) -> Subscription:
        """A subscription to ``patterns`` where ``running`` publishes (not yet attached: wait on ``ready``)."""
        return Subscription(self.url(running), patterns, profile=self.profile, **kw)


@pytest.fixture(scope="session", params=BUS_MODES)
def bus(request) -> Bus:
    """The bus mode of this run of the bus-level suite."""
    if request.param == "rabbitmq":
        return Bus("rabbitmq", request.getfixturevalue("broker_url"))
    return Bus("direct")


@pytest.fixture(scope="session")
def agent(bus):
    """One agent for the session (per bus mode), on test:///default."""
    with bus.agent() as running:
        yield running


@pytest.fixture(scope="session")
def client(bus, agent):
    with bus.client(agent, timeout=15) as c:
        yield c


@pytest.fixture
def host(client):
    return client.host()
