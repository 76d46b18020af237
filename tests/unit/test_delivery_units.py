"""Pure pieces of the delivery guarantees: the write-request deduplication window, the
reconnection backoff, the client's retry delays."""
from __future__ import annotations

import itertools

from busagent.bus.engine import backoff
from busagent.bus.server import write_methods
from busagent.client import connecting
from busagent.rpc import Deduplicator


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_runs_duplicates_wait_then_get_the_first_reply():
    d = Deduplicator(10, 60, clock=Clock())
    assert d.begin("a", "job1") == (Deduplicator.RUN, None)
    assert d.begin("a", "job2") == (Deduplicator.WAIT, None)
    assert d.begin("a", "job3") == (Deduplicator.WAIT, None)
    assert d.finish("a", b"reply-a") == ["job2", "job3"]
    assert d.begin("a", "job4") == (Deduplicator.DONE, b"reply-a")
    assert d.finish("a", b"other") == []  # a later finish has nobody waiting (and cannot happen)
    assert d.duplicates == 3
    assert d.begin("b", "job5") == (Deduplicator.RUN, None)


def test_window_by_count_keeps_the_newest_ids():
    d = Deduplicator(3, 600, clock=Clock())
    for key in "abcde":
        d.begin(key, None)
        d.finish(key, key.encode())
    d.begin("f", None)  # room is made before "f" comes in: a, b and c leave
    assert len(d) == 3
    assert d.begin("d", None) == (Deduplicator.DONE, b"d")
    assert d.begin("a", None) == (Deduplicator.RUN, None)  # forgotten: a new request


def test_window_by_age():
    clock = Clock()
    d = Deduplicator(100, 10, clock=clock)
    d.begin("old", None)
    d.finish("old", b"1")
    clock.now = 5
    d.begin("young", None)
    d.finish("young", b"2")
    clock.now = 10.5
    assert d.begin("young", None) == (Deduplicator.DONE, b"2")
    assert d.begin("old", None) == (Deduplicator.RUN, None)  # older than 10 s: forgotten


def test_a_request_still_running_is_never_forgotten():
    clock = Clock()
    d = Deduplicator(1, 1, clock=clock)
    d.begin("slow", "first")
    clock.now = 100
    for key in "xyz":
        d.begin(key, None)
        d.finish(key, b"")
    assert d.begin("slow", "again") == (Deduplicator.WAIT, None)
    assert d.finish("slow", b"done") == ["again"]


def test_writes_are_the_write_access_class():
    writes = write_methods()
    assert {"virDomainDefineXML", "virDomainCreate", "virDomainSetMetadata", "virDomainUndefine"} <= writes
    assert not {"virDomainGetInfo", "virConnectGetHostname", "virConnectListAllDomains"} & writes


def test_reconnection_backoff_is_capped():
    assert list(itertools.islice(backoff(0.2, 2.0, 1.0), 7)) == [0.0, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert max(itertools.islice(backoff(), 50)) == 10.0


def test_client_reconnection_delays_are_capped():
    delays = list(itertools.islice(connecting.reconnect_delays(), 10))
    assert delays[:5] == list(connecting.RECONNECT_DELAYS) and set(delays[5:]) == {connecting.RECONNECT_DELAYS[-1]}
