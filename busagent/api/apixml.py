"""Read libvirt's own API description (libvirt-api.xml) into plain data."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache

from lxml import etree

DEFAULT_API_XML = "/usr/share/libvirt/api/libvirt-api.xml"


@dataclass(frozen=True)
class Arg:
    """One C argument (or the return value) of a public function."""

    name: str
    type: str
    info: str = ""


@dataclass(frozen=True)
class Function:
    """One public C function."""

    name: str
    file: str
    version: str
    info: str
    ret: Arg
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Struct:
    """A public C struct and its fields, in declaration order."""

    name: str
    fields: tuple[Arg, ...]


@dataclass
class ApiDescription:
    """Functions, structs and enum constants of libvirt's public API."""

    functions: dict[str, Function] = field(default_factory=dict)
    structs: dict[str, Struct] = field(default_factory=dict)
    functypes: dict[str, Function] = field(default_factory=dict)
    enum_info: dict[str, str] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)
    enum_types: dict[str, dict[int, str]] = field(default_factory=dict)
    version: str = ""

    def enum_name(self, enum_type: str, value: int) -> str | None:
        """Constant name of ``value`` in ``enum_type``, or None."""
        return self.enum_types.get(enum_type, {}).get(value)


def locate_api_xml() -> str:
    """Find libvirt-api.xml: $BUSAGENT_LIBVIRT_API, pkg-config, then the Debian path."""
    env = os.environ.get("BUSAGENT_LIBVIRT_API")
    if env:
        return env
    if shutil.which("pkg-config"):
        try:
            out = subprocess.run(
                ["pkg-config", "--variable", "libvirt_api", "libvirt"],
                capture_output=True, text=True, timeout=10, check=False,
            ).stdout.strip()
            if out and os.path.exists(out):
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return DEFAULT_API_XML


def _text(el) -> str:
    return (el.get("info") or "").strip()


def _is_enum_alias(name: str) -> bool:
    return name.endswith("_LAST") or name.endswith("_SENTINEL")


@lru_cache(maxsize=4)
def load_api(path: str | None = None) -> ApiDescription:
    """Parse libvirt-api.xml (cached per path)."""
    path = path or locate_api_xml()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.parse(path, parser).getroot()
    api = ApiDescription()
    for fn in root.iter("function", "functype"):
        ret_el = fn.find("return")
        ret = Arg("return", ret_el.get("type"), _text(ret_el)) if ret_el is not None else Arg("return", "void")
        info_el = fn.find("info")
        table = api.functions if fn.tag == "function" else api.functypes
        table[fn.get("name")] = Function(
            name=fn.get("name"),
            file=fn.get("file") or "",
            version=fn.get("version") or "",
            info=(info_el.text or "").strip() if info_el is not None else "",
            ret=ret,
            args=tuple(Arg(a.get("name"), a.get("type"), _text(a)) for a in fn.findall("arg")),
        )
    for st in root.iter("struct"):
        fields = tuple(Arg(f.get("name"), f.get("type"), _text(f)) for f in st.findall("field"))
        if fields:
            api.structs[st.get("name")] = Struct(st.get("name"), fields)
    aliases: list[tuple[str, str, str]] = []
    for en in root.iter("enum"):
        name, etype = en.get("name"), en.get("type")
        api.enum_info[name] = en.get("info") or ""
        try:
            value = int(en.get("value"), 0)
        except (TypeError, ValueError):  # an alias: its value is another constant's name
            aliases.append((name, etype, en.get("value") or ""))
            continue
        api.constants[name] = value
        names = api.enum_types.setdefault(etype, {})
        if value not in names and not _is_enum_alias(name):
            names[value] = name
    for name, etype, target in aliases:
        if target in api.constants:
            api.constants[name] = api.constants[target]
            api.enum_types.setdefault(etype, {}).setdefault(api.constants[target], name)
    ver = root.find(".//macro[@name='LIBVIR_VERSION_NUMBER']")
    api.version = ver.get("string", "") if ver is not None else ""
    return api
