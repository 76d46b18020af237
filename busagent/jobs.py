"""Progress of long domain operations: while a job-running call (save, managed save, core
dump, migration, ...) runs, ``virDomainGetJobStats`` is sampled on a thread of its own and
published, so a controller sees progress rather than a silent wait."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import libvirt
import structlog

from busagent.api import refs
from busagent.api.marshal import to_json

log = structlog.get_logger("busagent.jobs")

# C functions that run a domain job for as long as the call lasts.
JOB_METHODS = frozenset({
    "virDomainSave", "virDomainSaveFlags", "virDomainSaveParams", "virDomainManagedSave",
    "virDomainCoreDump", "virDomainCoreDumpWithFormat", "virDomainMigrateToURI",
    "virDomainMigrateToURI2", "virDomainMigrateToURI3", "virDomainSnapshotCreateXML",
})

Publish = Callable[[str, dict[str, Any]], None]


class JobWatcher:
    """Samples the job of the domain a call works on, every ``interval`` seconds, while it runs."""

    def __init__(self, get_conn: Callable[[], libvirt.virConnect], publish: Publish, interval: float = 0.5) -> None:
        self.get_conn, self.publish, self.interval = get_conn, publish, interval

    @contextmanager
    def watch(self, method: str, domain_ref: Any, correlation_id: Any) -> Iterator[None]:
        if method not in JOB_METHODS or not isinstance(domain_ref, dict):
            yield
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

    def _poll(self, method: str, ref: dict[str, Any], correlation_id: str, done: threading.Event) -> None:
        try:
            dom = refs.resolve(self.get_conn(), "domain", ref)
            obj = refs.render(dom)
        except (libvirt.libvirtError, refs.BadReference):
            return  # the call itself reports what is wrong with the domain
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
