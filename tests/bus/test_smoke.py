"""A first call through the bus, and errors that keep the agent serving."""
import pytest

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
