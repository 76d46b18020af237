"""A real QEMU guest's whole life through the bus, and its vCPUs.

``beta`` is the tiny guest (TCG, 128 MiB, 1 of 2 vCPUs, no disk or NIC): defined, started,
paused, resumed, rebooted (ACPI: the guest powers off, libvirt resets it), its second vCPU
plugged in, shut down by the ACPI power button, started again, destroyed and undefined. After
each step the test asks libvirt (through the bus) for the state and reads the events the agent
published, in order. The guest's serial console tells when it is up.
"""
from __future__ import annotations

import re

from realkit import about, event_view, lifecycle_view, qemu_guest_xml, reason_name

LIFECYCLE = ("domain.lifecycle",)


def state(hv, ref) -> tuple[str, str]:
    """(state name, reason name): the reply names the state; the reason's enum depends on it."""
    s = hv.call("virDomainGetState", domain=ref, flags=0)
    return s["state_name"], reason_name(s["state_name"], s["reason"])


def test_define_start_pause_reboot_shutdown_destroy_undefine(hv):
    name, ref = "beta", {"name": "beta"}
    console = hv.console(name)
    console.path.unlink(missing_ok=True)
    ev = hv.events
    life = about("domain", name, LIFECYCLE)
    try:
        m = ev.mark()
        dom = hv.call("virDomainDefineXML", xml=qemu_guest_xml(hv.env, name))
        assert dom["name"] == name and dom["id"] == -1
        ev.expect(m, life, [("DEFINED", "ADDED")], lifecycle_view)
        assert state(hv, ref) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_UNKNOWN")

        m = ev.mark()
        hv.call("virDomainCreate", domain=ref)
        # QEMU's RESUME (the vCPUs start) reaches libvirt before its own 'started'
        ev.expect(m, life, [("RESUMED", "UNPAUSED"), ("STARTED", "BOOTED")], lifecycle_view)
        assert state(hv, ref) == ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_BOOTED")
        console.wait("BUSAGENT-READY")

        m = ev.mark()
        hv.call("virDomainSuspend", domain=ref)
        ev.expect(m, life, [("SUSPENDED", "PAUSED")], lifecycle_view)
        assert state(hv, ref) == ("VIR_DOMAIN_PAUSED", "VIR_DOMAIN_PAUSED_USER")
        hv.call("virDomainResume", domain=ref)
        ev.expect(m, life, [("SUSPENDED", "PAUSED"), ("RESUMED", "UNPAUSED")], lifecycle_view)
        assert state(hv, ref) == ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_UNPAUSED")

        # reboot: ACPI power button -> the guest powers off -> libvirt resets it (a 'fake reboot')
        m, mm = ev.mark(), hv.mirror.mark()
        hv.call("virDomainReboot", domain=ref, flags=["VIR_DOMAIN_REBOOT_ACPI_POWER_BTN"])
        console.wait("BUSAGENT-BOOT", 2)
        console.wait("BUSAGENT-READY", 2)
        assert console.count("BUSAGENT-POWEROFF") == 1
        # each QEMU reset is a reboot event: libvirt gives 2 or 3 for one reboot here (as many on the bus as
        # an independent connection got); the guest never stopped: no lifecycle event
        told = hv.mirror.view(mm, name)
        assert told and all(e == ("domain.reboot", name) for e in told), told
        ev.expect(m, about("domain", name), [("domain.reboot",)] * len(told), event_view)
        assert state(hv, ref)[0] == "VIR_DOMAIN_RUNNING"

        # a second vCPU, live (the guest onlines it), and in the persistent definition
        m = ev.mark()
        assert hv.call("virDomainGetVcpusFlags", domain=ref, flags=["VIR_DOMAIN_AFFECT_LIVE"]) == 1
        assert hv.call("virDomainGetVcpusFlags", domain=ref, flags=["VIR_DOMAIN_VCPU_MAXIMUM"]) == 2
        hv.call("virDomainSetVcpusFlags", domain=ref, nvcpus=2, flags=["VIR_DOMAIN_AFFECT_LIVE"])
        assert hv.call("virDomainGetVcpusFlags", domain=ref, flags=["VIR_DOMAIN_AFFECT_LIVE"]) == 2
        console.wait("BUSAGENT-CPU-ONLINE", 1, timeout=30)
        hv.call("virDomainSetVcpusFlags", domain=ref, nvcpus=2, flags=["VIR_DOMAIN_AFFECT_CONFIG"])
        assert hv.call("virDomainGetVcpusFlags", domain=ref, flags=["VIR_DOMAIN_AFFECT_CONFIG"]) == 2
        assert hv.call("virDomainGetInfo", domain=ref)["nrVirtCpu"] == 2
        inactive = hv.call("virDomainGetXMLDesc", domain=ref, flags=["VIR_DOMAIN_XML_INACTIVE"])
        assert re.search(r"<vcpu placement='static'>2</vcpu>", inactive), inactive  # 2 of 2: no 'current'
        assert [e["kind"] for e in ev.since(m, about("domain", name))] == []  # vCPU changes raise no event

        # ACPI shutdown: the guest answers the power button
        m = ev.mark()
        hv.call("virDomainShutdownFlags", domain=ref, flags=["VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN"])
        ev.expect(m, life, [("SHUTDOWN", "GUEST"), ("STOPPED", "SHUTDOWN")], lifecycle_view, timeout=60)
        assert console.count("BUSAGENT-POWEROFF") == 2
        assert state(hv, ref) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_SHUTDOWN")

        m = ev.mark()
        hv.call("virDomainCreate", domain=ref)
        ev.expect(m, life, [("RESUMED", "UNPAUSED"), ("STARTED", "BOOTED")], lifecycle_view)
        assert hv.call("virDomainGetInfo", domain=ref)["nrVirtCpu"] == 2  # the persistent change took
        m = ev.mark()
        hv.call("virDomainDestroy", domain=ref)
        # QEMU reports the SIGTERM as a shutdown when libvirt still reads its monitor (it nearly always does)
        ev.expect(m, life, [("SHUTDOWN", "HOST"), ("STOPPED", "DESTROYED")], lifecycle_view,
                  also=([("STOPPED", "DESTROYED")],))
        assert state(hv, ref) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_DESTROYED")

        m = ev.mark()
        hv.call("virDomainUndefineFlags", domain=ref, flags=0)
        ev.expect(m, life, [("UNDEFINED", "REMOVED")], lifecycle_view)
        names = [d["name"] for d in hv.call("virConnectListAllDomains", flags=0)]
        assert name not in names
    finally:
        for method, args in (("virDomainDestroy", {}), ("virDomainUndefineFlags", {"flags": 0})):
            try:
                hv.call(method, domain=ref, **args)
            except Exception:  # noqa: BLE001 - already gone
                pass
