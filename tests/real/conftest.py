"""The real-hypervisor session: agents on scripts/realhv's private libvirtd, networks, a pool, a guest.

``hv`` (session) is everything the tests share, set up through the bus by the agent itself:

- one agent on the qemu URI (host id ``real-qemu``, statistics every second, /metrics on a free
  port), a client, and recorders of its events and domain statistics started before anything
  else, so the tests can look back at what was published since the beginning;
- a NAT network ``bv-nat`` and an isolated one ``bv-iso``, both with DHCP;
- a dir pool ``bv-images`` holding the guests' disks;
- ``alpha``: the tiny guest with a qcow2 disk (a volume of bv-images), a NIC on each network,
  an empty cdrom drive and a balloon, started at once (tests that need it up call
  ``hv.alpha_ready()``). Tests that change its state leave it running and ready.

Without a running scripts/realhv the tests skip, saying why; under scripts/test
(BUSAGENT_REAL_REQUIRED=1) they fail instead.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from realkit import (
    ALPHA,
    ALPHA_ISO_MAC,
    ALPHA_NAT_MAC,
    ISO,
    NAT,
    POOL,
    Console,
    Mirror,
    Recorder,
    SecondHypervisor,
    qemu_guest_xml,
    realhv_env,
    required,
)

from busagent.client import CallError, Client
from busagent.config import Settings
from busagent.testing import RunningAgent

NAT_XML = (f"<network><name>{NAT}</name><forward mode='nat'/><bridge name='bvnat0'/>"
           "<ip address='192.168.150.1' netmask='255.255.255.0'><dhcp>"
           "<range start='192.168.150.10' end='192.168.150.100'/></dhcp></ip></network>")
ISO_XML = (f"<network><name>{ISO}</name><bridge name='bviso0'/>"
           "<ip address='192.168.151.1' netmask='255.255.255.0'><dhcp>"
           "<range start='192.168.151.10' end='192.168.151.100'/></dhcp></ip></network>")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/real/" in str(item.path) and item.path.name != "test_real_mapping.py":
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def realenv() -> dict[str, Any]:
    env, why = realhv_env()
    if env is None:
        if required():
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return env


@dataclass
class Hypervisor:
    env: dict[str, Any]
    running: RunningAgent
    client: Client
    events: Recorder
    stats: Recorder
    mirror: Mirror
    alpha_start_mark: int = 0
    alpha_started_at: float = 0.0
    setup_marks: dict[str, int] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.running.host_id

    @property
    def metrics_port(self) -> int:
        return self.running.agent.stats.metrics_port

    def call(self, method: str, **args: Any) -> Any:
        return self.client.call(method, **args)

    def console(self, name: str) -> Console:
        return Console(f"{self.env['console']}/{name}.log")

    def alpha_ready(self) -> None:
        """alpha is running and its init has done its first round (modules, acpid, DHCP).

        A test that failed half-way may have left it stopped or paused: it is brought back (and
        the next test is not failed for it)."""
        ref = {"name": ALPHA}
        state = self.call("virDomainGetState", domain=ref, flags=0)["state_name"]
        if state == "VIR_DOMAIN_PAUSED":
            self.call("virDomainResume", domain=ref)
        elif state != "VIR_DOMAIN_RUNNING":
            self.call("virDomainCreate", domain=ref)  # from its managed save image, if any
        self.console(ALPHA).wait("BUSAGENT-READY")


def _quietly(client: Client, method: str, **args: Any) -> None:
    with contextlib.suppress(CallError):
        client.call(method, **args)


def _remove_leftovers(client: Client) -> None:
    """A previous run against the same libvirtd that did not finish: clear its objects."""
    for dom in client.call("virConnectListAllDomains", flags=0):
        _quietly(client, "virDomainDestroy", domain=dom)
        _quietly(client, "virDomainUndefineFlags", domain=dom,
                 flags=["VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"])
    for net in (NAT, ISO):
        _quietly(client, "virNetworkDestroy", network={"name": net})
        _quietly(client, "virNetworkUndefine", network={"name": net})
    for pool in client.call("virConnectListAllStoragePools", flags=0):
        _quietly(client, "virStoragePoolDestroy", pool=pool)
        _quietly(client, "virStoragePoolUndefine", pool=pool)


@pytest.fixture(scope="session")
def hv(realenv):
    settings = Settings(uri=realenv["qemu_uri"], host_id="real-qemu", sample_interval=1.0,
                        metrics_listen="127.0.0.1:0", snapshot_interval=3600.0, job_interval=0.1)
    with RunningAgent(settings) as running:
        client = Client(running.url, timeout=120)
        events = Recorder(running.url, [f"libvirt.event.{running.host_id}.#"])
        stats = Recorder(running.url, [f"libvirt.stats.{running.host_id}.domain"])
        mirror = Mirror(realenv["qemu_uri"])
        h = Hypervisor(realenv, running, client, events, stats, mirror)
        try:
            _remove_leftovers(client)
            h.setup_marks["networks"] = events.mark()
            for xml in (NAT_XML, ISO_XML):
                net = client.call("virNetworkDefineXML", xml=xml)
                client.call("virNetworkCreate", network=net)
            h.setup_marks["pool"] = events.mark()
            pool = client.call("virStoragePoolDefineXML", flags=0, xml=(
                f"<pool type='dir'><name>{POOL}</name><target><path>{realenv['images']}</path></target></pool>"))
            client.call("virStoragePoolBuild", pool=pool, flags=0)
            client.call("virStoragePoolCreate", pool=pool, flags=0)
            _quietly(client, "virStorageVolDelete", vol={"pool": {"name": POOL}, "name": "alpha.qcow2"}, flags=0)
            vol = client.call("virStorageVolCreateXML", pool=pool, flags=0, xmlDesc=(
                "<volume><name>alpha.qcow2</name><capacity unit='MiB'>64</capacity>"
                "<target><format type='qcow2'/></target></volume>"))
            disk = client.call("virStorageVolGetPath", vol=vol)
            h.console(ALPHA).path.unlink(missing_ok=True)
            xml = qemu_guest_xml(realenv, ALPHA, disk=disk, cdrom=True,
                                 nics=((NAT, ALPHA_NAT_MAC), (ISO, ALPHA_ISO_MAC)))
            h.alpha_start_mark = events.mark()
            dom = client.call("virDomainDefineXML", xml=xml)
            h.alpha_started_at = time.time()
            client.call("virDomainCreate", domain=dom)
            yield h
            events.check_stream()
            stats.check_stream()
            bus_mirrors_libvirt(events, mirror)
        finally:
            for name in (ALPHA,):
                _quietly(client, "virDomainDestroy", domain={"name": name})
                _quietly(client, "virDomainUndefineFlags", domain={"name": name},
                         flags=["VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"])
            for net in (NAT, ISO):
                _quietly(client, "virNetworkDestroy", network={"name": net})
                _quietly(client, "virNetworkUndefine", network={"name": net})
            _quietly(client, "virStorageVolDelete", vol={"pool": {"name": POOL}, "name": "alpha.qcow2"}, flags=0)
            _quietly(client, "virStoragePoolDestroy", pool={"name": POOL})
            _quietly(client, "virStoragePoolUndefine", pool={"name": POOL})
            events.close()
            stats.close()
            mirror.close()
            client.close()


def bus_mirrors_libvirt(events: Recorder, mirror: Mirror) -> None:
    """Every event an independent connection got during the session is on the bus, in the same order."""
    def bus() -> list[tuple]:
        return [Mirror.bus_view(m) for m in events.since(0, lambda m: m["kind"] in Mirror.KINDS)]

    deadline = time.monotonic() + 10
    while len(bus()) < len(mirror.view()) and time.monotonic() < deadline:
        time.sleep(0.1)
    got, want = bus(), mirror.view()
    assert got == want, (f"the bus ({len(got)} events) differs from what libvirt told another connection "
                         f"({len(want)}): first difference at "
                         f"{next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)}")


@pytest.fixture
def alpha(hv) -> dict[str, str]:
    """alpha, running and ready: its reference."""
    hv.alpha_ready()
    return {"name": ALPHA}


@pytest.fixture(scope="session")
def realhv2(realenv) -> dict[str, Any]:
    """A second real libvirtd (its own scripts/realhv, another host UUID): a migration destination."""
    second = SecondHypervisor()
    env, why = second.start()
    try:
        if env is None:
            if required():
                pytest.fail(why, pytrace=False)
            pytest.skip(why)
        yield env
    finally:
        second.stop()
