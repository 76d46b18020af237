"""Helpers for the end-to-end bus tests.

The agent's test:///default driver is shared by the whole session: every test
names its own objects uniquely (``uniq``) and registers how to remove them
(``cleanup``), which runs even when the test fails.

``libvirtd``: a private unprivileged libvirtd serving the test driver
(scripts/libvirtd-testdriver), for the tests of a hypervisor that goes away. The script
starts libvirtd in the background and exits, so the daemon is reparented; where PID 1 does
not reap orphans (some containers), a killed daemon stays a zombie that the script's
``kill -0`` takes for alive. The fixture therefore adopts the daemon (child subreaper while
the script runs) and reaps it itself.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from busagent.client import CallError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "libvirtd-testdriver"
PR_SET_CHILD_SUBREAPER = 36


class Cleanup:
    """Calls to make at teardown, last registered first; their errors are ignored."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.steps: list[tuple[str, dict[str, Any]]] = []

    def add(self, method: str, **args: Any) -> None:
        self.steps.append((method, args))

    def run(self) -> None:
        for method, args in reversed(self.steps):
            try:
                self.client.call(method, **args)
            except CallError:
                pass  # already gone, or never got that far


@pytest.fixture
def cleanup(client):
    c = Cleanup(client)
    yield c
    c.run()


@pytest.fixture
def uniq() -> Callable[[str], str]:
    """``uniq("dom")`` -> ``"dom-3f2a9c01d4"``: a name no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_domain_xml(name: str, memory_mib: int = 64, vcpus: int = 1) -> str:
    """A minimal guest the test driver accepts."""
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>{memory_mib}</memory>"
            f"<vcpu>{vcpus}</vcpu><os><type arch='i686'>hvm</type></os></domain>")


@pytest.fixture
def domain_xml():
    """``domain_xml(name, memory_mib=64, vcpus=1)``: a minimal guest definition."""
    return make_domain_xml


@pytest.fixture
def persistent_domain(client, cleanup, uniq):
    """A defined, not yet running, guest: its reference (by name)."""
    name = uniq("dom")
    client.call("virDomainDefineXML", xml=make_domain_xml(name))
    ref = {"name": name}
    cleanup.add("virDomainUndefineFlags", domain=ref,
                flags=["VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA"])
    cleanup.add("virDomainDestroy", domain=ref)
    return ref


@pytest.fixture
def running_domain(client, persistent_domain):
    """A defined guest, started."""
    client.call("virDomainCreate", domain=persistent_domain)
    return persistent_domain


class Libvirtd:
    """A private libvirtd (scripts/libvirtd-testdriver) that this process adopts and reaps."""

    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        self.pid: int | None = None
        self._reaper: threading.Thread | None = None
        self.uri = self.start()

    def start(self) -> str:
        libc = ctypes.CDLL(None, use_errno=True)
        adopted = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        try:
            out = subprocess.run([str(SCRIPT), "start", self.dir], capture_output=True, text=True, timeout=30)
        finally:
            if adopted:
                libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        assert out.returncode == 0, f"libvirtd-testdriver start failed: {out.stderr}"
        self.pid = int(Path(self.dir, "libvirtd.pid").read_text())
        self._reaper = threading.Thread(target=_reap, args=(self.pid,), daemon=True)
        self._reaper.start()
        return out.stdout.strip()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL, and wait until the daemon is gone (reaped)."""
        self.signal(signal.SIGKILL)
        self._reaper.join(10)
        assert not _running(self.pid), "killed libvirtd still around"

    def stop(self) -> None:
        if self.pid is not None and _running(self.pid):
            os.kill(self.pid, signal.SIGCONT)  # in case a test left it stopped
        subprocess.run([str(SCRIPT), "stop", self.dir], capture_output=True, timeout=30)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # not adopted (no subreaper support): init reaps it


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def libvirtd():
    workdir = tempfile.mkdtemp(prefix="ba-lvd-", dir="/tmp")  # short: unix socket paths are limited
    daemon = Libvirtd(workdir)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class TcpProxy:
    """A TCP relay to ``host:port`` (a broker) whose connections can be cut at once, and which can
    refuse new ones for a while: a network failure between an agent and its broker."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.refusing = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, broker_url: str) -> str:
        """``broker_url`` (credentials kept) through this relay."""
        parts = urlsplit(broker_url)
        return urlunsplit(parts._replace(netloc=f"{parts.netloc.rpartition('@')[0]}@127.0.0.1:{self.port}"))

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.refusing.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, refuse: bool = False) -> None:
        """Cut every relayed connection; with ``refuse``, close new ones too until ``accept()``."""
        if refuse:
            self.refusing.set()
        with self.lock:
            victims, self.sockets = self.sockets, []
        for s in victims:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def accept(self) -> None:
        self.refusing.clear()

    def close(self) -> None:
        self.server.close()
        self.cut()


@pytest.fixture
def tcp_proxies(broker_url):
    """Makes cuttable relays to the test broker (``make().url(broker_url)`` goes through one)."""
    parts, made = urlsplit(broker_url), []

    def make() -> TcpProxy:
        made.append(TcpProxy(parts.hostname, parts.port))
        return made[-1]

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def tcp_proxy(tcp_proxies):
    """A cuttable relay to the test broker: ``tcp_proxy.url(broker_url)`` goes through it."""
    return tcp_proxies()
