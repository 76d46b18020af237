"""Transport security with a private PKI (tests/pki.py): TLS and client certificates in direct
mode, TLS and SASL PLAIN towards a real RabbitMQ in broker mode.

Every refusal is checked from both ends where both are ours: the peer fails to connect, the
agent keeps serving and counts the refused connection.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from busagent.agent import Agent
from busagent.client import CallError, Client
from busagent.client.errors import ConnectionFailed
from busagent.client.subscribe import Subscription
from busagent.config import ConfigError, Settings
from busagent.testing import RunningAgent


def _load_pki_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("busagent_test_pki", Path(__file__).parents[1] / "pki.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


test_pki = _load_pki_module()

READER = "CN=reader,O=busagent test"  # the principal proton reports for client-reader.pem
WRITER = "CN=writer,O=busagent test"


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """The PKI scripts/test made for the broker, else a fresh one."""
    given = os.environ.get("BUSAGENT_TEST_PKI_DIR")
    return Path(given) if given else test_pki.make(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Path, server: str = "server", **kw) -> Settings:
    return Settings(tls_cert=str(pki / f"{server}.pem"), tls_key=str(pki / f"{server}-key.pem"),
                    tls_ca=str(pki / "ca.pem"), **kw)


def url(running: RunningAgent, pki: Path, client: str | None = None, ca: str = "ca", host: str = "localhost") -> str:
    port = running.agent.bus.listening[1]
    u = f"amqps://{host}:{port}?ca={pki / (ca + '.pem')}"
    if client:
        u += f"&cert={pki / (client + '.pem')}&key={pki / (client + '-key.pem')}"
    return u


def refused(address: str) -> str:
    """Connect and call; return why it failed (the test fails if the call succeeds)."""
    with pytest.raises((ConnectionFailed, CallError, TimeoutError)) as info:
        with Client(address, timeout=5) as c:
            c.call("virConnectGetHostname")
    return str(info.value)


@pytest.fixture(scope="module")
def mutual(pki):
    """A direct-mode agent that requires client certificates (SASL EXTERNAL)."""
    with RunningAgent(tls_settings(pki, tls_client_auth="required"), with_stats=False) as running:
        yield running


def test_good_client_certificate_is_accepted_and_is_the_principal(mutual, pki):
    seen = []
    service = mutual.agent.bus.service
    original = service.handle

    def spy(req):
        seen.append(req.principal)
        return original(req)

    service.handle = spy
    try:
        with Client(url(mutual, pki, "client-reader"), timeout=10) as c:
            assert c.call("virConnectGetHostname")
    finally:
        service.handle = original
    assert seen == [READER]


@pytest.mark.parametrize(("client", "expect"), [
    ("client-unknown-ca", "unknown ca"),
    ("client-expired", "expired"),
    (None, "certificate required"),
])
def test_bad_client_certificates_are_refused(mutual, pki, client, expect):
    before = mutual.stats.rejected["connection_tls"]
    why = refused(url(mutual, pki, client))
    assert expect in why.lower(), why
    assert _eventually(lambda: mutual.stats.rejected["connection_tls"] > before)
    with Client(url(mutual, pki, "client-writer"), timeout=10) as c:  # still serving
        assert c.call("busagentPing") == {"pong": True}


def test_plain_amqp_to_a_tls_listener_is_refused(mutual):
    why = refused(f"amqp://127.0.0.1:{mutual.agent.bus.listening[1]}")
    assert why


@pytest.mark.parametrize(("server", "ca", "host", "expect"), [
    ("server-unknown-ca", "ca", "localhost", "certificate verify failed"),  # unknown CA
    ("server-otherhost", "ca", "localhost", "certificate verify failed"),  # names broker.invalid only
    ("server-expired", "ca", "localhost", "certificate verify failed"),
    ("server", "unknown-ca", "localhost", "certificate verify failed"),  # client trusts another CA
])
def test_client_refuses_a_bad_server_certificate(pki, server, ca, host, expect):
    with RunningAgent(tls_settings(pki, server), with_stats=False) as running:
        why = refused(url(running, pki, ca=ca, host=host))
        assert expect in why.lower(), why
        assert _eventually(lambda: running.stats.rejected["connection_tls"] >= 1)  # the agent saw it too


def test_server_certificate_without_client_auth_serves_anonymous_tls(pki):
    with RunningAgent(tls_settings(pki), with_stats=False) as running:
        seen = []
        original = running.agent.bus.service.handle
        running.agent.bus.service.handle = lambda req: (seen.append(req.principal), original(req))[1]
        with Client(url(running, pki), timeout=10) as c:
            assert c.call("virConnectGetHostname")
        assert seen == [None]  # encrypted, but not authenticated


def test_key_readable_by_others_is_refused(pki, tmp_path):
    key = tmp_path / "loose-key.pem"
    key.write_bytes((pki / "server-key.pem").read_bytes())
    key.chmod(0o644)
    settings = replace(tls_settings(pki), tls_key=str(key), listen="127.0.0.1:0", metrics_listen="")
    agent = Agent(settings.validate(), with_stats=False)
    with pytest.raises(ConfigError, match="chmod 600"):
        agent.start_services()
    agent.hypervisor.close()


def test_client_auth_needs_a_ca():
    with pytest.raises(ConfigError, match="tls_ca"):
        Settings(tls_cert="c.pem", tls_key="k.pem", tls_client_auth="required").validate()


def test_principal_drives_authorization(pki):
    """The certificate subject is the principal the [security] roles name."""
    security = {"roles": {"monitor": {"access": "read"}, "admin": {"access": "write"}},
                "principals": {READER: "monitor", WRITER: "admin"}}
    with RunningAgent(tls_settings(pki, tls_client_auth="required", security=security), with_stats=False) as running:
        with Client(url(running, pki, "client-reader"), timeout=10) as reader:
            assert reader.call("virConnectGetHostname")
            with pytest.raises(CallError) as denied:
                reader.call("virDomainSuspend", domain={"name": "test"})
            assert denied.value.kind == "unauthorized"
        with Client(url(running, pki, "client-nobody"), timeout=10) as nobody:
            with pytest.raises(CallError) as unknown:
                nobody.call("virConnectGetHostname")
            assert unknown.value.kind == "unauthorized"
        with Client(url(running, pki, "client-writer"), timeout=10) as writer:
            info = writer.call("virDomainGetInfo", domain={"name": "test"})
            assert info["state"] in (1, 3)


def test_subscriptions_need_a_role(pki):
    """What the agent publishes is for principals with a role too (direct mode)."""
    security = {"roles": {"monitor": {"access": "read"}, "admin": {"access": "write"}},
                "principals": {READER: "monitor", WRITER: "admin"}}
    with RunningAgent(tls_settings(pki, tls_client_auth="required", security=security), with_stats=False) as running:
        with Subscription(url(running, pki, "client-nobody"), ["libvirt.event.#"]) as refused_sub:
            with pytest.raises(ConnectionFailed, match="may not"):
                refused_sub.get(timeout=10)
        assert running.stats.rejected["unauthorized_subscription"] == 1
        with Subscription(url(running, pki, "client-reader"), ["libvirt.event.#"]) as sub:
            assert sub.ready.wait(10)
            with Client(url(running, pki, "client-writer"), timeout=10) as writer:
                writer.call("virDomainSuspend", domain={"name": "test"})
                writer.call("virDomainResume", domain={"name": "test"})
            deadline = time.monotonic() + 10
            kinds = set()
            while "domain.lifecycle" not in kinds and time.monotonic() < deadline:
                kinds.add(sub.get(timeout=10).get("kind"))
            assert "domain.lifecycle" in kinds


# -- broker mode: the agent as a TLS client of RabbitMQ -----------------------------------------

@pytest.fixture(scope="module")
def tls_broker(pki) -> str:
    """``amqps://localhost:PORT`` of the test broker (scripts/test gives it a TLS listener)."""
    address = os.environ.get("BUSAGENT_TEST_BROKER_TLS_URL")
    if not address:
        pytest.skip("BUSAGENT_TEST_BROKER_TLS_URL is not set (scripts/test starts RabbitMQ with TLS)")
    if not os.environ.get("BUSAGENT_TEST_PKI_DIR"):
        pytest.skip("the broker's PKI (BUSAGENT_TEST_PKI_DIR) is not known")
    return address


def _broker_agent(urls: tuple[str, ...], pki: Path, **kw) -> Agent:
    kw.setdefault("tls_ca", str(pki / "ca.pem"))
    settings = Settings(mode="broker", profile="rabbitmq3", broker_urls=urls, metrics_listen="",
                        host_id=f"tls-{os.urandom(4).hex()}", **kw)
    agent = Agent(settings.validate(), with_stats=False)
    agent.start_services()
    return agent


def _connects(agent: Agent, seconds: float) -> bool:
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        return agent.bus.broker_ready.wait(seconds)
    finally:
        agent.stop()
        thread.join(10)


def _refused_because(agent: Agent, expect: str) -> str:
    """Run ``agent`` until its first connection attempt fails; that failure's reason must say ``expect``."""
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert _eventually(lambda: agent.bus.last_broker_error != "", 10), "no connection attempt ended"
        assert not agent.bus.broker_ready.is_set()
        why = agent.bus.last_broker_error
        assert expect in why.lower(), why
        return why
    finally:
        agent.stop()
        thread.join(10)


def _with_user(address: str, user: str, password: str) -> str:
    return address.replace("amqps://", f"amqps://{user}:{password}@", 1)


def test_agent_serves_through_the_broker_over_tls(tls_broker, pki):
    agent = _broker_agent((_with_user(tls_broker, "busagent-writer", "writer-secret"),), pki)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert agent.bus.broker_ready.wait(15)
        client_url = _with_user(tls_broker, "busagent-reader", "reader-secret") + f"?ca={pki / 'ca.pem'}"
        with Client(client_url, host=agent.host_id, profile="rabbitmq3", timeout=15) as c:
            assert c.call("virConnectGetHostname")
    finally:
        agent.stop()
        thread.join(10)


@pytest.mark.parametrize(("host", "ca", "password", "expect"), [
    ("localhost", "ca", "not-the-password", "unauthorized"),  # wrong password
    ("127.0.0.1", "ca", "writer-secret", "certificate verify failed"),  # the certificate names localhost only
    ("localhost", "unknown-ca", "writer-secret", "certificate verify failed"),  # unknown CA
])
def test_agent_refuses_or_is_refused(tls_broker, pki, host, ca, password, expect):
    address = _with_user(tls_broker, "busagent-writer", password).replace("@localhost:", f"@{host}:")
    why = _refused_because(_broker_agent((address,), pki, tls_ca=str(pki / f"{ca}.pem")), expect)
    assert password not in why


def test_credentials_from_a_file_never_fall_back_to_anonymous(tls_broker, pki, tmp_path, monkeypatch):
    """The test broker maps ANONYMOUS to guest: an agent that fell back would connect."""
    creds = tmp_path / "bus.toml"
    creds.write_text('user = "busagent-writer"\npassword = "wrong-secret-4711"\n')
    creds.chmod(0o600)
    _refused_because(_broker_agent((tls_broker,), pki, credentials_file=str(creds)), "unauthorized")
    creds.write_text('user = "busagent-writer"\npassword = "writer-secret"\n')
    assert _connects(_broker_agent((tls_broker,), pki, credentials_file=str(creds)), 15)


def test_credentials_file_readable_by_others_is_refused(tls_broker, pki, tmp_path):
    creds = tmp_path / "bus.toml"
    creds.write_text('user = "busagent-writer"\npassword = "writer-secret"\n')
    creds.chmod(0o644)
    settings = Settings(mode="broker", profile="rabbitmq3", broker_urls=(tls_broker,), metrics_listen="",
                        credentials_file=str(creds), tls_ca=str(pki / "ca.pem"))
    agent = Agent(settings.validate(), with_stats=False)
    with pytest.raises(ConfigError, match="chmod 600"):
        agent.start_services()
    agent.hypervisor.close()


def _eventually(check, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()
