"""Live migration between two real libvirtd instances, through the bus, with its progress published.

The destination is a second ``scripts/realhv`` (``realhv2``: its own namespaces, its own host UUID,
since libvirt refuses to migrate to the same host). The two daemons live in different network
namespaces, so QEMU's migration stream cannot go over TCP between them: the migration is
peer-to-peer and tunnelled (``VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_TUNNELLED``): the source
libvirtd opens the destination's unix socket (``qemu+unix:///system?socket=...``) and carries the
guest's memory over it. A bandwidth limit stretches it over a few seconds, during which the agent
samples ``virDomainGetJobStats`` (``domain.job_progress``).
"""
from __future__ import annotations

import contextlib

import libvirt
import pytest
from realkit import about, call_with_id, lifecycle_view, qemu_guest_xml

from busagent.client import CallError

NAME = "mig"
BANDWIDTH_MIB = 20  # MiB/s: the guest's 96 MiB take about 5 s


@pytest.fixture
def mig(hv, realhv2):
    """``mig`` running and booted on the session's hypervisor; a connection to the destination."""
    ref = {"name": NAME}
    dest = libvirt.open(realhv2["qemu_uri"])
    for method in ("virDomainDestroy", "virDomainUndefine"):
        with contextlib.suppress(CallError):
            hv.call(method, domain=ref)
    hv.console(NAME).path.unlink(missing_ok=True)
    dom = hv.call("virDomainDefineXML", xml=qemu_guest_xml(hv.env, NAME, memory_mib=96, max_vcpus=1))
    hv.call("virDomainCreate", domain=dom)
    try:
        hv.console(NAME).wait("BUSAGENT-READY")
        yield {"ref": ref, "dest": dest, "dest_uri": realhv2["qemu_uri"]}
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dest.lookupByName(NAME).destroy()
        dest.close()
        for method in ("virDomainDestroy", "virDomainUndefine"):
            with contextlib.suppress(CallError):
                hv.call(method, domain=ref)


def test_live_migration_to_another_libvirtd(hv, mig):
    ev, ref, console = hv.events, mig["ref"], hv.console(NAME)
    m = ev.mark()
    result, cid = call_with_id(hv.client, "virDomainMigrateToURI3", domain=ref, dconnuri=mig["dest_uri"],
                               params={"bandwidth": BANDWIDTH_MIB},
                               flags=["VIR_MIGRATE_LIVE", "VIR_MIGRATE_PEER2PEER", "VIR_MIGRATE_TUNNELLED"])
    assert result == 0
    # the source saw the guest leave; the destination runs it, the same guest (no new boot)
    ev.expect(m, about("domain", NAME, ("domain.lifecycle",)), [("SUSPENDED", "MIGRATED"), ("STOPPED", "MIGRATED")],
              lifecycle_view)
    s = hv.call("virDomainGetState", domain=ref, flags=0)
    assert (s["state_name"], s["reason"]) == ("VIR_DOMAIN_SHUTOFF", libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED)
    moved = mig["dest"].lookupByName(NAME)
    assert moved.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_MIGRATED]
    assert console.count("BUSAGENT-BOOT") == 1

    # its progress was published while the call ran: memory moving towards the destination
    progress = ev.since(m, about("domain", NAME, ("domain.job_progress",)))
    assert [p["data"]["progress_seq"] for p in progress] == list(range(1, len(progress) + 1))
    for p in progress:
        assert (p["data"]["method"], p["data"]["correlation_id"]) == ("virDomainMigrateToURI3", cid)
        assert p["data"]["stats"]["type"] != libvirt.VIR_DOMAIN_JOB_NONE
    processed = [p["data"]["stats"].get("memory_processed", 0) for p in progress]
    assert processed == sorted(processed), f"memory_processed went back: {processed}"
    assert len({x for x in processed if x > 0}) >= 3, f"no moving progress: {processed}"
