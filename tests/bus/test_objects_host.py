"""The host end to end through the bus: node calls, interfaces, node devices, secrets and
network filters. The test driver has no secret or nwfilter driver: those calls must come
back as libvirt's own VIR_ERR_NO_SUPPORT."""
from __future__ import annotations

import uuid

import pytest
from lxml import etree

from busagent.client import LibvirtError


def random_mac() -> str:
    b = uuid.uuid4().bytes[:5]
    return "52:" + ":".join(f"{x:02x}" for x in b)


def iface_xml(name: str, mac: str) -> str:
    return (f"<interface type='ethernet' name='{name}'><start mode='onboot'/><mac address='{mac}'/>"
            "<protocol family='ipv4'><ip address='192.168.77.9' prefix='24'/></protocol></interface>")


# -- node ------------------------------------------------------------------------------------------


def test_node_memory_and_cpus(client):
    free = client.call("virNodeGetFreeMemory")
    cells = client.call("virNodeGetCellsFreeMemory", startCell=0, maxCells=2)
    assert isinstance(free, int) and free > 0
    assert len(cells) == 2 and all(isinstance(c, int) for c in cells)
    stats = client.call("virNodeGetCPUStats", cpuNum=-1)
    assert {"user", "kernel", "idle", "iowait"} <= set(stats)
    cpumap = client.call("virNodeGetCPUMap")
    assert cpumap[0] == len(cpumap[1]) and cpumap[2] == sum(cpumap[1])  # [cpus, online map, online]
    assert client.call("virConnectGetMaxVcpus", type="test") > 0
    assert "qemu64" in client.call("virConnectGetCPUModelNames", arch="x86_64")
    assert client.call("virNodeGetSecurityModel") == {"model": "testSecurity", "doi": ""}


def test_sysinfo_and_connection(client):
    sysinfo = etree.fromstring(client.call("virConnectGetSysinfo").encode())
    assert sysinfo.tag == "sysinfo" and sysinfo.find("bios") is not None
    assert client.call("virConnectIsAlive") == 1
    assert client.call("virConnectIsEncrypted") == 0


def test_node_calls_the_test_driver_lacks(client):
    for method, args in (("virNodeGetMemoryStats", {"cellNum": -1}), ("virNodeGetMemoryParameters", {}),
                         ("virConnectGetDomainCapabilities", {}), ("virNodeGetSEVInfo", {})):
        with pytest.raises(LibvirtError) as exc:
            client.call(method, **args)
        assert exc.value.code_name == "VIR_ERR_NO_SUPPORT", method


# -- interfaces ----------------------------------------------------------------------------------


def test_interface_define_create_destroy_undefine(client, cleanup, uniq):
    name, mac = uniq("if")[:15], random_mac()
    ref = client.call("virInterfaceDefineXML", xml=iface_xml(name, mac))
    cleanup.add("virInterfaceUndefine", iface={"name": name})
    cleanup.add("virInterfaceDestroy", iface={"name": name})
    assert ref == {"name": name, "mac": mac}
    assert client.call("virInterfaceIsActive", iface=ref) == 0
    assert name in client.call("virConnectListDefinedInterfaces")

    assert client.call("virInterfaceCreate", iface={"name": name}) == 0
    assert client.call("virInterfaceIsActive", iface={"mac": mac}) == 1
    assert name in client.call("virConnectListInterfaces")
    assert ref in client.call("virConnectListAllInterfaces", flags=["VIR_CONNECT_LIST_INTERFACES_ACTIVE"])
    assert client.call("virInterfaceLookupByMACString", macstr=mac) == ref
    assert client.call("virInterfaceGetMACString", iface={"name": name}) == mac
    doc = etree.fromstring(client.call("virInterfaceGetXMLDesc", iface=ref).encode())
    assert doc.get("name") == name and doc.find("mac").get("address") == mac

    assert client.call("virInterfaceDestroy", iface=ref) == 0
    assert client.call("virInterfaceIsActive", iface=ref) == 0
    assert client.call("virInterfaceUndefine", iface=ref) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virInterfaceLookupByName", name=name)
    assert exc.value.code_name == "VIR_ERR_NO_INTERFACE"


def test_interface_change_transaction(client, cleanup, uniq):
    # committed, not rolled back: the test driver's rollback also deactivates the stock eth1,
    # which other tests share
    name = uniq("if")[:15]
    assert client.call("virInterfaceChangeBegin") == 0
    cleanup.add("virInterfaceChangeCommit")
    with pytest.raises(LibvirtError) as exc:  # one transaction at a time
        client.call("virInterfaceChangeBegin")
    assert exc.value.code_name == "VIR_ERR_OPERATION_INVALID"
    client.call("virInterfaceDefineXML", xml=iface_xml(name, random_mac()))
    cleanup.add("virInterfaceUndefine", iface={"name": name})
    assert client.call("virInterfaceChangeCommit") == 0
    assert client.call("virInterfaceLookupByName", name=name)["name"] == name
    with pytest.raises(LibvirtError) as exc:  # nothing left to commit
        client.call("virInterfaceChangeCommit")
    assert exc.value.code_name == "VIR_ERR_OPERATION_INVALID"


def test_stock_interface_through_proxy(host):
    eth1 = host.interface(name="eth1")
    assert eth1.getMACString() == "aa:bb:cc:dd:ee:ff"
    assert eth1.isActive() == 1


# -- node devices -------------------------------------------------------------------------------


def test_node_device_listing_and_lookup(client, host):
    devices = client.call("virConnectListAllNodeDevices")
    names = {d["name"] for d in devices}
    assert {"computer", "scsi_host1"} <= names
    scsi = client.call("virConnectListAllNodeDevices", flags=["VIR_CONNECT_LIST_NODE_DEVICES_CAP_SCSI_HOST"])
    assert "computer" not in {d["name"] for d in scsi} and {"name": "scsi_host1"} in scsi
    assert "scsi_host1" in client.call("virNodeListDevices", cap="scsi_host")
    assert client.call("virNodeNumOfDevices", cap="scsi_host") == len(client.call("virNodeListDevices",
                                                                                  cap="scsi_host"))

    assert client.call("virNodeDeviceLookupByName", name="scsi_host1") == {"name": "scsi_host1"}
    doc = etree.fromstring(client.call("virNodeDeviceGetXMLDesc", dev={"name": "scsi_host1"}).encode())
    assert doc.findtext("name") == "scsi_host1" and doc.findtext("parent") == "computer"
    assert client.call("virNodeDeviceGetParent", dev={"name": "scsi_host1"}) == "computer"
    assert client.call("virNodeDeviceListCaps", dev={"name": "scsi_host1"}) == ["scsi_host"]
    assert host.node_device(name="computer").numOfCaps() == 1
    # NULL with an error set: the binding returns None there, the agent still answers with the error
    with pytest.raises(LibvirtError) as exc:
        client.call("virNodeDeviceGetParent", dev={"name": "computer"})
    assert exc.value.code_name == "VIR_ERR_INTERNAL_ERROR"
    with pytest.raises(LibvirtError) as exc:
        client.call("virNodeDeviceLookupByName", name="no_such_device")
    assert exc.value.code_name == "VIR_ERR_NO_NODE_DEVICE"


def test_node_device_create_and_destroy(client, cleanup):
    suffix = uuid.uuid4().hex[:12]
    wwnn, wwpn = "2000" + suffix, "1000" + suffix
    xml = (f"<device><parent>scsi_host1</parent><capability type='scsi_host'><capability type='fc_host'>"
           f"<wwnn>{wwnn}</wwnn><wwpn>{wwpn}</wwpn></capability></capability></device>")
    dev = client.call("virNodeDeviceCreateXML", xmlDesc=xml)
    cleanup.add("virNodeDeviceDestroy", dev=dev)
    assert dev["name"].startswith("scsi_host")
    with pytest.raises(LibvirtError) as exc:  # not in the test driver
        client.call("virNodeDeviceLookupSCSIHostByWWN", wwnn=wwnn, wwpn=wwpn)
    assert exc.value.code_name == "VIR_ERR_NO_SUPPORT"
    doc = etree.fromstring(client.call("virNodeDeviceGetXMLDesc", dev=dev).encode())
    assert doc.findtext("capability/capability/wwpn") == wwpn
    assert client.call("virNodeDeviceGetParent", dev=dev) == "scsi_host1"
    assert client.call("virNodeDeviceDestroy", dev=dev) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virNodeDeviceLookupByName", name=dev["name"])
    assert exc.value.code_name == "VIR_ERR_NO_NODE_DEVICE"


# -- secrets and network filters: not in the test driver ------------------------------------------


def test_secrets_are_not_supported_by_the_test_driver(client):
    secret_uuid = str(uuid.uuid4())
    xml = (f"<secret ephemeral='no' private='no'><uuid>{secret_uuid}</uuid>"
           "<usage type='volume'><volume>/var/lib/x.img</volume></usage></secret>")
    calls = [
        ("virSecretDefineXML", {"xml": xml}),
        ("virConnectListAllSecrets", {}),
        ("virConnectNumOfSecrets", {}),
        ("virSecretLookupByUUIDString", {"uuidstr": secret_uuid}),
        ("virSecretLookupByUsage", {"usageType": 1, "usageID": "/var/lib/x.img"}),
        ("virSecretSetValue", {"secret": {"uuid": secret_uuid}, "value": {"base64": "c2VjcmV0"}}),
        ("virSecretGetValue", {"secret": {"uuid": secret_uuid}}),
        ("virSecretGetXMLDesc", {"secret": {"usageType": "VIR_SECRET_USAGE_TYPE_VOLUME",
                                            "usageID": "/var/lib/x.img"}}),
        ("virSecretUndefine", {"secret": {"uuid": secret_uuid}}),
    ]
    for method, args in calls:
        with pytest.raises(LibvirtError) as exc:
            client.call(method, **args)
        assert exc.value.code_name == "VIR_ERR_NO_SUPPORT", method
        assert exc.value.error["domain_name"] == "VIR_FROM_SECRET", method


def test_nwfilters_are_not_supported_by_the_test_driver(client, uniq):
    name = uniq("filter")
    calls = [
        ("virNWFilterDefineXML", {"xmlDesc": f"<filter name='{name}' chain='ipv4'/>"}),
        ("virNWFilterLookupByName", {"name": name}),
        ("virNWFilterLookupByUUIDString", {"uuidstr": str(uuid.uuid4())}),
        ("virConnectListAllNWFilters", {}),
        ("virConnectNumOfNWFilters", {}),
        ("virNWFilterGetXMLDesc", {"nwfilter": {"name": name}}),
        ("virNWFilterUndefine", {"nwfilter": {"name": name}}),
        ("virConnectListAllNWFilterBindings", {}),
    ]
    for method, args in calls:
        with pytest.raises(LibvirtError) as exc:
            client.call(method, **args)
        assert exc.value.code_name == "VIR_ERR_NO_SUPPORT", method
        assert exc.value.error["domain_name"] == "VIR_FROM_NWFILTER", method
