"""Which C functions are not served over the bus, and why (one line each).

``helper_reason`` covers the C helpers that are not object functions at all
(they are outside the coverage figure). ``exclusion_reason`` covers object
functions that cannot make sense as a request/reply call.
"""
from __future__ import annotations

from busagent.api.apixml import Function

ERROR_HELPERS = {
    "virGetLastError", "virGetLastErrorMessage", "virGetLastErrorCode", "virGetLastErrorDomain",
    "virCopyLastError", "virConnCopyLastError", "virConnGetLastError", "virConnResetLastError",
    "virConnSetErrorFunc", "virDefaultErrorFunc", "virFreeError", "virResetError",
    "virResetLastError", "virSaveLastError", "virSetErrorFunc",
}
OWN_CONNECTION = {
    "virConnectOpen": "opens a hypervisor connection; the agent owns its connection",
    "virConnectOpenReadOnly": "opens a hypervisor connection; the agent owns its connection",
    "virConnectOpenAuth": "opens a hypervisor connection; the agent owns its connection",
    "virConnectClose": "closes the agent's own hypervisor connection",
    "virConnectSetKeepAlive": "tunes the agent's own connection keepalive (set in config)",
    "virInitialize": "library initialisation, done once by the agent",
    "virConnectSetIdentity": "sets the identity of the agent's own connection",
}
CALLBACK_DEREGISTRATION = {
    "virConnectDomainEventDeregister", "virConnectDomainEventDeregisterAny",
    "virConnectNetworkEventDeregisterAny", "virConnectStoragePoolEventDeregisterAny",
    "virConnectNodeDeviceEventDeregisterAny", "virConnectSecretEventDeregisterAny",
    "virConnectUnregisterCloseCallback",
}
PARENT_GETTERS_SUFFIXES = ("GetConnect",)


def helper_reason(fn: Function) -> str | None:
    """Reason a C function is a helper, not an object function (None if it is one)."""
    n = fn.name
    if n.startswith("virTypedParam"):
        return "typed-parameter helper: typed parameters travel as JSON objects"
    if n.startswith("virEvent"):
        return "event-loop plumbing: the agent runs libvirt's event loop itself"
    if n.startswith("virStream"):
        return "stream plumbing: byte streams do not fit request/reply messages"
    if n in ERROR_HELPERS:
        return "error plumbing: every reply carries libvirt's error itself"
    if n.endswith("Free") or n.endswith("Ref"):
        return "memory management of C handles"
    return None


def exclusion_reason(fn: Function, bound: bool) -> str | None:
    """Reason an object function is not exposed over the bus (None if it is)."""
    n = fn.name
    if n in OWN_CONNECTION:
        return OWN_CONNECTION[n]
    if n.endswith(PARENT_GETTERS_SUFFIXES):
        return "returns the C connection pointer, which means nothing off this host"
    types = [a.type for a in fn.args]
    if "virStreamPtr" in types:
        return "moves bytes through a virStream, which a request/reply message cannot carry"
    if any(t.endswith("Callback") or t == "virConnectAuthPtr" for t in types) or n in CALLBACK_DEREGISTRATION:
        return "callback registration: the agent's event messages replace it"
    if any(a.name in ("fd", "fds", "files") or a.type == "int *" and a.name == "fds" for a in fn.args):
        return "passes file descriptors, which cannot cross a bus"
    if any(a.type == "virConnectPtr" for a in fn.args[1:]) or n.startswith("virDomainMigrate") and any(
            a.name == "dconn" for a in fn.args):
        return "needs a second local connection object; use virDomainMigrateToURI3 instead"
    if not bound:
        return "not bound by the installed libvirt-python"
    return None
