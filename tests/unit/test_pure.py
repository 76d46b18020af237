"""Unit tests of pure logic: addressing, envelopes, settings, CLI argument parsing."""
from __future__ import annotations

import json

import pytest
from proton import Message

from busagent.api.errors import BadRequest, InvalidArguments
from busagent.bus import addressing
from busagent.bus.envelope import decode_request, encode_reply, encode_request, expired, parse_args, reply_body
from busagent.cli import parse_assignments
from busagent.config import ConfigError, load


@pytest.mark.parametrize("name,queue,topic,reply", [
    ("direct", "libvirt.rpc.h1", "libvirt.event.h1", None),
    ("rabbitmq3", "/queue/libvirt.rpc.h1", "/topic/libvirt.event.h1", "/exchange/amq.direct/c1"),
    ("rabbitmq4", "/queues/libvirt.rpc.h1", "/exchanges/amq.topic/libvirt.event.h1", "/exchanges/amq.direct/c1"),
    ("artemis", "libvirt.rpc.h1", "libvirt.event.h1", None),
    ("qpid-router", "libvirt.rpc.h1", "libvirt.event.h1", None),
])
def test_profiles(name, queue, topic, reply):
    p = addressing.profile(name)
    assert p.request_queue(addressing.rpc_name("libvirt", "h1")) == queue
    assert p.topic("libvirt.event.h1") == topic
    assert p.reply_address("c1") == reply


def test_unknown_profile():
    with pytest.raises(ValueError):
        addressing.profile("nope")


def test_request_roundtrip():
    data = encode_request("virDomainGetInfo", {"domain": {"name": "t"}}, "id-1", "reply-here", ttl=5)
    req = decode_request(data)
    assert req.subject == "virDomainGetInfo"
    assert req.correlation_id == "id-1"  # message id when no correlation id
    assert req.reply_to == "reply-here"
    assert parse_args(req) == {"domain": {"name": "t"}}
    assert req.deadline is not None and not expired(req)
    assert expired(req, now=req.deadline + 1)


def test_correlation_id_wins_over_message_id():
    msg = Message(body=b"{}", inferred=True, id="m", correlation_id="c", subject="x")
    assert decode_request(msg.encode()).correlation_id == "c"


@pytest.mark.parametrize("body,ctype", [(b"{nope", "application/json"), (b"{}", "text/plain"), (42, None)])
def test_bad_bodies(body, ctype):
    msg = Message(body=body, inferred=isinstance(body, bytes), subject="x", content_type=ctype)
    with pytest.raises(BadRequest):
        parse_args(decode_request(msg.encode()))


def test_string_body_accepted():
    msg = Message(body='{"a": 1}', subject="x")
    assert parse_args(decode_request(msg.encode())) == {"a": 1}


def test_reply_bodies():
    assert json.loads(reply_body(3, "VIR_X")) == {"result": 3, "result_name": "VIR_X"}
    err = json.loads(reply_body(error=InvalidArguments("bad", "$.flags")))
    assert err == {"error": {"kind": "invalid_arguments", "message": "bad", "path": "$.flags"}}
    msg = Message()
    msg.decode(encode_reply(b'{"result":1}', "c1"))
    assert msg.correlation_id == "c1" and msg.content_type == "application/json"
    assert bytes(msg.body) == b'{"result":1}'


def test_settings_defaults_and_env(tmp_path):
    s = load(env={})
    assert (s.uri, s.mode, s.listen, s.namespace) == ("test:///default", "direct", "127.0.0.1:5672", "libvirt")
    cfg = tmp_path / "a.toml"
    cfg.write_text('[libvirt]\nuri = "qemu:///system"\n[bus]\nmode = "broker"\nurls = ["amqp://b:5672"]\n')
    s = load(str(cfg), env={"BUSAGENT_WORKERS": "4"})
    assert (s.uri, s.mode, s.profile, s.broker_urls, s.workers) == (
        "qemu:///system", "broker", "rabbitmq3", ("amqp://b:5672",), 4)


@pytest.mark.parametrize("flags", [{"mode": "x"}, {"mode": "broker"}, {"workers": 0}, {"namespace": "a b"}])
def test_settings_rejected(flags):
    with pytest.raises(ConfigError):
        load(env={}, **flags)


def test_cli_assignments():
    assert parse_assignments(["domain.name=test", "flags=[\"VIR_A\"]", "n=3", "s=hello"]) == {
        "domain": {"name": "test"}, "flags": ["VIR_A"], "n": 3, "s": "hello"}
    with pytest.raises(SystemExit):
        parse_assignments(["novalue"])
