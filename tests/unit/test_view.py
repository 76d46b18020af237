"""The consumer's object view: upserts, removals, whole-kind snapshots, positions, gaps (pure)."""
from __future__ import annotations

import pytest

from busagent.client.view import FleetView, HostView, identity, is_object_message, live_hosts

TOPIC = "libvirt.object.h1.domain"


def dom(uuid: str, name: str, state: str = "VIR_DOMAIN_RUNNING") -> dict:
    return {"ref": {"uuid": uuid, "name": name, "id": 1}, "state_name": state}


def msg(n: int, epoch: str = "e1", host: str = "h1", kind: str = "domain", **body) -> dict:
    return {"kind": kind, "host": host, "topic": f"libvirt.object.{host}.{kind}", "epoch": epoch, "seq": n,
            "kind_seq": n, **body}


def reply(kind_seq: int, objects: dict, epoch: str = "e1", host: str = "h1") -> dict:
    return {"host": host, "position": {"epoch": epoch, "seq": 100, "kind_seq": {f"libvirt.object.{host}.domain":
                                                                              kind_seq}},
            "objects": objects}


def test_identity_keys():
    assert identity("domain", {"uuid": "u1", "name": "a", "id": 3}) == identity("domain", {"uuid": "u1", "name": "b"})
    assert identity("interface", {"name": "eth0", "mac": "x"}) == identity("interface", {"name": "eth0", "mac": "y"})
    assert identity("node_device", {"name": "pci_0"}) != identity("node_device", {"name": "pci_1"})
    assert identity("mystery", {"b": 1, "a": 2}) == identity("mystery", {"a": 2, "b": 1})


def test_upsert_remove_and_snapshot_replace():
    v = HostView("h1")
    assert v.apply(msg(1, object=dom("u1", "a")))
    assert v.apply(msg(2, object=dom("u2", "b")))
    assert v.apply(msg(3, object=dom("u1", "a", "VIR_DOMAIN_PAUSED")))
    assert v.get("domain", {"uuid": "u1"})["state_name"] == "VIR_DOMAIN_PAUSED"
    assert v.find("domain", name="b")["ref"]["uuid"] == "u2"
    assert v.apply(msg(4, removed=True, ref={"uuid": "u2", "name": "b", "id": -1}))
    assert v.find("domain", name="b") is None
    assert v.apply(msg(5, objects=[dom("u3", "c")], snapshot=True))  # a whole kind: replaces
    assert [o["ref"]["name"] for o in v.snapshot()["domain"]] == ["c"]
    assert v.kind_seq[TOPIC] == 5 and v.applied == 5


def test_removing_unknown_object_is_harmless():
    v = HostView("h1")
    assert v.apply(msg(1, removed=True, ref={"uuid": "nope"}))
    assert v.snapshot() == {}


def test_messages_at_or_before_the_resync_position_are_skipped():
    v = HostView("h1")
    v.load(reply(10, {"domain": [dom("u1", "a", "VIR_DOMAIN_PAUSED")], "node": []}))
    assert not v.stale and v.resyncs == 1
    assert not v.apply(msg(9, object=dom("u1", "a", "VIR_DOMAIN_RUNNING")))  # older than the snapshot
    assert not v.apply(msg(10, removed=True, ref={"uuid": "u1"}))
    assert v.get("domain", {"uuid": "u1"})["state_name"] == "VIR_DOMAIN_PAUSED" and v.skipped == 2
    assert v.apply(msg(11, object=dom("u1", "a", "VIR_DOMAIN_RUNNING")))
    assert v.get("domain", {"uuid": "u1"})["state_name"] == "VIR_DOMAIN_RUNNING"
    assert v.apply(msg(3, kind="network", object={"ref": {"uuid": "n1", "name": "net"}}))  # a topic not seeded


def test_new_epoch_marks_the_view_stale():
    v = HostView("h1")
    v.load(reply(10, {"domain": []}))
    assert v.apply(msg(1, epoch="e2", object=dom("u1", "a")))
    assert v.stale and v.epoch == "e2" and v.kind_seq == {TOPIC: 1}


def test_non_object_messages_are_ignored():
    fleet = FleetView()
    event = {"kind": "domain.lifecycle", "host": "h1", "topic": "libvirt.event.h1.domain.lifecycle",
             "epoch": "e1", "kind_seq": 1, "object": {"domain": {"uuid": "u1"}}, "data": {}}
    assert not is_object_message(event) and not fleet.apply(event)
    assert not fleet.apply({"kind": "presence", "host": "h1", "topic": "libvirt.presence.h1", "state": "alive"})
    assert fleet.hosts == {}


class FakeClient:
    def __init__(self, replies: list[dict]) -> None:
        self.replies, self.calls = replies, []

    def call(self, method: str, host: str | None = None, **args):
        self.calls.append((method, host))
        return self.replies.pop(0)


class FakeSubscription:
    def __init__(self, items: list[dict] | None = None) -> None:
        self.seeds, self.items = [], list(items or [])

    def seed(self, host: str, position: dict) -> None:
        self.seeds.append((host, position["epoch"], dict(position["kind_seq"])))

    def get(self, timeout: float | None = None) -> dict:
        import queue
        if not self.items:
            raise queue.Empty
        return self.items.pop(0)


def test_resync_loads_and_seeds():
    client, sub = FakeClient([reply(4, {"domain": [dom("u1", "a")]})]), FakeSubscription()
    fleet = FleetView(client, sub)
    view = fleet.resync(host="h1")
    assert client.calls == [("busagentResync", "h1")]
    assert sub.seeds == [("h1", "e1", {TOPIC: 4})]
    assert view is fleet.hosts["h1"] and view.find("domain", name="a")


def test_object_gap_resyncs_other_gaps_do_not():
    client = FakeClient([reply(4, {"domain": []}), reply(9, {"domain": [dom("u9", "z")]})])
    fleet = FleetView(client, FakeSubscription())
    fleet.resync(host="h1")
    assert not fleet.handle({"gap": {"host": "h1", "topic": "libvirt.event.h1.domain.lifecycle", "missed": 2,
                                     "restarted": False}})
    assert len(client.calls) == 1
    assert fleet.handle({"gap": {"host": "h1", "topic": TOPIC, "missed": 2, "restarted": False}})
    assert len(client.calls) == 2 and fleet.hosts["h1"].find("domain", name="z")
    assert not fleet.handle(msg(8, object=dom("u1", "stale")))  # revealed the gap, but older than the resync
    assert fleet.handle(msg(10, object=dom("u1", "new")))
    assert len(fleet.gaps) == 2


def test_first_message_of_an_unknown_host_resyncs_it():
    client = FakeClient([reply(5, {"domain": [dom("u1", "a"), dom("u2", "b")]}, host="h2")])
    fleet = FleetView(client)
    assert fleet.handle(msg(5, host="h2", object=dom("u1", "a")))
    assert client.calls == [("busagentResync", "h2")]
    assert len(fleet.hosts["h2"].snapshot()["domain"]) == 2 and not fleet.hosts["h2"].stale


def test_no_client_means_no_resync():
    fleet = FleetView()
    assert fleet.handle(msg(1, object=dom("u1", "a")))
    assert fleet.handle({"gap": {"host": "h1", "topic": TOPIC, "missed": 1}}) is False
    assert fleet.hosts["h1"].stale
    with pytest.raises(ValueError):
        fleet.resync(host="h1")


def test_follow_until():
    sub = FakeSubscription([msg(1, object=dom("u1", "a")), msg(2, object=dom("u2", "b"))])
    fleet = FleetView(subscription=sub, auto_resync=False)
    assert fleet.follow(until=lambda f: f.host("h1").find("domain", name="b") is not None, timeout=1)
    assert not fleet.follow(until=lambda f: False, timeout=0.1)


def test_live_hosts():
    presence = {
        "a": ({"host": "a", "state": "alive", "ttl": 15}, 100.0),
        "b": ({"host": "b", "state": "death", "ttl": 15}, 100.0),
        "c": ({"host": "c", "state": "birth", "ttl": 3}, 90.0),  # outlived its ttl
        "d": ({"host": "d", "state": "birth", "ttl": 15}, 104.0),
    }
    assert [(h["host"], h["age"]) for h in live_hosts(presence, now=105.0)] == [("a", 5.0), ("d", 1.0)]
