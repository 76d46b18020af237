"""A first call through the bus, and errors that keep the agent serving."""
import pytest
from proton.utils import BlockingConnection

from busagent.client import CallError, LibvirtError


def test_get_info(client):
    info = client.call("virDomainGetInfo", domain={"name": "test"})
    assert info["state_name"] == "VIR_DOMAIN_RUNNING"
    assert info["nrVirtCpu"] == 2


def test_no_such_domain_is_libvirt_error(client):
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainGetInfo", domain={"name": "nope"})
    assert exc.value.code_name == "VIR_ERR_NO_DOMAIN"


def test_unknown_method_then_still_serving(client):
    with pytest.raises(CallError) as exc:
        client.call("virNoSuchThing")
    assert exc.value.kind == "unknown_method"
    assert client.call("virConnectGetHostname")


def test_proxy(host):
    assert host.domain(name="test").getInfo()["nrVirtCpu"] == 2


def test_the_agent_names_itself_in_its_open_frame(bus, agent):
    """Direct mode only, by nature: there the agent is the AMQP peer, and its open frame gives its
    host id, request address and epoch (what lets ``busagent call`` go without ``--host``). Through
    a broker the peer is the broker, whose open frame knows nothing of agents."""
    if bus.mode != "direct":
        pytest.skip("the peer is the broker: its open frame says nothing of agents")
    conn = BlockingConnection(agent.url, timeout=10)
    try:
        props = {str(k): v for k, v in (conn.conn.remote_properties or {}).items()}
    finally:
        conn.close()
    assert props == {"busagent-host": agent.host_id, "busagent-rpc": f"libvirt.rpc.{agent.host_id}",
                     "busagent-epoch": agent.agent.bus.stamper.epoch}
