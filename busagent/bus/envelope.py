"""AMQP messages <-> requests and replies (pure: no I/O, no proton endpoints)."""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any

from proton import Message

from busagent.api.errors import AgentError, BadRequest
from busagent.bus import codec

CONTENT_TYPE = "application/json"


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


def decode_request(data: bytes) -> Request:
    """Decode a transfer's bytes into a Request (fast path, else proton's decoder; raises on garbage)."""
    try:
        f = codec.decode(data)
    except (codec.Unsupported, IndexError, UnicodeDecodeError, struct.error):
        return _decode_with_proton(data)
    deadline = None
    if f["expiry_time"]:
        deadline = f["expiry_time"] / 1000.0
    elif f.get("ttl") and f["creation_time"]:
        deadline = (f["creation_time"] + f["ttl"]) / 1000.0
    cid = f["correlation_id"] if f["correlation_id"] is not None else f["id"]
    return Request(f["subject"], f.get("body"), f["reply_to"], cid, f["content_type"] or None, deadline,
                   f["user_id"], f["id"])


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


def parse_args(req: Request) -> Any:
    """The request's arguments as JSON data (raises BadRequest)."""
    if req.content_type not in (None, CONTENT_TYPE):
        raise BadRequest(f"content-type must be {CONTENT_TYPE}, not {req.content_type!r}")
    body = req.body
    if body is None:
        return {}
    if isinstance(body, (bytes, memoryview)):
        body = bytes(body)
    elif not isinstance(body, str):
        raise BadRequest("the body must be a UTF-8 JSON text (data or string section)")
    try:
        return json.loads(body) if body else {}
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None


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
    msg = Message(body=body, inferred=True, correlation_id=correlation_id,
                  content_type=CONTENT_TYPE, address=address, subject=subject)
    return msg.encode()


def encode_request(method: str, args: dict[str, Any], message_id: Any, reply_to: str | None,
                   address: str | None = None, ttl: float | None = None) -> bytes:
    """Encode a request message (used by clients). Durable: a broker keeps it across a restart
    (in a durable queue) until the agent accepts it."""
    msg = Message(body=json.dumps(args, separators=(",", ":")).encode(), inferred=True, subject=method,
                  id=message_id, reply_to=reply_to, content_type=CONTENT_TYPE, address=address, durable=True)
    if ttl:
        msg.ttl = ttl
        msg.creation_time = time.time()
        msg.expiry_time = msg.creation_time + ttl
    return msg.encode()
