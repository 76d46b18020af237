"""The statistics sampler: one thread, a drift-free period, one bulk libvirt call per tick.

Each tick takes every domain's statistics with ONE ``virConnectGetAllDomainStats`` call
(``NOWAIT`` when the driver accepts it), plus the node's CPU and memory, the storage
pools and the networks, and swaps in an immutable ``Sample`` that the Prometheus
collector and the bus publisher read; neither ever calls libvirt.

A call that does not come back is never waited for past its deadline: every libvirt
call runs on a helper thread. When the bulk call misses its deadline (a domain whose
monitor hangs, on a driver without ``NOWAIT``), the tick falls back to one call per
domain, each with its own deadline; the domains that miss it keep their previous
statistics and are reported ``stale``. A call still hung at the next tick is not
repeated on top of itself.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import libvirt
import structlog

log = structlog.get_logger("busagent.sampler")

NOWAIT = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
_UNSUPPORTED = {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
                getattr(libvirt, "VIR_ERR_OPERATION_UNSUPPORTED", 84)}
KINDS = ("domain", "node", "storage_pool", "network")
MAX_DOMAINS_PER_MESSAGE = 500
FALLBACK_CONCURRENCY = 8


class DeadlineExceeded(Exception):
    """A libvirt call did not return within its deadline (it keeps running on its own thread)."""


class HypervisorUnavailable(Exception):
    """No live hypervisor connection to sample (the supervisor is reconnecting)."""


@dataclass(frozen=True)
class DomainStats:
    """One domain's statistics as libvirt returned them (``state.state``, ``cpu.time``, ...)."""

    name: str
    uuid: str
    stats: Mapping[str, Any]
    taken: float  # wall-clock time the statistics were read


@dataclass(frozen=True)
class Sample:
    """Everything one tick read. Immutable: readers share it without locks."""

    timestamp: float  # wall clock at the start of the tick
    duration: float  # seconds the tick took
    domains: tuple[DomainStats, ...] = ()
    node: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    pools: tuple[Mapping[str, Any], ...] = ()
    networks: tuple[Mapping[str, Any], ...] = ()
    stale: frozenset[str] = frozenset()  # uuids whose statistics are left over from an earlier tick
    ok: bool = True  # the domain statistics were read (in bulk or domain by domain)
    mode: str = "bulk"  # 'bulk' | 'per-domain' | 'failed'
    errors: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # section -> why

    def age_of(self, dom: DomainStats) -> float:
        """How old ``dom``'s statistics were when this sample was taken (0 unless stale)."""
        return max(0.0, self.timestamp - dom.taken) if dom.uuid in self.stale else 0.0


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


class _Call:
    """One libvirt call on its own daemon thread, so that its caller can stop waiting."""

    __slots__ = ("done", "result", "error", "started", "_notify")

    def __init__(self, fn: Callable[[], Any], notify: threading.Condition | None = None) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self._notify = notify
        threading.Thread(target=self._run, args=(fn,), name="busagent-sample-call", daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # handed to the waiter
            self.error = exc
        finally:
            self.done.set()
            if self._notify is not None:
                with self._notify:
                    self._notify.notify_all()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class SamplerCounters:
    """What the sampler did, for the metrics endpoint (read without a lock: plain ints)."""

    ticks: int = 0
    missed_ticks: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)  # section -> count
    timeouts: collections.Counter = field(default_factory=collections.Counter)  # section -> count
    fallbacks: int = 0  # ticks that sampled domain by domain
    last_duration: float = 0.0


def stats_groups() -> dict[str, int]:
    """libvirt's domain statistics groups by the name ``virsh domstats`` gives them (``cpu-total``,
    ``balloon``, ...) -> their VIR_DOMAIN_STATS_* flag, from the binding's constants."""
    return {name[len("VIR_DOMAIN_STATS_"):].lower().replace("_", "-"): getattr(libvirt, name)
            for name in dir(libvirt) if name.startswith("VIR_DOMAIN_STATS_")}


def stats_flags(groups: Iterable[str]) -> int:
    """The ``stats`` argument of virConnectGetAllDomainStats for ``groups`` (none: 0 = every group
    the driver has). Raises ValueError naming an unknown group."""
    known, flags = stats_groups(), 0
    for group in groups:
        if group not in known:
            raise ValueError(f"unknown statistics group {group!r}: the groups are {', '.join(sorted(known))}")
        flags |= known[group]
    return flags


class Sampler:
    """Samples the hypervisor every ``interval`` seconds on one thread.

    ``get_conn`` returns the live connection (or raises ``HypervisorUnavailable``);
    ``on_sample`` is called with each new Sample on the sampler thread.
    """

    def __init__(self, get_conn: Callable[[], Any], interval: float,
                 on_sample: Callable[[Sample], None] | None = None, call_timeout: float | None = None,
                 domain_timeout: float | None = None, concurrency: int = FALLBACK_CONCURRENCY,
                 stats: int = 0) -> None:
        self.get_conn = get_conn
        self.stats = stats  # VIR_DOMAIN_STATS_* groups asked for (0: every group the driver has)
        self.interval = interval
        self.on_sample = on_sample
        self.call_timeout = call_timeout if call_timeout is not None else max(0.5, min(5.0, interval / 2))
        self.domain_timeout = domain_timeout if domain_timeout is not None else min(2.0, self.call_timeout)
        self.concurrency = concurrency
        self.counters = SamplerCounters()
        self._latest: Sample | None = None
        self._nowait: bool | None = None if NOWAIT else False  # None: not tried yet
        self._unsupported: set[str] = set()  # node calls the driver refused once
        self._hung: dict[str, _Call] = {}  # section or 'domain:<uuid>' -> a call that missed its deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------
    @property
    def latest(self) -> Sample | None:
        """The newest sample (an atomic reference read)."""
        return self._latest

    @property
    def nowait(self) -> bool | None:
        """Whether the bulk call uses ``NOWAIT`` (None until the first call)."""
        return self._nowait

    # -- thread ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = threading.Event()  # its own: a thread still finishing a tick after stop() stays stopped
        self._thread = threading.Thread(target=self._run, args=(self._stop,), name="busagent-sampler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self.call_timeout + 1.0)

    def _run(self, stop: threading.Event) -> None:
        deadline = time.monotonic()  # first tick at once, then every interval after it
        while not stop.is_set():
            wait = deadline - time.monotonic()
            if wait > 0 and stop.wait(wait):
                return
            try:
                self.sample_once()
            except Exception:  # never let one bad tick end the thread
                log.exception("sampler tick failed")
            deadline += self.interval
            now = time.monotonic()
            if now > deadline:  # the tick overran: skip the ticks it missed, keep the phase
                missed = int((now - deadline) // self.interval) + 1
                self.counters.missed_ticks += missed
                deadline += missed * self.interval
                log.warning("sampler missed ticks", missed=missed, interval=self.interval)

    # -- one tick --------------------------------------------------------------------------
    def sample_once(self) -> Sample:
        """Take one sample now (the sampler thread, or a test), publish it, and return it."""
        with self._tick_lock:
            sample = self._take()
            self._latest = sample
            self.counters.ticks += 1
            self.counters.last_duration = sample.duration
        if self.on_sample is not None:
            try:
                self.on_sample(sample)
            except Exception:
                log.exception("publishing a sample failed")
        return sample

    def _take(self) -> Sample:
        started, wall = time.monotonic(), time.time()
        previous = self._latest
        errors: dict[str, str] = {}
        try:
            conn = self.get_conn()
        except Exception as exc:  # hypervisor down: everything we had is now stale
            self._fail("domain", errors, exc)
            return self._stale_sample(previous, wall, time.monotonic() - started, errors)
        for key in [k for k, call in self._hung.items() if call.done.is_set()]:
            del self._hung[key]  # returned late since: its result is dropped, the next call may go
        domains, stale, mode = self._domains(conn, previous, wall, errors, started)
        node = self._section("node", lambda: self._node(conn), errors)
        pools = self._section("storage_pool", lambda: self._pools(conn), errors)
        networks = self._section("network", lambda: self._networks(conn), errors)
        if node is None:
            node = previous.node if previous is not None else MappingProxyType({})
        if pools is None:
            pools = previous.pools if previous is not None else ()
        if networks is None:
            networks = previous.networks if previous is not None else ()
        return Sample(timestamp=wall, duration=time.monotonic() - started, domains=domains, node=node, pools=pools,
                      networks=networks, stale=stale, ok=mode != "failed", mode=mode,
                      errors=MappingProxyType(errors))

    def _stale_sample(self, previous: Sample | None, wall: float, duration: float, errors: dict[str, str]) -> Sample:
        if previous is None:
            return Sample(timestamp=wall, duration=duration, ok=False, mode="failed", errors=MappingProxyType(errors))
        return Sample(timestamp=wall, duration=duration, domains=previous.domains, node=previous.node,
                      pools=previous.pools, networks=previous.networks,
                      stale=frozenset(d.uuid for d in previous.domains), ok=False, mode="failed",
                      errors=MappingProxyType(errors))

    def _fail(self, section: str, errors: dict[str, str], exc: BaseException) -> None:
        if isinstance(exc, DeadlineExceeded):
            self.counters.timeouts[section] += 1
        self.counters.failures[section] += 1
        errors[section] = str(exc) or type(exc).__name__
        log.warning("sampling failed", section=section, error=errors[section])

    def _guarded(self, key: str, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on a helper thread; raise DeadlineExceeded if it is late or still hung from before."""
        hung = self._hung.get(key)
        if hung is not None:
            if not hung.done.is_set():
                raise DeadlineExceeded(f"{key}: the previous call has not returned for "
                                       f"{time.monotonic() - hung.started:.1f} s")
            del self._hung[key]
        call = _Call(fn)
        if not call.done.wait(timeout):
            self._hung[key] = call
            raise DeadlineExceeded(f"{key}: no answer within {timeout:g} s")
        return call.outcome()

    def _section(self, section: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
        try:
            return self._guarded(section, fn, self.call_timeout)
        except Exception as exc:
            self._fail(section, errors, exc)
            return None

    # -- domains ---------------------------------------------------------------------------
    def _bulk(self, conn: Any) -> list[tuple[Any, dict[str, Any]]]:
        """``virConnectGetAllDomainStats`` for every domain; learns once whether NOWAIT is accepted."""
        if self._nowait is not False:
            try:
                result = conn.getAllDomainStats(self.stats, NOWAIT)
            except libvirt.libvirtError as exc:
                if self._nowait is None and exc.get_error_code() in _UNSUPPORTED:
                    self._nowait = False
                    log.info("the driver refuses NOWAIT: bulk statistics without it", error=str(exc))
                    return conn.getAllDomainStats(self.stats, 0)
                raise
            self._nowait = True
            return result
        return conn.getAllDomainStats(self.stats, 0)

    def _domains(self, conn: Any, previous: Sample | None, wall: float, errors: dict[str, str],
                 started: float) -> tuple[tuple[DomainStats, ...], frozenset[str], str]:
        try:
            records = self._guarded("domain", lambda: self._bulk(conn), self.call_timeout)
            taken = time.time()
            return tuple(DomainStats(dom.name(), dom.UUIDString(), _frozen(stats), taken)
                         for dom, stats in records), frozenset(), "bulk"
        except Exception as exc:
            self._fail("domain", errors, exc)
        self.counters.fallbacks += 1
        try:
            return self._per_domain(conn, previous, wall, started)
        except Exception as exc:
            self._fail("domain_list", errors, exc)
            stale = self._stale_sample(previous, wall, 0.0, errors)
            return stale.domains, stale.stale, "failed"

    def _per_domain(self, conn: Any, previous: Sample | None, wall: float,
                    started: float) -> tuple[tuple[DomainStats, ...], frozenset[str], str]:
        """One ``virDomainListGetStats`` per domain, several at once, each with its own deadline."""
        doms = self._guarded("domain_list", lambda: conn.listAllDomains(0), self.call_timeout)
        before = {d.uuid: d for d in previous.domains} if previous is not None else {}
        flags = NOWAIT if self._nowait else 0
        budget_end = started + max(self.interval * 0.9, self.call_timeout)
        results: dict[str, DomainStats] = {}
        stale: set[str] = set()
        pending = collections.deque()
        for dom in doms:
            uuid = dom.UUIDString()
            hung = self._hung.get(f"domain:{uuid}")
            if hung is not None and not hung.done.is_set():
                stale.add(uuid)  # still stuck since an earlier tick: do not pile another call on it
                continue
            self._hung.pop(f"domain:{uuid}", None)
            pending.append((dom, uuid))
        names = {dom.UUIDString(): dom.name() for dom in doms}
        cond = threading.Condition()
        running: dict[str, _Call] = {}
        while pending or running:
            while pending and len(running) < self.concurrency and time.monotonic() < budget_end:
                dom, uuid = pending.popleft()
                running[uuid] = _Call(lambda d=dom: conn.domainListGetStats([d], self.stats, flags), cond)
            if pending and time.monotonic() >= budget_end:
                stale.update(uuid for _, uuid in pending)  # out of time for this tick
                pending.clear()
            now = time.monotonic()
            for uuid, call in list(running.items()):
                if call.done.is_set():
                    del running[uuid]
                    try:
                        records = call.outcome()
                    except libvirt.libvirtError as exc:
                        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                            continue  # gone since the list was taken
                        stale.add(uuid)
                        self.counters.failures["domain_one"] += 1
                        continue
                    for dom, stats in records:
                        results[uuid] = DomainStats(dom.name(), uuid, _frozen(stats), time.time())
                elif now - call.started > self.domain_timeout or now >= budget_end:
                    del running[uuid]
                    self._hung[f"domain:{uuid}"] = call
                    self.counters.timeouts["domain_one"] += 1
                    stale.add(uuid)
            if running:
                oldest = min(c.started for c in running.values())
                wait = max(0.001, min(oldest + self.domain_timeout, budget_end) - time.monotonic())
                with cond:
                    if not any(c.done.is_set() for c in running.values()):
                        cond.wait(wait)
        out: list[DomainStats] = []
        kept: set[str] = set()
        for dom in doms:
            uuid = dom.UUIDString()
            if uuid in results:
                out.append(results[uuid])
            elif uuid in stale and uuid in before:
                out.append(before[uuid])
                kept.add(uuid)
            elif uuid in stale:  # never sampled: its name only, no statistics yet (stale since now)
                out.append(DomainStats(names[uuid], uuid, MappingProxyType({}), wall))
                kept.add(uuid)
        if stale:
            log.warning("domains without fresh statistics", stale=len(stale), total=len(doms))
        return tuple(out), frozenset(kept), "per-domain"

    # -- node, pools, networks -------------------------------------------------------------
    def _optional(self, name: str, fn: Callable[[], Any]) -> Any:
        """A node call some drivers lack: asked once, then never again if unsupported."""
        if name in self._unsupported:
            return None
        try:
            return fn()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _UNSUPPORTED:
                self._unsupported.add(name)
                return None
            raise

    def _node(self, conn: Any) -> Mapping[str, Any]:
        model, memory_mib, cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()[:8]
        node: dict[str, Any] = {"model": model, "memory_bytes": memory_mib * 1024 * 1024, "cpus": cpus, "mhz": mhz,
                                "numa_nodes": nodes, "sockets": sockets, "cores": cores, "threads": threads}
        cpu = self._optional("cpu", lambda: conn.getCPUStats(libvirt.VIR_NODE_CPU_STATS_ALL_CPUS, 0))
        if cpu:
            node["cpu"] = dict(cpu)  # nanoseconds by mode (user, kernel, idle, iowait, ...)
        memory = self._optional("memory", lambda: conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0))
        if memory:
            node["memory"] = dict(memory)  # KiB (total, free, buffers, cached)
        return _frozen(node)

    def _pools(self, conn: Any) -> tuple[Mapping[str, Any], ...]:
        out = []
        for pool in conn.listAllStoragePools(0):
            state, capacity, allocation, available = pool.info()[:4]
            out.append(_frozen({"name": pool.name(), "uuid": pool.UUIDString(), "state": state,
                                "capacity": capacity, "allocation": allocation, "available": available}))
        return tuple(out)

    def _networks(self, conn: Any) -> tuple[Mapping[str, Any], ...]:
        out = []
        for flag, active in ((libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE, True),
                             (libvirt.VIR_CONNECT_LIST_NETWORKS_INACTIVE, False)):
            out.extend(_frozen({"name": net.name(), "uuid": net.UUIDString(), "active": active})
                       for net in conn.listAllNetworks(flag))
        return tuple(out)


# -- what goes on the bus ------------------------------------------------------------------
def batches(sample: Sample, host: str, max_domains: int = MAX_DOMAINS_PER_MESSAGE) -> Iterable[tuple[str, dict]]:
    """(kind, document) messages for one sample: one per kind, domains chunked by ``max_domains``."""
    # "timestamp" is the publish stamp (added by the bus); "sampled_at" is when this sample was taken
    head = {"host": host, "sampled_at": sample.timestamp, "duration": sample.duration}
    domains = [{"name": d.name, "uuid": d.uuid, "stale": d.uuid in sample.stale, "age": sample.age_of(d),
                "stats": dict(d.stats)} for d in sample.domains]
    chunks = [domains[i:i + max_domains] for i in range(0, len(domains), max_domains)] or [[]]
    for i, chunk in enumerate(chunks):
        yield "domain", {"kind": "stats.domain", **head, "ok": sample.ok, "mode": sample.mode, "chunk": i,
                         "chunks": len(chunks), "total": len(domains), "stale": len(sample.stale),
                         "domains": chunk}
    node = dict(sample.node)
    for key in ("cpu", "memory"):
        if key in node:
            node[key] = dict(node[key])
    yield "node", {"kind": "stats.node", **head, "node": node}
    yield "storage_pool", {"kind": "stats.storage_pool", **head, "pools": [dict(p) for p in sample.pools]}
    yield "network", {"kind": "stats.network", **head, "networks": [dict(n) for n in sample.networks]}
