"""Real virtual networks through the bus: a NAT one and an isolated one, both with dnsmasq's DHCP.

The session (conftest.hv) defined and started ``bv-nat`` and ``bv-iso`` through the agent;
``alpha`` has a NIC on each and ran udhcpc at boot. Bridges, dnsmasq and the NAT rules live in
scripts/realhv's network namespace only.
"""
from __future__ import annotations

import ipaddress

from realkit import ALPHA, ALPHA_ISO_MAC, ALPHA_NAT_MAC, ISO, NAT, about, event_view, wait_until


def test_networks_were_defined_and_started_with_events(hv):
    got = hv.events.since(hv.setup_marks["networks"], lambda m: m["kind"] == "network.lifecycle")
    views = [(m["object"]["network"]["name"], *event_view(m)[1:]) for m in got]
    assert views[:4] == [(NAT, "DEFINED", None), (NAT, "STARTED", None), (ISO, "DEFINED", None),
                         (ISO, "STARTED", None)]
    for name, forward in ((NAT, "nat"), (ISO, None)):
        ref = {"name": name}
        assert hv.call("virNetworkIsActive", net=ref) == 1
        assert hv.call("virNetworkIsPersistent", net=ref) == 1
        xml = hv.call("virNetworkGetXMLDesc", network=ref, flags=0)
        assert (f"<forward mode='{forward}'" in xml) if forward else ("<forward" not in xml)
        assert hv.call("virNetworkGetBridgeName", network=ref) == {NAT: "bvnat0", ISO: "bviso0"}[name]


def test_dhcp_leases_on_nat_and_isolated(hv, alpha):
    for net, mac, subnet in ((NAT, ALPHA_NAT_MAC, "192.168.150.0/24"), (ISO, ALPHA_ISO_MAC, "192.168.151.0/24")):
        leases = wait_until(f"alpha's lease on {net}", lambda net=net, mac=mac: hv.call(
            "virNetworkGetDHCPLeases", network={"name": net}, mac=mac, flags=0), timeout=30)
        assert len(leases) == 1, leases
        lease = leases[0]
        assert lease["mac"] == mac and lease["prefix"] == 24
        assert ipaddress.ip_address(lease["ipaddr"]) in ipaddress.ip_network(subnet)
        assert lease["iface"] == {NAT: "bvnat0", ISO: "bviso0"}[net]
        assert lease["type"] == 0  # VIR_IP_ADDR_TYPE_IPV4
        assert lease["expirytime"] > 0
        # the guest said which address it got, on its console
        assert f" {lease['ipaddr']}" in hv.console(ALPHA).text()
        # and all leases of the network (mac=None) include it
        assert any(x["mac"] == mac for x in hv.call("virNetworkGetDHCPLeases", network={"name": net},
                                                    mac=None, flags=0))
    # the same addresses seen from the domain, from the lease files
    ifaces = hv.call("virDomainInterfaceAddresses", dom=alpha, source="VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE",
                     flags=0)
    by_mac = {i["hwaddr"]: i for i in ifaces.values()}  # {tap name: {"hwaddr", "addrs"}}
    assert set(by_mac) == {ALPHA_NAT_MAC, ALPHA_ISO_MAC}, ifaces
    for mac, subnet in ((ALPHA_NAT_MAC, "192.168.150.0/24"), (ALPHA_ISO_MAC, "192.168.151.0/24")):
        addrs = by_mac[mac]["addrs"]
        assert len(addrs) == 1 and ipaddress.ip_address(addrs[0]["addr"]) in ipaddress.ip_network(subnet), addrs


def test_network_lifecycle_events(hv):
    ev = hv.events
    name = "bv-extra"
    xml = (f"<network><name>{name}</name><bridge name='bvextra0'/>"
           "<ip address='192.168.152.1' netmask='255.255.255.0'/></network>")
    ref = {"name": name}
    try:
        m = ev.mark()
        hv.call("virNetworkDefineXML", xml=xml)
        hv.call("virNetworkCreate", network=ref)
        assert hv.call("virNetworkIsActive", net=ref) == 1
        hv.call("virNetworkDestroy", network=ref)
        assert hv.call("virNetworkIsActive", net=ref) == 0
        hv.call("virNetworkUndefine", network=ref)
        ev.expect(m, about("network", name), [
            ("network.lifecycle", "DEFINED", None), ("network.lifecycle", "STARTED", None),
            ("network.lifecycle", "STOPPED", None), ("network.lifecycle", "UNDEFINED", None)], event_view)
        assert name not in [n["name"] for n in hv.call("virConnectListAllNetworks", flags=0)]
    finally:
        for method in ("virNetworkDestroy", "virNetworkUndefine"):
            try:
                hv.call(method, network=ref)
            except Exception:  # noqa: BLE001 - already gone
                pass
