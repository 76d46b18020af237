"""Broker mode through a real RabbitMQ 3.x (AMQP 1.0 plugin): agents and clients meet on it.

scripts/test starts a throwaway node (scripts/rabbitmq) and exports its URL as
BUSAGENT_TEST_BROKER_URL; without that variable these tests are skipped, with it they
must pass (an unreachable broker is a failure, not a skip: the ``broker_url`` fixture,
tests/conftest.py). The rest of the bus-level suite runs through this broker too (the
``rabbitmq`` half of the ``bus`` fixture); these are the tests only a broker has.

RabbitMQ 3.x facts these tests lean on: addresses are /queue/NAME, /topic/KEY and
/exchange/X/KEY; no dynamic receivers and no anonymous relay (clients listen on
/exchange/amq.direct/<id>, the agent keeps one sender per reply address); a refused
attach ends its whole session; SASL ANONYMOUS is offered first; an attach to /queue/NAME
declares the queue with the attach's durability (the agent's request queue is durable,
clients send to /amq/queue/NAME, which declares nothing); a message for a queue nobody
consumes just waits, and one for a queue that does not exist is dropped, so a call to a
host without an agent times out.
"""
from __future__ import annotations

import time
import uuid
from concurrent.futures import wait
from urllib.parse import urlsplit, urlunsplit

import pytest
from proton import Endpoint, Message
from proton.utils import BlockingConnection

from busagent.bus import server
from busagent.client import CallError, CallTimeout, Client, ConnectionFailed, LibvirtError
from busagent.config import Settings
from busagent.testing import RunningAgent

pytestmark = pytest.mark.rabbitmq

PROFILE = "rabbitmq3"


def broker_agent(url: str, uri: str = "test:///default", **kw) -> RunningAgent:
    settings = Settings(uri=uri, mode="broker", broker_urls=(url,), profile=PROFILE,
                        host_id=f"node-{uuid.uuid4().hex[:8]}", **kw)
    return RunningAgent(settings)


@pytest.fixture(scope="session")
def rabbit_agent(broker_url):
    with broker_agent(broker_url) as running:
        yield running


@pytest.fixture(scope="session")
def rabbit(broker_url, rabbit_agent):
    """A client on the broker whose default host is ``rabbit_agent``'s."""
    with Client(broker_url, host=rabbit_agent.host_id, profile=PROFILE, timeout=15) as c:
        yield c


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'guest'}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_call(rabbit):
    assert rabbit.call("virConnectGetHostname")
    info = rabbit.call("virDomainGetInfo", domain={"name": "test"})
    assert info["nrVirtCpu"] >= 1 and info["state_name"].startswith("VIR_DOMAIN_")


def test_proxy(rabbit):
    assert rabbit.host().domain(name="test").getInfo()["nrVirtCpu"] >= 1


def test_libvirt_error(rabbit):
    with pytest.raises(LibvirtError) as exc:
        rabbit.call("virDomainGetInfo", domain={"name": f"nope-{uuid.uuid4().hex[:8]}"})
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN"


def test_unknown_method_then_still_serving(rabbit):
    with pytest.raises(CallError) as exc:
        rabbit.call("virNoSuchThing")
    assert exc.value.kind == "unknown_method"
    assert rabbit.call("virConnectGetHostname")


def test_parallel_calls(rabbit, rabbit_agent):
    before = rabbit_agent.stats.calls[("virDomainGetInfo", "ok")]
    futures = [rabbit.call_async("virDomainGetInfo", {"domain": {"name": "test"}}) for _ in range(64)]
    futures += [rabbit.call_async("virConnectGetHostname") for _ in range(16)]
    done, pending = wait(futures, timeout=30)
    assert not pending
    results = [f.result() for f in futures]
    assert all(r["nrVirtCpu"] >= 1 for r in results[:64])
    assert len(set(results[64:])) == 1
    assert rabbit_agent.stats.calls[("virDomainGetInfo", "ok")] - before == 64


def test_two_agents_each_answer_for_their_own_host(broker_url, rabbit, rabbit_agent, tmp_path):
    node_b = tmp_path / "node-b.xml"
    node_b.write_text("<node><domain type='test'><name>only-on-b</name><memory unit='MiB'>64</memory>"
                      "<vcpu>3</vcpu><os><type arch='i686'>hvm</type></os></domain></node>")
    with broker_agent(broker_url, uri=f"test://{node_b}") as agent_b:
        assert agent_b.host_id != rabbit_agent.host_id
        a_before, b_before = sum(rabbit_agent.stats.calls.values()), sum(agent_b.stats.calls.values())
        # Host B's hypervisor has a guest host A's lacks, and the other way round.
        assert rabbit.call("virDomainGetInfo", host=agent_b.host_id, domain={"name": "only-on-b"})["nrVirtCpu"] == 3
        with pytest.raises(LibvirtError):
            rabbit.call("virDomainGetInfo", host=agent_b.host_id, domain={"name": "test"})
        with pytest.raises(LibvirtError):
            rabbit.call("virDomainGetInfo", domain={"name": "only-on-b"})
        futures = [rabbit.call_async("virConnectNumOfDomains", host=h)
                   for h in (rabbit_agent.host_id, agent_b.host_id) * 10]
        assert all(f.result(30) >= 0 for f in futures)
        assert sum(rabbit_agent.stats.calls.values()) - a_before == 1 + 10
        assert sum(agent_b.stats.calls.values()) - b_before == 2 + 10
        # Another client, host B as its default.
        with Client(broker_url, host=agent_b.host_id, profile=PROFILE, timeout=15) as other:
            assert other.call("virConnectListAllDomains", flags=[]) is not None
            assert other.host().domain(name="only-on-b").getInfo()["nrVirtCpu"] == 3


def test_host_without_agent_times_out(rabbit):
    with pytest.raises(CallTimeout):
        rabbit.call("virConnectGetHostname", host=f"node-nobody-{uuid.uuid4().hex[:8]}", timeout=2)
    assert rabbit.call("virConnectGetHostname")  # the client goes on


def test_client_credentials_are_used(broker_url, rabbit_agent):
    """Credentials (in the URL, or user and password) go by PLAIN: RabbitMQ would let ANONYMOUS in as guest."""
    parts = urlsplit(broker_url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    host = rabbit_agent.host_id
    with Client(with_password(broker_url, "wrong"), host=host, profile=PROFILE, timeout=10) as in_url, \
            Client(bare, host=host, profile=PROFILE, timeout=10, user="guest", password="wrong") as given, \
            Client(bare, host=host, profile=PROFILE, timeout=10, user="guest", password="guest") as good:
        # RabbitMQ answers a failed login after a few seconds: wait for all three at once.
        futures = [c.call_async("virConnectGetHostname") for c in (in_url, given, good)]
        for refused in futures[:2]:
            with pytest.raises(ConnectionFailed, match="PLAIN"):
                refused.result(15)
        assert futures[2].result(15)


def test_agent_credentials_are_used(broker_url):
    settings = Settings(mode="broker", broker_urls=(with_password(broker_url, "wrong"),), profile=PROFILE,
                        host_id=f"node-{uuid.uuid4().hex[:8]}")
    with pytest.raises(RuntimeError, match="not attached"):
        with RunningAgent(settings, attach_timeout=1.5):
            pass


def test_many_clients_in_turn(broker_url, rabbit_agent):
    """Every client has its own reply address: the agent opens (and caches) a sender for each."""
    for _ in range(5):
        with Client(broker_url, host=rabbit_agent.host_id, profile=PROFILE, timeout=15) as c:
            assert c.call("virConnectGetHostname")


def test_agent_serves_again_after_losing_the_broker(broker_url, rabbit, tcp_proxy):
    """The socket to the broker dies: the agent reconnects and consumes its requests again."""
    with broker_agent(tcp_proxy.url(broker_url)) as agent:
        assert rabbit.call("virConnectGetHostname", host=agent.host_id)
        tcp_proxy.cut()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert rabbit.call("virConnectGetHostname", host=agent.host_id, timeout=1)
                break
            except CallTimeout:
                assert time.monotonic() < deadline, "the agent did not serve again after reconnecting"
        assert rabbit.call("virConnectGetHostname", host=agent.host_id)


def raw_connection(broker_url: str) -> BlockingConnection:
    return BlockingConnection(broker_url, timeout=10, allowed_mechs="PLAIN", allow_insecure_mechs=True)


def request(reply_to: str, correlation_id: str) -> Message:
    return Message(subject="virConnectGetHostname", body=b"{}", content_type="application/json",
                   reply_to=reply_to, correlation_id=correlation_id)


def test_refused_reply_address_harms_no_other_reply(broker_url, rabbit, rabbit_agent):
    """RabbitMQ answers an attach to a missing exchange by ending the whole session: the agent's
    reply senders each have their own, so the other callers' replies still flow."""
    assert rabbit.call("virConnectGetHostname")  # the agent now has a reply sender for ``rabbit``
    conn = raw_connection(broker_url)
    try:
        requests = conn.create_sender(f"/amq/queue/libvirt.rpc.{rabbit_agent.host_id}")
        before = rabbit_agent.stats.calls[("virConnectGetHostname", "ok")]
        for n in range(3):
            requests.send(request(f"/exchange/no-such-exchange-{uuid.uuid4().hex[:8]}/x", f"lost-{n}"))
        deadline = time.monotonic() + 10
        while rabbit_agent.stats.calls[("virConnectGetHostname", "ok")] < before + 3:
            assert time.monotonic() < deadline, "the agent did not serve the requests"
            time.sleep(0.05)
    finally:
        conn.close()
    futures = [rabbit.call_async("virConnectGetHostname") for _ in range(10)]
    assert all(f.result(15) for f in futures)


def test_evicted_reply_senders_close_their_sessions(broker_url, rabbit_agent, monkeypatch):
    """Each reply sender has a session of its own: evicting one must end that session too."""
    monkeypatch.setattr(server, "MAX_REPLY_SENDERS", 2)
    for _ in range(6):
        with Client(broker_url, host=rabbit_agent.host_id, profile=PROFILE, timeout=15) as c:
            assert c.call("virConnectGetHostname")

    def open_sessions() -> int:
        conn = rabbit_agent.agent.bus._broker.connection
        ssn, n = conn.session_head(Endpoint.LOCAL_ACTIVE), 0
        while ssn is not None:
            n, ssn = n + 1, ssn.next(Endpoint.LOCAL_ACTIVE)
        return n

    # the request receiver's, the publishing one (presence, objects) and two reply senders'
    assert rabbit_agent.on_reactor(open_sessions) <= 2 + 2
