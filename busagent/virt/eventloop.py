"""libvirt's default event loop on a daemon thread (needed before any callback registration)."""
from __future__ import annotations

import threading

import libvirt
import structlog

log = structlog.get_logger("busagent.virt")
_started = threading.Event()
_lock = threading.Lock()


def _run() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as exc:  # keep looping: a transient failure must not stop events
            log.warning("libvirt event loop iteration failed", error=str(exc))


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation once and run it on a thread.

    Must run before the first connection is opened so keepalive and callbacks work.
    """
    with _lock:
        if _started.is_set():
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run, name="libvirt-events", daemon=True).start()
        _started.set()
