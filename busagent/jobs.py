"""Progress of long domain operations, published while they run so a controller sees progress
rather than a silent wait:

* a job-running call (save, managed save, core dump, migration, ...) that lasts as long as the
  job: ``virDomainGetJobStats`` is sampled on a thread of its own while the call runs and
  published as ``domain.job_progress``;
* a block job (``virDomainBlockPull``/``Copy``/``Commit``/``Rebase``): the call returns at once and
  the job runs on in the hypervisor, so after a successful call ``virDomainGetBlockJobInfo`` is
  polled on a thread of its own and published as ``domain.block_job_progress`` until the job is
  gone (completed, failed or aborted: libvirt's ``domain.block_job``/``block_job_2`` events say
  which) or ready (``cur == end``: a copy or an active commit then mirrors until it is pivoted or
  aborted, which is the controller's call).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import structlog
from lxml import etree

from busagent.api import refs
from busagent.api.marshal import to_json

log = structlog.get_logger("busagent.jobs")

# C functions that start a block job and return at once; the job types each may start.
BLOCK_JOB_METHODS: dict[str, frozenset[int]] = {
    "virDomainBlockPull": frozenset({libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL}),
    "virDomainBlockRebase": frozenset({libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_PULL,
                                       libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY}),
    "virDomainBlockCopy": frozenset({libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY}),
    "virDomainBlockCommit": frozenset({libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COMMIT,
                                       libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT}),
}

# C functions that run a domain job for as long as the call lasts, and the block job starters.
JOB_METHODS = frozenset({
    "virDomainSave", "virDomainSaveFlags", "virDomainSaveParams", "virDomainManagedSave",
    "virDomainCoreDump", "virDomainCoreDumpWithFormat", "virDomainMigrateToURI",
    "virDomainMigrateToURI2", "virDomainMigrateToURI3", "virDomainSnapshotCreateXML",
    *BLOCK_JOB_METHODS,
})

BLOCK_JOB_TYPE_NAMES = {getattr(libvirt, n): n for n in dir(libvirt) if n.startswith("VIR_DOMAIN_BLOCK_JOB_TYPE_")
                        and n != "VIR_DOMAIN_BLOCK_JOB_TYPE_LAST"}

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)

Publish = Callable[[str, dict[str, Any]], None]


class JobWatcher:
    """Samples the job of the domain a call works on, every ``interval`` seconds, while it runs."""

    def __init__(self, get_conn: Callable[[], libvirt.virConnect], publish: Publish, interval: float = 0.5) -> None:
        self.get_conn, self.publish, self.interval = get_conn, publish, interval

    @contextmanager
    def watch(self, method: str, domain_ref: Any, correlation_id: Any, disk: str | None = None) -> Iterator[None]:
        """Around the call of ``method`` on ``domain_ref``. For a block job, ``disk`` (the call's
        argument) names the disk to follow; without it, every disk with a job of the method's kind
        once the call has returned."""
        if method not in JOB_METHODS or not isinstance(domain_ref, dict):
            yield
            return
        if method in BLOCK_JOB_METHODS:
            yield  # the call failed: it raised here, and there is no job to follow
            threading.Thread(target=self._poll_block, args=(method, domain_ref, str(correlation_id), disk),
                             name="block-job-watch", daemon=True).start()
            return
        done = threading.Event()
        thread = threading.Thread(target=self._poll, args=(method, domain_ref, str(correlation_id), done),
                                  name="job-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(self.interval * 4)

    def _domain(self, ref: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """The domain a call names and its reference as published; None when it does not resolve
        (the call itself reports what is wrong with it)."""
        try:
            dom = refs.resolve(self.get_conn(), "domain", ref)
            return dom, refs.render(dom)
        except (libvirt.libvirtError, refs.BadReference):
            return None

    def _poll(self, method: str, ref: dict[str, Any], correlation_id: str, done: threading.Event) -> None:
        found = self._domain(ref)
        if found is None:
            return
        dom, obj = found
        seq, started = 0, time.monotonic()
        while not done.wait(self.interval):
            try:
                stats = dom.jobStats()
            except libvirt.libvirtError:
                return  # the driver has no job statistics: nothing to report
            if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
                continue
            seq += 1
            self.publish("domain.job_progress", {"object": {"domain": obj}, "data": {
                "method": method, "correlation_id": correlation_id, "progress_seq": seq,
                "elapsed": round(time.monotonic() - started, 3), "stats": to_json(stats)}})

    def _poll_block(self, method: str, ref: dict[str, Any], correlation_id: str, disk: str | None) -> None:
        """``virDomainGetBlockJobInfo`` at once, then every ``interval``, until the job is gone or ready."""
        started = time.monotonic()
        found = self._domain(ref)
        if found is None:
            return
        dom, obj = found
        try:
            disks = [disk] if disk else disk_targets(dom.XMLDesc(0))
        except (libvirt.libvirtError, etree.XMLSyntaxError):
            return
        kinds = BLOCK_JOB_METHODS[method]
        watched: list[str] | None = None  # the disks whose job this call started, found at the first poll
        seq = 0
        while True:
            infos: dict[str, dict[str, Any]] = {}
            for name in watched if watched is not None else disks:
                try:
                    info = dom.blockJobInfo(name, 0)
                except libvirt.libvirtError as exc:
                    log.debug("block job progress: no job information", method=method, disk=name, error=str(exc))
                    info = {}
                if info and (watched is not None or info.get("type") in kinds):
                    infos[name] = info
            if watched is None:
                watched = list(infos)
            for name, info in infos.items():
                ready = bool(info.get("end")) and info.get("cur") == info.get("end")
                seq += 1
                self.publish("domain.block_job_progress", {"object": {"domain": obj}, "data": {
                    "method": method, "correlation_id": correlation_id, "progress_seq": seq, "disk": name,
                    "elapsed": round(time.monotonic() - started, 3), "ready": ready,
                    "type_name": BLOCK_JOB_TYPE_NAMES.get(info.get("type")), "info": to_json(info)}})
                if ready:
                    watched.remove(name)  # done, or mirroring until pivot/abort: nothing moves any more
            watched = [name for name in watched if name in infos]  # a job that is gone has ended
            if not watched:
                return
            time.sleep(self.interval)


def disk_targets(xml: str) -> list[str]:
    """The target names (``vda``, ``hdc``) of a domain's disks, from its XML."""
    root = etree.fromstring(xml.encode(), _PARSER)
    return [t.get("dev") for t in root.findall("./devices/disk/target") if t.get("dev")]
