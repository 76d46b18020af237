"""One request in, one reply body out: parse, dispatch, turn every failure into an error reply.

Runs on a worker thread; knows nothing of proton endpoints.
"""
from __future__ import annotations

import bisect
import collections
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import libvirt
import structlog

from busagent.api.dispatch import AGENT_METHODS, Dispatcher
from busagent.api.errors import AgentError, BadRequest, Expired, Internal
from busagent.authz import Policy, Unauthorized
from busagent.bus.envelope import DEFAULT_LIMITS, Limits, Request, expired, parse_args, reply_body
from busagent.jobs import JOB_METHODS, JobWatcher
from busagent.virt.errors import libvirt_error_data

log = structlog.get_logger("busagent.rpc")


@dataclass
class Outcome:
    """What one call produced."""

    body: bytes
    method: str
    outcome: str  # 'ok' | error kind
    seconds: float


@dataclass
class RpcStats:
    """Counters by (method, outcome), shared with the metrics endpoint."""

    calls: collections.Counter = field(default_factory=collections.Counter)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # request latency histogram: method -> [count per bucket of latency_buckets..., count above, sum of seconds]
    latency: dict = field(default_factory=dict)
    latency_buckets: tuple = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        if outcome in ("unknown_method", "bad_request"):
            method = "(unknown)"  # a name the client made up: not a label of its own
        with self.lock:
            h = self.latency.get(method)
            if h is None:
                h = self.latency[method] = [0] * (len(self.latency_buckets) + 1) + [0.0]
            h[bisect.bisect_left(self.latency_buckets, seconds)] += 1
            h[-1] += seconds

    def count(self, method: str, outcome: str) -> None:
        with self.lock:
            self.calls[(method, outcome)] += 1

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] += 1


class RpcService:
    """Serves method calls through a Dispatcher.

    With an enabled ``policy``, each request is authorized for its principal before it runs
    (after the deadline and subject checks, before its body is parsed): a refused one is
    answered ``unauthorized``; one allowed to a read-only role runs through
    ``readonly_dispatcher``, bound to a read-only libvirt connection, so libvirt refuses
    writes too. A peer without a role is refused whatever it calls, so it cannot learn
    which methods exist; a peer with a role calling an unknown or unserved method gets
    ``unknown_method`` / ``not_supported`` as without a policy. The agent's own methods
    (``busagent*``) are reads and run on the main dispatcher (they make no libvirt calls of
    the caller's choosing).
    """

    def __init__(self, dispatcher: Dispatcher, stats: RpcStats | None = None, jobs: JobWatcher | None = None,
                 policy: Policy | None = None, readonly_dispatcher: Dispatcher | None = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.dispatcher = dispatcher
        self.limits = limits  # what one request's arguments may carry (depth, string size)
        self.stats = stats or RpcStats()
        self.jobs = jobs  # publishes job progress while long domain operations run
        self.policy = policy if policy is not None and policy.enabled else None  # None: no authorization
        if self.policy is not None and self.policy.needs_readonly and readonly_dispatcher is None:
            raise ValueError("a policy with read-only roles needs a read-only dispatcher")
        self.readonly_dispatcher = readonly_dispatcher

    def authorize(self, req: Request) -> Dispatcher:
        """The dispatcher that runs ``req`` for its principal; raises Unauthorized."""
        policy, name = self.policy, req.subject
        if policy is None:
            return self.dispatcher
        if name.startswith("busagent"):
            policy.decide(req.principal, name, "read")
            return self.dispatcher
        m = self.dispatcher.table.methods.get(name)
        if m is None or m.excluded:
            policy.role_of(req.principal)  # only a peer with a role learns what is not served
            return self.dispatcher  # which answers unknown_method / not_supported
        decision = policy.decide(req.principal, name, m.access)
        return self.readonly_dispatcher if decision.readonly else self.dispatcher

    def _label(self, name: str) -> str:
        """The name a request is counted and logged under: a name the peer made up becomes
        ``(unknown)``, so that counters and log lines stay bounded whatever peers send."""
        table = self.dispatcher.table
        if name in table.methods or name in AGENT_METHODS or name in table.helpers:
            return name
        return "(unknown)"

    def handle(self, req: Request) -> Outcome:
        start = time.perf_counter()
        method = req.subject if isinstance(req.subject, str) else "(none)"
        result_name = None
        try:
            if expired(req):
                raise Expired("the request's deadline passed before it could run")
            if not isinstance(req.subject, str) or not req.subject:
                raise BadRequest("the subject must name a libvirt C function")
            dispatcher = self.authorize(req)
            args = parse_args(req, self.limits)
            if self.jobs is not None and req.subject in JOB_METHODS and isinstance(args, dict):
                disk = args.get("disk")
                with self.jobs.watch(req.subject, args.get("domain", args.get("dom")), req.correlation_id,
                                     disk=disk if isinstance(disk, str) else None):
                    result, result_name = dispatcher.call(req.subject, args)
            else:
                result, result_name = dispatcher.call(req.subject, args)
            body, outcome = reply_body(result, result_name), "ok"
        except libvirt.libvirtError as exc:
            err = libvirt_error_data(exc)
            body, outcome = reply_body(error=err), "libvirt"
        except Unauthorized as exc:
            body, outcome = reply_body(error=exc), exc.kind
            log.warning("unauthorized", method=self._label(method), principal=req.principal, reason=str(exc),
                        correlation_id=str(req.correlation_id))
        except AgentError as exc:
            body, outcome = reply_body(error=exc), exc.kind
        except Exception as exc:  # never let one request take the agent down
            log.exception("internal error", method=method, correlation_id=str(req.correlation_id))
            body, outcome = reply_body(error=Internal(f"{type(exc).__name__}: {exc}")), "internal"
        seconds = time.perf_counter() - start
        method = self._label(method)
        self.stats.count(method, outcome)
        self.stats.observe(method, outcome, seconds)
        log.info("request", method=method, correlation_id=str(req.correlation_id), outcome=outcome,
                 ms=round(seconds * 1000, 3), reply=req.reply_to is not None)
        return Outcome(body, method, outcome, seconds)


class Deduplicator:
    """Write requests by message id, within a window of ``max_ids`` ids and ``seconds``.

    ``begin(key, job)`` says what to do with a request: ``RUN`` it (first seen), ``WAIT`` for
    the first one still running (the job is kept and handed back by ``finish``), or answer it
    with the first reply (``DONE``, with that reply's body). ``finish(key, body)`` records the
    first reply and returns the jobs that waited for it. Used on one thread (the reactor).
    Entries leave the window oldest first, by count or age; a request still running never
    does (there are at most as many as the agent takes in at once).
    """

    RUN, WAIT, DONE = "run", "wait", "done"

    def __init__(self, max_ids: int = 10_000, seconds: float = 600.0,
                 clock: Any = time.monotonic) -> None:
        self.max_ids, self.seconds, self.clock = max_ids, seconds, clock
        # key -> [first seen (clock), reply body or None while running, waiting jobs or None]
        self._entries: OrderedDict[Hashable, list[Any]] = OrderedDict()
        self.duplicates = 0

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, key: Hashable, job: Any) -> tuple[str, bytes | None]:
        now = self.clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = [now, None, None]
            self._expire(now)
            return self.RUN, None
        self.duplicates += 1
        if entry[1] is not None:
            return self.DONE, entry[1]
        if entry[2] is None:
            entry[2] = [job]
        else:
            entry[2].append(job)
        return self.WAIT, None

    def finish(self, key: Hashable, body: bytes) -> list[Any]:
        entry = self._entries.get(key)
        if entry is None:  # cannot happen while running (never evicted); be safe
            return []
        entry[1] = body
        waiting, entry[2] = entry[2] or [], None
        return waiting

    def _expire(self, now: float) -> None:
        entries, horizon = self._entries, now - self.seconds
        while entries:
            key, entry = next(iter(entries.items()))
            if entry[1] is None or (len(entries) <= self.max_ids and entry[0] >= horizon):
                return
            del entries[key]
