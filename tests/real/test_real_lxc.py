"""An LXC container's lifecycle through a second agent, on the same private libvirtd (lxc+unix://).

The container's root is the tiny guest's busybox tree (read-only); its init is busybox's sh on
a pty. LXC has no ACPI and sh ignores SIGTERM as PID 1, so it is stopped with destroy.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from realkit import Recorder, about, lifecycle_view, lxc_container_xml, reason_name

from busagent.client import Client
from busagent.config import Settings
from busagent.testing import RunningAgent

LIFE = ("domain.lifecycle",)


@pytest.fixture(scope="module")
def lxc(realenv):
    settings = Settings(uri=realenv["lxc_uri"], host_id="real-lxc", sample_interval=3600.0,
                        metrics_listen="", snapshot_interval=3600.0)
    with RunningAgent(settings, with_stats=False) as running:
        client = Client(running.url, timeout=60)
        events = Recorder(running.url, [f"libvirt.event.{running.host_id}.#"])
        try:
            yield running, client, events
            events.check_stream()
        finally:
            events.close()
            client.close()


def children(ppid: int, argv0: bytes) -> list[int]:
    """Processes whose parent is ``ppid`` and whose argv[0] is ``argv0``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid and (stat.parent / "cmdline").read_bytes().split(b"\0")[0] == argv0:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def state(client, ref) -> tuple[str, str]:
    s = client.call("virDomainGetState", domain=ref, flags=0)
    return s["state_name"], reason_name(s["state_name"], s["reason"])


def test_container_lifecycle(lxc, realenv):
    running, client, ev = lxc
    name, ref = "gamma", {"name": "gamma"}
    life = about("domain", name, LIFE)
    assert client.call("virConnectGetType") == "LXC"
    try:
        m = ev.mark()
        dom = client.call("virDomainDefineXML", xml=lxc_container_xml(realenv, name))
        assert dom["name"] == name
        ev.expect(m, life, [("DEFINED", "ADDED")], lifecycle_view)
        assert "<type>exe</type>" in client.call("virDomainGetXMLDesc", domain=ref, flags=0) \
            or "<type arch=" in client.call("virDomainGetXMLDesc", domain=ref, flags=0)

        m = ev.mark()
        client.call("virDomainCreate", domain=ref)
        ev.expect(m, life, [("STARTED", "BOOTED")], lifecycle_view)
        assert state(client, ref) == ("VIR_DOMAIN_RUNNING", "VIR_DOMAIN_RUNNING_BOOTED")
        info = client.call("virDomainGetInfo", domain=ref)
        assert info["state_name"] == "VIR_DOMAIN_RUNNING" and info["maxMem"] == 65536
        # the id is the pid of the container's controller (libvirt_lxc); its child is the init
        dom_id = client.call("virDomainGetID", domain=ref)
        assert f"--name\0{name}\0".encode() in Path(f"/proc/{dom_id}/cmdline").read_bytes()
        assert children(dom_id, b"/bin/sh"), "no /bin/sh under the container's controller"

        m = ev.mark()
        client.call("virDomainSuspend", domain=ref)  # the freezer cgroup
        assert state(client, ref)[0] == "VIR_DOMAIN_PAUSED"
        client.call("virDomainResume", domain=ref)
        assert state(client, ref)[0] == "VIR_DOMAIN_RUNNING"
        ev.expect(m, life, [("SUSPENDED", "PAUSED"), ("RESUMED", "UNPAUSED")], lifecycle_view)

        m = ev.mark()
        client.call("virDomainDestroy", domain=ref)
        ev.expect(m, life, [("STOPPED", "DESTROYED")], lifecycle_view)
        assert state(client, ref) == ("VIR_DOMAIN_SHUTOFF", "VIR_DOMAIN_SHUTOFF_DESTROYED")

        m = ev.mark()
        client.call("virDomainUndefine", domain=ref)
        ev.expect(m, life, [("UNDEFINED", "REMOVED")], lifecycle_view)
        assert name not in [d["name"] for d in client.call("virConnectListAllDomains", flags=0)]
    finally:
        for method in ("virDomainDestroy", "virDomainUndefine"):
            try:
                client.call(method, domain=ref)
            except Exception:  # noqa: BLE001 - already gone
                pass
