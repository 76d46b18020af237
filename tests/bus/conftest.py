"""Helpers for the end-to-end bus tests.

The agent's test:///default driver is shared by the whole session: every test
names its own objects uniquely (``uniq``) and registers how to remove them
(``cleanup``), which runs even when the test fails.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from busagent.client import CallError


class Cleanup:
    """Calls to make at teardown, last registered first; their errors are ignored."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.steps: list[tuple[str, dict[str, Any]]] = []

    def add(self, method: str, **args: Any) -> None:
        self.steps.append((method, args))

    def run(self) -> None:
        for method, args in reversed(self.steps):
            try:
                self.client.call(method, **args)
            except CallError:
                pass  # already gone, or never got that far


@pytest.fixture
def cleanup(client):
    c = Cleanup(client)
    yield c
    c.run()


@pytest.fixture
def uniq() -> Callable[[str], str]:
    """``uniq("dom")`` -> ``"dom-3f2a9c01d4"``: a name no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_domain_xml(name: str, memory_mib: int = 64, vcpus: int = 1) -> str:
    """A minimal guest the test driver accepts."""
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory>"
            f"<vcpu>{vcpus}</vcpu><os><type arch='i686'>hvm</type></os></domain>")


@pytest.fixture
def domain_xml():
    """``domain_xml(name, memory_mib=64, vcpus=1)``: a minimal guest definition."""
    return make_domain_xml


@pytest.fixture
def persistent_domain(client, cleanup, uniq):
    """A defined, not yet running, guest: its reference (by name)."""
    name = uniq("dom")
    client.call("virDomainDefineXML", xml=make_domain_xml(name))
    ref = {"name": name}
    cleanup.add("virDomainUndefineFlags", domain=ref,
                flags=["VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"])
    cleanup.add("virDomainDestroy", domain=ref)
    return ref


@pytest.fixture
def running_domain(client, persistent_domain):
    """A defined guest, started."""
    client.call("virDomainCreate", domain=persistent_domain)
    return persistent_domain
