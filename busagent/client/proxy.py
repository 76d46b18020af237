"""Friendly object proxies over ``Client.call``: ``host.domain(name="test").suspend()``.

A proxy method name is the C name without its ``vir<Object>`` prefix, in
libvirt-python's lower camel case (``suspend``, ``getInfo``, ``getXMLDesc``).
"""
from __future__ import annotations

from typing import Any

PREFIX = {
    "domain": "virDomain", "network": "virNetwork", "network_port": "virNetworkPort",
    "storage_pool": "virStoragePool", "storage_vol": "virStorageVol", "interface": "virInterface",
    "node_device": "virNodeDevice", "secret": "virSecret", "nwfilter": "virNWFilter",
    "nwfilter_binding": "virNWFilterBinding", "domain_snapshot": "virDomainSnapshot",
    "domain_checkpoint": "virDomainCheckpoint",
}


class HostProxy:
    """One host: connection-level calls and object proxies."""

    def __init__(self, client: Any, host_id: str | None) -> None:
        self.client, self.host_id = client, host_id
        self._index: dict[str, Any] | None = None

    def call(self, method: str, **args: Any) -> Any:
        return self.client.call(method, host=self.host_id, **args)

    def methods(self) -> dict[str, Any]:
        """The agent's method index (fetched once)."""
        if self._index is None:
            self._index = self.call("busagentListMethods")
        return self._index

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        cname = "virConnect" + name[:1].upper() + name[1:]
        index = self.methods()
        if cname not in index:
            alt = "vir" + name[:1].upper() + name[1:]
            cname = alt if alt in index else cname
        return lambda **args: self.call(cname, **args)

    def object(self, kind: str, **ref: Any) -> ObjectProxy:
        return ObjectProxy(self, kind, ref)

    def domain(self, **ref: Any) -> ObjectProxy:
        return self.object("domain", **ref)

    def network(self, **ref: Any) -> ObjectProxy:
        return self.object("network", **ref)

    def storage_pool(self, **ref: Any) -> ObjectProxy:
        return self.object("storage_pool", **ref)

    def storage_vol(self, **ref: Any) -> ObjectProxy:
        return self.object("storage_vol", **ref)

    def interface(self, **ref: Any) -> ObjectProxy:
        return self.object("interface", **ref)

    def node_device(self, **ref: Any) -> ObjectProxy:
        return self.object("node_device", **ref)

    def secret(self, **ref: Any) -> ObjectProxy:
        return self.object("secret", **ref)


class ObjectProxy:
    """One libvirt object named by a reference; attribute calls become C calls on it."""

    def __init__(self, host: HostProxy, kind: str, ref: dict[str, Any]) -> None:
        self.host, self.kind, self.ref = host, kind, ref

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        cname = PREFIX[self.kind] + name[:1].upper() + name[1:]
        entry = self.host.methods().get(cname)
        if entry is None:
            raise AttributeError(f"no method {cname} on the agent")

        def invoke(**args: Any) -> Any:
            if entry["self"] and entry["self_kind"] == self.kind:
                args = {entry["self"]: self.ref, **args}
            return self.host.call(cname, **args)

        return invoke

    def __repr__(self) -> str:
        return f"<{self.kind} {self.ref}>"
