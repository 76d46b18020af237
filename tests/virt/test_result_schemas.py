"""Every read method the test driver can answer with no argument but an object it has:
its result, as JSON, must validate against the result schema the table publishes.

Runs in-process through the Dispatcher (no bus). A call libvirt refuses is checked too:
it must be the refusal listed here, so the list of what the test driver lacks stays true.
"""
from __future__ import annotations

import json

import jsonschema
import libvirt
import pytest

from busagent.api.dispatch import Dispatcher
from busagent.api.schema import result_schema
from busagent.api.table import Method, load_table

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# the objects test:///default starts with
REFS = {
    "domain": {"name": "test"},
    "storage_pool": {"name": "default-pool"},
    "network": {"name": "default"},
    "interface": {"name": "eth1"},
    "node_device": {"name": "scsi_host1"},
}

# read calls the test driver does not implement (libvirt 9.x): VIR_ERR_NO_SUPPORT
NOT_IN_TEST_DRIVER = {
    "virConnectGetDomainCapabilities", "virConnectGetStoragePoolCapabilities",
    "virConnectListAllNWFilterBindings", "virConnectListAllNWFilters", "virConnectListAllSecrets",
    "virConnectListNWFilters", "virConnectListSecrets", "virConnectNumOfNWFilters", "virConnectNumOfSecrets",
    "virDomainBackupGetXMLDesc", "virDomainGetJobInfo", "virDomainGetJobStats", "virDomainGetSecurityLabelList",
    "virDomainManagedSaveGetXMLDesc", "virDomainMigrateGetCompressionCache", "virDomainMigrateGetMaxDowntime",
    "virDomainMigrateGetMaxSpeed", "virNetworkGetDHCPLeases", "virNetworkListAllPorts",
    "virNodeDeviceGetAutostart", "virNodeDeviceIsActive", "virNodeDeviceIsPersistent",
    "virNodeGetMemoryParameters", "virNodeGetSEVInfo",
}
# other refusals, for reasons of the stock objects or of the binding
OTHER_REFUSALS = {
    # the binding always adds VIR_TYPED_PARAM_STRING_OKAY, which the test driver rejects
    "virDomainGetSchedulerParametersFlags": "VIR_ERR_INVALID_ARG",
    # the stock guest has no snapshot
    "virDomainSnapshotCurrent": "VIR_ERR_NO_DOMAIN_SNAPSHOT",
}


def candidates() -> list[Method]:
    out = []
    for m in load_table().exposed:
        if m.access != "read" or m.self_via or any(p.required for p in m.params):
            continue
        if m.self_arg is not None and m.self_kind not in REFS:
            continue
        out.append(m)
    return out


CANDIDATES = candidates()


@pytest.fixture(scope="module")
def dispatcher():
    conn = libvirt.open("test:///default")
    yield Dispatcher(lambda: conn)
    conn.close()


def test_enough_candidates():
    # connection-level calls and calls on every stock object kind are all covered
    assert len(CANDIDATES) >= 100
    assert {m.self_kind for m in CANDIDATES} == set(REFS) | {None}


@pytest.mark.parametrize("method", CANDIDATES, ids=lambda m: m.name)
def test_result_matches_schema(dispatcher, method):
    args = {method.self_arg.name: REFS[method.self_kind]} if method.self_arg else {}
    try:
        result, result_name = dispatcher.call(method.name, args)
    except libvirt.libvirtError as exc:
        code = load_table().api.enum_name("virErrorNumber", exc.get_error_code())
        expected = "VIR_ERR_NO_SUPPORT" if method.name in NOT_IN_TEST_DRIVER else OTHER_REFUSALS.get(method.name)
        assert code == expected, f"{method.name}: unexpected libvirt error {code}: {exc}"
        return
    wire = json.loads(json.dumps(result))  # what a reply carries
    schema = result_schema(method.result)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(wire), key=lambda e: list(e.path))
    assert not errors, f"{method.name}: {wire!r} does not match {schema}: {errors[0].message}"
    if result_name is not None:
        assert isinstance(result_name, str) and result_name.startswith("VIR_")
    for key, value in (wire.items() if isinstance(wire, dict) else ()):
        if key.endswith("_name") and key[:-5] in wire:  # enum fields carry their constant's name
            assert value is None or value.startswith("VIR_"), f"{method.name}.{key} = {value!r}"
