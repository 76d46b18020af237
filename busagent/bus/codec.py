"""A fast path for the AMQP 1.0 encoding of the agent's own messages.

proton's ``Message`` costs 20-30 µs to decode or encode from Python; the agent
handles thousands of small, regular messages a second. This module reads the
sections a request uses (header, properties, data or string body; annotation and
application-property maps are skipped) and writes replies by hand. Anything it
does not recognise raises ``Unsupported`` and the caller falls back to proton.
"""
from __future__ import annotations

import struct
import uuid
from typing import Any

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")


class Unsupported(ValueError):
    """An encoding outside the fast path (the caller uses proton instead)."""


def _value(buf: bytes, i: int) -> tuple[Any, int]:
    """Decode one primitive AMQP value at ``buf[i]``; returns (value, next index)."""
    code = buf[i]
    i += 1
    if code == 0x40:
        return None, i
    if code in (0xA1, 0xA3, 0xA0):  # str8, sym8, vbin8
        n = buf[i]
        raw = buf[i + 1:i + 1 + n]
        if len(raw) != n:
            raise Unsupported("truncated")
        return (bytes(raw) if code == 0xA0 else raw.decode()), i + 1 + n
    if code in (0xB1, 0xB3, 0xB0):  # str32, sym32, vbin32
        n = _U32.unpack_from(buf, i)[0]
        raw = buf[i + 4:i + 4 + n]
        if len(raw) != n:
            raise Unsupported("truncated")
        return (bytes(raw) if code == 0xB0 else raw.decode()), i + 4 + n
    if code in (0x43, 0x44):  # uint0, ulong0
        return 0, i
    if code in (0x52, 0x53):  # smalluint, smallulong
        return buf[i], i + 1
    if code == 0x70:
        return _U32.unpack_from(buf, i)[0], i + 4
    if code == 0x80:
        return _U64.unpack_from(buf, i)[0], i + 8
    if code == 0x83:  # timestamp, ms
        return _I64.unpack_from(buf, i)[0], i + 8
    if code == 0x98:
        return uuid.UUID(bytes=bytes(buf[i:i + 16])), i + 16
    if code in (0x41, 0x42):
        return code == 0x41, i
    if code == 0x56:
        return buf[i] == 1, i + 1
    if code == 0x50:
        return buf[i], i + 1
    raise Unsupported(f"type 0x{code:02x}")


def _list(buf: bytes, i: int) -> tuple[list[Any], int]:
    code = buf[i]
    if code == 0x45:
        return [], i + 1
    if code == 0xC0:
        size, count, j = buf[i + 1], buf[i + 2], i + 3
        end = i + 2 + size
    elif code == 0xD0:
        size, count = _U32.unpack_from(buf, i + 1)[0], _U32.unpack_from(buf, i + 5)[0]
        j, end = i + 9, i + 5 + size
    else:
        raise Unsupported(f"list 0x{code:02x}")
    out = []
    for _ in range(count):
        v, j = _value(buf, j)
        out.append(v)
    if j != end:
        raise Unsupported("list size mismatch")
    return out, end


def _skip_map(buf: bytes, i: int) -> int:
    code = buf[i]
    if code == 0xC1:
        return i + 2 + buf[i + 1]
    if code == 0xD1:
        return i + 5 + _U32.unpack_from(buf, i + 1)[0]
    raise Unsupported(f"map 0x{code:02x}")


def decode(buf: bytes) -> dict[str, Any]:
    """Decode a message into a dict of the fields the agent reads (raises Unsupported)."""
    out: dict[str, Any] = {}
    i, n = 0, len(buf)
    while i < n:
        if buf[i] != 0x00 or buf[i + 1] != 0x53:
            raise Unsupported("not a small descriptor")
        section, i = buf[i + 2], i + 3
        if section == 0x70:  # header
            fields, i = _list(buf, i)
            if len(fields) > 2 and fields[2] is not None:
                out["ttl"] = fields[2]
        elif section in (0x71, 0x72, 0x74):  # delivery/message annotations, application properties
            i = _skip_map(buf, i)
        elif section == 0x73:  # properties
            fields, i = _list(buf, i)
            fields += [None] * (13 - len(fields))
            (out["id"], out["user_id"], _to, out["subject"], out["reply_to"], out["correlation_id"],
             out["content_type"], _enc, out["expiry_time"], out["creation_time"]) = fields[:10]
        elif section == 0x75:  # data
            if "body" in out:
                raise Unsupported("several data sections")
            out["body"], i = _value(buf, i)
            if not isinstance(out["body"], bytes):
                raise Unsupported("data section without binary")
        elif section == 0x77:  # amqp-value: only a string body is on the fast path
            out["body"], i = _value(buf, i)
            if not isinstance(out["body"], (str, type(None))):
                raise Unsupported("amqp-value not a string")
        else:
            raise Unsupported(f"section 0x{section:02x}")
    return out


def _str(code8: int, code32: int, raw: bytes) -> bytes:
    n = len(raw)
    return bytes((code8, n)) + raw if n < 256 else bytes((code32,)) + _U32.pack(n) + raw


def _id(value: Any) -> bytes:
    if value is None:
        return b"\x40"
    if isinstance(value, str):
        return _str(0xA1, 0xB1, value.encode())
    if isinstance(value, bool):
        raise Unsupported("bool id")
    if isinstance(value, int) and 0 <= value < 1 << 64:
        return b"\x80" + _U64.pack(value)
    if isinstance(value, uuid.UUID):
        return b"\x98" + value.bytes
    if isinstance(value, bytes):
        return _str(0xA0, 0xB0, value)
    raise Unsupported(f"id of type {type(value).__name__}")


_JSON = _str(0xA3, 0xB3, b"application/json")


def encode_reply(body: bytes, correlation_id: Any, to: str | None = None, subject: str | None = None) -> bytes:
    """Properties (to, subject, correlation-id, content-type) and one data section."""
    items = (b"\x40" + b"\x40" + (_str(0xA1, 0xB1, to.encode()) if to else b"\x40")
             + (_str(0xA1, 0xB1, subject.encode()) if subject else b"\x40") + b"\x40"
             + _id(correlation_id) + _JSON)
    count = 7
    if len(items) + 1 < 256:
        props = bytes((0xC0, len(items) + 1, count)) + items
    else:
        props = b"\xd0" + _U32.pack(len(items) + 4) + _U32.pack(count) + items
    return b"\x00\x53\x73" + props + b"\x00\x53\x75" + _str(0xA0, 0xB0, body)
