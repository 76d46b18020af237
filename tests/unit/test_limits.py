"""Limits on input: JSON depth, argument size, message framing, integer ranges, XML."""
from __future__ import annotations

import json

import pytest
from proton import Message

from busagent.api.errors import BadRequest, TooLarge
from busagent.bus import codec
from busagent.bus.envelope import (
    Limits,
    Request,
    check_depth,
    check_strings,
    decode_head,
    decode_request,
    encode_reply,
    json_depth,
    parse_args,
)


def req(body, content_type=None) -> Request:
    return Request("virConnectGetType", body, "r", "c", content_type, None, None)


@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ("{}", 1), ("[[]]", 2), ('{"a": [1, {"b": 2}]}', 3), ("[[],[[]]]", 3),
    ('["[[[[", "]]"]', 1), ('{"k[": "\\"[["}', 1), ("[" * 50 + "]" * 50, 50),
])
def test_json_depth(text, depth):
    assert json_depth(text) == depth
    assert json_depth(text.encode()) == depth


def test_json_depth_stops_early_and_is_cheap_on_bombs():
    assert json_depth("[" * 500_000 + "]" * 500_000, stop=32) == 33
    assert json_depth('"' + '\\"' * 100_000 + "\\", stop=32) == 0  # an unterminated string: no backtracking


def test_depth_limit_names_the_setting():
    check_depth("[" * 32 + "]" * 32, 32)
    with pytest.raises(TooLarge) as exc:
        check_depth("[" * 33 + "]" * 33, 32)
    assert exc.value.kind == "too_large" and "max_json_depth = 32" in exc.value.message
    assert exc.value.to_data()["limit"] == "max_json_depth"


def test_parse_args_depth():
    body = ('{"a":' * 40 + "1" + "}" * 40).encode()
    with pytest.raises(TooLarge):
        parse_args(req(body))
    assert parse_args(req(body), Limits(max_json_depth=64, max_arg_bytes=1 << 20))
    with pytest.raises(TooLarge):  # beyond Python's own recursion limit too
        parse_args(req(b"[" * 200_000), Limits(max_json_depth=100_000, max_arg_bytes=1 << 20))


def test_string_limit_with_path():
    check_strings({"a": ["x" * 1024]}, 1024)
    with pytest.raises(TooLarge) as exc:
        check_strings({"a": [1, {"b": "x" * 1025}]}, 1024)
    assert exc.value.details["path"] == "$.a[1].b" and "max_arg_bytes = 1024" in exc.value.message
    with pytest.raises(TooLarge):  # bytes, not characters
        check_strings({"a": "\u00e9" * 600}, 1024)
    with pytest.raises(TooLarge):  # keys count too
        check_strings({"k" * 2000: 1}, 1024)


def test_parse_args_string_limit():
    body = json.dumps({"xml": "x" * 5000}).encode()
    assert parse_args(req(body))["xml"] == "x" * 5000
    with pytest.raises(TooLarge) as exc:
        parse_args(req(body), Limits(max_json_depth=32, max_arg_bytes=4096))
    assert exc.value.details["path"] == "$.xml"


def test_the_service_applies_its_limits():
    """The agent's settings reach parse_args through RpcService (agent.py builds it with them)."""
    from busagent.api.dispatch import Dispatcher
    from busagent.rpc import RpcService

    body = json.dumps({"xml": "x" * 5000}).encode()
    loose, strict = RpcService(Dispatcher(lambda: None)), RpcService(Dispatcher(lambda: None), limits=Limits(32, 4096))
    assert strict.handle(req(body)).outcome == "too_large"
    assert loose.handle(req(body)).outcome != "too_large"


@pytest.mark.parametrize("body", [b"\xff\xfe{\x00}\x00", b'{"a": "\xff"}', b"\xc3\x28"])
def test_body_must_be_utf8(body):
    with pytest.raises(BadRequest):
        parse_args(req(body))


def test_odd_bodies_are_bad_requests():
    for body in ({"a": 1}, [1], 5, 1.5, True):
        with pytest.raises(BadRequest):
            parse_args(req(body))
    with pytest.raises(BadRequest):
        parse_args(req(b"{}", "text/plain"))


def _message(**props) -> bytes:
    return bytes(Message(inferred=True, **props).encode())


def test_head_of_a_cut_message():
    data = _message(subject="virConnectGetType", reply_to="rt", correlation_id="c1", body=b"x" * 100_000)
    for cut in (len(data) // 2, 60, 70):
        r = decode_head(data[:cut])
        assert (r.subject, r.reply_to, r.correlation_id, r.body) == ("virConnectGetType", "rt", "c1", None)
    assert decode_head(data[:10]).reply_to is None  # the properties are cut: nothing to answer to
    with pytest.raises(ValueError):
        decode_head(data[:2])


@pytest.mark.parametrize("tail", [
    b"\x00\x53\x75\xb0\x00\x00\x10\x00{}",  # a data section longer than the message
    b"\x00\x53\x75\x44garbage",  # a data section that is no binary, then garbage
    b"\x00\x53\x99\x40",  # an unknown section
    b"\x00\x53\x75\xa0\x02{}\x00\x53\x75\xa0\x02{}",  # two data sections
    b"\x00\x53\x75\xa0\x02{}\xff",  # trailing bytes
    b"\x00\x53\x77\xa1\x02\xff\xfe",  # a string body that is not UTF-8
])
def test_malformed_messages_do_not_decode(tail):
    head = _message(subject="virConnectGetType", reply_to="rt", correlation_id="c1")
    head = head[:codec.head_length(head)]
    with pytest.raises(Exception):  # noqa: B017 - any failure: the agent rejects it as undecodable
        decode_request(head + tail)
    assert decode_head(head + tail).reply_to == "rt"  # so it can still be answered


def test_well_formed_messages_still_decode():
    for props in ({"body": b"{}"}, {"body": "{}"}, {"body": {"a": 1}}, {"body": [1, 2]}, {"body": None}):
        data = _message(subject="s", reply_to="rt", correlation_id="c", **props)
        codec.check_message(data)
        assert decode_request(data).reply_to == "rt"


def test_properties_of_the_wrong_type_are_dropped_as_proton_does():
    data = _message(subject="virConnectGetType", reply_to="abc", correlation_id="c1", body=b"{}")
    r = decode_request(data.replace(b"\xa1\x03abc", b"\xa0\x03abc"))  # reply-to as binary
    assert r.reply_to is None and r.subject == "virConnectGetType"


@pytest.mark.parametrize("cid", [-5, 2 ** 70, True, 1.5, "x" * 300, b"id", 7])
def test_any_correlation_id_can_be_encoded(cid):
    """Whatever a request's id decoded to, its reply encodes (a negative or huge integer as its text)."""
    data = encode_reply(b"{}", cid)
    assert decode_request(data).body == b"{}"


def test_skip_is_iterative():
    with pytest.raises((IndexError, codec.Unsupported)):
        codec.skip(b"\x00" * 100_000, 0)  # nested descriptors: no recursion error
