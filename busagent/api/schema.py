"""JSON Schemas generated from the method table: one per method (arguments and
result) plus the request/reply envelopes. The same schemas validate requests at
run time (compiled with fastjsonschema) and are written to ``schemas/``."""
from __future__ import annotations

import re
from typing import Any

from busagent.api.refs import REF_KEYS, ref_schema
from busagent.api.table import BINDING_PARAMS, Method, MethodTable, Param, Result

SCHEMA_VERSION = "1.0"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = "https://busagent.example/schemas"

_INT = {"type": "integer"}
_TOKEN = re.compile(r"\bvir[A-Z]\w+")
_NAME = {"type": "string", "pattern": "^VIR_[A-Z0-9_]+$"}


def ref_defs() -> dict[str, Any]:
    """``$defs`` for every object reference kind."""
    defs: dict[str, Any] = {f"ref_{k}": ref_schema(k) for k in REF_KEYS}
    defs["flags"] = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "array", "items": _NAME}]}
    defs["typedparams"] = {
        "type": "object",
        "additionalProperties": {"type": ["integer", "number", "string", "boolean", "array"]},
    }
    return defs


def value_schema(kind: str, enum: str | None = None, for_result: bool = False) -> dict[str, Any]:
    """Schema of one value of a given wire kind."""
    if kind.startswith("ref:"):
        k = kind[4:]
        return _rendered_ref(k) if for_result else {"$ref": f"#/$defs/ref_{k}"}
    if kind.startswith("refs:"):
        return {"type": "array", "items": value_schema("ref:" + kind[5:], for_result=for_result)}
    simple: dict[str, dict[str, Any]] = {
        "integer": {"type": ["integer", "boolean"]} if not for_result else _INT,
        "number": {"type": "number"},
        "string": {"type": "string"},
        "strings": {"type": "array", "items": {"type": "string"}},
        "flags": {"$ref": "#/$defs/flags"},
        "typedparams": {"$ref": "#/$defs/typedparams"} if not for_result else {"type": "object"},
        "uuid": {"type": "string", "format": "uuid"},
        "cpumap": {"type": "array", "items": {"type": "boolean"}},
        "bytes": ({"type": "string", "contentEncoding": "base64"} if for_result else
                  {"anyOf": [{"type": "string"}, {"type": "object", "required": ["base64"],
                                                   "properties": {"base64": {"type": "string"}}}]}),
        "null": {"type": "null"},
        "domstats": {"type": "array", "items": {"type": "object", "required": ["domain", "stats"], "properties": {
            "domain": _rendered_ref("domain"), "stats": {"type": "object"}}}},
        "any": {},
    }
    if kind == "enum":
        s: dict[str, Any] = ({"anyOf": [_INT, _NAME]} if not for_result else dict(_INT))
        if enum:
            s["x-enum-type"] = enum
        return s
    return dict(simple[kind])


def _rendered_ref(kind: str) -> dict[str, Any]:
    keys = sorted({k for ks in REF_KEYS[kind] for k in ks})
    return {"type": "object", "x-object-kind": kind, "required": [REF_KEYS[kind][0][0]],
            "properties": {k: {} for k in keys}}


def param_schema(m: Method, p: Param) -> dict[str, Any]:
    bound = BINDING_PARAMS.get((m.name, p.pyname))
    s = dict(bound[1]) if bound else value_schema(p.kind, p.enum)
    if p.kind == "flags":
        flag_type = next((t for t in _TOKEN.findall(p.info) if t.endswith(("Flags", "FlagValues", "Values"))), None)
        if flag_type:
            s["x-flag-type"] = flag_type
    if p.nullable:
        s = {"anyOf": [s, {"type": "null"}]}
    if p.info:
        s["description"] = p.info
    if bound or p.kind == "any":
        s["x-binding-only"] = True
    return s


def args_schema(m: Method) -> dict[str, Any]:
    """Schema of the request body (arguments by name) for one method."""
    props: dict[str, Any] = {}
    required: list[str] = []
    if m.self_arg is not None and not m.self_via:
        props[m.self_arg.name] = {"$ref": f"#/$defs/ref_{m.self_kind}", "description": m.self_arg.info}
        required.append(m.self_arg.name)
    for p in m.params:
        props[p.name] = param_schema(m, p)
        if p.required:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def result_schema(r: Result) -> dict[str, Any]:
    """Schema of the ``result`` member of a successful reply."""
    if r.shape == "value":
        return value_schema(r.kind, r.enums[0] if r.enums else None, for_result=True)
    props: dict[str, Any] = {}
    for name, kind, enum in zip(r.names, r.kinds, r.enums, strict=True):
        props[name] = value_schema(kind, enum, for_result=True) if kind != "any" else {}
        if enum:
            props[f"{name}_name"] = {"type": ["string", "null"]}
    if "reason" in r.names and "state" in r.names and r.enums[r.names.index("state")] == "virDomainState":
        props["reason_name"] = {"type": ["string", "null"], "description": "the reason's constant name; its "
                                "enum depends on the state (virDomainRunningReason, virDomainPausedReason, ...)"}
    return {"type": "object", "properties": props, "required": list(r.names)}


def method_schema(m: Method) -> dict[str, Any]:
    """The full per-method document: arguments, result, access class, C description."""
    doc: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": f"{BASE_ID}/{SCHEMA_VERSION}/methods/{m.name}.json",
        "title": m.name,
        "description": m.fn.info.split("\n\n")[0],
        "x-access": m.access,
        "x-since": m.fn.version,
        "x-binding": f"{m.binding.cls or 'libvirt'}.{m.binding.method}" if m.binding else None,
        "properties": {"args": args_schema(m), "result": result_schema(m.result)},
    }
    if m.notes:
        doc["x-notes"] = m.notes
    return doc


def validator_schema(m: Method) -> dict[str, Any]:
    """The schema run against a request body (arguments only).

    References are checked here only as objects: resolving them gives a more
    precise error (which keys a kind takes) with the same JSON path."""
    defs = ref_defs()
    for k in REF_KEYS:
        defs[f"ref_{k}"] = {"type": "object"}
    return {"$defs": defs, **args_schema(m)}


ERROR_SCHEMA = {
    "type": "object",
    "required": ["kind", "message"],
    "properties": {
        "kind": {"enum": ["libvirt", "unknown_method", "invalid_arguments", "not_supported",
                          "bad_request", "expired", "too_large", "unauthorized", "internal"]},
        "message": {"type": "string"},
        "code": {"type": "integer"}, "code_name": {"type": ["string", "null"]},
        "domain": {"type": "integer"}, "domain_name": {"type": ["string", "null"]},
        "level": {"type": "integer"}, "level_name": {"type": ["string", "null"]},
        "path": {"type": "string", "description": "JSON path of the faulty argument"},
        "str1": {"type": "string"}, "str2": {"type": "string"}, "str3": {"type": "string"},
        "int1": {"type": "integer"}, "int2": {"type": "integer"},
    },
}


def envelope_schemas() -> dict[str, dict[str, Any]]:
    """Request and reply envelopes (the AMQP body; properties are in the AsyncAPI document)."""
    return {
        "request": {
            "$schema": DIALECT, "$id": f"{BASE_ID}/{SCHEMA_VERSION}/request.json",
            "title": "method call request body",
            "description": "Body of a request: the C function's arguments by name (connection left "
                           "out). The AMQP subject is the C function name; content-type application/json.",
            "type": "object",
        },
        "reply": {
            "$schema": DIALECT, "$id": f"{BASE_ID}/{SCHEMA_VERSION}/reply.json",
            "title": "method call reply body",
            "type": "object",
            "oneOf": [
                {"required": ["result"], "properties": {"result": {}, "result_name": {"type": "string"}}},
                {"required": ["error"], "properties": {"error": {"$ref": "#/$defs/error"}}},
            ],
            "$defs": {"error": ERROR_SCHEMA},
        },
    }


def _external_refs(doc: Any) -> Any:
    """Point ``#/$defs/...`` at the shared defs.json (method files stay small)."""
    if isinstance(doc, dict):
        return {k: ("../defs.json" + v if k == "$ref" and v.startswith("#/$defs/") else _external_refs(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_external_refs(v) for v in doc]
    return doc


def all_schemas(table: MethodTable) -> dict[str, dict[str, Any]]:
    """Every schema document by relative file name."""
    out = {f"{k}.json": v for k, v in envelope_schemas().items()}
    out["defs.json"] = {"$schema": DIALECT, "$id": f"{BASE_ID}/{SCHEMA_VERSION}/defs.json",
                        "title": "shared definitions: object references, flags, typed parameters",
                        "$defs": ref_defs()}
    for m in table.exposed:
        out[f"methods/{m.name}.json"] = _external_refs(method_schema(m))
    out["methods/index.json"] = {
        "version": SCHEMA_VERSION,
        "libvirt_api": table.api.version or None,
        "coverage": table.coverage_line(),
        "exposed": {m.name: {"access": m.access} for m in table.exposed},
        "excluded": {m.name: m.excluded for m in table.excluded},
        "helpers": table.helpers,
    }
    return out
