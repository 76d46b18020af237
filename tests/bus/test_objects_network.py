"""Virtual networks end to end through the bus."""
from __future__ import annotations

import random
import uuid

import libvirt
import pytest
from lxml import etree

from busagent.client import LibvirtError


def network_xml(name: str) -> tuple[str, str]:
    bridge = "tb" + uuid.uuid4().hex[:10]
    a, b = random.randint(1, 254), random.randint(1, 254)
    xml = (f"<network><name>{name}</name><bridge name='{bridge}'/>"
           f"<ip address='10.{a}.{b}.1' netmask='255.255.255.0'/></network>")
    return xml, bridge


def test_network_lifecycle(client, cleanup, uniq):
    name = uniq("net")
    xml, bridge = network_xml(name)
    ref = client.call("virNetworkDefineXML", xml=xml)
    cleanup.add("virNetworkUndefine", network={"name": name})
    cleanup.add("virNetworkDestroy", network={"name": name})
    assert ref["name"] == name
    assert client.call("virNetworkIsActive", net=ref) == 0
    assert client.call("virNetworkIsPersistent", net=ref) == 1
    assert name in client.call("virConnectListDefinedNetworks")
    inactive = client.call("virConnectListAllNetworks", flags=["VIR_CONNECT_LIST_NETWORKS_INACTIVE"])
    assert ref in inactive

    assert client.call("virNetworkCreate", network=ref) == 0
    assert client.call("virNetworkIsActive", net={"uuid": ref["uuid"]}) == 1
    assert name in client.call("virConnectListNetworks")
    assert client.call("virNetworkGetBridgeName", network=ref) == bridge
    doc = etree.fromstring(client.call("virNetworkGetXMLDesc", network=ref).encode())
    assert doc.findtext("name") == name and doc.findtext("uuid") == ref["uuid"]
    assert doc.find("bridge").get("name") == bridge
    assert client.call("virNetworkLookupByUUIDString", uuidstr=ref["uuid"]) == ref
    assert client.call("virNetworkLookupByUUID", uuid=ref["uuid"]) == ref
    assert client.call("virNetworkGetUUIDString", network={"name": name}) == ref["uuid"]

    assert client.call("virNetworkGetAutostart", network=ref) == 0
    assert client.call("virNetworkSetAutostart", network=ref, autostart=1) == 0
    assert client.call("virNetworkGetAutostart", network=ref) == 1
    client.call("virNetworkSetAutostart", network=ref, autostart=0)

    assert client.call("virNetworkDestroy", network=ref) == 0
    assert client.call("virNetworkIsActive", net=ref) == 0
    assert client.call("virNetworkUndefine", network=ref) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virNetworkLookupByName", name=name)
    assert exc.value.code_name == "VIR_ERR_NO_NETWORK"


def test_transient_network(client, cleanup, uniq):
    name = uniq("tnet")
    ref = client.call("virNetworkCreateXML", xmlDesc=network_xml(name)[0])
    cleanup.add("virNetworkDestroy", network={"name": name})
    assert client.call("virNetworkIsActive", net=ref) == 1
    assert client.call("virNetworkIsPersistent", net=ref) == 0
    assert client.call("virNetworkDestroy", network=ref) == 0
    with pytest.raises(LibvirtError) as exc:
        client.call("virNetworkGetXMLDesc", network=ref)
    assert exc.value.code_name == "VIR_ERR_NO_NETWORK"


def test_network_update_with_enum_names(client, cleanup, uniq):
    name = uniq("net")
    xml, _ = network_xml(name)
    ref = client.call("virNetworkDefineXML", xml=xml)
    cleanup.add("virNetworkUndefine", network=ref)
    ip = etree.fromstring(xml.encode()).find("ip").get("address").rsplit(".", 1)[0] + ".77"
    host = f"<host mac='52:54:00:aa:bb:cc' name='h77' ip='{ip}'/>"
    # enum arguments by constant name, and the same by number
    assert client.call("virNetworkUpdate", network=ref, command="VIR_NETWORK_UPDATE_COMMAND_ADD_LAST",
                       section="VIR_NETWORK_SECTION_IP_DHCP_HOST", parentIndex=-1, xml=host,
                       flags=["VIR_NETWORK_UPDATE_AFFECT_CONFIG"]) == 0
    doc = etree.fromstring(client.call("virNetworkGetXMLDesc", network=ref).encode())
    assert doc.find("ip/dhcp/host").get("ip") == ip
    with pytest.raises(LibvirtError) as exc:  # the test driver takes no XML flags
        client.call("virNetworkGetXMLDesc", network=ref, flags=["VIR_NETWORK_XML_INACTIVE"])
    assert exc.value.code_name == "VIR_ERR_INVALID_ARG" and "unsupported flags (0x1)" in str(exc.value)
    assert client.call("virNetworkUpdate", network=ref, command=libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
                       section=libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, parentIndex=-1, xml=host,
                       flags=libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG) == 0
    doc = etree.fromstring(client.call("virNetworkGetXMLDesc", network=ref).encode())
    assert doc.find("ip/dhcp/host") is None


def test_stock_network_through_proxy(host):
    net = host.network(name="default")
    assert net.isActive() == 1
    assert net.getBridgeName() == "virbr0"
    assert etree.fromstring(net.getXMLDesc().encode()).findtext("name") == "default"


def test_network_calls_the_test_driver_lacks(client):
    for method in ("virNetworkGetDHCPLeases", "virNetworkListAllPorts"):
        with pytest.raises(LibvirtError) as exc:
            client.call(method, network={"name": "default"})
        assert exc.value.code_name == "VIR_ERR_NO_SUPPORT", method
