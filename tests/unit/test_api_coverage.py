"""The method table, the schemas and libvirt-api.xml agree (after libvirt-python's test_api_coverage.py)."""
from __future__ import annotations

import json
import pathlib

import libvirt
import pytest

from busagent.api.apixml import load_api
from busagent.api.binding import load_bindings
from busagent.api.table import load_table
from busagent.schemagen import render_all

SCHEMAS = pathlib.Path(__file__).resolve().parents[2] / "schemas"


@pytest.fixture(scope="module")
def table():
    return load_table()


def test_every_public_function_is_accounted_for(table):
    api = load_api()
    accounted = set(table.methods) | set(table.helpers)
    assert set(api.functions) == accounted
    assert not set(table.methods) & set(table.helpers)


def test_every_exclusion_has_a_reason(table):
    for m in table.excluded:
        assert m.excluded and len(m.excluded) > 10, m.name


def test_every_bound_function_is_exposed_or_excluded_with_reason(table):
    for cname in load_bindings():
        if cname in table.helpers:
            continue
        if cname not in table.methods:
            continue  # libvirtmod-only helpers of the binding (e.g. virConnectListDomainsID)
        m = table.methods[cname]
        assert m.exposed or m.excluded, cname


def test_coverage_at_least_90_percent(table):
    exposed, total = len(table.exposed), len(table.methods)
    assert total >= 400, "libvirt 9.0 has about 425 object functions"
    assert exposed / total >= 0.90, table.coverage_line()


def test_exposed_methods_call_real_binding_callables(table):
    for m in table.exposed:
        owner = libvirt if m.binding.cls is None else getattr(libvirt, m.binding.cls)
        assert callable(getattr(owner, m.binding.method)), m.name


def test_argument_names_come_from_libvirt_api_xml(table):
    for m in table.exposed:
        cnames = {a.name for a in m.fn.args}
        for p in m.params:
            assert p.name in cnames or p.kind == "any", (m.name, p.name)
        if m.self_arg is not None:
            assert m.self_arg.name in cnames


def test_struct_results_use_libvirt_field_names(table):
    info = table.methods["virDomainGetInfo"].result
    assert info.names == ("state", "maxMem", "memory", "nrVirtCpu", "cpuTime")
    assert info.enums[0] == "virDomainState"


def test_access_classes(table):
    assert table.methods["virDomainGetInfo"].access == "read"
    assert table.methods["virConnectListAllDomains"].access == "read"
    assert table.methods["virDomainSuspend"].access == "write"
    assert table.methods["virDomainDefineXML"].access == "write"
    assert table.methods["virSecretGetValue"].access == "write"  # privileged read
    assert {m.access for m in table.exposed} == {"read", "write"}


def test_committed_schemas_are_current():
    """`busagent schema` output equals what is committed in schemas/."""
    expected = render_all()
    on_disk = {str(p.relative_to(SCHEMAS)): p.read_text() for p in SCHEMAS.rglob("*.json")}
    stale = sorted(k for k in expected if on_disk.get(k) != expected[k])
    extra = sorted(set(on_disk) - set(expected))
    assert not stale and not extra, f"run `busagent schema`: stale {stale[:5]}, extra {extra[:5]}"


def test_schema_index_matches_table(table):
    index = json.loads((SCHEMAS / "methods" / "index.json").read_text())
    assert set(index["exposed"]) == {m.name for m in table.exposed}
    assert set(index["excluded"]) == {m.name for m in table.excluded}
    assert index["coverage"] == table.coverage_line()
