"""Live device changes on the running tiny guest ``alpha``, through the bus.

The balloon (virDomainSetMemoryFlags: the guest's virtio_balloon driver gives memory back), a
NIC plugged in and out (virDomainAttachDeviceFlags / DetachDeviceFlags: ACPI PCI hotplug, the
guest runs DHCP on the new NIC and releases it on request), and cdrom media inserted and
ejected (virDomainUpdateDeviceFlags). Each checks what libvirt reports afterwards and the
events on the bus, in order.
"""
from __future__ import annotations

import re
from pathlib import Path

from realkit import ALPHA, ISO, about, event_view, wait_until

LIVE = ["VIR_DOMAIN_AFFECT_LIVE"]


def test_balloon_down_and_up(hv, alpha):
    ev = hv.events
    balloon = about("domain", ALPHA, ("domain.balloon_change",))
    assert hv.call("virDomainGetInfo", domain=alpha)["memory"] == 131072
    m = ev.mark()
    hv.call("virDomainSetMemoryFlags", domain=alpha, memory=98304, flags=LIVE)
    # the guest deflates in steps: the events report them, the last one the target
    got = wait_until("balloon at 96 MiB", lambda: (lambda b: b and b[-1]["data"]["actual"] == 98304 and b)(
        ev.since(m, balloon)), timeout=60)
    actual = [e["data"]["actual"] for e in got]
    assert actual == sorted(actual, reverse=True) and actual[-1] == 98304, actual
    assert all(e["kind"] == "domain.balloon_change" and e["object"]["domain"]["name"] == ALPHA for e in got)
    info = hv.call("virDomainGetInfo", domain=alpha)
    assert info["memory"] == 98304 and info["maxMem"] == 131072
    assert hv.call("virDomainMemoryStats", dom=alpha)["actual"] == 98304

    m = ev.mark()
    hv.call("virDomainSetMemoryFlags", domain=alpha, memory=131072, flags=LIVE)
    got = wait_until("balloon back at 128 MiB", lambda: (lambda b: b and b[-1]["data"]["actual"] == 131072 and b)(
        ev.since(m, balloon)), timeout=60)
    actual = [e["data"]["actual"] for e in got]
    assert actual == sorted(actual) and actual[-1] == 131072, actual
    assert hv.call("virDomainGetInfo", domain=alpha)["memory"] == 131072
    # nothing but balloon events about alpha meanwhile
    assert {e["kind"] for e in ev.since(m, about("domain", ALPHA))} == {"domain.balloon_change"}


def test_nic_attach_detach(hv, alpha):
    ev = hv.events
    mac = "52:54:00:b5:00:03"
    nic = (f"<interface type='network'><source network='{ISO}'/><mac address='{mac}'/>"
           "<model type='virtio'/></interface>")
    console = hv.console(ALPHA)
    leases_before = console.count("BUSAGENT-LEASE")
    devices = about("domain", ALPHA)

    m = ev.mark()
    hv.call("virDomainAttachDeviceFlags", domain=alpha, xml=nic, flags=LIVE)
    ev.expect(m, devices, [("domain.device_added", "net2")], event_view)
    xml = hv.call("virDomainGetXMLDesc", domain=alpha, flags=0)
    assert f"<mac address='{mac}'/>" in xml
    assert "<alias name='net2'/>" in xml
    # the guest sees the NIC (PCI hotplug) and takes a lease on the isolated network
    console.wait("BUSAGENT-LEASE", leases_before + 1, timeout=60)
    lease = wait_until("a lease for the plugged NIC", lambda: [
        x for x in hv.call("virNetworkGetDHCPLeases", network={"name": ISO}, mac=mac, flags=0)], timeout=30)
    assert lease[0]["mac"] == mac and lease[0]["ipaddr"].startswith("192.168.151.")
    assert re.search(rf"BUSAGENT-LEASE eth2 {re.escape(lease[0]['ipaddr'])}\b", console.text())

    m = ev.mark()
    hv.call("virDomainDetachDeviceFlags", domain=alpha, xml=nic, flags=LIVE)
    # the guest releases the device (ACPI eject); libvirt reports the removal once QEMU has it
    ev.expect(m, devices, [("domain.device_removed", "net2")], event_view, timeout=60)
    assert f"<mac address='{mac}'/>" not in hv.call("virDomainGetXMLDesc", domain=alpha, flags=0)
    assert f"<mac address='{mac}'/>" not in hv.call("virDomainGetXMLDesc", domain=alpha,
                                                     flags=["VIR_DOMAIN_XML_INACTIVE"])


def test_cdrom_media_change(hv, alpha):
    ev = hv.events
    media = Path(hv.env["images"]) / "media.iso"
    media.write_bytes(b"\0" * (1 << 20))
    drive = about("domain", ALPHA)
    insert = (f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='{media}'/>"
              "<target dev='hdc' bus='ide'/><readonly/></disk>")
    eject = "<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>"
    try:
        m = ev.mark()
        hv.call("virDomainUpdateDeviceFlags", domain=alpha, xml=insert, flags=LIVE)
        # QEMU opens the tray, changes the medium, closes the tray
        ev.expect(m, drive, [("domain.tray_change", "ide0-1-0", "VIR_DOMAIN_EVENT_TRAY_CHANGE_OPEN"),
                             ("domain.tray_change", "ide0-1-0", "VIR_DOMAIN_EVENT_TRAY_CHANGE_CLOSE")], event_view)
        assert f"<source file='{media}'" in hv.call("virDomainGetXMLDesc", domain=alpha, flags=0)
        info = hv.call("virDomainGetBlockInfo", domain=alpha, disk="hdc", flags=0)
        assert info["capacity"] == 1 << 20

        m = ev.mark()
        hv.call("virDomainUpdateDeviceFlags", domain=alpha, xml=eject, flags=LIVE)
        ev.expect(m, drive, [("domain.tray_change", "ide0-1-0", "VIR_DOMAIN_EVENT_TRAY_CHANGE_OPEN"),
                             ("domain.tray_change", "ide0-1-0", "VIR_DOMAIN_EVENT_TRAY_CHANGE_CLOSE")], event_view)
        assert str(media) not in hv.call("virDomainGetXMLDesc", domain=alpha, flags=0)
    finally:
        media.unlink(missing_ok=True)
