"""The event table: every libvirt event id the API description and the binding offer.

Generated from libvirt-api.xml: each ``VIR_<FAMILY>_EVENT_ID_*`` constant names its
callback type in its description; the callback's arguments (less the connection,
the object and the opaque pointer) are the event's payload fields, by name.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import libvirt

from busagent.api.apixml import ApiDescription, Arg, load_api
from busagent.api.marshal import to_json
from busagent.api.refs import KIND_OF_CTYPE, render
from busagent.api.table import enum_in

# family -> (enum type of its event ids, id prefix, libvirt-python register method)
FAMILIES = {
    "domain": ("virDomainEventID", "VIR_DOMAIN_EVENT_ID_", "domainEventRegisterAny", "domainEventDeregisterAny"),
    "network": ("virNetworkEventID", "VIR_NETWORK_EVENT_ID_", "networkEventRegisterAny",
                "networkEventDeregisterAny"),
    "storage_pool": ("virStoragePoolEventID", "VIR_STORAGE_POOL_EVENT_ID_", "storagePoolEventRegisterAny",
                     "storagePoolEventDeregisterAny"),
    "node_device": ("virNodeDeviceEventID", "VIR_NODE_DEVICE_EVENT_ID_", "nodeDeviceEventRegisterAny",
                    "nodeDeviceEventDeregisterAny"),
    "secret": ("virSecretEventID", "VIR_SECRET_EVENT_ID_", "secretEventRegisterAny", "secretEventDeregisterAny"),
}


@dataclass(frozen=True)
class Field:
    """One payload field of an event callback."""

    name: str
    ctype: str
    enum: str | None


@dataclass(frozen=True)
class EventSpec:
    """One event id: its bus kind (``domain.lifecycle``), callback and payload fields."""

    family: str
    id_name: str
    id_value: int
    kind: str
    callback: str
    object_arg: Arg
    fields: tuple[Field, ...]


def _detail_enums(api: ApiDescription, family: str) -> dict[int, str]:
    """Lifecycle event value -> enum type of its detail (domain events only have them)."""
    if family != "domain":
        return {}
    by_lower = {t.lower(): t for t in api.enum_types}
    out = {}
    for value, name in api.enum_types.get("virDomainEventType", {}).items():
        suffix = name[len("VIR_DOMAIN_EVENT_"):].replace("_", "")
        t = by_lower.get(f"virdomainevent{suffix.lower()}detailtype")
        if t:
            out[value] = t
    return out


_TOKEN = re.compile(r"\bvir[A-Z]\w+")


def _field_enum(api: ApiDescription, arg: Arg) -> str | None:
    """The enum type of a payload field, also when its description misspells the type by a
    trailing letter (libvirt's "a value from virDomainMetadataTypea")."""
    enum = enum_in(arg.info, api, arg.name)
    if enum is None and arg.name != "flags" and arg.type in ("int", "unsigned int"):
        for tok in _TOKEN.findall(arg.info or ""):
            if tok[:-1] in api.enum_types and not tok[:-1].endswith("Flags"):
                return tok[:-1]
    return enum


@lru_cache(maxsize=1)
def load_events() -> tuple[EventSpec, ...]:
    """Every event id of libvirt-api.xml that the binding can register."""
    api = load_api()
    specs = []
    for family, (id_type, prefix, register, _) in FAMILIES.items():
        if not hasattr(libvirt.virConnect, register):
            continue
        for value, id_name in sorted(api.enum_types.get(id_type, {}).items()):
            cb = api.functypes.get(api.enum_info.get(id_name, ""))
            if cb is None or len(cb.args) < 3:
                continue
            obj, payload = cb.args[1], cb.args[2:-1]
            fields = tuple(Field(a.name, a.type, _field_enum(api, a)) for a in payload)
            kind = f"{family}.{id_name[len(prefix):].lower()}"
            specs.append(EventSpec(family, id_name, value, kind, cb.name, obj, fields))
    return tuple(specs)


def lifecycle_names(api: ApiDescription, spec: EventSpec, event: int, detail: int) -> tuple[str | None, str | None]:
    """Constant names of a lifecycle event and its detail."""
    etype = next((f.enum for f in spec.fields if f.name == "event"), None)
    if etype is None:
        etype = {"network": "virNetworkEventLifecycleType", "storage_pool": "virStoragePoolEventLifecycleType",
                 "node_device": "virNodeDeviceEventLifecycleType",
                 "secret": "virSecretEventLifecycleType"}.get(spec.family, "virDomainEventType")
    dtype = _detail_enums(api, spec.family).get(event)
    return api.enum_name(etype, event), api.enum_name(dtype, detail) if dtype else None


_UPPER = re.compile(r"(?<!^)(?=[A-Z])")


def payload(api: ApiDescription, spec: EventSpec, args: tuple[Any, ...]) -> dict[str, Any]:
    """Name the callback's positional payload (as libvirt-python passes it) as JSON data."""
    data: dict[str, Any] = {}
    for f, value in zip(spec.fields, args, strict=False):
        if f.ctype in KIND_OF_CTYPE and value is not None:
            data[f.name] = render(value)
            continue
        data[f.name] = to_json(value)
        if f.enum and isinstance(value, int):
            data[f"{f.name}_name"] = api.enum_name(f.enum, value)
    if {"event", "detail"} <= data.keys():
        data["event_name"], data["detail_name"] = lifecycle_names(api, spec, data["event"], data["detail"])
    return data


class EventRegistrar:
    """Registers a callback for every event id on a connection; hands events to ``sink``.

    ``sink(spec, object_ref, data)`` runs on libvirt's event-loop thread: keep it short.
    """

    def __init__(self, sink: Callable[[EventSpec, dict[str, Any], dict[str, Any]], None]) -> None:
        self.sink = sink
        self.api = load_api()
        self.registered: list[tuple[str, int]] = []
        self.unsupported: dict[str, str] = {}
        self.conn: libvirt.virConnect | None = None

    def register(self, conn: libvirt.virConnect) -> int:
        """Register every event id; returns how many took (the rest are in ``unsupported``).

        Callbacks still registered on a previous connection are removed first: each holds a
        reference that would keep that (dead) connection from ever being freed.
        """
        if self.registered and self.conn is not None and self.conn is not conn:
            self.deregister(self.conn)
        self.registered, self.unsupported, self.conn = [], {}, conn
        for spec in load_events():
            register = getattr(conn, FAMILIES[spec.family][2])
            try:
                cid = register(None, spec.id_value, self._callback(spec), None)
            except libvirt.libvirtError as exc:
                self.unsupported[spec.kind] = exc.get_error_message() or str(exc)
                continue
            self.registered.append((spec.family, cid))
        return len(self.registered)

    def deregister(self, conn: libvirt.virConnect | None = None) -> None:
        """Remove the callbacks (from ``conn``, by default the connection they were registered on).

        On a dead remote connection libvirt drops the callback locally, then fails to tell the
        daemon: that error is expected and ignored.
        """
        conn = conn if conn is not None else self.conn
        for family, cid in self.registered if conn is not None else ():
            try:
                getattr(conn, FAMILIES[family][3])(cid)
            except (libvirt.libvirtError, AttributeError, TypeError):
                pass  # dead connection, or one already closed
        self.registered = []

    def _callback(self, spec: EventSpec) -> Callable[..., None]:
        def on_event(_conn: Any, obj: Any, *rest: Any) -> None:
            args = rest[:-1]  # the last one is the opaque value
            self.sink(spec, {spec.family: render(obj)},
                      payload(self.api, spec, args))
        return on_event
