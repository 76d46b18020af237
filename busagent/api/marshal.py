"""Arguments from JSON to the binding's Python values, and results back to JSON."""
from __future__ import annotations

import base64
import uuid as uuidlib
from typing import Any

import libvirt

from busagent.api import refs
from busagent.api.apixml import ApiDescription
from busagent.api.errors import InvalidArguments
from busagent.api.table import Param, Result


def constant(api: ApiDescription, name: Any, path: str) -> int:
    """Value of a libvirt constant named in a request."""
    if isinstance(name, str) and name in api.constants:
        return api.constants[name]
    raise InvalidArguments(f"unknown libvirt constant {name!r}", path)


def to_flags(api: ApiDescription, value: Any, path: str) -> int:
    if isinstance(value, list):
        out = 0
        for i, name in enumerate(value):
            out |= constant(api, name, f"{path}[{i}]")
        return out
    return int(value)


def to_python(conn: libvirt.virConnect, api: ApiDescription, p: Param, value: Any, path: str) -> Any:
    """Convert one validated JSON argument into what the binding takes."""
    kind = p.kind
    if value is None:
        return None
    if kind.startswith("ref:"):
        return refs.resolve(conn, kind[4:], value, path)
    if kind.startswith("refs:"):
        return [refs.resolve(conn, kind[5:], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind == "flags":
        return to_flags(api, value, path)
    if kind == "enum":
        return constant(api, value, path) if isinstance(value, str) else int(value)
    if kind == "integer":
        return int(value)
    if kind == "uuid":
        try:
            return uuidlib.UUID(value).bytes
        except ValueError:
            raise InvalidArguments(f"not a UUID: {value!r}", path) from None
    if kind == "bytes":
        if isinstance(value, dict):
            try:
                return base64.b64decode(value["base64"], validate=True)
            except (ValueError, TypeError):
                raise InvalidArguments("invalid base64", f"{path}.base64") from None
        return value.encode()
    if kind == "cpumap":
        return tuple(bool(v) for v in value)
    return value


def to_json(value: Any) -> Any:
    """Convert anything the binding returns into JSON data."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if refs.is_object(value):
        return refs.render(value)
    return str(value)


def domain_reason_enum(api: ApiDescription, state: Any) -> str | None:
    """The enum of a domain state's reason: VIR_DOMAIN_PAUSED -> virDomainPausedReason."""
    name = api.enum_name("virDomainState", state) if isinstance(state, int) else None
    if name is None:
        return None
    wanted = "virdomain" + name[len("VIR_DOMAIN_"):].replace("_", "").lower() + "reason"
    return next((t for t in api.enum_types if t.lower() == wanted), None)


def shape_result(api: ApiDescription, r: Result, value: Any) -> tuple[Any, str | None]:
    """Shape the binding's return value as the table says; returns (result, result_name)."""
    if r.shape in ("struct", "outargs"):
        if isinstance(value, dict) and set(value) == set(r.names):  # the binding already names them
            value = [value[name] for name in r.names]
        if isinstance(value, (list, tuple)) and len(value) == len(r.names):
            out: dict[str, Any] = {}
            for name, enum, kind, v in zip(r.names, r.enums, r.kinds, value, strict=True):
                out[name] = int(v) if kind == "integer" and isinstance(v, bool) else to_json(v)
                if enum:
                    out[f"{name}_name"] = api.enum_name(enum, v) if isinstance(v, int) else None
            if "reason" in out and out.get("state_name", "").startswith("VIR_DOMAIN_"):
                reason_type = domain_reason_enum(api, out["state"])  # the reason's enum depends on the state
                out["reason_name"] = api.enum_name(reason_type, out["reason"]) if reason_type else None
            return out, None
        if r.shape == "outargs" and not isinstance(value, (list, tuple)):
            return {r.names[0]: to_json(value)}, None
        return to_json(value), None
    if r.kind == "uuid" and isinstance(value, (bytes, bytearray)) and len(value) == 16:
        return str(uuidlib.UUID(bytes=bytes(value))), None
    if r.kind == "domstats" and isinstance(value, list):
        return [{"domain": refs.render(d), "stats": to_json(s)} for d, s in value], None
    if r.kind == "enum" and isinstance(value, int) and r.enums and r.enums[0]:
        return value, api.enum_name(r.enums[0], value)
    if r.kind in ("integer", "enum") and isinstance(value, bool):  # the binding's bool for a C int
        return int(value), None
    return to_json(value), None
