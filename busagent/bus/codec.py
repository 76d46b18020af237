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


_HEAD_SECTIONS = frozenset((0x70, 0x71, 0x72, 0x73, 0x74))  # header, annotations, properties, app-properties
_FIXED = {0x4: 0, 0x5: 1, 0x6: 2, 0x7: 4, 0x8: 8, 0x9: 16}


def skip(buf: bytes, i: int) -> int:
    """The index just past the AMQP-encoded value at ``buf[i]`` (any type; IndexError when truncated)."""
    todo = 1  # values still to pass (a described value is two: its descriptor, then itself)
    while todo:
        code = buf[i]
        if code == 0x00:
            i, todo = i + 1, todo + 1
            continue
        width = code >> 4
        if width in _FIXED:
            i += 1 + _FIXED[width]
        elif width in (0xA, 0xC, 0xE):  # one-byte size
            i += 2 + buf[i + 1]
        elif width in (0xB, 0xD, 0xF):  # four-byte size
            i += 5 + _U32.unpack_from(buf, i + 1)[0]
        else:
            raise Unsupported(f"type 0x{code:02x}")
        todo -= 1
    if i > len(buf):
        raise IndexError("truncated")
    return i


def head_length(prefix: bytes) -> int:
    """How many bytes of the start of a message hold its complete leading sections (header,
    annotations, properties, application properties), which come before the body.

    ``prefix`` may be cut anywhere (the first bytes of an oversized message): the bytes
    returned decode as a message without its body. 0 when not even the first section is
    whole; raises Unsupported on a section this reader does not know how to skip."""
    i, n = 0, len(prefix)
    while i < n:
        if prefix[i] != 0x00:
            raise Unsupported("not a described section")
        if i + 3 > n:
            return i
        if prefix[i + 1] == 0x53:
            section, start = prefix[i + 2], i + 3
        elif prefix[i + 1] == 0x80:
            if i + 10 > n:
                return i
            code = _U64.unpack_from(prefix, i + 2)[0]
            section, start = (code if code < 256 else 0), i + 10
        else:
            raise Unsupported("section descriptor")
        if section not in _HEAD_SECTIONS:
            return i  # the body starts here
        try:
            i = skip(prefix, start)
        except (IndexError, struct.error):
            return i  # this section is cut: what precedes it is whole
    return i


_SECTION_NAMES = {b"amqp:header:list": 0x70, b"amqp:delivery-annotations:map": 0x71,
                  b"amqp:message-annotations:map": 0x72, b"amqp:properties:list": 0x73,
                  b"amqp:application-properties:map": 0x74, b"amqp:data:binary": 0x75,
                  b"amqp:amqp-sequence:list": 0x76, b"amqp:amqp-value:*": 0x77, b"amqp:footer:map": 0x78}
_LISTS, _MAPS, _BINARY = frozenset((0x45, 0xC0, 0xD0)), frozenset((0xC1, 0xD1)), frozenset((0xA0, 0xB0))
_SECTION_TYPES = {0x70: _LISTS, 0x71: _MAPS, 0x72: _MAPS, 0x73: _LISTS, 0x74: _MAPS, 0x75: _BINARY,
                  0x76: _LISTS, 0x78: _MAPS}


def check_message(buf: bytes) -> None:
    """Raise Unsupported unless ``buf`` is one well-formed message: known sections, in order,
    each of its type, every value whole, nothing after the last, and one body (a single data
    section, amqp-sequence sections or one amqp-value).

    proton's decoder reads garbage leniently (a cut data section as no body, unknown sections
    and trailing bytes ignored): a request must not run on what is left of it."""
    i, n, last, data_sections = 0, len(buf), 0, 0
    try:
        while i < n:
            if buf[i] != 0x00:
                raise Unsupported("not a described section")
            if buf[i + 1] == 0x53:
                section, i = buf[i + 2], i + 3
            elif buf[i + 1] == 0x80:
                section, i = _U64.unpack_from(buf, i + 2)[0], i + 10
            elif buf[i + 1] in (0xA3, 0xB3):
                end = skip(buf, i + 1)
                section = _SECTION_NAMES.get(bytes(buf[i + 3 if buf[i + 1] == 0xA3 else i + 6:end]), 0)
                i = end
            else:
                raise Unsupported("section descriptor")
            if not 0x70 <= section <= 0x78:
                raise Unsupported(f"unknown section 0x{section:x}")
            body, last_body = 0x75 <= section <= 0x77, 0x75 <= last <= 0x77
            if (section < last or (section == last and section not in (0x75, 0x76))
                    or (body and last_body and section != last)):
                raise Unsupported("sections out of order, repeated, or several bodies")
            if section == 0x75:
                data_sections += 1
                if data_sections > 1:
                    raise Unsupported("several data sections")
            kinds = _SECTION_TYPES.get(section)
            if kinds is not None and buf[i] not in kinds:
                raise Unsupported(f"section 0x{section:x} of the wrong type")
            i, last = skip(buf, i), section
    except (IndexError, struct.error):
        raise Unsupported("truncated") from None
    if i != n:
        raise Unsupported("truncated")
