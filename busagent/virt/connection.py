"""The agent's hypervisor connection: opened once, kept open, reopened when it drops."""
from __future__ import annotations

import threading
import time

import libvirt
import structlog

log = structlog.get_logger("busagent.virt")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; errors travel in replies instead."""


libvirt.registerErrorHandler(_quiet, None)


class HypervisorConnection:
    """Thread-safe holder of one libvirt connection to ``uri``."""

    def __init__(self, uri: str, readonly: bool = False) -> None:
        self.uri = uri
        self.readonly = readonly
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        self._alive = False
        self.generation = 0  # bumped at every (re)open

    def open(self) -> libvirt.virConnect:
        """Open (or reopen) the connection; raises libvirtError when the hypervisor is unreachable."""
        with self._lock:
            if self._conn is not None and self._alive:
                return self._conn
            opener = libvirt.openReadOnly if self.readonly else libvirt.open
            conn = opener(self.uri)
            try:
                conn.registerCloseCallback(self._closed, None)
            except libvirt.libvirtError:
                pass  # drivers without a remote transport have no close callback
            self._conn, self._alive = conn, True
            self.generation += 1
            log.info("hypervisor connected", uri=self.uri, generation=self.generation)
            return conn

    def _closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        self._alive = False
        log.warning("hypervisor connection closed", uri=self.uri, reason=reason)

    def get(self) -> libvirt.virConnect:
        """The live connection, reopened first if it dropped."""
        conn = self._conn
        if conn is not None and self._alive:
            return conn
        return self.open()

    def hostname(self) -> str:
        return self.get().getHostname()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn, self._alive = None, False


def open_with_retry(hc: HypervisorConnection, attempts: int = 30, delay: float = 1.0) -> libvirt.virConnect:
    """Open at start-up, retrying while the hypervisor comes up."""
    for i in range(attempts):
        try:
            return hc.open()
        except libvirt.libvirtError as exc:
            if i == attempts - 1:
                raise
            log.warning("hypervisor not reachable yet", uri=hc.uri, error=str(exc))
            time.sleep(delay)
    raise RuntimeError("unreachable")
