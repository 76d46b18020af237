"""Shared fixtures: a real agent on the libvirt test driver, and a real client."""
from __future__ import annotations

import pytest

from busagent.client import Client
from busagent.testing import RunningAgent


@pytest.fixture(scope="session")
def agent():
    """One agent for the session, direct mode, on test:///default."""
    with RunningAgent() as running:
        yield running


@pytest.fixture(scope="session")
def client(agent):
    with Client(agent.url, timeout=15) as c:
        yield c


@pytest.fixture
def host(client):
    return client.host()
