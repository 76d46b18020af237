"""Property snapshots of every object of a host, and their publication on the bus.

``ObjectCatalog`` reads the objects with libvirt-python (``listAll*`` calls, a few
per-object getters, no XML parsing). ``ObjectPublisher`` publishes them on
``<ns>.object.<host>.<kind>``: one object when an event says it changed, one
message per kind for a full snapshot (periodic, after a hypervisor reconnect),
and answers ``busagentResync``. Every libvirt call of the publisher runs on its
own worker thread, never on libvirt's event-loop thread nor on the reactor.

Messages (besides the stamp every published message carries)::

    {"kind": "domain", "host": H, "object": {...}, "reason": "domain.lifecycle"}
    {"kind": "domain", "host": H, "removed": true, "ref": {...}, "reason": "domain.lifecycle"}
    {"kind": "domain", "host": H, "objects": [{...}, ...], "snapshot": true, "reason": "periodic"}

A snapshot message holds every object of its kind: it replaces what a consumer knew.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import libvirt
import structlog

from busagent.api import refs
from busagent.api.apixml import load_api
from busagent.api.errors import Internal
from busagent.bus.topics import object_name
from busagent.client.view import identity

log = structlog.get_logger("busagent.objects")

KINDS = ("node", "domain", "storage_pool", "network", "interface", "node_device", "secret")
EVENT_FAMILIES = ("domain", "network", "storage_pool", "node_device", "secret")  # kinds events re-read

# "no such object" errors: the object is gone (anything else is a failure to read it)
GONE = frozenset(getattr(libvirt, name) for name in (
    "VIR_ERR_NO_DOMAIN", "VIR_ERR_NO_NETWORK", "VIR_ERR_NO_STORAGE_POOL", "VIR_ERR_NO_STORAGE_VOL",
    "VIR_ERR_NO_INTERFACE", "VIR_ERR_NO_NODE_DEVICE", "VIR_ERR_NO_SECRET") if hasattr(libvirt, name))

DOMAIN_INFO = ("state", "maxMem", "memory", "nrVirtCpu", "cpuTime")
NODE_INFO = ("model", "memory", "cpus", "mhz", "nodes", "sockets", "cores", "threads")
POOL_INFO = ("state", "capacity", "allocation", "available")
VOL_INFO = ("type", "capacity", "allocation")
L = libvirt


def _code(exc: libvirt.libvirtError) -> int | None:
    return exc.get_error_code()


def _safe(fn: Callable[[], Any], default: Any = None) -> Any:
    """``fn()``, or ``default`` when libvirt cannot say (but the object's disappearance propagates)."""
    try:
        return fn()
    except libvirt.libvirtError as exc:
        if _code(exc) in GONE:
            raise
        return default


def _each(items: Iterable[Any], build: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """``build`` every object, skipping those that vanish while being read."""
    out = []
    for item in items:
        try:
            out.append(build(item))
        except libvirt.libvirtError as exc:
            if _code(exc) not in GONE:
                raise
    return out


def _version(n: int | None) -> str | None:
    return None if n is None else f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


def _uuids(objs: Iterable[Any]) -> set[str]:
    return {o.UUIDString() for o in objs}


def _with_flags(list_all: Callable[[int], list[Any]], active: int, persistent: int,
                autostart: int) -> list[tuple[Any, bool, bool, bool]]:
    """Every object of a kind with its active/persistent/autostart flags: four list calls in all."""
    flagged = [_uuids(list_all(flag)) for flag in (active, persistent, autostart)]
    return [(o, *(o.UUIDString() in f for f in flagged)) for o in list_all(0)]


class ObjectCatalog:
    """Reads the properties of every object of one hypervisor connection (thread-safe)."""

    def __init__(self, get_conn: Callable[[], libvirt.virConnect]) -> None:
        self.get_conn = get_conn
        self.api = load_api()
        self.unsupported: dict[str, str] = {}  # kind -> why the driver has none
        by_lower = {t.lower(): t for t in self.api.enum_types}
        self._reason_enums = {  # domain state -> enum type of its reasons
            state: by_lower.get(f"virdomain{name[len('VIR_DOMAIN_'):].replace('_', '').lower()}reason")
            for state, name in self.api.enum_types.get("virDomainState", {}).items()}

    # -- public -------------------------------------------------------------------------------
    def snapshot(self, kinds: Iterable[str] = KINDS) -> dict[str, list[dict[str, Any]]]:
        """Every object of every kind the driver supports: kind -> list of objects.

        A kind whose driver answers VIR_ERR_NO_SUPPORT is left out (and noted in ``unsupported``).
        Raises libvirtError when the hypervisor cannot be read (never a partial kind).
        """
        conn = self.get_conn()
        out: dict[str, list[dict[str, Any]]] = {}
        for kind in kinds:
            try:
                out[kind] = getattr(self, f"_all_{kind}")(conn)
            except libvirt.libvirtError as exc:
                if _code(exc) != L.VIR_ERR_NO_SUPPORT:
                    raise
                self.unsupported[kind] = exc.get_error_message() or str(exc)
                continue
            self.unsupported.pop(kind, None)
        return out

    def describe(self, kind: str, ref: dict[str, Any]) -> dict[str, Any] | None:
        """One object's properties, or None when it is gone. Raises libvirtError otherwise."""
        conn = self.get_conn()
        if kind == "node":
            return self._node(conn)
        try:
            obj = refs.resolve(conn, kind, ref)
            return getattr(self, f"_one_{kind}")(obj)
        except libvirt.libvirtError as exc:
            if _code(exc) in GONE:
                return None
            raise

    # -- names --------------------------------------------------------------------------------
    def _named(self, fields: tuple[str, ...], values: Any, enums: dict[str, str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in zip(fields, values, strict=False):
            out[name] = value
            if name in enums:
                out[f"{name}_name"] = self.api.enum_name(enums[name], value)
        return out

    def _state_names(self, state: int, reason: int) -> dict[str, Any]:
        reason_enum = self._reason_enums.get(state)
        return {"state": state, "state_name": self.api.enum_name("virDomainState", state), "reason": reason,
                "reason_name": self.api.enum_name(reason_enum, reason) if reason_enum else None}

    # -- node ---------------------------------------------------------------------------------
    def _all_node(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        return [self._node(conn)]

    def _node(self, conn: libvirt.virConnect) -> dict[str, Any]:
        hostname = conn.getHostname()
        lib, hv = _safe(conn.getLibVersion), _safe(conn.getVersion)
        return {"ref": {"hostname": hostname}, "hostname": hostname, "uri": _safe(conn.getURI),
                "info": self._named(NODE_INFO, conn.getInfo(), {}),
                "libvirt": {"version": lib, "version_string": _version(lib)},
                "hypervisor": {"type": _safe(conn.getType), "version": hv, "version_string": _version(hv)}}

    # -- domains ------------------------------------------------------------------------------
    def _all_domain(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        doms = conn.listAllDomains(0)
        persistent = _uuids(conn.listAllDomains(L.VIR_CONNECT_LIST_DOMAINS_PERSISTENT))
        autostart = _uuids(conn.listAllDomains(L.VIR_CONNECT_LIST_DOMAINS_AUTOSTART))
        states: dict[str, tuple[int, int]] = {}
        try:  # one call for every domain's state and reason
            for dom, stats in conn.getAllDomainStats(L.VIR_DOMAIN_STATS_STATE, 0):
                states[dom.UUIDString()] = (stats.get("state.state"), stats.get("state.reason"))
        except libvirt.libvirtError as exc:
            if _code(exc) != L.VIR_ERR_NO_SUPPORT:
                raise

        def build(dom: libvirt.virDomain) -> dict[str, Any]:
            uuid = dom.UUIDString()
            st = states.get(uuid)
            if st is None or None in st:
                st = tuple(dom.state())
            return self._domain(dom, st, uuid in persistent, uuid in autostart)
        return _each(doms, build)

    def _one_domain(self, dom: libvirt.virDomain) -> dict[str, Any]:
        return self._domain(dom, tuple(dom.state()), bool(dom.isPersistent()), bool(dom.autostart()))

    def _domain(self, dom: libvirt.virDomain, state: tuple[int, ...], persistent: bool,
                autostart: bool) -> dict[str, Any]:
        ref = refs.render(dom)
        return {"ref": ref, **self._state_names(state[0], state[1]),
                "info": self._named(DOMAIN_INFO, dom.info(), {"state": "virDomainState"}),
                "active": ref["id"] != -1, "persistent": persistent, "autostart": autostart}

    # -- storage ------------------------------------------------------------------------------
    def _all_storage_pool(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        return _each(_with_flags(conn.listAllStoragePools, L.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE,
                                 L.VIR_CONNECT_LIST_STORAGE_POOLS_PERSISTENT,
                                 L.VIR_CONNECT_LIST_STORAGE_POOLS_AUTOSTART), lambda f: self._pool(*f))

    def _one_storage_pool(self, pool: libvirt.virStoragePool) -> dict[str, Any]:
        return self._pool(pool, bool(pool.isActive()), bool(pool.isPersistent()), bool(pool.autostart()))

    def _pool(self, pool: libvirt.virStoragePool, active: bool, persistent: bool, autostart: bool) -> dict[str, Any]:
        ref = refs.render(pool)
        info = self._named(POOL_INFO, pool.info(), {"state": "virStoragePoolState"})
        volumes: list[Any] = []
        if active:
            try:
                volumes = pool.listAllVolumes(0)
            except libvirt.libvirtError as exc:
                if _code(exc) != L.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                    raise
        return {"ref": ref, "info": info, "active": active, "persistent": persistent, "autostart": autostart,
                "volumes": _each(volumes, self._volume)}

    def _volume(self, vol: libvirt.virStorageVol) -> dict[str, Any]:
        return {"ref": refs.render(vol), "path": _safe(vol.path),
                "info": self._named(VOL_INFO, vol.info(), {"type": "virStorageVolType"})}

    # -- networks and interfaces --------------------------------------------------------------
    def _all_network(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        return _each(_with_flags(conn.listAllNetworks, L.VIR_CONNECT_LIST_NETWORKS_ACTIVE,
                                 L.VIR_CONNECT_LIST_NETWORKS_PERSISTENT, L.VIR_CONNECT_LIST_NETWORKS_AUTOSTART),
                     lambda f: self._network(*f))

    def _one_network(self, net: libvirt.virNetwork) -> dict[str, Any]:
        return self._network(net, bool(net.isActive()), bool(net.isPersistent()), bool(net.autostart()))

    def _network(self, net: libvirt.virNetwork, active: bool, persistent: bool, autostart: bool) -> dict[str, Any]:
        return {"ref": refs.render(net), "active": active, "persistent": persistent, "autostart": autostart,
                "bridge": _safe(net.bridgeName)}  # None when the network has no bridge

    def _all_interface(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        ifaces = conn.listAllInterfaces(0)
        active = {i.name() for i in conn.listAllInterfaces(L.VIR_CONNECT_LIST_INTERFACES_ACTIVE)}
        return _each(ifaces, lambda i: {"ref": refs.render(i), "active": i.name() in active})

    def _one_interface(self, iface: libvirt.virInterface) -> dict[str, Any]:
        return {"ref": refs.render(iface), "active": bool(iface.isActive())}

    # -- node devices and secrets -------------------------------------------------------------
    def _all_node_device(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        return _each(conn.listAllDevices(0), self._one_node_device)

    def _one_node_device(self, dev: libvirt.virNodeDevice) -> dict[str, Any]:
        return {"ref": refs.render(dev), "parent": _safe(dev.parent), "caps": _safe(dev.listCaps, [])}

    def _all_secret(self, conn: libvirt.virConnect) -> list[dict[str, Any]]:
        return _each(conn.listAllSecrets(0), self._one_secret)

    def _one_secret(self, secret: libvirt.virSecret) -> dict[str, Any]:
        ref = refs.render(secret)
        return {"ref": ref, "usage_type": ref["usageType"], "usage_id": ref["usageID"],
                "usage_type_name": self.api.enum_name("virSecretUsageType", ref["usageType"])}


class ObjectPublisher:
    """Publishes a catalog's objects on a bus; one worker thread does every libvirt read.

    Work, in order of priority: resync requests, a due full snapshot, changed objects
    (one per object however many events named it while it waited).
    """

    def __init__(self, catalog: ObjectCatalog, bus: Any, interval: float, resync_timeout: float = 60.0) -> None:
        self.catalog = catalog
        self.bus = bus
        self.host = bus.host_id
        self.namespace = bus.settings.namespace
        self.interval = interval
        self.resync_timeout = resync_timeout
        self._cond = threading.Condition()
        self._changes: collections.OrderedDict[tuple[str, str], tuple[str, dict[str, Any], str]] = \
            collections.OrderedDict()
        self._resyncs: collections.deque[Future] = collections.deque()
        self._snapshot_reason: str | None = None
        self._next_snapshot = time.monotonic() + interval
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="busagent-objects", daemon=True)
        self.published = collections.Counter()  # 'object' | 'removed' | 'snapshot'

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while self._resyncs:
            fut = self._resyncs.popleft()
            if not fut.done():
                fut.set_exception(Internal("the agent is stopping"))

    # -- requests (any thread; cheap) ---------------------------------------------------------
    def on_event(self, kind: str, ref: dict[str, Any], reason: str) -> None:
        """An event named an object of ``kind`` (libvirt's event-loop thread): re-read it soon."""
        if kind not in EVENT_FAMILIES:
            return
        key = (kind, identity(kind, ref))
        with self._cond:
            self._changes[key] = (kind, ref, reason)  # already waiting: still read once, latest reason
            self._cond.notify()

    def request_snapshot(self, reason: str) -> None:
        """Publish a full snapshot soon (e.g. after a hypervisor reconnect)."""
        with self._cond:
            self._snapshot_reason = reason
            self._cond.notify()

    def resync(self) -> dict[str, Any]:
        """``busagentResync`` (an RPC worker thread): the position, then every object.

        Runs on the objects worker, between two of its reads: every object message it
        published before is stamped before the position is taken (the reactor stamps the
        outbox in order), every later one is read after the snapshot. A consumer that
        seeds from the position and applies every later message ends with the agent's view.
        """
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                raise Internal("the agent is stopping")
            self._resyncs.append(fut)
            self._cond.notify()
        try:
            return fut.result(self.resync_timeout)
        except FutureTimeout:
            raise Internal(f"no snapshot within {self.resync_timeout} s") from None

    # -- the worker ---------------------------------------------------------------------------
    def _next_job(self) -> tuple[str, Any] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._resyncs:  # every waiting resync shares one position and snapshot
                    futures = list(self._resyncs)
                    self._resyncs.clear()
                    return "resync", futures
                now = time.monotonic()
                if self._snapshot_reason is not None or now >= self._next_snapshot:
                    reason, self._snapshot_reason = self._snapshot_reason or "periodic", None
                    self._next_snapshot = now + self.interval
                    return "snapshot", reason
                if self._changes:
                    return "change", self._changes.popitem(last=False)[1]
                self._cond.wait(self._next_snapshot - now)

    def _loop(self) -> None:
        while (job := self._next_job()) is not None:
            what, arg = job
            try:
                if what == "resync":
                    self._resync(arg)
                elif what == "snapshot":
                    self._publish_snapshot(arg)
                else:
                    self._publish_change(*arg)
            except libvirt.libvirtError as exc:
                log.warning("objects not read", job=what, error=exc.get_error_message() or str(exc))
            except Exception:
                log.exception("objects job failed", job=what)

    def _resync(self, futures: list[Future]) -> None:
        futures = [f for f in futures if f.set_running_or_notify_cancel()]
        if not futures:
            return
        try:
            position = self._position()
            objects = self.catalog.snapshot()
        except BaseException as exc:
            for fut in futures:
                fut.set_exception(exc)
            return
        for fut in futures:
            fut.set_result({"host": self.host, "position": position, "objects": objects,
                            "unsupported": dict(self.catalog.unsupported)})

    def _position(self, timeout: float = 10.0) -> dict[str, Any]:
        """The stamper's position, read on the reactor thread (after everything queued before)."""
        done, box = threading.Event(), []

        def read() -> None:
            box.append(self.bus.stamper.position())
            done.set()

        self.bus.engine.call_soon_threadsafe(read)
        deadline = time.monotonic() + timeout
        while not done.wait(0.2):
            if self._stopping or time.monotonic() > deadline:
                raise Internal("the bus did not answer (stopping?)")
        return box[0]

    def _publish(self, kind: str, doc: dict[str, Any]) -> None:
        self.bus.publish_threadsafe(object_name(self.namespace, self.host, kind), f"object.{kind}",
                                    {"kind": kind, "host": self.host, **doc})

    def _publish_change(self, kind: str, ref: dict[str, Any], reason: str) -> None:
        obj = self.catalog.describe(kind, ref)
        if obj is None:
            self._publish(kind, {"removed": True, "ref": ref, "reason": reason})
            self.published["removed"] += 1
        else:
            self._publish(kind, {"object": obj, "reason": reason})
            self.published["object"] += 1

    def _publish_snapshot(self, reason: str) -> None:
        """One message per kind, each with every object of that kind."""
        for kind, objects in self.catalog.snapshot().items():
            self._publish(kind, {"objects": objects, "snapshot": True, "reason": reason})
            self.published["snapshot"] += 1
