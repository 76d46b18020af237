"""Introspect libvirt-python: which Python callable wraps each C function.

libvirt-python is generated from the same API description; every wrapper calls
``libvirtmod.<C name>``. Reading that from the module's source gives an exact
C name -> (class, method) map without guessing at naming rules.
"""
from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from functools import lru_cache

import libvirt

# C functions that the binding wraps under another libvirtmod entry point.
ALIASES = {"virConnectListDomains": "virConnectListDomainsID"}
# Parent getters the binding implements in Python, without a libvirtmod call.
PYTHON_LEVEL = {
    "virDomainSnapshotGetDomain": ("virDomainSnapshot", "getDomain"),
    "virDomainCheckpointGetDomain": ("virDomainCheckpoint", "getDomain"),
    "virNetworkPortGetNetwork": ("virNetworkPort", "network"),
}
# Wrapper methods that call a C function as a side effect, not as their job.
_SIDE_CALLERS = {"__del__", "__init__"}


@dataclass(frozen=True)
class PyParam:
    """One parameter of a Python wrapper (``self`` excluded)."""

    name: str
    has_default: bool
    default: object = None


@dataclass(frozen=True)
class Binding:
    """The Python wrapper of one C function."""

    cname: str
    cls: str | None  # None for module-level functions
    method: str
    params: tuple[PyParam, ...]

    def callable_on(self, obj):
        """The bound method (or module function) to call."""
        if self.cls is None:
            return getattr(libvirt, self.method)
        return getattr(obj, self.method)


def _wrapper_calls(tree: ast.AST) -> dict[str, tuple[str | None, str]]:
    found: dict[str, tuple[str | None, str]] = {}

    def visit(node: ast.AST, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name)
            elif isinstance(child, ast.FunctionDef):
                if child.name in _SIDE_CALLERS:
                    continue
                for n in ast.walk(child):
                    f = getattr(n, "func", None)
                    if (isinstance(n, ast.Call) and isinstance(f, ast.Attribute)
                            and isinstance(f.value, ast.Name) and f.value.id == "libvirtmod"):
                        found.setdefault(f.attr, (cls, child.name))
            else:
                visit(child, cls)

    visit(tree, None)
    return found


def _params(fn) -> tuple[PyParam, ...]:
    out = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        if i == 0 and p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        has_default = p.default is not inspect.Parameter.empty
        out.append(PyParam(p.name, has_default, p.default if has_default else None))
    return tuple(out)


@lru_cache(maxsize=1)
def load_bindings() -> dict[str, Binding]:
    """Map every C function name the binding wraps to its Python callable."""
    tree = ast.parse(inspect.getsource(libvirt))
    calls = _wrapper_calls(tree)
    out: dict[str, Binding] = {}
    for cname, (cls, method) in list(calls.items()) + list(PYTHON_LEVEL.items()):
        owner = libvirt if cls is None else getattr(libvirt, cls, None)
        fn = getattr(owner, method, None)
        if fn is None:
            continue
        out[cname] = Binding(cname, cls, method, _params(fn))
    for cname, target in ALIASES.items():
        if target in out and cname not in out:
            b = out[target]
            out[cname] = Binding(cname, b.cls, b.method, b.params)
    return out
