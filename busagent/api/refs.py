"""Object references: how a request names a libvirt object, and how a reply names one.

A reference is a small JSON object. Each kind accepts the keys listed in
``REF_KEYS`` (exactly one way of naming it); replies render the keys that are
free to read (no hypervisor round trip).
"""
from __future__ import annotations

import uuid as uuidlib
from typing import Any

import libvirt

# C pointer type -> reference kind
KIND_OF_CTYPE = {
    "virDomainPtr": "domain",
    "virNetworkPtr": "network",
    "virNetworkPortPtr": "network_port",
    "virStoragePoolPtr": "storage_pool",
    "virStorageVolPtr": "storage_vol",
    "virInterfacePtr": "interface",
    "virNodeDevicePtr": "node_device",
    "virSecretPtr": "secret",
    "virNWFilterPtr": "nwfilter",
    "virNWFilterBindingPtr": "nwfilter_binding",
    "virDomainSnapshotPtr": "domain_snapshot",
    "virDomainCheckpointPtr": "domain_checkpoint",
}
KIND_OF_CLASS = {t[:-3]: k for t, k in KIND_OF_CTYPE.items()}

# kind -> the alternative key sets that identify one object
REF_KEYS: dict[str, list[tuple[str, ...]]] = {
    "domain": [("uuid",), ("name",), ("id",)],
    "network": [("uuid",), ("name",)],
    "network_port": [("network", "uuid")],
    "storage_pool": [("uuid",), ("name",)],
    "storage_vol": [("key",), ("path",), ("pool", "name")],
    "interface": [("name",), ("mac",)],
    "node_device": [("name",)],
    "secret": [("uuid",), ("usageType", "usageID")],
    "nwfilter": [("uuid",), ("name",)],
    "nwfilter_binding": [("portdev",)],
    "domain_snapshot": [("domain", "name")],
    "domain_checkpoint": [("domain", "name")],
}
# keys a rendered reference carries that do not identify the object (accepted back as-is)
RENDER_ONLY_KEYS = {"nwfilter_binding": {"filtername"}}
# keys whose value is itself a reference
PARENT_KIND = {
    ("network_port", "network"): "network",
    ("storage_vol", "pool"): "storage_pool",
    ("domain_snapshot", "domain"): "domain",
    ("domain_checkpoint", "domain"): "domain",
}


class BadReference(ValueError):
    """A reference that names no object in a well-formed way."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def _uuid(value: str, path: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except (ValueError, AttributeError, TypeError):
        raise BadReference(path, f"not a UUID: {value!r}") from None


def _pick_keys(kind: str, ref: Any, path: str) -> tuple[str, ...]:
    if not isinstance(ref, dict):
        raise BadReference(path, f"a {kind} reference must be an object")
    for keys in REF_KEYS[kind]:
        if all(k in ref for k in keys):
            for k in keys:
                if (kind, k) not in PARENT_KIND and not isinstance(ref[k], (str, int)) or isinstance(ref[k], bool):
                    raise BadReference(f"{path}.{k}", f"{k} must be a string or an integer")
            extra = set(ref) - {k for ks in REF_KEYS[kind] for k in ks} - RENDER_ONLY_KEYS.get(kind, set())
            if extra:
                raise BadReference(path, f"unknown key(s) in a {kind} reference: {sorted(extra)}")
            return keys
    ways = " or ".join("+".join(ks) for ks in REF_KEYS[kind])
    raise BadReference(path, f"a {kind} reference needs {ways}")


def resolve(conn: libvirt.virConnect, kind: str, ref: Any, path: str = "$") -> Any:
    """Look up the libvirt object a reference names (may raise libvirtError)."""
    keys = _pick_keys(kind, ref, path)
    v = ref[keys[0]]
    if kind == "domain":
        if keys == ("uuid",):
            return conn.lookupByUUIDString(_uuid(v, f"{path}.uuid"))
        if keys == ("name",):
            return conn.lookupByName(str(v))
        if not isinstance(v, int) or isinstance(v, bool):
            raise BadReference(f"{path}.id", "domain id must be an integer")
        return conn.lookupByID(v)
    if kind == "network":
        return (conn.networkLookupByUUIDString(_uuid(v, f"{path}.uuid")) if keys == ("uuid",)
                else conn.networkLookupByName(str(v)))
    if kind == "network_port":
        net = resolve(conn, "network", v, f"{path}.network")
        return net.portLookupByUUIDString(_uuid(ref["uuid"], f"{path}.uuid"))
    if kind == "storage_pool":
        return (conn.storagePoolLookupByUUIDString(_uuid(v, f"{path}.uuid")) if keys == ("uuid",)
                else conn.storagePoolLookupByName(str(v)))
    if kind == "storage_vol":
        if keys == ("key",):
            return conn.storageVolLookupByKey(str(v))
        if keys == ("path",):
            return conn.storageVolLookupByPath(str(v))
        pool = resolve(conn, "storage_pool", v, f"{path}.pool")
        return pool.storageVolLookupByName(str(ref["name"]))
    if kind == "interface":
        return (conn.interfaceLookupByName(str(v)) if keys == ("name",)
                else conn.interfaceLookupByMACString(str(v)))
    if kind == "node_device":
        return conn.nodeDeviceLookupByName(str(v))
    if kind == "secret":
        if keys == ("uuid",):
            return conn.secretLookupByUUIDString(_uuid(v, f"{path}.uuid"))
        usage = _enum_value(v, "VIR_SECRET_USAGE_TYPE_", f"{path}.usageType")
        return conn.secretLookupByUsage(usage, str(ref["usageID"]))
    if kind == "nwfilter":
        return (conn.nwfilterLookupByUUIDString(_uuid(v, f"{path}.uuid")) if keys == ("uuid",)
                else conn.nwfilterLookupByName(str(v)))
    if kind == "nwfilter_binding":
        return conn.nwfilterBindingLookupByPortDev(str(v))
    if kind == "domain_snapshot":
        dom = resolve(conn, "domain", v, f"{path}.domain")
        return dom.snapshotLookupByName(str(ref["name"]))
    if kind == "domain_checkpoint":
        dom = resolve(conn, "domain", v, f"{path}.domain")
        return dom.checkpointLookupByName(str(ref["name"]))
    raise BadReference(path, f"unknown object kind {kind}")


def _enum_value(v: Any, prefix: str, path: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str) and v.startswith(prefix) and isinstance(getattr(libvirt, v, None), int):
        return getattr(libvirt, v)
    raise BadReference(path, f"expected an integer or a {prefix}* constant name")


def render(obj: Any) -> dict[str, Any]:
    """The reference a reply carries for a libvirt object (no hypervisor round trip)."""
    if isinstance(obj, libvirt.virDomain):
        return {"uuid": obj.UUIDString(), "name": obj.name(), "id": obj.ID()}
    if isinstance(obj, libvirt.virNetwork):
        return {"uuid": obj.UUIDString(), "name": obj.name()}
    if isinstance(obj, libvirt.virNetworkPort):
        return {"network": render(obj.network()), "uuid": obj.UUIDString()}
    if isinstance(obj, libvirt.virStoragePool):
        return {"uuid": obj.UUIDString(), "name": obj.name()}
    if isinstance(obj, libvirt.virStorageVol):
        return {"key": obj.key(), "name": obj.name()}
    if isinstance(obj, libvirt.virInterface):
        return {"name": obj.name(), "mac": obj.MACString()}
    if isinstance(obj, libvirt.virNodeDevice):
        return {"name": obj.name()}
    if isinstance(obj, libvirt.virSecret):
        return {"uuid": obj.UUIDString(), "usageType": obj.usageType(), "usageID": obj.usageID()}
    if isinstance(obj, libvirt.virNWFilter):
        return {"uuid": obj.UUIDString(), "name": obj.name()}
    if isinstance(obj, libvirt.virNWFilterBinding):
        return {"portdev": obj.portDev(), "filtername": obj.filterName()}
    if isinstance(obj, libvirt.virDomainSnapshot):
        return {"domain": render(obj.getDomain()), "name": obj.getName()}
    if isinstance(obj, libvirt.virDomainCheckpoint):
        return {"domain": render(obj.getDomain()), "name": obj.getName()}
    raise TypeError(f"not a libvirt object: {type(obj).__name__}")


def is_object(value: Any) -> bool:
    """True for any libvirt object a reply should render as a reference."""
    return type(value).__name__ in KIND_OF_CLASS


def ref_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of a reference to ``kind`` (for requests)."""
    alts = []
    for keys in REF_KEYS[kind]:
        props: dict[str, Any] = {}
        for k in keys:
            parent = PARENT_KIND.get((kind, k))
            if parent:
                props[k] = {"$ref": f"#/$defs/ref_{parent}"}
            elif k == "uuid":
                props[k] = {"type": "string", "format": "uuid"}
            elif k == "id":
                props[k] = {"type": "integer"}
            elif k == "usageType":
                props[k] = {"type": ["integer", "string"]}
            else:
                props[k] = {"type": "string"}
        alts.append({"type": "object", "required": list(keys), "properties": props})
    return alts[0] if len(alts) == 1 else {"anyOf": alts}
