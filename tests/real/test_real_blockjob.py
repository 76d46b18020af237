"""Block jobs on a real QEMU guest, started through the bus: their progress is published while
they run (``domain.block_job_progress``, from ``virDomainGetBlockJobInfo`` polled by the agent
after the call has returned), before libvirt's own completion event.

The guest ``bjob`` (the tiny guest, no NIC) has one disk ``vda``: a qcow2 overlay on a raw base
image of random data, so a pull has data to move; bandwidth limits stretch each job over a few
seconds. Both jobs that QEMU under TCG runs here are covered: a pull (it completes by itself) and
a copy (it becomes ready, the test pivots to the copy).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from realkit import about, call_with_id, qemu_guest_xml, wait_until

from busagent.client import CallError

NAME = "bjob"
DATA_MIB = 24
BANDWIDTH_MIB = 8  # MiB/s: a 24 MiB job takes about 3 s
PROGRESS = ("domain.block_job_progress",)
DONE = ("domain.block_job_2",)


@pytest.fixture
def bjob(hv):
    """``bjob`` running, with vda = overlay.qcow2 on base.raw (24 MiB of random data)."""
    if not shutil.which("qemu-img"):
        pytest.fail("qemu-img is not installed (scripts/realhv installs qemu-utils)")
    d = Path(hv.env["dir"]) / "blockjob"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    base, top = d / "base.raw", d / "overlay.qcow2"
    base.write_bytes(os.urandom(DATA_MIB << 20))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top)],
                   check=True, timeout=30)
    ref = {"name": NAME}
    with contextlib.suppress(CallError):
        hv.call("virDomainDestroy", domain=ref)
    with contextlib.suppress(CallError):
        hv.call("virDomainUndefine", domain=ref)
    hv.console(NAME).path.unlink(missing_ok=True)
    dom = hv.call("virDomainDefineXML", xml=qemu_guest_xml(hv.env, NAME, disk=str(top), memory_mib=96, max_vcpus=1))
    hv.call("virDomainCreate", domain=dom)
    try:
        yield {"ref": ref, "dir": d, "base": base, "top": top}
    finally:
        with contextlib.suppress(CallError):
            hv.call("virDomainBlockJobAbort", dom=ref, disk="vda", flags=0)
        with contextlib.suppress(CallError):
            hv.call("virDomainDestroy", domain=ref)
        with contextlib.suppress(CallError):
            hv.call("virDomainUndefine", domain=ref)
        shutil.rmtree(d, ignore_errors=True)


def check_progress(progress: list[dict], method: str, correlation_id: str, job_type: str) -> list[int]:
    """Sequence-numbered messages of this call about vda, cur never going back: the cur values."""
    assert [p["data"]["progress_seq"] for p in progress] == list(range(1, len(progress) + 1))
    for p in progress:
        data = p["data"]
        assert p["object"]["domain"]["name"] == NAME
        assert (data["method"], data["correlation_id"], data["disk"]) == (method, correlation_id, "vda")
        assert data["type_name"] == job_type and data["info"]["type"] == getattr(libvirt, job_type)
        assert data["info"]["end"] == DATA_MIB << 20 and data["info"]["bandwidth"] == BANDWIDTH_MIB
    curs = [p["data"]["info"]["cur"] for p in progress]
    assert curs == sorted(curs), f"cur went back: {curs}"
    return curs


def disk_source(hv, ref) -> str:
    xml = hv.call("virDomainGetXMLDesc", domain=ref, flags=0)
    disk = xml[xml.index("<disk type='file' device='disk'>"):]
    return disk[:disk.index("</disk>")]


def test_block_pull_progress(hv, bjob):
    ev, ref = hv.events, bjob["ref"]
    m = ev.mark()
    result, cid = call_with_id(hv.client, "virDomainBlockPull", dom=ref, disk="vda", bandwidth=BANDWIDTH_MIB, flags=0)
    assert result == 0
    done = ev.wait(m, about("domain", NAME, DONE), timeout=60)
    assert done, "no domain.block_job_2 event: the pull did not end within 60 s"
    assert done[0]["data"]["status_name"] == "VIR_DOMAIN_BLOCK_JOB_COMPLETED"
    assert done[0]["data"]["type_name"] == "VIR_DOMAIN_BLOCK_JOB_TYPE_PULL"
    progress = ev.since(m, about("domain", NAME, PROGRESS))
    curs = check_progress(progress, "virDomainBlockPull", cid, "VIR_DOMAIN_BLOCK_JOB_TYPE_PULL")
    # progress before the completion event, and moving: several distinct cur values below end
    before = [p["data"]["info"]["cur"] for p in progress if p["seq"] < done[0]["seq"]]
    moving = sorted({c for c in before if c < DATA_MIB << 20})
    assert len(moving) >= 3, f"cur values before completion: {before}"
    assert curs[0] < (DATA_MIB << 20) // 2, f"the first progress came late: {curs}"
    # the watcher stopped with the job: nothing after a short wait
    count = len(progress)
    time.sleep(1.0)
    assert len(ev.since(m, about("domain", NAME, PROGRESS))) == count
    assert "<backingStore/>" in disk_source(hv, ref), "the pulled disk still has a backing file"
    assert hv.call("virDomainGetBlockJobInfo", dom=ref, disk="vda", flags=0) in ({}, None, 0)


def test_block_copy_progress_until_ready(hv, bjob):
    ev, ref = hv.events, bjob["ref"]
    dest = bjob["dir"] / "copy.qcow2"
    m = ev.mark()
    result, cid = call_with_id(
        hv.client, "virDomainBlockCopy", dom=ref, disk="vda", params={"bandwidth": BANDWIDTH_MIB << 20},
        destxml=f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
        flags=["VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB"])
    assert result == 0
    ready = ev.wait(m, about("domain", NAME, DONE), timeout=60)
    assert ready, "no domain.block_job_2 event: the copy was not ready within 60 s"
    assert ready[0]["data"]["status_name"] == "VIR_DOMAIN_BLOCK_JOB_READY"
    # the watcher publishes until cur == end (ready), then stops: the copy mirrors until pivoted
    last = wait_until("a progress message saying ready", lambda: [
        p for p in ev.since(m, about("domain", NAME, PROGRESS)) if p["data"]["ready"]], timeout=10)
    progress = ev.since(m, about("domain", NAME, PROGRESS))
    assert progress[-1] is last[0] and len(last) == 1
    curs = check_progress(progress, "virDomainBlockCopy", cid, "VIR_DOMAIN_BLOCK_JOB_TYPE_COPY")
    assert curs[-1] == DATA_MIB << 20
    before = [p["data"]["info"]["cur"] for p in progress if p["seq"] < ready[0]["seq"]]
    assert len({c for c in before if c < DATA_MIB << 20}) >= 2, f"cur values before ready: {before}"

    m = ev.mark()
    hv.call("virDomainBlockJobAbort", dom=ref, disk="vda", flags=["VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT"])
    pivot = ev.wait(m, about("domain", NAME, DONE), timeout=30)
    assert pivot and pivot[0]["data"]["status_name"] == "VIR_DOMAIN_BLOCK_JOB_COMPLETED"
    assert f"<source file='{dest}'" in disk_source(hv, ref)
    assert not ev.since(m, about("domain", NAME, PROGRESS))
