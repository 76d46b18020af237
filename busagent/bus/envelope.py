"""AMQP messages <-> requests and replies (pure: no I/O, no proton endpoints)."""
from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

from proton import Message

from busagent.api.errors import AgentError, BadRequest, TooLarge
from busagent.bus import codec
from busagent.config import Settings

CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Limits:
    """What one request may carry (Settings ``max_json_depth``, ``max_arg_bytes``)."""

    max_json_depth: int = Settings.max_json_depth
    max_arg_bytes: int = Settings.max_arg_bytes


DEFAULT_LIMITS = Limits()


@dataclass
class Request:
    """One decoded method call."""

    subject: str | None
    body: Any  # raw body (bytes or str) until parsed on a worker
    reply_to: str | None
    correlation_id: Any
    content_type: str | None
    deadline: float | None  # absolute, seconds since the epoch
    user_id: bytes | None
    message_id: Any = None  # the key of write-request deduplication
    principal: str | None = None  # who sent it, as the transport proved it (None: unauthenticated)


def _str_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def decode_request(data: bytes) -> Request:
    """Decode a transfer's bytes into a Request (fast path, else proton's decoder; raises on garbage)."""
    try:
        f = codec.decode(data)
    except (codec.Unsupported, IndexError, UnicodeDecodeError, struct.error):
        codec.check_message(data)  # proton reads garbage leniently: refuse what is not a whole message
        return _decode_with_proton(data)
    if "subject" not in f:  # no properties section
        return _decode_with_proton(data)
    if not (_str_or_none(f["subject"]) and _str_or_none(f["reply_to"]) and _str_or_none(f["content_type"])
            and isinstance(f["user_id"], (bytes, type(None)))):
        return _decode_with_proton(data)  # properties of the wrong types: proton's reading (it drops them)
    deadline = None
    if f["expiry_time"]:
        deadline = f["expiry_time"] / 1000.0
    elif f.get("ttl") and f["creation_time"]:
        deadline = (f["creation_time"] + f["ttl"]) / 1000.0
    cid = f["correlation_id"] if f["correlation_id"] is not None else f["id"]
    return Request(f["subject"], f.get("body"), f["reply_to"], cid, f["content_type"] or None, deadline,
                   f["user_id"], f["id"])


def decode_head(prefix: bytes) -> Request:
    """The request in the first bytes of a message whose body is not at hand (an oversized
    one, of which only a prefix was kept, or one whose body does not decode): its leading
    sections (properties: subject, reply-to, correlation id...), body None. Raises on garbage."""
    end = codec.head_length(prefix)
    if not end:
        raise ValueError("no complete leading section")
    req = decode_request(bytes(prefix[:end]))
    req.body = None
    return req


def _decode_with_proton(data: bytes) -> Request:
    msg = Message()
    msg.decode(data)
    deadline = None
    if msg.expiry_time:
        deadline = float(msg.expiry_time)
    elif msg.ttl and msg.creation_time:
        deadline = float(msg.creation_time) + float(msg.ttl)
    cid = msg.correlation_id if msg.correlation_id is not None else msg.id
    body = msg.body
    if isinstance(body, memoryview):  # a view into proton's buffer: copy before it is freed
        body = bytes(body)
    ctype = msg.content_type
    if ctype in ("", "None"):  # proton 0.40 reports an absent content-type as symbol('None')
        ctype = None
    return Request(msg.subject, body, msg.reply_to, cid, ctype, deadline, msg.user_id, msg.id)


def parse_args(req: Request, lim: Limits = DEFAULT_LIMITS) -> Any:
    """The request's arguments as JSON data (raises BadRequest, or TooLarge over a limit of ``lim``)."""
    if req.content_type not in (None, CONTENT_TYPE):
        raise BadRequest(f"content-type must be {CONTENT_TYPE}, not {req.content_type!r}")
    body = req.body
    if body is None:
        return {}
    if isinstance(body, (bytes, memoryview)):
        size = len(body)
        try:
            body = str(body, "utf-8")  # UTF-8 only (json.loads would guess UTF-16 and UTF-32 too)
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the body is not UTF-8: {exc}") from None
    elif isinstance(body, str):
        size = 4 * len(body)  # at most so many UTF-8 bytes
    else:
        raise BadRequest("the body must be a UTF-8 JSON text (data or string section)")
    if not body:
        return {}
    check_depth(body, lim.max_json_depth)
    try:
        args = json.loads(body)
    except RecursionError:
        raise _too_deep(lim.max_json_depth) from None
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if size > lim.max_arg_bytes:  # else no string in it can be longer
        check_strings(args, lim.max_arg_bytes)
    return args


# a JSON string, possessive (no backtracking); one left open runs to the end of the text
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")  # both kinds of brackets nest alike
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _too_deep(limit: int) -> TooLarge:
    return TooLarge(f"the arguments are nested deeper than max_json_depth = {limit}",
                    limit="max_json_depth", max=limit, path="$")


def json_depth(text: bytes | str, stop: int | None = None) -> int:
    """How deeply the arrays and objects of a JSON text nest (``[]`` is 1, a scalar 0).

    Never parses, and all in C: strings are dropped and brackets kept, then each pass removes
    the innermost pairs (one level) until none is left, or ``stop`` levels are passed (then it
    returns ``stop + 1``). Brackets that do not pair (invalid JSON) count as far as they pair."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if data.count(b"[") + data.count(b"{") == 0:
        return 0
    skeleton = _JSON_STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    over = b"(" * (stop + 1) if stop is not None else None
    depth = 0
    while skeleton:
        if over is not None and over in skeleton:  # as many openers in a row: that deep at least
            return stop + 1
        reduced = skeleton.replace(b"()", b"")
        if len(reduced) == len(skeleton):
            break  # unbalanced: json.loads reports it
        skeleton = reduced
        depth += 1
        if over is not None and depth > stop:
            return depth
    return depth


def check_depth(text: bytes | str, limit: int) -> None:
    """Raise TooLarge when a JSON text nests deeper than ``limit`` (cheap for ordinary texts:
    fewer brackets than the limit cannot nest deeper)."""
    if isinstance(text, str):
        opened = text.count("[") + text.count("{")
    else:
        opened = text.count(b"[") + text.count(b"{")
    if opened > limit and json_depth(text, limit) > limit:
        raise _too_deep(limit)


def check_strings(value: Any, limit: int) -> None:
    """Raise TooLarge for the first string (value or key) longer than ``limit`` UTF-8 bytes,
    with its JSON path."""
    stack: list[tuple[Any, str]] = [(value, "$")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if len(v) > limit // 4 and _utf8_len(v) > limit:
                raise TooLarge(f"the argument at {path} is {_utf8_len(v)} bytes, over max_arg_bytes = {limit}",
                               limit="max_arg_bytes", max=limit, path=path)
        elif isinstance(v, dict):
            for k, item in v.items():
                where = f"{path}.{k}" if len(k) <= 64 else f"{path}.{k[:64]}..."
                if len(k) > limit // 4 and _utf8_len(k) > limit:
                    raise TooLarge(f"a key in {path} is {_utf8_len(k)} bytes, over max_arg_bytes = {limit}",
                                   limit="max_arg_bytes", max=limit, path=path)
                stack.append((item, where))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def expired(req: Request, now: float | None = None) -> bool:
    return req.deadline is not None and (now or time.time()) > req.deadline


def reply_body(result: Any = None, result_name: str | None = None, error: AgentError | dict | None = None) -> bytes:
    """The JSON body of a reply."""
    if error is not None:
        doc: dict[str, Any] = {"error": error.to_data() if isinstance(error, AgentError) else error}
    else:
        doc = {"result": result}
        if result_name is not None:
            doc["result_name"] = result_name
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def encode_reply(body: bytes, correlation_id: Any, address: str | None = None, subject: str | None = None) -> bytes:
    """Encode a reply message (data section, JSON content type) to transfer bytes."""
    try:
        return codec.encode_reply(body, correlation_id, address, subject)
    except codec.Unsupported:
        pass
    try:
        msg = Message(body=body, inferred=True, correlation_id=correlation_id,
                      content_type=CONTENT_TYPE, address=address, subject=subject)
        return msg.encode()
    except Exception:  # an id of no AMQP id type (a negative integer...): echoed as its text
        return codec.encode_reply(body, str(correlation_id), address, subject)


def encode_request(method: str, args: dict[str, Any], message_id: Any, reply_to: str | None,
                   address: str | None = None, ttl: float | None = None, user_id: bytes | None = None) -> bytes:
    """Encode a request message (used by clients). Durable: a broker keeps it across a restart
    (in a durable queue) until the agent accepts it. ``user_id``: the sender's authenticated
    user, which a broker validates (RabbitMQ refuses any other) and an agent in broker mode
    authorizes by."""
    msg = Message(body=json.dumps(args, separators=(",", ":")).encode(), inferred=True, subject=method,
                  id=message_id, reply_to=reply_to, content_type=CONTENT_TYPE, address=address, durable=True)
    if user_id:
        msg.user_id = user_id
    if ttl:
        msg.ttl = ttl
        msg.creation_time = time.time()
        msg.expiry_time = msg.creation_time + ttl
    return msg.encode()
