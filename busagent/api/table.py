"""The method table: one entry per libvirt C function, built from libvirt-api.xml
and libvirt-python introspection (nothing here is written per function, except
the handful of renames in ``PY_RENAMES``)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from busagent.api.apixml import ApiDescription, Arg, Function, load_api
from busagent.api.binding import Binding, load_bindings
from busagent.api.exclusions import exclusion_reason, helper_reason
from busagent.api.refs import KIND_OF_CTYPE

# (C function, C argument) -> the binding's parameter name, where they differ.
PY_RENAMES = {
    ("virDomainBlockStats", "disk"): "path",
    ("virDomainBlockStatsFlags", "disk"): "path",
    ("virDomainGetBlockInfo", "disk"): "path",
    ("virDomainGetBlockJobInfo", "disk"): "path",
    ("virDomainInterfaceStats", "device"): "path",
    ("virDomainPinIOThread", "iothread_id"): "iothread_val",
    ("virDomainSetIOThreadParams", "iothread_id"): "iothread_val",
    ("virDomainRestore", "from"): "frm",
    ("virDomainRestoreFlags", "from"): "frm",
    ("virDomainRevertToSnapshot", "snapshot"): "snap",
    ("virGetVersion", "type"): "name",
    ("virNodeGetFreePages", "cellCount"): "maxCells",
}
# Binding-only parameters (no C counterpart): the C arguments each stands for, and its JSON shape.
BINDING_PARAMS: dict[tuple[str, str], tuple[tuple[str, ...], dict]] = {
    ("virDomainGetCPUStats", "total"): (("start_cpu", "ncpus"), {"type": "boolean"}),
    ("virDomainSetTime", "time"): (("seconds", "nseconds"), {
        "type": "object", "properties": {"seconds": {"type": "integer"}, "nseconds": {"type": "integer"}},
        "required": ["seconds"]}),
    ("virNodeAllocPages", "pages"): (("npages", "pageSizes", "pageCounts"), {
        "type": "object", "additionalProperties": {"type": "integer"},
        "description": "page size (KiB) -> number of pages"}),
}
# The binding returns another shape than the C out-arguments suggest.
RAW_RESULTS = {"virDomainGetVcpus", "virDomainGetDiskErrors", "virGetVersion", "virNodeGetFreePages"}

INT_TYPES = {
    "int", "unsigned int", "long", "unsigned long", "long long", "unsigned long long",
    "unsigned char", "unsigned short", "short", "size_t", "ssize_t",
}
STRING_TYPES = {"const char *", "char *"}
STRING_LIST_TYPES = {"const char **", "char ** const", "char **", "char ***"}

# Read-only calls whose names would say "read" but that expose guest memory,
# disks or secrets: they need write access, as in libvirt's own ACL.
PRIVILEGED_READS = {
    "virSecretGetValue", "virDomainBlockPeek", "virDomainMemoryPeek",
    "virDomainGetGuestInfo", "virDomainGetHostname", "virDomainGetFSInfo",
    "virDomainGetTime", "virDomainInterfaceAddresses", "virDomainAuthorizedSSHKeysGet",
    "virDomainGetGuestVcpus", "virDomainGetMessages", "virDomainGetLaunchSecurityInfo",
    # reads that libvirt refuses on a read-only connection (VIR_ERR_OPERATION_DENIED): a read
    # role goes through one, so they are write methods here
    "virConnectGetDomainCapabilities", "virNodeGetSEVInfo", "virDomainMigrateGetMaxSpeed",
    "virNodeDeviceGetAutostart",
}
_READ_RE = re.compile(
    r"(Get|List|Lookup|NumOf|Is[A-Z]|Has[A-Z]|XMLDesc|Stats|Info$|^virConnectCompare|^virConnectBaseline"
    r"|^virGetVersion|XMLFromNative|XMLToNative|^virConnectFindStoragePoolSources|^virDomainSnapshotCurrent"
    r"|^virDomainHasCurrentSnapshot|^virDomainMemoryStats|^virNodeGetFreeMemory|^virDomainInterfaceStats"
    r"|^virDomainBlockStats|^virConnectIsAlive|^virConnectIsSecure|^virConnectIsEncrypted)"
)
_ENUM_TOKEN = re.compile(r"\bvir[A-Z]\w+")
_BITMASK = re.compile(r"\bOR\b|bitwise")  # "bitwise-OR of virDomainStatsTypes", "binary-OR of ..."


@dataclass(frozen=True)
class Param:
    """One request argument: named as in libvirt-api.xml, passed to the binding as ``pyname``."""

    name: str
    pyname: str
    kind: str  # see schema.py for the JSON shape of each kind
    ctype: str
    required: bool
    nullable: bool
    info: str = ""
    enum: str | None = None  # enum type (for kind 'enum')


@dataclass(frozen=True)
class Result:
    """How the binding's return value becomes JSON."""

    shape: str  # 'value' | 'struct' | 'outargs'
    kind: str  # value kind for shape 'value'
    names: tuple[str, ...] = ()  # field / out-arg names for 'struct' and 'outargs'
    enums: tuple[str | None, ...] = ()  # enum type per name, or of the value
    kinds: tuple[str, ...] = ()  # value kind per name


@dataclass
class Method:
    """One C function and how the bus serves it (or why it does not)."""

    name: str
    fn: Function
    binding: Binding | None
    access: str  # 'read' | 'write'
    excluded: str | None = None
    self_arg: Arg | None = None  # None: a connection or module-level call
    self_kind: str | None = None
    self_via: str | None = None  # the binding's class differs: reach it through this ref key
    params: tuple[Param, ...] = ()
    result: Result | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exposed(self) -> bool:
        return self.excluded is None


@dataclass
class MethodTable:
    """Exposed and excluded object functions, plus helpers outside the figure."""

    api: ApiDescription
    methods: dict[str, Method]
    helpers: dict[str, str]

    @property
    def exposed(self) -> list[Method]:
        return [m for m in self.methods.values() if m.exposed]

    @property
    def excluded(self) -> list[Method]:
        return [m for m in self.methods.values() if not m.exposed]

    def coverage_line(self) -> str:
        n, total = len(self.exposed), len(self.methods)
        return f"exposed {n} of {total} ({100.0 * n / total:.1f}%)"


def enum_in(info: str, api: ApiDescription, name: str = "", strict: bool = False) -> str | None:
    """The enum type a value's description names (``one of virDomainState``)."""
    if name == "flags" or _BITMASK.search(info):
        return None
    if strict and not re.search(r"\bone of\b|\benum\b", info):
        return None
    for tok in _ENUM_TOKEN.findall(info):
        if tok in api.enum_types and not tok.endswith("Flags"):
            return tok
    return None


def value_kind(ctype: str, name: str, api: ApiDescription, info: str = "") -> tuple[str, str | None]:
    """Classify a C type (as an input) into a wire kind (+ enum type)."""
    t = ctype.strip()
    if t in KIND_OF_CTYPE:
        return f"ref:{KIND_OF_CTYPE[t]}", None
    if t.endswith("Ptr *") and t[:-2] in KIND_OF_CTYPE:
        return f"refs:{KIND_OF_CTYPE[t[:-2]]}", None
    if t in INT_TYPES and (name == "flags" or _BITMASK.search(info) and _ENUM_TOKEN.search(info)):
        return "flags", None  # a bit set: an integer or a list of constant names
    if t in api.enum_types:
        return "enum", t
    if t in INT_TYPES:
        enum = enum_in(info, api, name)
        return ("enum", enum) if enum else ("integer", None)
    if t in ("double", "float"):
        return "number", None
    if t in STRING_TYPES:
        return "string", None
    if t in STRING_LIST_TYPES:
        return "strings", None
    if t in ("virTypedParameterPtr", "virTypedParameterPtr *"):
        return "typedparams", None
    if t == "const unsigned char *" and name == "uuid":
        return "uuid", None
    if t == "unsigned char *" and name == "cpumap":
        return "cpumap", None
    if t in ("const unsigned char *", "unsigned char *", "const void *"):
        return "bytes", None
    return "any", None


def _null_in_doc(doc: str, arg: str) -> bool:
    """The function's description lets ``arg`` be NULL ("@uri ... otherwise must be NULL",
    "Passing NULL for @metadata", "Any of @emulator, @arch ... may be NULL")."""
    a = re.escape(arg)
    return re.search(rf"@{a}\b[^.;]*?\b(?:may|must|can|should) be NULL|@{a} is NULL\b|NULL for @{a}\b",
                     doc) is not None


def _access(name: str) -> str:
    if name in PRIVILEGED_READS:
        return "write"
    return "read" if _READ_RE.search(name) else "write"


def _struct_of(ctype: str, api: ApiDescription) -> str | None:
    """The struct a ``<name>Ptr`` type points to: ``<name>`` or ``<name>Struct`` (virDomainBlockStatsPtr)."""
    t = ctype.strip()
    if not t.endswith("Ptr"):
        return None
    return next((s for s in (t[:-3], t[:-3] + "Struct") if s in api.structs), None)


def _is_out(arg: Arg, api: ApiDescription) -> bool:
    """An argument the C function fills in (the binding returns it), given the binding did not take it."""
    t = arg.type.strip()
    if t in KIND_OF_CTYPE or t.startswith("const "):
        return False
    # ``char ** const names`` is a caller-allocated array of names; a bare ``char *`` not taken by the
    # binding is an output buffer (virDomainGetUUIDString's ``buf``).
    if t.endswith("*") or t.endswith("* const") or _struct_of(t, api):
        return True
    return False


def _result(fn: Function, outs: list[Arg], api: ApiDescription) -> Result:
    ret = fn.ret.type.strip()
    typed = [a for a in outs if a.type.startswith("virTypedParameterPtr")]
    lists = [a for a in outs if a.type.endswith("**") or a.type in STRING_LIST_TYPES]
    structs = [a for a in outs if _struct_of(a.type, api)]
    scalars = [a for a in outs if a.type.rstrip(" *") in INT_TYPES | {"double"}
               and a not in lists and a.name not in ("nparams", "maxparams", "size", "maxlen")]
    if ret in STRING_TYPES and outs and all(a.type.rstrip(" *") in INT_TYPES for a in outs):
        # a string and out-integers: the binding returns them together (virDomainGetSchedulerType)
        return Result("outargs", "object", ("return", *(a.name for a in outs)), (None,) * (1 + len(outs)),
                      ("string", *("integer" for _ in outs)))
    if ret in KIND_OF_CTYPE or ret in STRING_TYPES or ret in ("double",) or ret == "void":
        kind = value_kind(ret, "return", api)[0] if ret != "void" else "null"
        return Result("value", kind, enums=(None,))
    if typed:
        return Result("value", "typedparams")
    if len(structs) == 1 and len(outs) == 1 and "array" in structs[0].info:
        return Result("value", "any")  # an array of structs: the binding returns a list or a dict
    if len(structs) == 1 and len(outs) - len(scalars) == 1:
        st = api.structs[_struct_of(structs[0].type, api)]
        kinds = tuple(value_kind(f.type, f.name, api, f.info)[0] for f in st.fields)
        enums = tuple(enum_in(f.info, api, f.name) for f in st.fields)
        return Result("struct", "object", tuple(f.name for f in st.fields), enums, kinds)
    if len(outs) == 1 and outs[0].type.startswith("virDomainStatsRecordPtr"):
        return Result("value", "domstats")
    if len(lists) == 1 and not structs:
        base = lists[0].type.replace("const", "").split("*")[0].strip()
        if base in KIND_OF_CTYPE or base + "Ptr" in KIND_OF_CTYPE:
            k = KIND_OF_CTYPE.get(base) or KIND_OF_CTYPE[base + "Ptr"]
            return Result("value", f"refs:{k}")
        if base == "char":
            return Result("value", "strings")
        return Result("value", "any")
    if len(scalars) >= 2 and len(scalars) == len(outs):
        return Result("outargs", "object", tuple(a.name for a in scalars),
                      tuple(enum_in(a.info, api, a.name) for a in scalars),
                      tuple("integer" for _ in scalars))
    if ret in INT_TYPES and not outs:
        enum = enum_in(fn.ret.info, api, strict=True)
        return Result("value", "enum" if enum else "integer", enums=(enum,))
    if ret == "unsigned char *" or [a.type for a in outs] == ["void *"]:
        return Result("value", "bytes")
    if len(outs) == 1 and outs[0].name == "uuid":
        return Result("value", "uuid")
    if len(outs) == 1 and outs[0].type.strip() == "char *":
        return Result("value", "string")
    if len(outs) == 1 and outs[0].type.rstrip(" *") in INT_TYPES and not outs[0].type.endswith("**"):
        if outs[0].name not in ("ids", "freeMems", "cpumap", "cpumaps"):
            enum = enum_in(outs[0].info, api, outs[0].name, strict=True)
            return Result("value", "enum" if enum else "integer", enums=(enum,))
    return Result("value", "any")


def build_method(fn: Function, binding: Binding | None, api: ApiDescription) -> Method:
    """Derive one table entry from the C declaration and its Python wrapper."""
    m = Method(fn.name, fn, binding, _access(fn.name))
    m.excluded = exclusion_reason(fn, binding is not None)
    if m.excluded or binding is None:
        return m
    renames = {c: p for (f, c), p in PY_RENAMES.items() if f == fn.name}
    py_to_c = {renames.get(a.name, a.name): a for a in fn.args}
    if binding.cls and binding.cls != "virConnect":
        own = binding.cls + "Ptr"
        first = next((a for a in fn.args if a.type == own), None)
        if first is None:  # e.g. virDomainRevertToSnapshot: reach the domain via the snapshot
            first = fn.args[0]
            m.self_via = "domain"
        m.self_arg, m.self_kind = first, KIND_OF_CTYPE[first.type]
    params = []
    used = {m.self_arg.name} if m.self_arg and not m.self_via else set()
    for p in binding.params:
        carg = py_to_c.get(p.name)
        stands_for = BINDING_PARAMS.get((fn.name, p.name))
        if stands_for:
            used.update(stands_for[0])
        if carg is not None:
            kind, enum = value_kind(carg.type, carg.name, api, carg.info)
            name, ctype, info = carg.name, carg.type, carg.info
            used.add(carg.name)
        else:
            kind, enum, name, ctype, info = "any", None, p.name, "", "binding-only parameter"
            m.notes.append(f"{p.name}: parameter of the Python binding with no C counterpart")
        nullable = (p.has_default and p.default is None) or "NULL" in info or _null_in_doc(fn.info, name)
        params.append(Param(name, p.name, kind, ctype, not p.has_default, nullable, info, enum))
    m.params = tuple(params)
    outs = [a for a in fn.args if a.name not in used and a is not m.self_arg and _is_out(a, api)]
    m.result = Result("value", "any") if fn.name in RAW_RESULTS else _result(fn, outs, api)
    return m


@lru_cache(maxsize=1)
def load_table() -> MethodTable:
    """Build the whole table from the installed libvirt and libvirt-python."""
    api, bindings = load_api(), load_bindings()
    methods: dict[str, Method] = {}
    helpers: dict[str, str] = {}
    for name, fn in sorted(api.functions.items()):
        reason = helper_reason(fn)
        if reason:
            helpers[name] = reason
            continue
        methods[name] = build_method(fn, bindings.get(name), api)
    return MethodTable(api, methods, helpers)
