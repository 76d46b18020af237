"""Saving and restoring the running tiny guest ``alpha``, and its internal snapshots, through the bus.

Every step leaves alpha running with its memory intact (the guest carries on where it was:
its console shows no new boot), so the session's other tests can go on using it.
"""
from __future__ import annotations

from pathlib import Path

from realkit import ALPHA, about, lifecycle_view, reason_name

LIFE = ("domain.lifecycle",)


def state(hv, ref) -> tuple[str, str]:
    s = hv.call("virDomainGetState", domain=ref, flags=0)
    return s["state_name"], reason_name(s["state_name"], s["reason"])


def test_save_restore(hv, alpha):
    ev, console = hv.events, hv.console(ALPHA)
    boots = console.count("BUSAGENT-BOOT")
    image = Path(hv.env["images"]) / "alpha.save"
    image.unlink(missing_ok=True)
    try:
        m = ev.mark()
        hv.call("virDomainSave", domain=alpha, to=str(image))
        # libvirt pauses the guest, QEMU writes its state out, the guest stops
        ev.expect(m, about("domain", ALPHA, LIFE), [("SUSPENDED", "PAUSED"), ("STOPPED", "SAVED")], lifecycle_view)
        assert state(hv, alpha) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_SAVED")
        assert image.stat().st_size > 0
        # the save ran as a job: its progress was published while the call was running
        progress = ev.since(m, lambda msg: msg.get("kind") == "domain.job_progress")
        assert progress, "no job progress published during virDomainSave"
        assert [p["data"]["progress_seq"] for p in progress] == list(range(1, len(progress) + 1))
        for p in progress:
            assert p["object"]["domain"]["name"] == ALPHA and p["data"]["method"] == "virDomainSave"
            assert p["data"]["stats"]["type"] != 0 and "time_elapsed" in p["data"]["stats"]
        saved_xml = hv.call("virDomainSaveImageGetXMLDesc", file=str(image), flags=0)
        assert f"<name>{ALPHA}</name>" in saved_xml

        m = ev.mark()
        hv.call("virDomainRestore", **{"from": str(image)})
        ev.expect(m, about("domain", ALPHA, LIFE), [("STARTED", "RESTORED"), ("RESUMED", "FROM_SNAPSHOT")],
                  lifecycle_view)
        assert state(hv, alpha) == ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_RESTORED")
        assert console.count("BUSAGENT-BOOT") == boots  # the same guest, not a new boot
    finally:
        image.unlink(missing_ok=True)


def test_managed_save(hv, alpha):
    ev, console = hv.events, hv.console(ALPHA)
    boots = console.count("BUSAGENT-BOOT")
    life = about("domain", ALPHA, LIFE)
    m = ev.mark()
    hv.call("virDomainManagedSave", dom=alpha, flags=0)
    ev.expect(m, life, [("SUSPENDED", "PAUSED"), ("STOPPED", "SAVED")], lifecycle_view)
    assert hv.call("virDomainHasManagedSaveImage", dom=alpha, flags=0) == 1
    assert state(hv, alpha) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_SAVED")

    m = ev.mark()
    hv.call("virDomainCreate", domain=alpha)  # starts from the managed save image
    ev.expect(m, life, [("STARTED", "RESTORED"), ("RESUMED", "FROM_SNAPSHOT")], lifecycle_view)
    assert hv.call("virDomainHasManagedSaveImage", dom=alpha, flags=0) == 0
    assert state(hv, alpha) == ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_RESTORED")
    assert console.count("BUSAGENT-BOOT") == boots


def test_internal_snapshot_create_revert_delete(hv, alpha):
    ev = hv.events
    life = about("domain", ALPHA, LIFE)
    snap = {"domain": alpha, "name": "s1"}
    try:
        m = ev.mark()
        created = hv.call("virDomainSnapshotCreateXML", domain=alpha, flags=0,
                          xmlDesc="<domainsnapshot><name>s1</name><description>real</description></domainsnapshot>")
        assert created["name"] == "s1"
        # a running guest's internal snapshot pauses it while QEMU writes memory and disk state
        ev.expect(m, life, [("SUSPENDED", "PAUSED"), ("RESUMED", "UNPAUSED")], lifecycle_view, quiet=0.5)
        assert hv.call("virDomainSnapshotNum", domain=alpha, flags=0) == 1
        assert hv.call("virDomainSnapshotListNames", domain=alpha, flags=0) == ["s1"]
        xml = hv.call("virDomainSnapshotGetXMLDesc", snapshot=snap, flags=0)
        assert "<state>running</state>" in xml and "<description>real</description>" in xml
        assert "snapshot='internal'" in xml
        assert hv.call("virDomainSnapshotIsCurrent", snapshot=snap, flags=0) == 1

        m = ev.mark()
        hv.call("virDomainRevertToSnapshot", snapshot=snap, flags=0)
        # QEMU is restarted on the snapshot's state (loadvm), and the definition replaced by its own
        ev.expect(m, life, [("STOPPED", "FROM_SNAPSHOT"), ("STARTED", "FROM_SNAPSHOT"),
                            ("RESUMED", "FROM_SNAPSHOT"), ("DEFINED", "FROM_SNAPSHOT")], lifecycle_view, quiet=0.5)
        assert state(hv, alpha)[0] == "VIR_DOMAIN_RUNNING"

        hv.call("virDomainSnapshotDelete", snapshot=snap, flags=0)
        assert hv.call("virDomainSnapshotNum", domain=alpha, flags=0) == 0
    finally:
        try:
            hv.call("virDomainSnapshotDelete", snapshot=snap, flags=0)
        except Exception:  # noqa: BLE001 - deleted by the test
            pass
    hv.console(ALPHA).wait("BUSAGENT-READY")
