"""Guests end to end through the bus: the Application Development Guide's domain scenarios
(listing, transient and persistent guests, lifecycle, save/restore, managed save, autostart,
XML, snapshots, lookups) on the agent's test:///default driver."""
from __future__ import annotations

import uuid

import libvirt
import pytest
from lxml import etree

from busagent.client import LibvirtError


def state_name(client, ref) -> str:
    return client.call("virDomainGetState", domain=ref)["state_name"]


# -- listing ------------------------------------------------------------------------------


def test_list_active_and_inactive_domains(client, cleanup, uniq, domain_xml, persistent_domain):
    transient = uniq("transient")
    running = client.call("virDomainCreateXML", xmlDesc=domain_xml(transient))
    cleanup.add("virDomainDestroy", domain={"name": transient})

    active = client.call("virConnectListAllDomains", flags=["VIR_CONNECT_LIST_DOMAINS_ACTIVE"])
    inactive = client.call("virConnectListAllDomains", flags=["VIR_CONNECT_LIST_DOMAINS_INACTIVE"])
    active_names = {d["name"] for d in active}
    inactive_names = {d["name"] for d in inactive}
    assert transient in active_names and transient not in inactive_names
    assert persistent_domain["name"] in inactive_names and persistent_domain["name"] not in active_names
    assert all(d["id"] > 0 for d in active) and all(d["id"] == -1 for d in inactive)

    # several flags at once: a list of names, or the same bits as an integer
    both = client.call("virConnectListAllDomains",
                       flags=["VIR_CONNECT_LIST_DOMAINS_PERSISTENT", "VIR_CONNECT_LIST_DOMAINS_INACTIVE"])
    as_int = client.call("virConnectListAllDomains", flags=libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
                         | libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
    assert persistent_domain["name"] in {d["name"] for d in both}
    assert transient not in {d["name"] for d in both}
    assert sorted(d["uuid"] for d in both) == sorted(d["uuid"] for d in as_int)

    # the older calls agree with the flagged listing
    assert client.call("virConnectNumOfDomains") == len(active)
    assert running["id"] in client.call("virConnectListDomains")
    defined = client.call("virConnectListDefinedDomains")
    assert isinstance(defined, list) and persistent_domain["name"] in defined
    assert client.call("virConnectNumOfDefinedDomains") == len(defined)


# -- transient vs persistent -------------------------------------------------------------


def test_transient_guest_vanishes_when_destroyed(client, cleanup, uniq, domain_xml):
    name = uniq("transient")
    ref = client.call("virDomainCreateXML", xmlDesc=domain_xml(name))
    cleanup.add("virDomainDestroy", domain={"name": name})
    assert ref["name"] == name and ref["id"] > 0
    uuid.UUID(ref["uuid"])
    assert client.call("virDomainIsActive", dom=ref) == 1
    assert client.call("virDomainIsPersistent", dom=ref) == 0
    assert state_name(client, ref) == "VIR_DOMAIN_RUNNING"

    assert client.call("virDomainDestroy", domain=ref) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainGetInfo", domain={"uuid": ref["uuid"]})
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN"


def test_persistent_guest_define_create_destroy_undefine(client, cleanup, uniq, domain_xml):
    name = uniq("persistent")
    ref = client.call("virDomainDefineXML", xml=domain_xml(name, memory_mib=128, vcpus=2))
    cleanup.add("virDomainUndefine", domain={"name": name})
    cleanup.add("virDomainDestroy", domain={"name": name})
    assert ref["name"] == name and ref["id"] == -1
    assert client.call("virDomainIsPersistent", dom=ref) == 1
    assert client.call("virDomainIsActive", dom=ref) == 0
    info = client.call("virDomainGetInfo", domain=ref)
    assert info["state_name"] == "VIR_DOMAIN_SHUTOFF"
    assert info["maxMem"] == 128 * 1024 and info["nrVirtCpu"] == 2

    assert client.call("virDomainCreate", domain={"name": name}) == 0
    assert client.call("virDomainIsActive", dom={"name": name}) == 1
    assert client.call("virDomainGetID", domain={"name": name}) > 0

    client.call("virDomainDestroy", domain={"name": name})
    assert state_name(client, {"name": name}) == "VIR_DOMAIN_SHUTOFF"  # still defined

    assert client.call("virDomainUndefine", domain={"uuid": ref["uuid"]}) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainLookupByName", name=name)
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN"


# -- lifecycle ------------------------------------------------------------------------------


def test_suspend_resume_shutdown(client, running_domain):
    ref = running_domain
    assert client.call("virDomainSuspend", domain=ref) == 0
    state = client.call("virDomainGetState", domain=ref)
    assert state["state_name"] == "VIR_DOMAIN_PAUSED" and state["state"] == libvirt.VIR_DOMAIN_PAUSED
    assert client.call("virDomainGetInfo", domain=ref)["state_name"] == "VIR_DOMAIN_PAUSED"

    assert client.call("virDomainResume", domain=ref) == 0
    assert state_name(client, ref) == "VIR_DOMAIN_RUNNING"

    # resuming a running guest is libvirt's own error (the test driver reports it as internal)
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainResume", domain=ref)
    assert exc.value.code_name == "VIR_ERR_INTERNAL_ERROR" and "not paused" in str(exc.value)

    assert client.call("virDomainShutdown", domain=ref) == 0
    assert client.call("virDomainGetInfo", domain=ref)["state_name"] == "VIR_DOMAIN_SHUTOFF"


def test_lifecycle_through_proxy(host, running_domain):
    dom = host.domain(**running_domain)
    assert dom.suspend() == 0
    assert dom.getState()["state_name"] == "VIR_DOMAIN_PAUSED"
    assert dom.resume() == 0
    assert dom.getInfo()["state_name"] == "VIR_DOMAIN_RUNNING"
    assert dom.getName() == running_domain["name"]
    assert dom.destroy() == 0
    assert dom.isActive() == 0
    assert host.numOfDefinedDomains() >= 1  # virConnectNumOfDefinedDomains through the host proxy


def test_reboot_and_set_memory(client, running_domain):
    ref = running_domain
    assert client.call("virDomainReboot", domain=ref, flags=0) == 0
    assert client.call("virDomainSetMemory", domain=ref, memory=32 * 1024) == 0
    info = client.call("virDomainGetInfo", domain=ref)
    assert info["memory"] == 32 * 1024 and info["maxMem"] == 64 * 1024
    assert client.call("virDomainGetMaxMemory", domain=ref) == 64 * 1024


# -- save / restore / managed save --------------------------------------------------------


def test_save_and_restore(client, running_domain, tmp_path):
    ref = running_domain
    image = str(tmp_path / "guest.save")
    assert client.call("virDomainSave", domain=ref, to=image) == 0
    assert (tmp_path / "guest.save").exists()
    assert state_name(client, ref) == "VIR_DOMAIN_SHUTOFF"

    saved = etree.fromstring(client.call("virDomainSaveImageGetXMLDesc", file=image).encode())
    assert saved.findtext("name") == ref["name"]

    assert client.call("virDomainRestore", **{"from": image}) == 0
    state = client.call("virDomainGetState", domain=ref)
    assert state["state_name"] == "VIR_DOMAIN_RUNNING"
    assert state["reason"] == libvirt.VIR_DOMAIN_RUNNING_RESTORED


def test_restore_missing_image_is_libvirt_error(client, tmp_path):
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainRestore", **{"from": str(tmp_path / "nothing-here")})
    assert exc.value.kind == "libvirt" and exc.value.code_name is not None


def test_managed_save(client, running_domain):
    ref = running_domain
    assert client.call("virDomainHasManagedSaveImage", dom=ref) == 0
    assert client.call("virDomainManagedSave", dom=ref) == 0
    assert client.call("virDomainHasManagedSaveImage", dom=ref) == 1
    assert state_name(client, ref) == "VIR_DOMAIN_SHUTOFF"
    # starting again resumes from the image and consumes it
    assert client.call("virDomainCreate", domain=ref) == 0
    assert state_name(client, ref) == "VIR_DOMAIN_RUNNING"
    assert client.call("virDomainHasManagedSaveImage", dom=ref) == 0

    client.call("virDomainManagedSave", dom=ref)
    assert client.call("virDomainManagedSaveRemove", dom=ref) == 0
    assert client.call("virDomainHasManagedSaveImage", dom=ref) == 0


def test_autostart(client, persistent_domain):
    ref = persistent_domain
    assert client.call("virDomainGetAutostart", domain=ref) == 0
    assert client.call("virDomainSetAutostart", domain=ref, autostart=1) == 0
    assert client.call("virDomainGetAutostart", domain=ref) == 1
    autostarted = client.call("virConnectListAllDomains", flags=["VIR_CONNECT_LIST_DOMAINS_AUTOSTART"])
    assert ref["name"] in {d["name"] for d in autostarted}
    client.call("virDomainSetAutostart", domain=ref, autostart=0)
    assert client.call("virDomainGetAutostart", domain=ref) == 0


# -- XML, lookups, identity ---------------------------------------------------------------------


def test_get_xml_desc(client, running_domain):
    ref = running_domain
    uuid_str = client.call("virDomainGetUUIDString", domain=ref)
    live = etree.fromstring(client.call("virDomainGetXMLDesc", domain=ref).encode())
    assert live.tag == "domain" and live.get("type") == "test"
    assert live.findtext("name") == ref["name"]
    assert live.findtext("uuid") == uuid_str
    assert live.get("id") == str(client.call("virDomainGetID", domain=ref))
    inactive = etree.fromstring(client.call("virDomainGetXMLDesc", domain=ref,
                                            flags=["VIR_DOMAIN_XML_INACTIVE"]).encode())
    assert inactive.get("id") is None  # the persistent config has no run-time id


def test_lookups_by_uuid_string_uuid_and_id(client, running_domain):
    ref = client.call("virDomainLookupByName", name=running_domain["name"])
    by_uuid_str = client.call("virDomainLookupByUUIDString", uuidstr=ref["uuid"])
    by_uuid = client.call("virDomainLookupByUUID", uuid=ref["uuid"])
    by_id = client.call("virDomainLookupByID", id=ref["id"])
    assert by_uuid_str == by_uuid == by_id == ref
    assert client.call("virDomainGetUUID", domain={"id": ref["id"]}) == ref["uuid"]
    assert client.call("virDomainGetUUIDString", domain={"uuid": ref["uuid"]}) == ref["uuid"]
    assert client.call("virDomainGetName", domain={"id": ref["id"]}) == running_domain["name"]
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainLookupByUUIDString", uuidstr=str(uuid.uuid4()))
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN"


def test_result_shapes_of_the_stock_guest(client):
    """Read calls on the driver's own 'test' guest: struct, out-argument and dict results."""
    ref = {"name": "test"}
    sched = client.call("virDomainGetSchedulerType", domain=ref)
    assert sched == {"return": "fair", "nparams": 1}
    blk = client.call("virDomainBlockStats", dom=ref, disk="vda")
    assert set(blk) == {"rd_req", "rd_bytes", "wr_req", "wr_bytes", "errs"}
    assert all(isinstance(v, int) for v in blk.values())
    mem = client.call("virDomainMemoryStats", dom=ref)
    assert isinstance(mem, dict) and mem["actual"] > 0
    label = client.call("virDomainGetSecurityLabel", domain=ref)
    assert label["label"] == "libvirt-test" and label["enforcing"] in (0, 1) and type(label["enforcing"]) is int
    assert client.call("virDomainGetOSType", domain=ref) == "linux"


def test_set_and_get_time(client, running_domain):
    ref = running_domain
    assert client.call("virDomainSetTime", dom=ref, time={"seconds": 1234567, "nseconds": 0}) == 0
    assert client.call("virDomainGetTime", dom=ref) == {"seconds": 1234567, "nseconds": 0}


def test_unsupported_domain_call_is_libvirt_no_support(client):
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainManagedSaveGetXMLDesc", domain={"name": "test"})
    assert exc.value.code_name == "VIR_ERR_NO_SUPPORT"
    # a wrapper that returns None on failure instead of raising: still libvirt's error
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainMigrateGetMaxDowntime", domain={"name": "test"})
    assert exc.value.code_name == "VIR_ERR_NO_SUPPORT"


def test_domain_stats(client, running_domain):
    stats = client.call("virDomainListGetStats", doms=[running_domain],
                        stats=["VIR_DOMAIN_STATS_STATE", "VIR_DOMAIN_STATS_VCPU"])
    assert len(stats) == 1 and stats[0]["domain"]["name"] == running_domain["name"]
    assert stats[0]["stats"]["state.state"] == libvirt.VIR_DOMAIN_RUNNING
    everyone = client.call("virConnectGetAllDomainStats", stats=["VIR_DOMAIN_STATS_STATE"],
                           flags=["VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE"])
    assert running_domain["name"] in {s["domain"]["name"] for s in everyone}


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshots(client, running_domain):
    ref = running_domain
    s1 = client.call("virDomainSnapshotCreateXML", domain=ref,
                     xmlDesc="<domainsnapshot><name>s1</name></domainsnapshot>")
    assert s1["name"] == "s1" and s1["domain"]["name"] == ref["name"]
    assert client.call("virDomainHasCurrentSnapshot", domain=ref) == 1

    client.call("virDomainSuspend", domain=ref)
    s2 = client.call("virDomainSnapshotCreateXML", domain=ref,
                     xmlDesc="<domainsnapshot><name>s2</name><description>paused</description></domainsnapshot>")
    listed = client.call("virDomainListAllSnapshots", domain=ref)
    assert sorted(s["name"] for s in listed) == ["s1", "s2"]
    assert client.call("virDomainSnapshotListNames", domain=ref) in (["s1", "s2"], ["s2", "s1"])
    assert client.call("virDomainSnapshotCurrent", domain=ref)["name"] == "s2"

    found = client.call("virDomainSnapshotLookupByName", domain=ref, name="s2")
    assert found["name"] == "s2"
    snap_xml = etree.fromstring(client.call("virDomainSnapshotGetXMLDesc", snapshot=found).encode())
    assert snap_xml.findtext("description") == "paused" and snap_xml.findtext("state") == "paused"
    assert client.call("virDomainSnapshotGetParent", snapshot=found)["name"] == "s1"
    children = client.call("virDomainSnapshotListAllChildren", snapshot={"domain": ref, "name": "s1"})
    assert [c["name"] for c in children] == ["s2"]

    # back to the running snapshot
    assert client.call("virDomainRevertToSnapshot", snapshot=s1) == 0
    assert state_name(client, ref) == "VIR_DOMAIN_RUNNING"
    assert client.call("virDomainSnapshotIsCurrent", snapshot=s1) == 1

    assert client.call("virDomainSnapshotDelete", snapshot=s2) == 0
    assert client.call("virDomainSnapshotDelete", snapshot={"domain": ref, "name": "s1"}) == 0
    assert client.call("virDomainListAllSnapshots", domain=ref) == []
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainSnapshotLookupByName", domain=ref, name="s1")
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN_SNAPSHOT"


# -- the host, as the guide's first chapter ---------------------------------------------------------


def test_capabilities_parse(client):
    caps = etree.fromstring(client.call("virConnectGetCapabilities").encode())
    assert caps.tag == "capabilities"
    assert caps.findtext("host/cpu/arch")
    guests = caps.findall("guest")
    assert guests and {g.findtext("os_type") for g in guests} >= {"hvm"}
    assert any(d.get("type") == "test" for d in caps.iterfind("guest/arch/domain"))


def test_node_info(client):
    info = client.call("virNodeGetInfo")
    assert set(info) == {"model", "memory", "cpus", "mhz", "nodes", "sockets", "cores", "threads"}
    assert isinstance(info["model"], str) and info["memory"] > 0
    assert info["cpus"] == info["nodes"] * info["sockets"] * info["cores"] * info["threads"]


def test_versions_and_hostname(client, host):
    lib = client.call("virConnectGetLibVersion")
    assert lib == libvirt.getVersion()  # the agent runs this very libvirt
    assert isinstance(client.call("virConnectGetVersion"), int) and client.call("virConnectGetVersion") > 0
    assert client.call("virConnectGetType") == "TEST"
    assert client.call("virConnectGetURI") == "test:///default"
    hostname = client.call("virConnectGetHostname")
    assert isinstance(hostname, str) and hostname
    assert host.getHostname() == hostname  # through the host proxy


def test_metadata_title_with_null_uri(client, persistent_domain):
    ref = persistent_domain
    assert client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_TITLE",
                       metadata="a title", key=None, uri=None) == 0
    assert client.call("virDomainGetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_TITLE", uri=None) == "a title"
    element = "<app xmlns='http://example.org/busagent'><owner>tests</owner></app>"
    client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_ELEMENT", metadata=element,
                key="ba", uri="http://example.org/busagent")
    got = etree.fromstring(client.call("virDomainGetMetadata", domain=ref, type=2,
                                       uri="http://example.org/busagent").encode())
    assert got.tag == "app" and got.findtext("owner") == "tests"  # libvirt returns it under its own prefix
    # NULL metadata removes the title
    client.call("virDomainSetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_TITLE", metadata=None,
                key=None, uri=None)
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainGetMetadata", domain=ref, type="VIR_DOMAIN_METADATA_TITLE", uri=None)
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN_METADATA"
