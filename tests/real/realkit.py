"""Helpers for the real-hypervisor tests: the set-up's description, guest XML, the guests'
serial consoles, and recorders of what the agents publish.

The hypervisor is the private libvirtd of ``scripts/realhv`` (QEMU under TCG and LXC, in its own
mount and network namespaces); its ``env.json`` says where everything is.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from busagent.client.subscribe import Subscription

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = "/tmp/busagent-realhv"
NAT, ISO, POOL = "bv-nat", "bv-iso", "bv-images"  # the session's networks and image pool (conftest.hv)
ALPHA = "alpha"  # the session's guest
ALPHA_NAT_MAC, ALPHA_ISO_MAC = "52:54:00:b5:00:01", "52:54:00:b5:00:02"
BOOT_TIMEOUT = 90.0  # seconds for the tiny guest to reach BUSAGENT-READY (about 10 s here, TCG)


# -- the set-up ----------------------------------------------------------------------------------
def realhv_env() -> tuple[dict[str, Any] | None, str]:
    """(env.json of a running scripts/realhv, "") or (None, why there is none)."""
    if os.environ.get("BUSAGENT_REALHV_ERROR"):
        return None, f"scripts/realhv start failed: {os.environ['BUSAGENT_REALHV_ERROR']}"
    d = Path(os.environ.get("BUSAGENT_REALHV_DIR") or DEFAULT_DIR)
    path = d / "env.json"
    if not path.exists():
        return None, f"no real hypervisor: {path} does not exist (start one: scripts/realhv start {d})"
    env = json.loads(path.read_text())
    if not Path(f"/proc/{env['pid']}").exists():
        return None, f"no real hypervisor: libvirtd (pid {env['pid']}) of {d} is not running"
    try:
        libvirt.open(env["qemu_uri"]).close()
    except libvirt.libvirtError as exc:
        return None, f"no real hypervisor: {env['qemu_uri']}: {exc}"
    return env, ""


def required() -> bool:
    """scripts/test sets BUSAGENT_REAL_REQUIRED=1: there, a missing hypervisor is a failure."""
    return os.environ.get("BUSAGENT_REAL_REQUIRED") == "1"


# -- guests --------------------------------------------------------------------------------------
def qemu_guest_xml(env: dict[str, Any], name: str, *, disk: str | None = None, nics: tuple[tuple[str, str], ...] = (),
                   cdrom: bool = False, memory_mib: int = 128, vcpus: int = 1, max_vcpus: int = 2) -> str:
    """The tiny guest under TCG: direct kernel boot, serial console to a file, virtio everything.

    ``nics``: (network name, MAC) pairs; ``disk``: a qcow2 file for vda; ``cdrom``: an empty IDE
    drive (hdc) for media changes.
    """
    g = env["guest"]
    devices = []
    if disk:
        devices.append(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                       f"<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>")
    if cdrom:
        devices.append("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                       "<target dev='hdc' bus='ide'/><readonly/></disk>")
    for network, mac in nics:
        devices.append(f"<interface type='network'><source network='{network}'/><mac address='{mac}'/>"
                       f"<model type='virtio'/></interface>")
    devices.append(f"<serial type='file'><source path='{console_path(env, name)}' append='on'/>"
                   f"<target port='0'/></serial>")
    devices.append("<memballoon model='virtio'><stats period='1'/></memballoon>")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu placement='static' current='{vcpus}'>{max_vcpus}</vcpu>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>
    <topology sockets='{max_vcpus}' dies='1' cores='1' threads='1'/></cpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{g['kernel']}</kernel><initrd>{g['initrd']}</initrd>
    <cmdline>{g['cmdline']}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>{''.join(devices)}</devices>
</domain>"""


def lxc_container_xml(env: dict[str, Any], name: str) -> str:
    """A container whose init is busybox's sh on a pty, in the tiny guest's busybox root (read-only)."""
    return f"""<domain type='lxc'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type>exe</type><init>/bin/sh</init></os>
  <devices>
    <filesystem type='mount'><source dir='{env['guest']['lxcroot']}'/><target dir='/'/><readonly/></filesystem>
    <console type='pty'/>
  </devices>
</domain>"""


def console_path(env: dict[str, Any], name: str) -> str:
    return f"{env['console']}/{name}.log"


class Console:
    """A guest's serial console log (a file on this machine, written by QEMU)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, marker: str) -> int:
        return self.text().count(marker)

    def wait(self, marker: str, count: int = 1, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds until ``marker`` appeared ``count`` times; fails with the console's tail."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.count(marker) >= count:
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{marker!r} x{count} not on {self.path} within {timeout} s; "
                             f"console ends: {self.text()[-800:]!r}")


# -- what the agents publish ---------------------------------------------------------------------
class Recorder:
    """Keeps every message of one subscription, from before the first action on.

    Tests take a ``mark()`` before acting and look at what arrived after it, so one recorder
    serves the whole session and its stream stamps can be checked end to end (``check_stream``).
    """

    def __init__(self, url: str, patterns: list[str]) -> None:
        self.sub = Subscription(url, patterns)
        if not self.sub.ready.wait(15):
            raise RuntimeError(f"subscription {patterns} not attached")
        self.messages: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="real-recorder", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.sub.get(timeout=0.2)
            except queue.Empty:
                continue
            except Exception as exc:  # noqa: BLE001 - kept for the stream check
                self.errors.append(exc)
                return
            with self.cond:
                if "gap" in item:
                    self.gaps.append(item["gap"])
                else:
                    self.messages.append(item)
                self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.messages)

    def since(self, mark: int, match: Callable[[dict[str, Any]], bool] = lambda m: True) -> list[dict[str, Any]]:
        with self.cond:
            return [m for m in self.messages[mark:] if match(m)]

    def wait(self, mark: int, match: Callable[[dict[str, Any]], bool], count: int = 1,
             timeout: float = 30.0) -> list[dict[str, Any]]:
        """At least ``count`` matching messages after ``mark`` (all of them so far)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [m for m in self.messages[mark:] if match(m)]
                left = deadline - time.monotonic()
                if len(got) >= count or left <= 0:
                    return got
                self.cond.wait(left)

    def expect(self, mark: int, match: Callable[[dict[str, Any]], bool], expected: list[Any],
               view: Callable[[dict[str, Any]], Any], timeout: float = 30.0, quiet: float = 1.0,
               also: tuple[list[Any], ...] = ()) -> list[dict]:
        """Exactly ``expected`` (as seen through ``view``), in order, after ``mark``: waits for as many
        matching messages, then ``quiet`` seconds for any further one. ``also``: other sequences
        libvirt may equally produce (a documented race), accepted too."""
        accepted = [expected, *also]
        got = self.wait(mark, match, min(len(a) for a in accepted), timeout)
        if len(got) >= min(len(a) for a in accepted):
            deadline = time.monotonic() + timeout
            while [view(m) for m in got] not in accepted and len(got) < max(len(a) for a in accepted) \
                    and time.monotonic() < deadline:
                got = self.wait(mark, match, len(got) + 1, deadline - time.monotonic())
            time.sleep(quiet)
            got = self.since(mark, match)
        seen = [view(m) for m in got]
        assert seen in accepted, f"events after the action: {seen}, expected {' or '.join(map(str, accepted))}"
        return got

    def check_stream(self) -> None:
        """One epoch, seq strictly increasing, kind_seq without holes per topic, no gap reported."""
        assert not self.errors, f"subscription failed: {self.errors}"
        assert not self.gaps, f"gaps reported: {self.gaps}"
        with self.cond:
            msgs = list(self.messages)
        assert len({m["epoch"] for m in msgs}) <= 1
        seqs = [m["seq"] for m in msgs]
        assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False)), "seq not increasing"
        last: dict[str, int] = {}
        for m in msgs:
            if m["topic"] in last:
                assert m["kind_seq"] == last[m["topic"]] + 1, f"hole in kind_seq of {m['topic']}"
            last[m["topic"]] = m["kind_seq"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sub.close()


class Mirror:
    """What an independent libvirt connection is told, in order: the reference the bus must match.

    libvirtd sends every client the same events in the same order, so the agent's messages of
    these kinds (``bus_view``) must be exactly this list (``view``) at the end of the session.
    """

    DOMAIN = {"domain.lifecycle": "LIFECYCLE", "domain.reboot": "REBOOT", "domain.balloon_change": "BALLOON_CHANGE",
              "domain.device_added": "DEVICE_ADDED", "domain.device_removed": "DEVICE_REMOVED",
              "domain.tray_change": "TRAY_CHANGE"}
    KINDS = (*DOMAIN, "network.lifecycle", "storage_pool.lifecycle", "storage_pool.refresh")

    def __init__(self, uri: str) -> None:
        self.conn = libvirt.open(uri)  # the agent's process already runs libvirt's event loop
        self.events: list[tuple] = []
        self.lock = threading.Lock()
        self._ids: list[tuple[str, int]] = []
        for kind, name in self.DOMAIN.items():
            evid = getattr(libvirt, f"VIR_DOMAIN_EVENT_ID_{name}")
            self._ids.append(("domain", self.conn.domainEventRegisterAny(None, evid, self._on(kind), None)))
        self._ids.append(("network", self.conn.networkEventRegisterAny(
            None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, self._on("network.lifecycle"), None)))
        for kind, evid in (("storage_pool.lifecycle", libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE),
                           ("storage_pool.refresh", libvirt.VIR_STORAGE_POOL_EVENT_ID_REFRESH)):
            self._ids.append(("storage_pool", self.conn.storagePoolEventRegisterAny(None, evid, self._on(kind), None)))

    def _on(self, kind: str) -> Callable[..., None]:
        def callback(_conn: Any, obj: Any, *args: Any) -> None:
            payload = tuple(a for a in args[:-1])  # the last one is the opaque
            with self.lock:
                self.events.append((kind, obj.name(), *payload))
        return callback

    def mark(self) -> int:
        with self.lock:
            return len(self.events)

    def view(self, mark: int = 0, name: str | None = None) -> list[tuple]:
        with self.lock:
            return [e for e in self.events[mark:] if name is None or e[1] == name]

    @staticmethod
    def bus_view(m: dict[str, Any]) -> tuple:
        """A bus message in the mirror's terms: (kind, object name, payload in callback order)."""
        kind, data = m["kind"], m.get("data") or {}
        family = kind.split(".")[0]
        fields = {"lifecycle": ("event", "detail"), "reboot": (), "balloon_change": ("actual",),
                  "device_added": ("devAlias",), "device_removed": ("devAlias",),
                  "tray_change": ("devAlias", "reason"), "refresh": ()}[kind.split(".")[1]]
        return (kind, m["object"][family]["name"], *(data[f] for f in fields))

    def close(self) -> None:
        for family, cid in self._ids:
            deregister = {"domain": self.conn.domainEventDeregisterAny, "network": self.conn.networkEventDeregisterAny,
                          "storage_pool": self.conn.storagePoolEventDeregisterAny}[family]
            try:
                deregister(cid)
            except libvirt.libvirtError:
                pass
        self.conn.close()


# -- matching events -----------------------------------------------------------------------------
def about(family: str, name: str, kinds: tuple[str, ...] | None = None) -> Callable[[dict[str, Any]], bool]:
    """Events about the ``family`` object called ``name`` (of the given kinds)."""
    def match(m: dict[str, Any]) -> bool:
        return (m.get("object", {}).get(family, {}).get("name") == name
                and (kinds is None or m.get("kind") in kinds))
    return match


def lifecycle_view(m: dict[str, Any]) -> tuple[str, str | None]:
    """('STARTED', 'BOOTED') from a lifecycle event, checking its numbers against the binding."""
    data = m["data"]
    assert data["event"] == getattr(libvirt, data["event_name"])
    if data.get("detail_name") is not None:
        assert data["detail"] == getattr(libvirt, data["detail_name"])
    short = data["event_name"].removeprefix("VIR_DOMAIN_EVENT_").removeprefix("VIR_NETWORK_EVENT_") \
        .removeprefix("VIR_STORAGE_POOL_EVENT_")
    detail = data.get("detail_name")
    if detail is not None:
        detail = detail.removeprefix(data["event_name"] + "_")
    return short, detail


def event_view(m: dict[str, Any]) -> tuple:
    """(kind, payload summary): lifecycle events as ('STARTED', 'BOOTED'), others by their key fields."""
    kind = m["kind"]
    if kind.endswith(".lifecycle"):
        return (kind, *lifecycle_view(m))
    data = m.get("data", {})
    if kind == "domain.device_added" or kind == "domain.device_removed":
        return kind, data.get("devAlias")
    if kind == "domain.tray_change":
        return kind, data.get("devAlias"), data.get("reason_name", data.get("reason"))
    if kind == "domain.balloon_change":
        return kind, "actual"
    return (kind,)


def reason_name(state_name: str, reason: int) -> str:
    """VIR_DOMAIN_RUNNING, 1 -> VIR_DOMAIN_RUNNING_BOOTED (from the state's reason enum in libvirt-api.xml)."""
    from busagent.api.apixml import load_api

    word = state_name.removeprefix("VIR_DOMAIN_").lower().replace("nostate", "no_state")
    etype = "virDomain" + {"pmsuspended": "PMSuspended"}.get(word, "".join(
        p.capitalize() for p in word.split("_"))) + "Reason"
    return load_api().enum_types.get(etype, {}).get(reason, f"{etype}:{reason}")


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.25) -> Any:
    """Polls ``check`` until it returns something true; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


# -- calls and a second hypervisor ---------------------------------------------------------------
def call_with_id(client: Any, method: str, timeout: float = 120.0, **args: Any) -> tuple[Any, str]:
    """The result of a bus call and its message id (the ``correlation_id`` of the job progress
    messages the agent publishes about it)."""
    msg_id = client.new_message_id()
    return client.call_async(method, args, message_id=msg_id).result(timeout), str(msg_id)


class SecondHypervisor:
    """Another scripts/realhv (a directory, namespaces and libvirtd of its own) with a host UUID of its
    own, so libvirt accepts it as a migration destination: ``start()`` -> its env.json, ``stop()``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bvr2.", dir="/tmp"))  # short: it holds the socket

    def start(self) -> tuple[dict[str, Any] | None, str]:
        env = {**os.environ, "BUSAGENT_REALHV_HOST_UUID": str(uuid.uuid4())}
        proc = subprocess.run([str(REPO / "scripts" / "realhv"), "start", str(self.dir)], capture_output=True,
                              text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            return None, f"a second scripts/realhv did not start: {proc.stderr.strip()[-600:]}"
        return json.loads((self.dir / "env.json").read_text()), ""

    def stop(self) -> None:
        subprocess.run([str(REPO / "scripts" / "realhv"), "stop", str(self.dir)], capture_output=True, timeout=120,
                       stdin=subprocess.DEVNULL)
