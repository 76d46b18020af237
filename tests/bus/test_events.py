"""Every libvirt event kind end to end: libvirt callback -> agent -> bus -> Subscription.

The session agent serves test:///default (in each bus mode: direct, and through RabbitMQ);
each test subscribes to its events (``libvirt.event.<host>.#``: on a broker, other agents of the
session publish too), drives the test driver through the bus and checks what arrives: the kind,
the topic, the object reference, the event/detail numbers (against the binding's constants)
and their names, the order within the scenario, and the stream's stamps (``seq`` strictly
increasing, ``kind_seq`` without holes per topic, no gap reported).

The table is driven by ``busagent.events.load_events()``: every event kind is either raised by
a scenario here (``OBSERVED``) or listed in ``CANNOT_RAISE`` with the reason the test driver
cannot raise it, so a new kind in libvirt-api.xml fails ``test_every_event_kind_is_accounted_for``
until someone tests or explains it. Kinds the driver cannot raise still go through the bus once,
fed to the agent's own callbacks with the arguments libvirt-python would pass
(``test_every_registered_kind_is_published_with_named_fields``).
"""
from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import libvirt
import pytest

from busagent.api.apixml import load_api
from busagent.events import load_events

# event kind -> the test below that makes the test driver raise it
OBSERVED = {
    "domain.lifecycle": "test_domain_define_start_pause_stop_undefine",
    "domain.metadata_change": "test_domain_metadata_change",
    "network.lifecycle": "test_network_lifecycle",
    "storage_pool.lifecycle": "test_storage_pool_lifecycle_and_refresh",
    "storage_pool.refresh": "test_storage_pool_lifecycle_and_refresh",
    "node_device.lifecycle": "test_node_device_created_and_deleted",
}

_QEMU = "raised by hypervisor drivers (qemu) from the guest or its devices; the test driver has no source for it"
_BLOCK_JOBS = "block jobs (virDomainBlockPull/Rebase/Commit/Copy) are VIR_ERR_NO_SUPPORT in the test driver"
# event kind -> why the test driver (libvirt 9.x src/test/test_driver.c) never raises it (tried: the APIs named)
CANNOT_RAISE = {
    "domain.reboot": "virDomainReboot in the test driver only applies <on_reboot>: restart raises nothing, "
                     "destroy raises a STOPPED_SHUTDOWN lifecycle event (test_domain_reboot)",
    "domain.rtc_change": _QEMU,
    "domain.watchdog": _QEMU,
    "domain.io_error": _QEMU,
    "domain.io_error_reason": _QEMU,
    "domain.graphics": _QEMU + " (VNC/SPICE client connections)",
    "domain.control_error": _QEMU + " (monitor failures)",
    "domain.block_job": _BLOCK_JOBS,
    "domain.block_job_2": _BLOCK_JOBS,
    "domain.disk_change": "virDomainUpdateDeviceFlags (media change) is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.tray_change": "virDomainUpdateDeviceFlags (media change) is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.pmwakeup": "virDomainPMWakeup is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.pmsuspend": "virDomainPMSuspendForDuration is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.pmsuspend_disk": "virDomainPMSuspendForDuration is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.balloon_change": "virDomainSetMemory(Flags) succeeds in the test driver but raises no event",
    "domain.device_removed": "virDomainDetachDevice(Flags/Alias) is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.device_added": "virDomainAttachDevice(Flags) is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.device_removal_failed": "virDomainDetachDevice(Flags/Alias) is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.tunable": "virDomainPinVcpu, SetSchedulerParameters, SetBlkioParameters, SetMemoryParameters and "
                      "SetVcpusFlags succeed in the test driver but raise no event",
    "domain.agent_lifecycle": _QEMU + " (guest agent channel)",
    "domain.migration_iteration": "the test driver cannot migrate",
    "domain.job_completed": "the test driver runs no jobs (virDomainAbortJob is VIR_ERR_NO_SUPPORT)",
    "domain.block_threshold": "virDomainSetBlockThreshold is VIR_ERR_NO_SUPPORT in the test driver",
    "domain.memory_failure": _QEMU + " (host memory errors)",
    "domain.memory_device_size_change": _QEMU + " (virtio-mem)",
    "node_device.update": "the test driver only creates and destroys node devices (virNodeDeviceDefineXML is "
                          "VIR_ERR_NO_SUPPORT), it never updates one",
    "secret.lifecycle": "the test driver has no secret driver: registering is VIR_ERR_NO_SUPPORT, the agent "
                        "lists the id in events.unsupported (test_secret_events_are_reported_unsupported)",
    "secret.value_changed": "the test driver has no secret driver: registering is VIR_ERR_NO_SUPPORT, the agent "
                            "lists the id in events.unsupported (test_secret_events_are_reported_unsupported)",
}

WAIT = 10.0  # seconds for an expected message (they take milliseconds)
QUIET = 0.3  # seconds without a further matching message before a scenario counts as complete


class Watch:
    """A Subscription on the agent's events that keeps every message for the stream checks."""

    def __init__(self, bus: Any, agent: Any) -> None:
        self.host = agent.host_id
        self.sub = bus.subscription(agent, [f"libvirt.event.{self.host}.#"])
        assert self.sub.ready.wait(WAIT), "subscription not attached"
        self.messages: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []

    def _next(self, deadline: float) -> dict[str, Any] | None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                item = self.sub.get(timeout=left)
            except queue.Empty:
                return None
            if "gap" in item:
                self.gaps.append(item["gap"])
                continue
            self.messages.append(item)
            return item

    def expect(self, match: Callable[[dict[str, Any]], bool], count: int) -> list[dict[str, Any]]:
        """Exactly ``count`` matching messages, then none for QUIET seconds."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT
        while len(got) < count:
            msg = self._next(deadline)
            if msg is None:
                pytest.fail(f"got {len(got)} of {count} expected events: {[summary(m) for m in got]}")
            if match(msg):
                got.append(msg)
        quiet = time.monotonic() + QUIET
        while (msg := self._next(quiet)) is not None:
            assert not match(msg), f"unexpected further event: {summary(msg)} after {[summary(m) for m in got]}"
        return got

    def check_stream(self) -> None:
        """Stamps of everything received: one epoch, seq strictly increasing, kind_seq with no holes."""
        assert not self.gaps, f"gaps reported: {self.gaps}"
        assert len({m["epoch"] for m in self.messages}) <= 1
        seqs = [m["seq"] for m in self.messages]
        assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), f"seq not increasing: {seqs}"
        last: dict[str, int] = {}
        for m in self.messages:
            assert m["topic"] == f"libvirt.event.{self.host}.{m['kind']}" and m["host"] == self.host
            if m["topic"] in last:
                assert m["kind_seq"] == last[m["topic"]] + 1, f"hole in kind_seq of {m['topic']}"
            last[m["topic"]] = m["kind_seq"]


def summary(m: dict[str, Any]) -> tuple:
    data = m.get("data", {})
    return m.get("kind"), m.get("object"), data.get("event_name"), data.get("detail_name")


@pytest.fixture
def events(bus, agent):
    """Subscribed from here on: list it after the fixtures whose own events a test does not expect."""
    w = Watch(bus, agent)
    yield w
    w.sub.close()
    w.check_stream()


def on(family: str, *names: str) -> Callable[[dict[str, Any]], bool]:
    """Matches events about the ``family`` objects called ``names``."""
    return lambda m: m.get("object", {}).get(family, {}).get("name") in names


def assert_lifecycle(msgs: list[dict[str, Any]], family: str,
                     expected: list[tuple[str, str, str | None]]) -> None:
    """Each message is the ``family.lifecycle`` event (object name, event name, detail name), numbers
    checked against the binding's constants."""
    assert [(m["object"][family]["name"], m["data"]["event_name"], m["data"]["detail_name"]) for m in msgs] \
        == expected
    for m in msgs:
        assert m["kind"] == f"{family}.lifecycle"
        assert m["data"]["event"] == getattr(libvirt, m["data"]["event_name"])
        if m["data"]["detail_name"] is None:
            assert m["data"]["detail"] == 0  # only domain events have named details
        else:
            assert m["data"]["detail"] == getattr(libvirt, m["data"]["detail_name"])


def domain_xml(name: str, domain_uuid: str | None = None, extra: str = "") -> str:
    """A minimal guest the test driver accepts (``extra``: more elements, e.g. <on_reboot>)."""
    uuid_elem = f"<uuid>{domain_uuid}</uuid>" if domain_uuid else ""
    return (f"<domain type='test'><name>{name}</name>{uuid_elem}<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            f"<os><type arch='i686'>hvm</type></os>{extra}</domain>")


# -- the table ------------------------------------------------------------------------------------


def test_every_event_kind_is_accounted_for():
    kinds = {spec.kind for spec in load_events()}
    assert len(kinds) == len(load_events())
    assert not set(OBSERVED) & set(CANNOT_RAISE)
    assert set(OBSERVED) | set(CANNOT_RAISE) == kinds, (
        f"untested: {sorted(kinds - set(OBSERVED) - set(CANNOT_RAISE))}, "
        f"stale: {sorted((set(OBSERVED) | set(CANNOT_RAISE)) - kinds)}")
    for kind, test in OBSERVED.items():
        assert callable(globals().get(test)), f"{kind}: no test {test}"
    assert all(reason.strip() for reason in CANNOT_RAISE.values())


def test_secret_events_are_reported_unsupported(agent):
    events = agent.agent.events
    assert set(events.unsupported) == {"secret.lifecycle", "secret.value_changed"}
    assert all("not supported" in why for why in events.unsupported.values())
    assert len(events.registered) == len(load_events()) - 2
    assert agent.agent.hypervisor.alive  # and the agent serves on


# -- domains --------------------------------------------------------------------------------------


def test_domain_define_start_pause_stop_undefine(client, events, uniq, cleanup):
    name, domain_uuid = uniq("evdom"), str(uuid.uuid4())
    ref = {"name": name}
    cleanup.add("virDomainUndefine", domain=ref)
    cleanup.add("virDomainDestroy", domain=ref)
    client.call("virDomainDefineXML", xml=domain_xml(name, domain_uuid))
    client.call("virDomainDefineXML", xml=domain_xml(name, domain_uuid))  # again: an update
    client.call("virDomainCreate", domain=ref)
    client.call("virDomainSuspend", domain=ref)
    client.call("virDomainResume", domain=ref)
    client.call("virDomainShutdown", domain=ref)
    client.call("virDomainCreate", domain=ref)
    client.call("virDomainDestroy", domain=ref)
    client.call("virDomainUndefine", domain=ref)
    msgs = events.expect(on("domain", name), 9)
    assert_lifecycle(msgs, "domain", [
        (name, "VIR_DOMAIN_EVENT_DEFINED", "VIR_DOMAIN_EVENT_DEFINED_ADDED"),
        (name, "VIR_DOMAIN_EVENT_DEFINED", "VIR_DOMAIN_EVENT_DEFINED_UPDATED"),
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_BOOTED"),
        (name, "VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_PAUSED"),
        (name, "VIR_DOMAIN_EVENT_RESUMED", "VIR_DOMAIN_EVENT_RESUMED_UNPAUSED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN"),
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_BOOTED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_DESTROYED"),
        (name, "VIR_DOMAIN_EVENT_UNDEFINED", "VIR_DOMAIN_EVENT_UNDEFINED_REMOVED"),
    ])
    # the object is a full reference: uuid, name, and the id (-1 while inactive)
    assert all(m["object"]["domain"]["uuid"] == domain_uuid for m in msgs)
    ids = [m["object"]["domain"]["id"] for m in msgs]
    assert ids[0] == ids[1] == -1 and ids[2] > 0 and ids[2] == ids[3] == ids[4] and ids[-1] == -1


def test_domain_save_restore_managed_save_and_crash(client, running_domain, events, tmp_path):
    ref, name = running_domain, running_domain["name"]
    image = str(tmp_path / "guest.save")
    client.call("virDomainSave", domain=ref, to=image)
    client.call("virDomainRestore", **{"from": image})
    client.call("virDomainManagedSave", dom=ref)
    client.call("virDomainCreate", domain=ref)
    client.call("virDomainCoreDumpWithFormat", domain=ref, to=str(tmp_path / "core"),
                dumpformat="VIR_DOMAIN_CORE_DUMP_FORMAT_RAW", flags=["VIR_DUMP_CRASH"])
    assert_lifecycle(events.expect(on("domain", name), 5), "domain", [
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_SAVED"),
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_RESTORED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_SAVED"),
        # the test driver reports a start from a managed save image as a boot
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_BOOTED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_CRASHED"),
    ])


def test_domain_snapshot_revert(client, running_domain, events):
    ref, name = running_domain, running_domain["name"]
    running = client.call("virDomainSnapshotCreateXML", domain=ref,
                          xmlDesc="<domainsnapshot><name>running</name></domainsnapshot>")
    client.call("virDomainSuspend", domain=ref)
    paused = client.call("virDomainSnapshotCreateXML", domain=ref,
                         xmlDesc="<domainsnapshot><name>paused</name></domainsnapshot>")
    client.call("virDomainRevertToSnapshot", snapshot=running)
    client.call("virDomainRevertToSnapshot", snapshot=paused)
    client.call("virDomainSnapshotCreateXML", domain=ref, xmlDesc="<domainsnapshot><name>halt</name></domainsnapshot>",
                flags=["VIR_DOMAIN_SNAPSHOT_CREATE_HALT"])
    for snap in ("halt", "paused", "running"):
        client.call("virDomainSnapshotDelete", snapshot={"domain": ref, "name": snap})
    assert_lifecycle(events.expect(on("domain", name), 7), "domain", [
        (name, "VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_PAUSED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT"),
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT"),
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_FROM_SNAPSHOT"),
        (name, "VIR_DOMAIN_EVENT_SUSPENDED", "VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT"),
    ])


def test_domain_rename(client, persistent_domain, events, uniq, cleanup):
    old = persistent_domain["name"]
    new = uniq("renamed")
    cleanup.add("virDomainUndefine", domain={"name": new})
    domain_uuid = client.call("virDomainGetUUIDString", domain=persistent_domain)
    client.call("virDomainRename", dom=persistent_domain, new_name=new)
    msgs = events.expect(on("domain", old, new), 2)
    assert_lifecycle(msgs, "domain", [
        (old, "VIR_DOMAIN_EVENT_UNDEFINED", "VIR_DOMAIN_EVENT_UNDEFINED_RENAMED"),
        (new, "VIR_DOMAIN_EVENT_DEFINED", "VIR_DOMAIN_EVENT_DEFINED_RENAMED"),
    ])
    assert {m["object"]["domain"]["uuid"] for m in msgs} == {domain_uuid}


def test_transient_domain(client, events, uniq, cleanup):
    name = uniq("evtrans")
    cleanup.add("virDomainDestroy", domain={"name": name})
    ref = client.call("virDomainCreateXML", xmlDesc=domain_xml(name))
    client.call("virDomainDestroy", domain=ref)
    assert_lifecycle(events.expect(on("domain", name), 2), "domain", [
        (name, "VIR_DOMAIN_EVENT_STARTED", "VIR_DOMAIN_EVENT_STARTED_BOOTED"),
        (name, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_DESTROYED"),
    ])


def test_domain_reboot(client, events, uniq, cleanup):
    """No REBOOT event from the test driver (see CANNOT_RAISE): a reboot with <on_reboot>restart</on_reboot>
    raises nothing; with <on_reboot>destroy</on_reboot> the guest stops, as a shutdown."""
    restarts, stops = uniq("evboot"), uniq("evboot")
    for name, action in ((restarts, "restart"), (stops, "destroy")):
        cleanup.add("virDomainUndefine", domain={"name": name})
        cleanup.add("virDomainDestroy", domain={"name": name})
        client.call("virDomainDefineXML", xml=domain_xml(name, extra=f"<on_reboot>{action}</on_reboot>"))
        client.call("virDomainCreate", domain={"name": name})
    events.expect(on("domain", restarts, stops), 4)  # defined and started, each
    client.call("virDomainReboot", domain={"name": restarts}, flags=0)
    client.call("virDomainReboot", domain={"name": stops}, flags=0)
    assert_lifecycle(events.expect(on("domain", restarts, stops), 1), "domain", [
        (stops, "VIR_DOMAIN_EVENT_STOPPED", "VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN"),
    ])
    assert not [m for m in events.messages if m["kind"] == "domain.reboot"]


def test_domain_metadata_change(client, persistent_domain, events):
    ref, name = persistent_domain, persistent_domain["name"]
    client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_DESCRIPTION", metadata="about",
                key=None, uri=None)
    client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_TITLE", metadata="a title",
                key=None, uri=None)
    client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_ELEMENT",
                metadata="<app xmlns='http://example.org/ev'><x/></app>", key="ev", uri="http://example.org/ev")
    msgs = events.expect(on("domain", name), 3)
    assert {m["kind"] for m in msgs} == {"domain.metadata_change"}
    assert [(m["data"]["type_name"], m["data"]["nsuri"]) for m in msgs] == [
        ("VIR_DOMAIN_METADATA_DESCRIPTION", None), ("VIR_DOMAIN_METADATA_TITLE", None),
        ("VIR_DOMAIN_METADATA_ELEMENT", "http://example.org/ev")]
    assert all(m["data"]["type"] == getattr(libvirt, m["data"]["type_name"]) for m in msgs)


# -- networks, storage pools, node devices --------------------------------------------------------


def test_network_lifecycle(client, events, uniq, cleanup):
    name, transient = uniq("evnet"), uniq("evnet")
    for n in (name, transient):
        cleanup.add("virNetworkUndefine", network={"name": n})
        cleanup.add("virNetworkDestroy", network={"name": n})

    def xml(n: str) -> str:
        return f"<network><name>{n}</name><bridge name='tb{uuid.uuid4().hex[:10]}'/></network>"

    ref = client.call("virNetworkDefineXML", xml=xml(name))
    client.call("virNetworkCreate", network=ref)
    client.call("virNetworkDestroy", network=ref)
    client.call("virNetworkUndefine", network=ref)
    tref = client.call("virNetworkCreateXML", xmlDesc=xml(transient))
    client.call("virNetworkDestroy", network=tref)
    msgs = events.expect(on("network", name, transient), 6)
    assert_lifecycle(msgs, "network", [
        (name, "VIR_NETWORK_EVENT_DEFINED", None),
        (name, "VIR_NETWORK_EVENT_STARTED", None),
        (name, "VIR_NETWORK_EVENT_STOPPED", None),
        (name, "VIR_NETWORK_EVENT_UNDEFINED", None),
        (transient, "VIR_NETWORK_EVENT_STARTED", None),
        (transient, "VIR_NETWORK_EVENT_STOPPED", None),
    ])
    assert [m["object"]["network"] for m in msgs[:4]] == [ref] * 4


def test_storage_pool_lifecycle_and_refresh(client, events, uniq, cleanup, tmp_path):
    name = uniq("evpool")
    cleanup.add("virStoragePoolUndefine", pool={"name": name})
    cleanup.add("virStoragePoolDestroy", pool={"name": name})
    ref = client.call("virStoragePoolDefineXML",
                      xml=f"<pool type='dir'><name>{name}</name><target><path>{tmp_path}</path></target></pool>")
    client.call("virStoragePoolBuild", pool=ref)
    client.call("virStoragePoolCreate", pool=ref)
    client.call("virStoragePoolRefresh", pool=ref)
    client.call("virStoragePoolDestroy", pool=ref)
    client.call("virStoragePoolDelete", pool=ref)
    client.call("virStoragePoolUndefine", pool=ref)
    msgs = events.expect(on("storage_pool", name), 7)
    assert [m["object"]["storage_pool"] for m in msgs] == [ref] * 7
    refresh = msgs.pop(3)
    assert refresh["kind"] == "storage_pool.refresh" and refresh["data"] == {}
    assert_lifecycle(msgs, "storage_pool", [
        (name, "VIR_STORAGE_POOL_EVENT_DEFINED", None),
        (name, "VIR_STORAGE_POOL_EVENT_CREATED", None),  # built
        (name, "VIR_STORAGE_POOL_EVENT_STARTED", None),
        (name, "VIR_STORAGE_POOL_EVENT_STOPPED", None),
        (name, "VIR_STORAGE_POOL_EVENT_DELETED", None),
        (name, "VIR_STORAGE_POOL_EVENT_UNDEFINED", None),
    ])


def test_node_device_created_and_deleted(client, events, cleanup):
    suffix = uuid.uuid4().hex[:12]
    xml = (f"<device><parent>scsi_host1</parent><capability type='scsi_host'><capability type='fc_host'>"
           f"<wwnn>2000{suffix}</wwnn><wwpn>1000{suffix}</wwpn></capability></capability></device>")
    dev = client.call("virNodeDeviceCreateXML", xmlDesc=xml)
    cleanup.add("virNodeDeviceDestroy", dev=dev)
    client.call("virNodeDeviceDestroy", dev=dev)
    msgs = events.expect(on("node_device", dev["name"]), 2)
    assert_lifecycle(msgs, "node_device", [
        (dev["name"], "VIR_NODE_DEVICE_EVENT_CREATED", None),
        (dev["name"], "VIR_NODE_DEVICE_EVENT_DELETED", None),
    ])
    assert [m["object"]["node_device"] for m in msgs] == [dev, dev]


# -- every kind's payload through the bus ---------------------------------------------------------


def _binding_args(spec) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments as libvirt-python passes them to a ``spec`` callback, and the data expected on the bus."""
    api = load_api()
    if any(f.ctype == "virTypedParameterPtr" for f in spec.fields):  # the binding passes one dict
        params = {"cpu_shares": 1024, "vcpu0": "0-1"}
        return (params,), {"params": params}
    args: list[Any] = []
    data: dict[str, Any] = {}
    for f in spec.fields:
        if f.enum:
            value = max(api.enum_types[f.enum])
            data[f"{f.name}_name"] = api.enum_types[f.enum][value]
            assert getattr(libvirt, data[f"{f.name}_name"]) == value
        elif f.name == "detail":
            value = 0
        elif "GraphicsAddress" in f.ctype:
            value = {"family": 0, "node": "127.0.0.1", "service": "5900"}
        elif "GraphicsSubject" in f.ctype:
            value = [("x509dname", "CN=guest")]
        elif "char" in f.ctype:
            value = f"{f.name}-value"
        else:
            value = 7
        args.append(value)
        data[f.name] = [list(v) for v in value] if isinstance(value, list) else value
    return tuple(args), data


def test_every_registered_kind_is_published_with_named_fields(agent, events):
    conn = agent.agent.hypervisor.get()
    objects = {"domain": conn.lookupByName("test"), "network": conn.networkLookupByName("default"),
               "storage_pool": conn.storagePoolLookupByName("default-pool"),
               "node_device": conn.nodeDeviceLookupByName("computer")}
    specs = [s for s in load_events() if s.kind not in agent.agent.events.unsupported]
    assert {s.family for s in specs} == set(objects)
    expected = {}
    for spec in specs:
        args, data = _binding_args(spec)
        agent.agent.events._callback(spec)(conn, objects[spec.family], *args, None)
        expected[spec.kind] = data
    msgs = events.expect(lambda m: m["kind"] in expected, len(specs))
    assert [m["kind"] for m in msgs] == [s.kind for s in specs]
    for m in msgs:
        data = m["data"]
        assert {k: data[k] for k in expected[m["kind"]]} == expected[m["kind"]], m["kind"]
        if "event" in data:
            assert data["event_name"] is not None
        family = m["kind"].split(".")[0]
        assert m["object"][family]["name"] == objects[family].name()
