"""Execute one method call: validate, resolve references, call libvirt, shape the result."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import fastjsonschema
import libvirt

from busagent.api import refs
from busagent.api.errors import InvalidArguments, NotSupported, UnknownMethod
from busagent.api.marshal import shape_result, to_python
from busagent.api.schema import validator_schema
from busagent.api.table import Method, MethodTable, Param, load_table
from busagent.xmlsafe import UnsafeXML, check_xml

_XML_PARAMS: dict[str, tuple[Param, ...]] = {}
AGENT_METHODS = frozenset({"busagentListMethods", "busagentPing", "busagentResync"})  # the agent's own: reads


def _xml_params(m: Method) -> tuple[Param, ...]:
    """The arguments of a method that carry XML documents (checked before libvirt sees them)."""
    found = _XML_PARAMS.get(m.name)
    if found is None:
        found = _XML_PARAMS[m.name] = tuple(p for p in m.params if "xml" in p.name.lower())
    return found


_C_RANGES = {  # C integer types of arguments -> the values they hold (libvirt-python would wrap or refuse others)
    "int": (-(1 << 31), (1 << 31) - 1), "unsigned int": (0, (1 << 32) - 1),
    "long": (-(1 << 63), (1 << 63) - 1), "long long": (-(1 << 63), (1 << 63) - 1),
    "ssize_t": (-(1 << 63), (1 << 63) - 1),
    "unsigned long": (0, (1 << 64) - 1), "unsigned long long": (0, (1 << 64) - 1), "size_t": (0, (1 << 64) - 1),
    "short": (-(1 << 15), (1 << 15) - 1), "unsigned short": (0, (1 << 16) - 1), "unsigned char": (0, 255),
}
_INT_PARAMS: dict[str, tuple[tuple[str, str, int, int], ...]] = {}


def _int_params(m: Method) -> tuple[tuple[str, str, int, int], ...]:
    """(name, C type, lowest, highest) of a method's integer, flags and enum arguments."""
    found = _INT_PARAMS.get(m.name)
    if found is None:
        found = _INT_PARAMS[m.name] = tuple(
            (p.name, p.ctype, *_C_RANGES[p.ctype.strip()]) for p in m.params
            if p.kind in ("integer", "flags", "enum") and p.ctype.strip() in _C_RANGES)
    return found


def _json_path(exc: fastjsonschema.JsonSchemaValueException) -> str:
    name = exc.name or "data"
    return "$" + name[4:] if name.startswith("data") else name


def _unconvertible(args: dict[str, Any]) -> str:
    """The JSON path of the first argument libvirt-python is likely to refuse (an integer beyond 32
    bits or negative, a string with a NUL character), else ``$``."""
    stack: list[tuple[Any, str]] = [(v, f"$.{k}") for k, v in reversed(list(args.items()))]
    while stack:
        v, path = stack.pop()
        if isinstance(v, bool):
            continue
        if (isinstance(v, int) and not -1 < v < 1 << 31) or (isinstance(v, str) and "\0" in v):
            return path
        if isinstance(v, dict):
            stack.extend((item, f"{path}.{k}") for k, item in reversed(list(v.items())))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(v))))
    return "$"


class Dispatcher:
    """Runs method calls against one libvirt connection (thread-safe)."""

    resync: Callable[[], dict[str, Any]] | None = None  # busagentResync; the agent sets it (busagent.objects)

    def __init__(self, get_conn: Callable[[], libvirt.virConnect], table: MethodTable | None = None) -> None:
        self.table = table or load_table()
        self._get_conn = get_conn
        self._validators: dict[str, Callable[[Any], Any]] = {}
        self._lock = threading.Lock()

    def agent_method(self, name: str, args: Any) -> Any:
        """The agent's own methods (prefixed ``busagent``)."""
        if name == "busagentListMethods":
            return {m.name: {"self": m.self_arg.name if m.self_arg else None, "self_kind": m.self_kind,
                             "access": m.access} for m in self.table.exposed}
        if name == "busagentPing":
            return {"pong": True}
        if name == "busagentResync":  # {"host", "position": {"epoch", "seq", "kind_seq"}, "objects"}
            if self.resync is None:
                raise NotSupported("busagentResync is not served: this agent publishes no objects")
            return self.resync()
        raise UnknownMethod(f"unknown method {name!r}")

    def method(self, name: str) -> Method:
        m = self.table.methods.get(name)
        if m is None:
            if name in self.table.helpers:
                raise NotSupported(f"{name} is not served: {self.table.helpers[name]}")
            raise UnknownMethod(f"unknown method {name!r}")
        if m.excluded:
            raise NotSupported(f"{name} is not served: {m.excluded}")
        return m

    def validator(self, m: Method) -> Callable[[Any], Any]:
        v = self._validators.get(m.name)
        if v is None:
            with self._lock:
                v = self._validators.get(m.name)
                if v is None:
                    v = fastjsonschema.compile(validator_schema(m))
                    self._validators[m.name] = v
        return v

    def validate(self, m: Method, args: Any) -> None:
        if not isinstance(args, dict):
            raise InvalidArguments("the request body must be a JSON object of arguments", "$")
        try:
            self.validator(m)(args)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise InvalidArguments(exc.message.replace("data", "$", 1), _json_path(exc)) from None
        for name, ctype, lo, hi in _int_params(m):
            v = args.get(name)
            if type(v) is int and not lo <= v <= hi:  # not bool; a float the schema let through is integral
                raise InvalidArguments(f"{v} is out of range for a C {ctype} ({lo}..{hi})", f"$.{name}")
        for p in _xml_params(m):
            if args.get(p.name) is not None:
                values = args[p.name] if p.kind == "strings" else [args[p.name]]
                for i, text in enumerate(values):
                    if isinstance(text, str):
                        try:
                            check_xml(text)
                        except UnsafeXML as exc:
                            where = f"$.{p.name}" + (f"[{i}]" if p.kind == "strings" else "")
                            raise InvalidArguments(str(exc), where) from None

    def call(self, name: str, args: Any) -> tuple[Any, str | None]:
        """Run one call; returns (result, result_name). Raises AgentError or libvirtError."""
        if name.startswith("busagent"):
            return self.agent_method(name, args), None
        m = self.method(name)
        self.validate(m, args)
        conn = self._get_conn()
        api = self.table.api
        try:
            if m.self_arg is None:
                target = conn if m.binding.cls == "virConnect" else None
            elif m.self_via:
                target = refs.resolve(conn, m.self_kind, args[m.self_arg.name], f"$.{m.self_arg.name}").getDomain()
            else:
                target = refs.resolve(conn, m.self_kind, args[m.self_arg.name], f"$.{m.self_arg.name}")
            kwargs = {p.pyname: to_python(conn, api, p, args[p.name], f"$.{p.name}")
                      for p in m.params if p.name in args}
        except refs.BadReference as exc:
            raise InvalidArguments(str(exc), exc.path) from None
        fn = m.binding.callable_on(target)
        try:
            value = fn(**kwargs)
        except (OverflowError, ValueError) as exc:  # libvirt-python refused a value: too big, NUL in a string...
            raise InvalidArguments(f"an argument cannot be passed to libvirt: {exc}", _unconvertible(args)) from None
        if value is None and libvirt.virGetLastError() is not None:
            # some wrappers return None on failure instead of raising (migrateGetMaxDowntime)
            raise libvirt.libvirtError(f"{name}() failed")
        return shape_result(api, m.result, value)
