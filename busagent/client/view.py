"""A consumer's view of hosts' objects, kept from object messages and ``busagentResync``.

An agent publishes on ``<ns>.object.<host>.<kind>`` (see busagent.objects):

* ``{"kind", "host", "object": {...}}``: upsert one object;
* ``{"kind", "host", "removed": true, "ref": {...}}``: remove one;
* ``{"kind", "host", "objects": [...], "snapshot": true}``: every object of that kind.

Objects are identified per kind by keys of their ``ref`` (``IDENTITY``). A resync
reply replaces a host's view and gives the stream position it reflects: messages
stamped at or before it are skipped, later ones applied (applying is idempotent).
Pure except ``FleetView.resync`` and ``FleetView.follow``, which use a client and a
subscription. Not thread-safe: feed a view from one thread.
"""
from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable
from typing import Any

# kind -> the ref keys that identify an object of that kind on its host
IDENTITY: dict[str, tuple[str, ...]] = {
    "node": ("hostname",),
    "domain": ("uuid",),
    "network": ("uuid",),
    "storage_pool": ("uuid",),
    "storage_vol": ("key",),
    "interface": ("name",),
    "node_device": ("name",),
    "secret": ("uuid",),
}


def identity(kind: str, ref: dict[str, Any]) -> str:
    """The key of an object of ``kind`` among its host's objects of that kind."""
    keys = IDENTITY.get(kind)
    if keys and all(k in ref for k in keys):
        return "\x1f".join(str(ref[k]) for k in keys)
    return json.dumps(ref, sort_keys=True)


def is_object_message(doc: dict[str, Any]) -> bool:
    topic = doc.get("topic")
    if isinstance(topic, str):
        parts = topic.split(".")
        return len(parts) > 1 and parts[1] == "object"
    return "kind" in doc and ("object" in doc or "objects" in doc or "removed" in doc)


def is_object_topic(topic: str | None) -> bool:
    return topic is None or (len(topic.split(".")) > 1 and topic.split(".")[1] == "object")


class HostView:
    """One host's objects: kind -> identity -> object, and the stream position they reflect."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.epoch: str | None = None
        self.kind_seq: dict[str, int] = {}  # topic -> last stamp the view reflects
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.unsupported: dict[str, str] = {}
        self.stale = True  # never loaded, or the agent restarted since: resync
        self.resyncs = 0
        self.applied = 0
        self.skipped = 0

    def load(self, reply: dict[str, Any]) -> None:
        """Replace everything with a ``busagentResync`` reply."""
        position = reply["position"]
        self.epoch = position["epoch"]
        self.kind_seq = dict(position.get("kind_seq", {}))
        self.objects = {kind: {identity(kind, o["ref"]): o for o in objs} for kind, objs in reply["objects"].items()}
        self.unsupported = dict(reply.get("unsupported", {}))
        self.stale = False
        self.resyncs += 1

    def apply(self, doc: dict[str, Any]) -> bool:
        """Apply one object message; False when the view already reflects it (or it is no object message)."""
        kind, topic, n, epoch = doc.get("kind"), doc.get("topic"), doc.get("kind_seq"), doc.get("epoch")
        if not isinstance(kind, str):
            return False
        if epoch is not None and self.epoch is not None and epoch != self.epoch:
            self.stale = True  # the agent restarted: what the view holds may be outdated
            self.kind_seq = {}
        elif isinstance(n, int) and topic in self.kind_seq and n <= self.kind_seq[topic]:
            self.skipped += 1
            return False
        if epoch is not None:
            self.epoch = epoch
        if "objects" in doc:
            self.objects[kind] = {identity(kind, o["ref"]): o for o in doc["objects"]}
        elif doc.get("removed"):
            self.objects.get(kind, {}).pop(identity(kind, doc["ref"]), None)
        elif "object" in doc:
            obj = doc["object"]
            self.objects.setdefault(kind, {})[identity(kind, obj["ref"])] = obj
        else:
            return False
        if isinstance(topic, str) and isinstance(n, int):
            self.kind_seq[topic] = n
        self.applied += 1
        return True

    def get(self, kind: str, ref: dict[str, Any]) -> dict[str, Any] | None:
        return self.objects.get(kind, {}).get(identity(kind, ref))

    def find(self, kind: str, **props: Any) -> dict[str, Any] | None:
        """The first object of ``kind`` whose ref has these values (``find("domain", name="test")``)."""
        for obj in self.objects.get(kind, {}).values():
            if all(obj["ref"].get(k) == v for k, v in props.items()):
                return obj
        return None

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """The view in the shape of a resync reply's ``objects`` (sorted by identity)."""
        return {kind: [objs[k] for k in sorted(objs)] for kind, objs in self.objects.items()}


class FleetView:
    """Every host's view, fed from a Subscription (``libvirt.object.#``); resyncs on gaps.

    ``client`` answers ``busagentResync``; ``subscription`` (optional) is seeded with the
    position of each resync so that its gap detection starts from there.
    """

    def __init__(self, client: Any = None, subscription: Any = None, auto_resync: bool = True) -> None:
        self.client = client
        self.subscription = subscription
        self.auto_resync = auto_resync
        self.hosts: dict[str, HostView] = {}
        self.gaps: list[dict[str, Any]] = []

    def host(self, host: str) -> HostView:
        view = self.hosts.get(host)
        if view is None:
            view = self.hosts[host] = HostView(host)
        return view

    def resync(self, client: Any = None, host: str | None = None) -> HostView:
        """Rebuild one host's view from ``busagentResync`` and seed the subscription's gap tracker."""
        client = client or self.client
        if client is None:
            raise ValueError("resync needs a client")
        reply = client.call("busagentResync", host=host)
        view = self.host(reply["host"])
        view.load(reply)
        if self.subscription is not None:
            self.subscription.seed(reply["host"], reply["position"])
        return view

    def apply(self, doc: dict[str, Any]) -> bool:
        """Apply one object message (others are ignored)."""
        host = doc.get("host")
        if not isinstance(host, str) or not is_object_message(doc):
            return False
        return self.host(host).apply(doc)

    def handle(self, item: dict[str, Any]) -> bool:
        """One item of a Subscription: a gap report (resync when it concerns objects) or a message.

        Returns whether the view changed. Resync failures propagate; the host stays stale and
        the next message tries again.
        """
        gap = item.get("gap")
        if isinstance(gap, dict):
            self.gaps.append(gap)
            host = gap.get("host")
            if isinstance(host, str) and (gap.get("restarted") or is_object_topic(gap.get("topic"))):
                self.host(host).stale = True
                return self._maybe_resync(host)
            return False
        changed = self.apply(item)
        host = item.get("host")
        if isinstance(host, str) and host in self.hosts and self.hosts[host].stale and is_object_message(item):
            changed = self._maybe_resync(host) or changed
        return changed

    def _maybe_resync(self, host: str) -> bool:
        if not self.auto_resync or self.client is None:
            return False
        self.resync(host=host)
        return True

    def follow(self, until: Callable[[FleetView], bool] | None = None, timeout: float | None = None) -> bool:
        """Handle the subscription's items until ``until(self)`` holds (True) or ``timeout`` passes (False)."""
        if self.subscription is None:
            raise ValueError("follow needs a subscription")
        deadline = None if timeout is None else time.monotonic() + timeout
        if until is not None and until(self):
            return True
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                item = self.subscription.get(timeout=remaining)
            except queue.Empty:
                return False
            self.handle(item)
            if until is not None and until(self):
                return True


def live_hosts(presence: dict[str, tuple[dict[str, Any], float]], now: float | None = None) -> list[dict[str, Any]]:
    """Hosts alive by their latest presence message: host -> (message, monotonic time received).

    A host is live unless its last word was ``death`` or that word outlived its ``ttl``.
    """
    now = time.monotonic() if now is None else now
    out = []
    for host in sorted(presence):
        doc, received = presence[host]
        if doc.get("state") == "death":
            continue
        ttl = doc.get("ttl")
        if isinstance(ttl, (int, float)) and received + ttl < now:
            continue
        out.append({**doc, "age": round(now - received, 3)})
    return out
