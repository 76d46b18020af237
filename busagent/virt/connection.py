"""The agent's hypervisor connection: opened once, kept open, reopened when it drops.

libvirt's close callback (and keepalive) only work through a daemon; with them, a
supervisor thread notices the loss, tells ``on_lost`` listeners, reconnects with
capped backoff and tells ``on_open`` listeners (which register events again and
publish a fresh snapshot). Drivers without a daemon (``test:///``) never drop.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

import libvirt
import structlog

log = structlog.get_logger("busagent.virt")


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; errors travel in replies instead."""


libvirt.registerErrorHandler(_quiet, None)

OpenListener = Callable[[libvirt.virConnect, int], None]
LostListener = Callable[[str], None]


class HypervisorConnection:
    """Thread-safe holder of one libvirt connection to ``uri``.

    ``readonly``: opened with ``virConnectOpenReadOnly`` (libvirt refuses every call that
    changes something with VIR_ERR_OPERATION_DENIED); the agent serves read-only roles'
    calls through one, supervised and reopened like the main connection.
    """

    def __init__(self, uri: str, readonly: bool = False, keepalive: tuple[int, int] = (5, 3)) -> None:
        self.uri = uri
        self.readonly = readonly
        self.keepalive = keepalive
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()  # held while opening
        self._state_lock = threading.Lock()  # guards the switch between connections (never held for I/O)
        self._alive = False
        self._lost = threading.Event()
        self._stopping = False
        self.generation = 0  # bumped at every (re)open
        self.on_open: list[OpenListener] = []
        self.on_lost: list[LostListener] = []
        self.losses = 0

    @property
    def alive(self) -> bool:
        return self._alive

    def open(self) -> libvirt.virConnect:
        """Open (or reopen) the connection; raises libvirtError when the hypervisor is unreachable.

        ``on_open`` listeners run with the new connection before the previous one is closed, so
        they can still release what they registered on it.
        """
        with self._lock:
            if self._conn is not None and self._alive:
                return self._conn
            opener = libvirt.openReadOnly if self.readonly else libvirt.open
            conn = opener(self.uri)
            generation = self.generation + 1
            try:
                conn.setKeepAlive(*self.keepalive)
            except libvirt.libvirtError:
                pass  # only remote connections have keepalive
            try:
                # the generation tells a late close callback of a replaced connection from a current one
                conn.registerCloseCallback(self._closed, generation)
            except libvirt.libvirtError:
                pass  # drivers without a remote transport have no close callback
            with self._state_lock:
                old, self._conn, self._alive = self._conn, conn, True
                self.generation = generation
                self._lost.clear()
        log.info("hypervisor connected", uri=self.uri, generation=generation, readonly=self.readonly)
        for listener in list(self.on_open):
            try:
                listener(conn, generation)
            except Exception:
                log.exception("on_open listener failed")
        if old is not None:
            _release(old)
        return conn

    def _closed(self, _conn: libvirt.virConnect, reason: int, generation: int) -> None:
        self._mark_lost(f"close callback, reason {reason}", generation)

    def _mark_lost(self, why: str, generation: int | None = None) -> None:
        """The connection (of ``generation``, default the current one) is gone: tell the listeners once."""
        with self._state_lock:
            if not self._alive or (generation is not None and generation != self.generation):
                return
            self._alive = False
            self.losses += 1
        log.warning("hypervisor connection lost", uri=self.uri, why=why, readonly=self.readonly)
        for listener in list(self.on_lost):
            try:
                listener(why)
            except Exception:
                log.exception("on_lost listener failed")
        self._lost.set()

    def get(self) -> libvirt.virConnect:
        """The live connection, reopened first if it dropped."""
        conn = self._conn
        if conn is not None and self._alive:
            return conn
        return self.open()

    def hostname(self) -> str:
        return self.get().getHostname()

    def start_supervisor(self, initial: float = 0.5, cap: float = 10.0) -> None:
        """Reconnect in the background whenever the connection is lost."""
        name = "libvirt-supervisor-ro" if self.readonly else "libvirt-supervisor"
        threading.Thread(target=self._supervise, args=(initial, cap), name=name,
                         daemon=True).start()

    def _supervise(self, initial: float, cap: float) -> None:
        while not self._stopping:
            self._lost.wait(1.0)
            if self._stopping or not self._lost.is_set():
                conn, generation = self._conn, self.generation
                if conn is not None and self._alive:  # keepalive failure without a close callback
                    try:
                        if not conn.isAlive():
                            self._mark_lost("isAlive() is false", generation)
                    except libvirt.libvirtError as exc:
                        self._mark_lost(str(exc), generation)
                continue
            delay = initial
            while not self._stopping and not self._alive:
                try:
                    self.open()
                except libvirt.libvirtError as exc:
                    log.warning("hypervisor reconnect failed", uri=self.uri, error=str(exc), retry_in=delay)
                    time.sleep(delay)
                    delay = min(cap, delay * 2)

    def close(self) -> None:
        self._stopping = True
        self._lost.set()
        with self._lock:
            with self._state_lock:
                conn, self._conn, self._alive = self._conn, None, False
            if conn is not None:
                _release(conn)


def _release(conn: libvirt.virConnect) -> None:
    """Close a connection we are done with, dropping our close callback first (it holds a reference
    on the connection, so closing alone would never free it)."""
    try:
        conn.unregisterCloseCallback()
    except libvirt.libvirtError:
        pass  # none registered (local driver), or the connection is already dead
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


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
