"""``busagent monitor``: the whole fleet from the bus, and one Prometheus endpoint for it.

One subscription to ``<ns>.#`` (events, objects, statistics and presence of every
agent), one worker thread that handles what arrives, and one HTTP endpoint whose
families are built afresh on every scrape from what the worker keeps in memory:

* **objects**: a ``FleetView`` per host, loaded with ``busagentResync`` (through a
  ``Client`` on the same broker) when a host is first seen, after a gap on one of its
  object topics and after it restarted; object messages then keep it current. Resyncs
  are asynchronous: while one is under way the host's object messages are held back and
  applied after the reply (those it already reflects are skipped), so the view stays exact
  and the worker never waits for an agent.
* **statistics**: the latest complete statistics message of each kind for each host
  (domain chunks put together), mapped with the agent's own table
  (``busagent.metrics.add_stats_messages``): the same metric names as an agent's
  ``/metrics``, with a ``host`` label first. A message is mapped at the first scrape that
  sees it (and reused by later ones); the fleet's families are put together at each scrape,
  and only hosts that are up contribute.
* **liveness** from presence: a host is up while its latest heartbeat lives (received
  ``ttl`` seconds ago at most) and was not ``death``.

A scrape takes the monitor's lock only to copy references (the worker holds it for the
in-memory handling of one message): it never waits for the bus, an agent or libvirt.
"""
from __future__ import annotations

import collections
import queue
import signal
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from busagent.client.errors import ConnectionFailed
from busagent.client.view import FleetView, is_object_topic
from busagent.config import PROFILES, ConfigError, file_values
from busagent.metrics import Families, add_stats_messages

log = structlog.get_logger("busagent.monitor")

FAMILIES = ("event", "object", "stats", "presence")
STATS_KINDS = ("domain", "node", "storage_pool", "network")


# -- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MonitorSettings:
    """What ``busagent monitor`` needs: defaults < config file (TOML) < flags."""

    url: str = "amqp://127.0.0.1:5672"
    profile: str = "direct"
    namespace: str = "libvirt"
    metrics_listen: str = "127.0.0.1:9178"  # '' turns the endpoint off
    resync_timeout: float = 10.0  # a busagentResync not answered by then is given up (and retried)
    resync_retry: float = 5.0  # seconds between two resync attempts of one host
    forget_after: float = 3600.0  # a host gone this long (no message at all) leaves the endpoint
    log_level: str = "info"

    def validate(self) -> MonitorSettings:
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}")
        if not self.namespace or any(c in self.namespace for c in "/ #*"):
            raise ConfigError("namespace must be a plain word")
        if not self.url.startswith(("amqp://", "amqps://")):
            raise ConfigError(f"url must be amqp:// or amqps://, not {self.url!r}")
        if self.metrics_listen and not self.metrics_listen.rpartition(":")[2].isdigit():
            raise ConfigError(f"metrics_listen must be HOST:PORT, not {self.metrics_listen!r}")
        if self.resync_timeout <= 0 or self.resync_retry <= 0 or self.forget_after <= 0:
            raise ConfigError("resync_timeout, resync_retry and forget_after must be positive")
        return self


_FILE_KEYS = {  # TOML section.key -> MonitorSettings field (bus.* as in the agent's file)
    "bus.url": "url", "bus.urls": "url", "bus.profile": "profile", "bus.namespace": "namespace",
    "monitor.metrics_listen": "metrics_listen", "monitor.resync_timeout": "resync_timeout",
    "monitor.resync_retry": "resync_retry", "monitor.forget_after": "forget_after", "log.level": "log_level",
}


def load_settings(path: str | None = None, **flags: Any) -> MonitorSettings:
    """Validated settings from a TOML file (``[bus] url/profile/namespace``, ``[monitor] ...``,
    ``[log] level``) and flags (None: not given). ``bus.urls`` (the agent's key) takes its first URL."""
    kinds = {f.name: f.type for f in fields(MonitorSettings)}
    values: dict[str, Any] = {}
    if path:
        for name, raw in file_values(path, _FILE_KEYS).items():
            if isinstance(raw, list):
                raw = raw[0] if raw else ""
            values[name] = float(raw) if kinds[name] == "float" else str(raw)
    values.update({k: v for k, v in flags.items() if v is not None})
    return replace(MonitorSettings(), **values).validate()


# -- per host ------------------------------------------------------------------------------
@dataclass
class HostState:
    """What the monitor knows of one host besides its objects (those are in the FleetView)."""

    host: str
    presence: dict[str, Any] | None = None  # the latest presence message
    presence_at: float = 0.0  # monotonic time it was received
    last_seen: float = 0.0  # monotonic time of the latest message of any family
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> latest complete message
    pending_chunks: list[dict[str, Any]] | None = None  # domain chunks of a sample being put together
    lag: float | None = None  # receipt time - the latest statistics message's timestamp
    gaps: int = 0
    resyncs: int = 0
    resync_failures: int = 0
    next_resync: float = 0.0  # monotonic: no new attempt before (after a failure)


def liveness(state: HostState, now: float) -> tuple[bool, str]:
    """(up, why): ``alive`` (a heartbeat within its ttl), ``death`` (a clean stop), ``expired``
    (the last heartbeat outlived its ttl) or ``unknown`` (no presence message yet)."""
    doc = state.presence
    if doc is None:
        return False, "unknown"
    if doc.get("state") == "death":
        return False, "death"
    ttl = doc.get("ttl")
    if isinstance(ttl, (int, float)) and state.presence_at + ttl < now:
        return False, "expired"
    return True, "alive"


@dataclass
class _Resync:
    future: Future
    started: float
    held: list[dict[str, Any]] = field(default_factory=list)  # object messages that arrived meanwhile
    again: bool = False  # a gap or restart arrived meanwhile: the reply may predate it


def _credentials(url: str) -> tuple[str | None, str | None]:
    parts = urlsplit(url)
    return (unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None)


# -- the monitor ---------------------------------------------------------------------------
class Monitor:
    """The fleet from the bus. ``start()`` subscribes and serves ``/metrics``; ``handle(item)`` is
    the worker's step (feed it Subscription items directly in tests); ``collect()`` builds the
    families of one scrape."""

    def __init__(self, settings: MonitorSettings | None = None, client: Any = None) -> None:
        self.settings = (settings or MonitorSettings()).validate()
        self.hosts: dict[str, HostState] = {}
        self.view = FleetView(auto_resync=False)
        self.messages: collections.Counter[str] = collections.Counter()  # family -> count
        self.bus_errors = 0
        self.scrapes = 0
        self.client = client
        self.subscription: Any = None
        self.server: Any = None
        self._own_client = client is None
        self._client_failed_at = 0.0
        self._resyncs: dict[str, _Resync] = {}
        self._mapped: dict[str, dict[str, tuple[dict[str, Any], list[Metric]]]] = {}  # host -> kind -> (doc, fams)
        self._status: dict[str, str] = {}  # host -> last logged liveness reason
        self._backoff = 0.5  # seconds before subscribing again after a failure (doubles, at most 10)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------
    @property
    def patterns(self) -> list[str]:
        return [f"{self.settings.namespace}.#"]

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server is not None else None

    def _subscribe(self) -> None:
        from busagent.client.subscribe import Subscription

        user, password = _credentials(self.settings.url)
        self.subscription = Subscription(self.settings.url, self.patterns, profile=self.settings.profile, user=user,
                                         password=password)

    def _resubscribe(self, why: str) -> None:
        """The subscription failed: a new one after a pause; every host resyncs on its next message
        (what was missed meanwhile is no gap the new subscription could see)."""
        self.bus_errors += 1
        log.warning("monitor subscription lost", error=why, retry_in=self._backoff)
        old, self.subscription = self.subscription, None
        if old is not None:
            old.close()
        with self._lock:
            for view in self.view.hosts.values():
                view.stale = True
        if self._stop.wait(self._backoff):
            return
        self._backoff = min(self._backoff * 2, 10.0)
        self._subscribe()

    @property
    def bus_connected(self) -> bool:
        sub = self.subscription
        return sub is not None and sub.ready.is_set()

    def start(self) -> Monitor:
        self._subscribe()
        if self.settings.metrics_listen:
            from busagent.metrics import MetricsServer, make_registry

            self.server = MetricsServer(self.settings.metrics_listen, make_registry(self))
            log.info("monitor metrics endpoint", address=f"http://{self.server.host}:{self.server.port}/metrics")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="busagent-monitor", daemon=True)
        self._thread.start()
        log.info("monitor started", url=_redact(self.settings.url), profile=self.settings.profile,
                 patterns=self.patterns)
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Whether the subscription is attached (messages published from now on reach the monitor)."""
        return self.subscription is not None and self.subscription.ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.subscription is not None:
            self.subscription.close()
            self.subscription = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._own_client and self.client is not None:
            self.client.close()
            self.client = None

    def run_forever(self) -> None:
        """Start, then wait for SIGTERM/SIGINT (the CLI)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
            log.info("monitor stopped")

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the worker ------------------------------------------------------------------------
    def _run(self) -> None:
        last_check = 0.0
        while not self._stop.is_set():
            item = None
            try:
                item = self.subscription.get(timeout=0.1)
                self._backoff = 0.5
            except queue.Empty:
                pass
            except ConnectionFailed as exc:
                self._resubscribe(str(exc))
            try:
                if item is not None:
                    self.handle(item)
                self.poll()
                now = time.monotonic()
                if now - last_check >= 0.25:
                    last_check = now
                    self._check_liveness(now)
            except Exception:  # one bad message never ends the worker
                log.exception("monitor failed to handle a message")

    def handle(self, item: dict[str, Any], now: float | None = None, wall: float | None = None) -> None:
        """One Subscription item: a message of any family, or a gap report."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        gap = item.get("gap")
        with self._lock:
            if isinstance(gap, dict):
                self._on_gap(gap)
                return
            topic = item.get("topic")
            parts = topic.split(".") if isinstance(topic, str) else []
            family = parts[1] if len(parts) > 2 and parts[0] == self.settings.namespace else "other"
            self.messages[family] += 1
            host = item.get("host")
            if not isinstance(host, str) or not host:
                host = parts[2] if family != "other" else None
            if host is None:
                return
            state = self._host(host)
            state.last_seen = now
            if family == "presence":
                state.presence, state.presence_at = item, now
            elif family == "stats":
                self._on_stats(state, item, wall)
            elif family == "object":
                pending = self._resyncs.get(host)
                if pending is not None:
                    pending.held.append(item)
                else:
                    self.view.apply(item)
            if self.view.host(host).stale and not (family == "presence" and item.get("state") == "death"):
                self._request_resync(host, now)

    def _host(self, host: str) -> HostState:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = HostState(host)
            log.info("monitor: new host", host=host)
        return state

    def _on_gap(self, gap: dict[str, Any]) -> None:
        host = gap.get("host")
        if not isinstance(host, str):
            return
        state = self._host(host)
        state.gaps += 1
        if gap.get("restarted") or is_object_topic(gap.get("topic")):
            self.view.host(host).stale = True
            pending = self._resyncs.get(host)
            if pending is not None:
                pending.again = True
            # the resync itself is asked by the message that revealed the gap (it follows)

    def _on_stats(self, state: HostState, doc: dict[str, Any], wall: float) -> None:
        stamp = doc.get("timestamp")
        if isinstance(stamp, (int, float)):
            state.lag = wall - stamp
        kind = str(doc.get("kind", "")).partition(".")[2]
        if kind not in STATS_KINDS:
            return
        if kind != "domain":
            state.stats[kind] = doc
            return
        index, chunks = doc.get("chunk", 0), doc.get("chunks", 1)
        if index == 0:
            state.pending_chunks = [doc]
        elif state.pending_chunks is not None and len(state.pending_chunks) == index:
            state.pending_chunks.append(doc)
        else:  # a chunk went missing: this sample stays incomplete, the next one will do
            state.pending_chunks = None
            return
        if len(state.pending_chunks) >= chunks:
            parts, state.pending_chunks = state.pending_chunks, None
            state.stats["domain"] = {**parts[0], "domains": [d for p in parts for d in p.get("domains", ())]}

    # -- resyncs (asynchronous: the worker never waits for an agent) -------------------------
    def _request_resync(self, host: str, now: float) -> None:
        state = self.hosts[host]
        if host in self._resyncs or now < state.next_resync:
            return
        client = self._resync_client(now)
        if client is None:
            state.next_resync = now + self.settings.resync_retry
            return
        try:
            future = client.call_async("busagentResync", host=host, ttl=self.settings.resync_timeout)
        except Exception as exc:  # noqa: BLE001 - a closed client and the like: try again later
            log.warning("monitor: resync not sent", host=host, error=str(exc))
            state.next_resync = now + self.settings.resync_retry
            return
        self._resyncs[host] = _Resync(future, now)

    def _resync_client(self, now: float) -> Any:
        if self.client is not None and getattr(self.client, "_failure", None) is not None and self._own_client:
            dead, self.client, self._client_failed_at = self.client, None, now  # a failed client stays failed
            threading.Thread(target=dead.close, name="busagent-monitor-close", daemon=True).start()
        if self.client is None and self._own_client:
            if now - self._client_failed_at < self.settings.resync_retry and self._client_failed_at:
                return None
            from busagent.client import Client

            self.client = Client(self.settings.url, profile=self.settings.profile, namespace=self.settings.namespace,
                                 timeout=self.settings.resync_timeout)
        return self.client

    def poll(self, now: float | None = None) -> None:
        """Take in finished (or overdue) resyncs."""
        if not self._resyncs:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            for host, pending in list(self._resyncs.items()):
                if pending.future.done():
                    del self._resyncs[host]
                    self._finish_resync(host, pending, now)
                elif now - pending.started > self.settings.resync_timeout:
                    del self._resyncs[host]
                    self._resync_failed(host, pending, now, f"no reply within {self.settings.resync_timeout:g} s")

    def _finish_resync(self, host: str, pending: _Resync, now: float) -> None:
        try:
            reply = pending.future.result()
        except Exception as exc:  # noqa: BLE001 - CallError, ConnectionFailed, ...
            self._resync_failed(host, pending, now, str(exc) or type(exc).__name__)
            return
        view = self.view.host(host)
        view.load(reply)
        state = self._host(host)
        state.resyncs += 1
        state.next_resync = 0.0
        for doc in pending.held:  # those the reply already reflects are skipped
            view.apply(doc)
        if pending.again:
            view.stale = True
        log.info("monitor: resynced", host=host, objects=sum(len(v) for v in view.objects.values()),
                 seconds=round(now - pending.started, 3))
        if view.stale:
            self._request_resync(host, now)

    def _resync_failed(self, host: str, pending: _Resync, now: float, why: str) -> None:
        view = self.view.host(host)
        for doc in pending.held:
            view.apply(doc)
        view.stale = True
        state = self._host(host)
        state.resync_failures += 1
        state.next_resync = now + self.settings.resync_retry
        log.warning("monitor: resync failed", host=host, error=why)

    # -- liveness --------------------------------------------------------------------------
    def _check_liveness(self, now: float) -> None:
        with self._lock:
            for host, state in list(self.hosts.items()):
                up, why = liveness(state, now)
                if why != self._status.get(host):
                    if why != "unknown":
                        log.info("monitor: host " + ("up" if up else "gone"), host=host, why=why)
                    self._status[host] = why
                if not up and now - state.last_seen > self.settings.forget_after:
                    del self.hosts[host]
                    self.view.hosts.pop(host, None)
                    self._status.pop(host, None)
                    self._resyncs.pop(host, None)
                    log.info("monitor: host forgotten", host=host)

    # -- reading (any thread) --------------------------------------------------------------
    def status(self, host: str, now: float | None = None) -> dict[str, Any] | None:
        """One host: ``up``, ``why``, presence ``state``, ``lag``, ``gaps``, ``resyncs``, ``stale``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            state = self.hosts.get(host)
            if state is None:
                return None
            up, why = liveness(state, now)
            view = self.view.hosts.get(host)
            return {"host": host, "up": up, "why": why,
                    "state": state.presence.get("state") if state.presence else None,
                    "lag": state.lag, "gaps": state.gaps, "resyncs": state.resyncs,
                    "stale": view.stale if view is not None else True, "stats": sorted(state.stats)}

    def objects(self, host: str, kind: str) -> list[dict[str, Any]]:
        """A copy of one host's objects of one kind (from the view)."""
        with self._lock:
            view = self.view.hosts.get(host)
            return list(view.objects.get(kind, {}).values()) if view is not None else []

    def describe(self) -> list[Metric]:
        return []

    def _mapped_stats(self, host: str, stats: dict[str, dict[str, Any]]) -> list[Metric]:
        """One host's ``libvirt_*`` families (``host`` label first), mapped once per statistics message:
        a message never changes once kept, so the next scrapes reuse its families until a newer one."""
        cache = self._mapped.setdefault(host, {})
        out: list[Metric] = []
        for kind in STATS_KINDS:
            doc = stats.get(kind)
            if doc is None:
                continue
            hit = cache.get(kind)
            if hit is None or hit[0] is not doc:
                fams = Families()
                fams.scope(("host",), (host,))
                add_stats_messages(fams, {kind: doc})
                hit = cache[kind] = (doc, fams.families())
            out.extend(hit[1])
        return out

    def collect(self, now: float | None = None, wall: float | None = None) -> Iterable[Metric]:
        """The families of one scrape, from a copy of the monitor's state taken under its lock."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        self.scrapes += 1
        with self._lock:
            hosts = []
            for host in sorted(self.hosts):
                state = self.hosts[host]
                view = self.view.hosts.get(host)
                counts = {kind: len(objs) for kind, objs in view.objects.items()} if view is not None else {}
                hosts.append((host, liveness(state, now), dict(state.stats), state.lag, state.gaps, state.resyncs,
                              state.resync_failures, counts))
            messages = dict(self.messages)
        out = Families()
        libvirt: dict[str, Metric] = {}  # every up host's libvirt_* series, family by family
        up_total = 0
        known = {h[0] for h in hosts}
        for name in list(self._mapped):  # forgotten hosts
            if name not in known:
                self._mapped.pop(name, None)
        for host, (up, _why), stats, lag, gaps, resyncs, failures, counts in hosts:
            up_total += up
            out.scope(("host",), (host,))
            domain = stats.get("domain")
            out.add("libvirt_up", "Whether scraping libvirt's metrics was successful.", (), (),
                    1.0 if up and domain is not None and domain.get("ok", True) else 0.0)
            if up:
                for fam in self._mapped_stats(host, stats):
                    merged = libvirt.get(fam.name)
                    if merged is None:
                        merged = libvirt[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                    merged.samples.extend(fam.samples)
            out.scope()
            out.add("busagent_monitor_host_up", "Whether a host's agent is alive (its latest heartbeat lives).",
                    ("host",), (host,), 1.0 if up else 0.0)
            if lag is not None:
                out.add("busagent_monitor_lag_seconds",
                        "Receipt time minus the timestamp of the host's latest statistics message, in seconds.",
                        ("host",), (host,), lag)
            stamps = [d["timestamp"] for d in stats.values() if isinstance(d.get("timestamp"), (int, float))]
            if stamps:
                out.add("busagent_monitor_stats_age_seconds",
                        "Seconds since the host's latest statistics message was published.", ("host",), (host,),
                        max(0.0, wall - max(stamps)))
            out.add("busagent_monitor_gaps_total", "Gaps seen in a host's messages (missed messages or a restart).",
                    ("host",), (host,), float(gaps))
            out.add("busagent_monitor_resyncs_total", "busagentResync calls that rebuilt a host's objects.",
                    ("host",), (host,), float(resyncs))
            out.add("busagent_monitor_resync_failures_total", "busagentResync calls that failed or timed out.",
                    ("host",), (host,), float(failures))
            for kind, n in sorted(counts.items()):
                out.add("busagent_monitor_objects", "Objects of a host in the monitor's view, by kind.",
                        ("host", "kind"), (host, kind), float(n))
        families = out.families()
        families[1:1] = libvirt.values()  # after libvirt_up
        hosts_up = GaugeMetricFamily("busagent_monitor_hosts_up", "Hosts whose agent is alive.")
        hosts_up.add_metric([], float(up_total))
        received = CounterMetricFamily("busagent_monitor_messages", "Messages received, by family.",
                                       labels=["family"])
        for family in sorted(set(FAMILIES) | set(messages)):
            received.add_metric([family], float(messages.get(family, 0)))
        errors = CounterMetricFamily("busagent_monitor_bus_errors",
                                     "Subscription failures (each followed by a new one).")
        errors.add_metric([], float(self.bus_errors))
        connected = GaugeMetricFamily("busagent_monitor_bus_connected",
                                      "Whether the monitor's subscription is attached.")
        connected.add_metric([], 1.0 if self.bus_connected else 0.0)
        return [hosts_up, received, errors, connected, *families]


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return url if parts.password is None else url.replace(f":{parts.password}@", ":***@", 1)
