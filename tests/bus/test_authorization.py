"""Authorization with real components: principal -> role -> allowed methods, read-only roles
served through a read-only libvirt connection (so libvirt refuses writes too).

(a) RpcService with the real method table, the real test driver and a real read-only
    connection (``test:///default``: every connection of the process shares one in-process
    driver, so the read-only connection sees the same domains).
(b) The agent's bus in direct mode (today a direct peer is unauthenticated: principal None).
(c) Through the test RabbitMQ for real, as its users busagent-reader, busagent-writer and
    busagent-nobody (scripts/rabbitmq defines them): the principal is the user-id the broker
    validated. Skipped without BUSAGENT_TEST_BROKER_URL.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import libvirt
import pytest

from busagent.api.dispatch import Dispatcher
from busagent.api.table import load_table
from busagent.authz import Policy
from busagent.bus.envelope import Request
from busagent.client import CallError, CallTimeout, Client, ConnectionFailed, LibvirtError
from busagent.client import core as client_core
from busagent.config import Settings
from busagent.rpc import RpcService
from busagent.testing import RunningAgent
from busagent.virt.connection import HypervisorConnection

URI = "test:///default"
SECURITY = {
    "roles": {
        "monitor": {"access": "read"},
        "operator": {"access": "read", "allow": ["virDomainSuspend"]},  # a write, still on the RO connection
        "admin": {"access": "write"},
    },
    "principals": {"mon": "monitor", "ops": "operator", "ctl": "admin"},
}
# Reads by name that libvirt itself refuses on a read-only connection (its own ACL says write):
# the table classes them write, so no read role is sent to a refusal.
LIBVIRT_DENIES_READONLY = {"virConnectGetDomainCapabilities", "virNodeGetSEVInfo",
                           "virDomainMigrateGetMaxSpeed", "virNodeDeviceGetAutostart"}
# test:///default's fixed objects: the reads taking only one of these references are called for real
REFS = {"domain": {"name": "test"}, "network": {"name": "default"}, "storage_pool": {"name": "default-pool"},
        "interface": {"name": "eth1"}, "node_device": {"name": "computer"}}


def domain_xml(name: str) -> str:
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory>"
            f"<vcpu>1</vcpu><os><type arch='i686'>hvm</type></os></domain>")


def request(method: str, principal: str | None, body: bytes = b"{}") -> Request:
    return Request(method, body, "reply", f"c-{uuid.uuid4().hex[:8]}", "application/json", None, None,
                   None, principal)


def error_of(outcome) -> dict | None:
    return json.loads(outcome.body).get("error")


@pytest.fixture(scope="module")
def rw():
    hc = HypervisorConnection(URI)
    hc.open()
    yield hc
    hc.close()


@pytest.fixture(scope="module")
def ro():
    hc = HypervisorConnection(URI, readonly=True)
    hc.open()
    yield hc
    hc.close()


@pytest.fixture(scope="module")
def dispatchers(rw, ro):
    main = Dispatcher(rw.get)
    return main, Dispatcher(ro.get, table=main.table)


def service(dispatchers, doc=SECURITY) -> RpcService:
    main, readonly = dispatchers
    return RpcService(main, policy=Policy.from_config(doc), readonly_dispatcher=readonly)


@pytest.fixture
def guest(rw):
    """A running guest of this test's own on the shared driver."""
    name = f"authz-{uuid.uuid4().hex[:8]}"
    dom = rw.get().defineXML(domain_xml(name))
    dom.create()
    yield name
    try:
        dom.destroy()
    except libvirt.libvirtError:
        pass
    dom.undefine()


# -- (a) RpcService, real table, real connections ----------------------------------------------------

def test_readonly_connection_is_readonly(ro, rw):
    """The premise: libvirt refuses a write on the read-only connection, allows it on the other."""
    with pytest.raises(libvirt.libvirtError) as info:
        ro.get().lookupByName("test").setAutostart(0)
    assert info.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
    rw.get().lookupByName("test").setAutostart(rw.get().lookupByName("test").autostart())


def test_reader_is_denied_every_write_method_of_the_table(dispatchers):
    svc = service(dispatchers)
    table = dispatchers[0].table
    writes = [m.name for m in table.exposed if m.access == "write"]
    assert len(writes) > 150, "the table lost its write methods?"
    for name in writes:
        out = svc.handle(request(name, "mon"))
        err = error_of(out)
        assert out.outcome == "unauthorized" and err["kind"] == "unauthorized", (name, err)
        assert name in err["message"] and "write" in err["message"]
        assert svc.stats.calls[(name, "unauthorized")] == 1
    # the same principal-free check for the admin: every write is authorized, on the main connection
    for name in writes:
        assert svc.authorize(request(name, "ctl")) is dispatchers[0]
    assert sum(n for (_, o), n in svc.stats.calls.items() if o == "unauthorized") == len(writes)


def _ref_reads(table):
    """Read methods taking nothing but one reference to a fixed object of test:///default."""
    for m in table.exposed:
        if m.access != "read":
            continue
        if m.self_arg is None:
            if m.binding.cls == "virConnect" and not any(p.required for p in m.params):
                yield m.name, {}
        elif m.self_kind in REFS and not m.self_via \
                and not any(p.required and p.name != m.self_arg.name for p in m.params):
            yield m.name, {m.self_arg.name: REFS[m.self_kind]}


def test_reader_is_allowed_the_reads_and_they_run_on_the_readonly_connection(dispatchers):
    """Every read of virConnect without required arguments and every read of a domain, network,
    storage pool, interface or node device taking only its reference, called for real as the
    read-only principal: authorized, and answered as the read-write connection answers it, except
    the few reads libvirt's own ACL keeps from read-only connections (denied by libvirt)."""
    svc = service(dispatchers)
    main = dispatchers[0]
    reads = list(_ref_reads(main.table))
    assert len(reads) >= 100, len(reads)
    ok, denied_by_libvirt, differ = 0, set(), []
    for name, args in reads:
        out = svc.handle(request(name, "mon", json.dumps(args).encode()))
        assert out.outcome != "unauthorized", (name, error_of(out))
        try:
            main.call(name, args)
            rw_outcome = "ok"
        except libvirt.libvirtError as exc:
            rw_outcome = f"libvirt:{exc.get_error_code()}"
        ro_err = error_of(out)
        ro_outcome = "ok" if ro_err is None else f"{out.outcome}:{ro_err.get('code')}"
        if ro_outcome == "ok":
            ok += 1
        elif ro_outcome == f"libvirt:{libvirt.VIR_ERR_OPERATION_DENIED}":
            denied_by_libvirt.add(name)
        if ro_outcome != rw_outcome and name not in denied_by_libvirt:
            differ.append((name, ro_outcome, rw_outcome))
    assert not differ
    assert not denied_by_libvirt, f"reads libvirt refuses on a read-only connection: {denied_by_libvirt}"
    assert ok >= 80, ok
    assert svc.stats.calls[("virConnectGetHostname", "ok")] == 1


def test_agent_methods_are_reads(dispatchers):
    svc = service(dispatchers)
    assert svc.handle(request("busagentPing", "mon")).outcome == "ok"
    assert svc.handle(request("busagentListMethods", "mon")).outcome == "ok"
    assert svc.handle(request("busagentPing", "stranger")).outcome == "unauthorized"
    denied = service(dispatchers, {**SECURITY, "roles": {**SECURITY["roles"],
                                                         "monitor": {"access": "read", "deny": ["busagent*"]}}})
    assert denied.handle(request("busagentPing", "mon")).outcome == "unauthorized"


def test_allowed_write_still_runs_on_the_readonly_connection(dispatchers, guest, rw):
    """A read role allowed virDomainSuspend is authorized, and libvirt refuses it: the call went
    through the read-only connection. The same call by the write role suspends the guest."""
    svc = service(dispatchers)
    body = json.dumps({"domain": {"name": guest}}).encode()
    out = svc.handle(request("virDomainSuspend", "ops", body))
    err = error_of(out)
    assert out.outcome == "libvirt", err
    assert err["code"] == libvirt.VIR_ERR_OPERATION_DENIED and err["code_name"] == "VIR_ERR_OPERATION_DENIED"
    assert rw.get().lookupByName(guest).state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert svc.handle(request("virDomainResume", "ops", body)).outcome == "unauthorized"  # not in its allow list
    out = svc.handle(request("virDomainSuspend", "ctl", body))
    assert out.outcome == "ok", error_of(out)
    assert rw.get().lookupByName(guest).state()[0] == libvirt.VIR_DOMAIN_PAUSED


def test_unknown_and_unauthenticated_principals_refused(dispatchers):
    svc = service(dispatchers)
    for principal in ("stranger", None, ""):
        out = svc.handle(request("virConnectGetHostname", principal))
        assert out.outcome == "unauthorized", principal
    err = error_of(svc.handle(request("virConnectGetHostname", None)))
    assert err["message"] == "an unauthenticated peer may not call this agent"
    anon = service(dispatchers, {**SECURITY, "anonymous_role": "monitor"})
    assert anon.handle(request("virConnectGetHostname", None)).outcome == "ok"
    assert anon.handle(request("virDomainDestroy", None)).outcome == "unauthorized"
    assert anon.handle(request("virConnectGetHostname", "stranger")).outcome == "unauthorized"


def test_peer_without_a_role_learns_nothing_about_methods(dispatchers):
    """Unknown, unserved and real methods alike are 'unauthorized' to a peer without a role (the
    made-up name is not a stats label); a peer with a role gets unknown_method / not_supported."""
    svc = service(dispatchers)
    for name in ("virNoSuchThing", "virDomainOpenConsole", "virDomainDestroy", "busagentNope"):
        assert svc.handle(request(name, None)).outcome == "unauthorized", name
    assert svc.stats.calls[("(unknown)", "unauthorized")] == 2  # virNoSuchThing, busagentNope
    assert svc.handle(request("virNoSuchThing", "mon")).outcome == "unknown_method"
    assert svc.handle(request("virDomainOpenConsole", "mon")).outcome == "not_supported"


def test_refused_before_the_body_is_read(dispatchers):
    """An unauthorized peer's body is never parsed (no bad_request / invalid_arguments oracle)."""
    svc = service(dispatchers)
    assert svc.handle(request("virDomainGetInfo", None, b"{not json")).outcome == "unauthorized"
    assert svc.handle(request("virDomainGetInfo", "mon", b"{not json")).outcome == "bad_request"


def test_open_policy_checks_nothing(dispatchers):
    svc = RpcService(dispatchers[0], policy=Policy.open())
    assert svc.policy is None
    assert svc.authorize(request("virDomainDestroy", None)) is dispatchers[0]


def test_policy_with_read_roles_needs_a_readonly_dispatcher(dispatchers):
    with pytest.raises(ValueError):
        RpcService(dispatchers[0], policy=Policy.from_config(SECURITY))
    RpcService(dispatchers[0], policy=Policy.from_config(  # write roles only: no read-only connection needed
        {"roles": {"admin": {"access": "write"}}, "principals": {"ctl": "admin"}}))


# -- (b) a real agent, direct mode ----------------------------------------------------------------------

def test_agent_without_security_is_open_and_opens_no_readonly_connection():
    with RunningAgent(Settings(), with_stats=False) as running:
        assert not running.agent.policy.enabled and running.agent.readonly_hypervisor is None
        with Client(running.url, timeout=15) as c:
            assert c.call("busagentPing") == {"pong": True}


def test_agent_direct_mode_anonymous_role():
    """Direct peers are unauthenticated today: refused, unless anonymous_role gives them a role;
    that role's allowed write reaches libvirt through the agent's read-only connection."""
    with RunningAgent(Settings(security=SECURITY), with_stats=False) as running:
        assert running.agent.readonly_hypervisor.readonly and running.agent.readonly_hypervisor.alive
        with Client(running.url, timeout=15) as c:
            with pytest.raises(CallError) as info:
                c.call("virConnectGetHostname")
            assert info.value.kind == "unauthorized"
        assert running.stats.calls[("virConnectGetHostname", "unauthorized")] == 1
    with RunningAgent(Settings(security={**SECURITY, "anonymous_role": "operator"}), with_stats=False) as running:
        with Client(running.url, timeout=15) as c:
            assert c.call("virDomainGetInfo", domain={"name": "test"})["state_name"]
            with pytest.raises(CallError) as info:
                c.call("virDomainDestroy", domain={"name": "test"})
            assert info.value.kind == "unauthorized"
            with pytest.raises(LibvirtError) as info:
                c.call("virDomainSuspend", domain={"name": "test"})
            assert info.value.code_name == "VIR_ERR_OPERATION_DENIED"


# -- (c) through RabbitMQ: the broker-validated user-id ------------------------------------------------

BROKER_SECURITY = {
    "roles": {"monitor": {"access": "read"}, "admin": {"access": "write"}},
    "principals": {"busagent-reader": "monitor", "busagent-writer": "admin"},
}
PROFILE = "rabbitmq3"


def bare(url: str) -> str:
    """The broker URL without credentials."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


@pytest.fixture(scope="module")
def secured_agent(broker_url):
    settings = replace(Settings(), mode="broker", broker_urls=(broker_url,), profile=PROFILE,
                       host_id=f"authz-{uuid.uuid4().hex[:8]}", security=BROKER_SECURITY)
    with RunningAgent(settings, with_stats=False) as running:
        yield running


def as_user(broker_url: str, running: RunningAgent, user: str | None, password: str | None = None, **kw) -> Client:
    return Client(bare(broker_url), host=running.host_id, profile=PROFILE, user=user, password=password,
                  timeout=kw.pop("timeout", 15), **kw)


@pytest.mark.rabbitmq
def test_broker_reader_reads_and_is_refused_writes(broker_url, secured_agent):
    with as_user(broker_url, secured_agent, "busagent-reader", "reader-secret") as c:
        assert c.call("virConnectGetHostname")
        assert c.call("virDomainGetInfo", domain={"name": "test"})["state_name"]
        with pytest.raises(CallError) as info:
            c.call("virDomainDefineXML", xml=domain_xml(f"authz-{uuid.uuid4().hex[:8]}"))
        assert info.value.kind == "unauthorized"
        assert "virDomainDefineXML" in str(info.value) and "reader-secret" not in str(info.value)


@pytest.mark.rabbitmq
def test_broker_writer_writes(broker_url, secured_agent, test_driver_keeper):
    name = f"authz-{uuid.uuid4().hex[:8]}"
    with as_user(broker_url, secured_agent, "busagent-writer", "writer-secret") as c:
        c.call("virDomainDefineXML", xml=domain_xml(name))
        try:
            assert test_driver_keeper.lookupByName(name).name() == name
        finally:
            c.call("virDomainUndefine", domain={"name": name})


@pytest.mark.rabbitmq
def test_broker_authenticated_but_unmapped_or_anonymous_refused(broker_url, secured_agent):
    with as_user(broker_url, secured_agent, "busagent-nobody", "nobody-secret") as c:
        with pytest.raises(CallError) as info:
            c.call("virConnectGetHostname")
        assert info.value.kind == "unauthorized" and "busagent-nobody" in str(info.value)
    # the broker's ANONYMOUS login (RabbitMQ maps it to guest) sends no user-id: unauthenticated
    with as_user(broker_url, secured_agent, None) as c:
        with pytest.raises(CallError) as info:
            c.call("virConnectGetHostname")
        assert info.value.kind == "unauthorized"
        assert info.value.error["message"] == "an unauthenticated peer may not call this agent"


def defines(running: RunningAgent) -> int:
    """virDomainDefineXML requests the agent handled, whatever their outcome."""
    return sum(n for (m, _), n in running.stats.calls.items() if m == "virDomainDefineXML")


@pytest.mark.rabbitmq
def test_broker_refuses_a_forged_user_id(broker_url, secured_agent, monkeypatch, test_driver_keeper):
    """busagent-nobody sends a write claiming to be busagent-writer: RabbitMQ refuses the message
    (the user-id must be the authenticated user), so the agent never runs it."""
    name = f"authz-forged-{uuid.uuid4().hex[:8]}"
    real = client_core.encode_request

    def forged(*args, **kw):
        return real(*args, **{**kw, "user_id": b"busagent-writer"})

    before = defines(secured_agent)
    monkeypatch.setattr(client_core, "encode_request", forged)
    with as_user(broker_url, secured_agent, "busagent-nobody", "nobody-secret", timeout=5) as c:
        with pytest.raises((CallTimeout, ConnectionFailed)):
            c.call("virDomainDefineXML", xml=domain_xml(name))
    monkeypatch.setattr(client_core, "encode_request", real)
    # a call behind it on the same queue is served, so the forged one is not merely late
    with as_user(broker_url, secured_agent, "busagent-writer", "writer-secret") as c:
        assert c.call("virConnectGetHostname")
    time.sleep(0.5)
    with pytest.raises(libvirt.libvirtError):
        test_driver_keeper.lookupByName(name)
    assert defines(secured_agent) == before  # not run, not even refused: it never reached the agent


@pytest.mark.rabbitmq
def test_broker_user_from_the_url_is_the_principal(broker_url, secured_agent):
    """A client whose credentials are in the URL (guest) sends user-id guest: not mapped, refused
    by name (not as an unauthenticated peer)."""
    with Client(broker_url, host=secured_agent.host_id, profile=PROFILE, timeout=15) as c:
        with pytest.raises(CallError) as info:
            c.call("virConnectGetHostname")
        assert info.value.error["message"] == "principal 'guest' may not call this agent"


def test_reads_libvirt_refuses_read_only_are_write_methods():
    table = load_table()
    assert {table.methods[n].access for n in LIBVIRT_DENIES_READONLY} == {"write"}
