"""Bad requests get clear error replies, and the agent keeps serving after each one.

The first half goes through the real client; the second sends hand-made AMQP
messages with a small proton client, to reach what the client never sends (straight to
the agent in direct mode, through the broker's request queue in rabbitmq mode)."""
from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import pytest
from proton import Message
from proton.utils import BlockingConnection

from busagent.client import CallError, LibvirtError


def still_serving(client) -> None:
    assert client.call("virDomainGetInfo", domain={"name": "test"})["state_name"] == "VIR_DOMAIN_RUNNING"


def call_error(client, method: str, **args: Any) -> dict[str, Any]:
    with pytest.raises(CallError) as exc:
        client.call(method, **args)
    still_serving(client)
    return exc.value.error


# -- through the client ---------------------------------------------------------------------------


def test_unknown_method(client):
    err = call_error(client, "virDomainFrobnicate", domain={"name": "test"})
    assert err["kind"] == "unknown_method" and "virDomainFrobnicate" in err["message"]


def test_excluded_method(client):
    err = call_error(client, "virDomainOpenConsole", dom={"name": "test"})
    assert err["kind"] == "not_supported" and "virStream" in err["message"]


def test_helper_function_is_not_served(client):
    err = call_error(client, "virDomainFree", domain={"name": "test"})
    assert err["kind"] == "not_supported" and "memory management" in err["message"]


@pytest.mark.parametrize("args, path", [
    ({"domain": {"name": "test"}, "flags": "VIR_DOMAIN_XML_SECURE"}, "$.flags"),
    ({"domain": {"name": "test"}, "flags": -1}, "$.flags"),
    ({"domain": {"name": "test"}, "flags": [1]}, "$.flags"),
    ({"domain": "test"}, "$.domain"),
])
def test_wrong_argument_types(client, args, path):
    err = call_error(client, "virDomainGetXMLDesc", **args)
    assert err["kind"] == "invalid_arguments"
    assert err["path"].startswith(path)


def test_wrong_type_for_string_and_integer(client):
    err = call_error(client, "virDomainLookupByName", name=42)
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.name"
    err = call_error(client, "virDomainLookupByID", id="one")
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.id"


def test_unknown_argument(client):
    err = call_error(client, "virDomainGetInfo", domain={"name": "test"}, verbose=True)
    assert err["kind"] == "invalid_arguments" and "verbose" in err["message"]


def test_missing_required_argument(client):
    err = call_error(client, "virDomainGetInfo")
    assert err["kind"] == "invalid_arguments" and "domain" in err["message"]
    err = call_error(client, "virDomainSetMemory", domain={"name": "test"})
    assert err["kind"] == "invalid_arguments" and "memory" in err["message"]


@pytest.mark.parametrize("ref, path, words", [
    ({"nam": "x"}, "$.domain", "uuid or name or id"),
    ({"uuid": "not-a-uuid"}, "$.domain.uuid", "not a UUID"),
    ({"id": "1"}, "$.domain.id", "integer"),
    ({"name": ["test"]}, "$.domain.name", "string"),
    ({"name": "test", "colour": "blue"}, "$.domain", "colour"),
])
def test_malformed_references(client, ref, path, words):
    err = call_error(client, "virDomainGetInfo", domain=ref)
    assert err["kind"] == "invalid_arguments"
    assert err["path"] == path and words in err["message"]


def test_malformed_nested_reference(client):
    err = call_error(client, "virStorageVolGetInfo", vol={"pool": {"nam": "default-pool"}, "name": "x"})
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.vol.pool"
    err = call_error(client, "virDomainSnapshotGetXMLDesc", snapshot={"domain": {"uuid": "zz"}, "name": "s"})
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.snapshot.domain.uuid"


def test_bad_uuid_argument(client):
    err = call_error(client, "virDomainLookupByUUID", uuid="0123")
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.uuid"


def test_unknown_flag_constant_name(client):
    err = call_error(client, "virConnectListAllDomains", flags=["VIR_CONNECT_LIST_DOMAINS_NOPE"])
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.flags[0]"
    err = call_error(client, "virConnectListAllDomains",
                     flags=["VIR_CONNECT_LIST_DOMAINS_ACTIVE", "VIR_CONNECT_LIST_DOMAINS_BOGUS"])
    assert err["path"] == "$.flags[1]" and "VIR_CONNECT_LIST_DOMAINS_BOGUS" in err["message"]


def test_unknown_enum_constant_name(client):
    err = call_error(client, "virDomainGetMetadata", domain={"name": "test"}, type="VIR_DOMAIN_METADATA_NOPE",
                     uri=None)
    assert err["kind"] == "invalid_arguments" and err["path"] == "$.type"


def test_no_such_domain(client):
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainSuspend", domain={"name": "no-such-guest"})
    err = exc.value.error
    assert err["kind"] == "libvirt" and err["code_name"] == "VIR_ERR_NO_DOMAIN" and err["code"] == 42
    assert err["domain_name"] and err["level_name"] == "VIR_ERR_ERROR"
    still_serving(client)


def test_libvirt_rejects_bad_xml(client):
    with pytest.raises(LibvirtError) as exc:
        client.call("virDomainDefineXML", xml="<domain")
    assert exc.value.code_name == "VIR_ERR_XML_DETAIL"
    still_serving(client)


# -- raw AMQP messages ----------------------------------------------------------------------------


class RawClient:
    """Sends hand-made requests to the agent and reads the replies (blocking proton API).

    Direct mode: a dynamic reply receiver at the agent. RabbitMQ: replies to
    /exchange/amq.direct/<id>, requests to the agent's queue (/amq/queue/: declares nothing)."""

    def __init__(self, bus: Any, agent: Any) -> None:
        if bus.mode == "direct":
            self.conn = BlockingConnection(agent.url, timeout=10)
            self.receiver = self.conn.create_receiver(None, dynamic=True)
            self.reply_to = self.receiver.remote_source.address
            self.sender = self.conn.create_sender(f"libvirt.rpc.{agent.host_id}")
        else:
            self.conn = BlockingConnection(bus.broker_url, timeout=10, allowed_mechs="PLAIN", allow_insecure_mechs=True)
            self.reply_to = f"/exchange/amq.direct/raw-{uuid.uuid4().hex}"
            self.receiver = self.conn.create_receiver(self.reply_to)
            self.sender = self.conn.create_sender(f"/amq/queue/libvirt.rpc.{agent.host_id}")
        self.ids = itertools.count()

    def send(self, **props: Any) -> None:
        """Send one message; returns once the agent (direct mode: after it ran) or the broker settled it."""
        self.sender.send(Message(**props))

    def request(self, **props: Any) -> tuple[Any, dict[str, Any]]:
        cid = f"raw-{next(self.ids)}"
        self.send(reply_to=self.reply_to, correlation_id=cid, **props)
        msg = self.receiver.receive(timeout=10)
        assert msg.correlation_id == cid
        assert msg.content_type == "application/json"
        return cid, json.loads(bytes(msg.body))

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw(bus, agent):
    c = RawClient(bus, agent)
    yield c
    c.close()


def error_of(raw: RawClient, **props: Any) -> dict[str, Any]:
    _, reply = raw.request(**props)
    assert "result" not in reply
    return reply["error"]


def assert_raw_serving(raw: RawClient) -> None:
    _, reply = raw.request(body=b"{}", subject="virConnectGetType", content_type="application/json")
    assert reply == {"result": "TEST"}


def test_raw_well_formed_request(raw):
    _, reply = raw.request(body=json.dumps({"domain": {"name": "test"}}).encode(), subject="virDomainGetState",
                           content_type="application/json")
    assert reply["result"]["state_name"] == "VIR_DOMAIN_RUNNING"
    # a JSON text as an AMQP string, and no content type at all, are accepted too
    _, reply = raw.request(body=json.dumps({"name": "test"}), subject="virDomainLookupByName")
    assert reply["result"]["name"] == "test"


def test_raw_non_json_body(raw):
    err = error_of(raw, body=b"this is not json", subject="virConnectGetType", content_type="application/json")
    assert err["kind"] == "bad_request" and "JSON" in err["message"]
    assert_raw_serving(raw)


def test_raw_wrong_content_type(raw):
    err = error_of(raw, body=b"{}", subject="virConnectGetType", content_type="text/plain")
    assert err["kind"] == "bad_request" and "text/plain" in err["message"]
    assert_raw_serving(raw)


def test_raw_no_subject(raw):
    err = error_of(raw, body=b"{}", content_type="application/json")
    assert err["kind"] == "bad_request" and "subject" in err["message"]
    assert_raw_serving(raw)


def test_raw_body_is_a_json_array(raw):
    err = error_of(raw, body=b'[{"name": "test"}]', subject="virDomainLookupByName",
                   content_type="application/json")
    assert err["kind"] == "invalid_arguments" and err["path"] == "$"
    assert_raw_serving(raw)


def test_raw_body_is_an_amqp_map(raw):
    err = error_of(raw, body={"name": "test"}, subject="virDomainLookupByName")
    assert err["kind"] == "bad_request" and "JSON text" in err["message"]
    assert_raw_serving(raw)


def test_raw_expired_request(raw):
    err = error_of(raw, body=b"{}", subject="virConnectGetType", content_type="application/json",
                   creation_time=time.time() - 60, expiry_time=time.time() - 30)
    assert err["kind"] == "expired"
    assert_raw_serving(raw)


def test_raw_request_without_reply_to_is_executed_and_counted(raw, agent, client, running_domain):
    rejected = agent.stats.rejected["no_reply_to"]
    ok = agent.stats.calls[("virDomainSuspend", "ok")]
    raw.send(body=json.dumps({"domain": running_domain}).encode(), subject="virDomainSuspend",
             content_type="application/json")  # no reply_to
    deadline = time.monotonic() + 5
    while agent.stats.rejected["no_reply_to"] == rejected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.stats.rejected["no_reply_to"] == rejected + 1
    assert agent.stats.calls[("virDomainSuspend", "ok")] == ok + 1
    # it ran: the guest is paused
    assert client.call("virDomainGetState", domain=running_domain)["state_name"] == "VIR_DOMAIN_PAUSED"
    assert_raw_serving(raw)
