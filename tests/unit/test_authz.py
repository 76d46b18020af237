import pytest

from busagent.api.table import load_table
from busagent.authz import Policy, PolicyError, Unauthorized

DOC = {
    "roles": {
        "reader": {"access": "read", "deny": ["virDomainGetXMLDesc"]},
        "operator": {"access": "read", "allow": ["virDomainSuspend", "virDomainResume"]},
        "admin": {"access": "write", "deny": ["virDomainUndefine*"]},
    },
    "principals": {"mon": "reader", "ops": "operator", "ctl": "admin"},
}


def test_open_policy_allows_everything():
    p = Policy.open()
    assert not p.decide(None, "virDomainDestroy", "write").readonly


def test_reader_is_denied_every_write_method_and_allowed_reads():
    p = Policy.from_config(DOC)
    table = load_table()
    writes = [m for m in table.exposed if m.access == "write"]
    reads = [m for m in table.exposed if m.access == "read" and m.name != "virDomainGetXMLDesc"]
    assert len(writes) > 150 and len(reads) > 100
    for m in writes:
        with pytest.raises(Unauthorized):
            p.decide("mon", m.name, m.access)
    for m in reads:
        assert p.decide("mon", m.name, m.access).readonly


def test_deny_wins_and_allow_opens():
    p = Policy.from_config(DOC)
    with pytest.raises(Unauthorized):
        p.decide("mon", "virDomainGetXMLDesc", "read")
    assert p.decide("ops", "virDomainSuspend", "write").readonly  # still on the read-only connection
    with pytest.raises(Unauthorized):
        p.decide("ops", "virDomainDestroy", "write")
    with pytest.raises(Unauthorized):
        p.decide("ctl", "virDomainUndefineFlags", "write")
    assert not p.decide("ctl", "virDomainDestroy", "write").readonly


def test_unknown_and_anonymous_principals_refused():
    p = Policy.from_config(DOC)
    with pytest.raises(Unauthorized):
        p.decide("stranger", "virConnectGetHostname", "read")
    with pytest.raises(Unauthorized):
        p.decide(None, "virConnectGetHostname", "read")
    q = Policy.from_config({**DOC, "anonymous_role": "reader"})
    assert q.decide(None, "virConnectGetHostname", "read").readonly
    with pytest.raises(Unauthorized):
        q.decide("stranger", "virConnectGetHostname", "read")  # a named but unknown principal


@pytest.mark.parametrize("doc", [
    {"roles": {"r": {"access": "root"}}},
    {"roles": {"r": {"access": "read"}}, "principals": {"a": "nope"}},
    {"roles": {}, "anonymous_role": "x"},
    {"roles": {"r": {"access": "read", "allow": "virDomainSuspend"}}},  # a string, not a list of globs
    {"roles": {"r": {"access": "read", "deny": [1]}}},
    {"roles": {"r": "read"}},
    {"roles": ["r"]},
    {"roles": {"r": {"access": "read"}}, "principals": ["a"]},
])
def test_bad_policies(doc):
    with pytest.raises(PolicyError):
        Policy.from_config(doc)


def test_role_of_and_needs_readonly():
    p = Policy.from_config(DOC)
    assert p.role_of("ops").name == "operator"
    with pytest.raises(Unauthorized, match="principal 'stranger' may not call this agent"):
        p.role_of("stranger")
    with pytest.raises(Unauthorized, match="an unauthenticated peer may not call this agent"):
        p.role_of(None)
    assert p.needs_readonly
    assert not Policy.from_config({"roles": {"a": {"access": "write"}}, "principals": {"x": "a"}}).needs_readonly
    assert Policy.open().role_of("anyone").name == "admin" and not Policy.open().needs_readonly


def test_describe_names_roles_not_principals():
    assert Policy.open().describe() == {"authz": "open"}
    d = Policy.from_config({**DOC, "anonymous_role": "reader"}).describe()
    assert d == {"authz": "policy", "roles": {"reader": "read", "operator": "read", "admin": "write"},
                 "principals": 3, "anonymous_role": "reader"}


def test_globs_match_whole_names():
    p = Policy.from_config({"roles": {"r": {"access": "read", "allow": ["virDomainSuspend"],
                                             "deny": ["virNode*"]}}, "principals": {"a": "r"}})
    with pytest.raises(Unauthorized):
        p.decide("a", "virDomainSuspendX", "write")  # not a prefix match
    with pytest.raises(Unauthorized):
        p.decide("a", "virNodeGetInfo", "read")
    assert p.decide("a", "virDomainGetInfo", "read").readonly


def test_request_carries_user_id():
    from busagent.bus.envelope import decode_request, encode_request

    assert decode_request(encode_request("busagentPing", {}, "m1", "r", user_id=b"busagent-reader")).user_id \
        == b"busagent-reader"
    assert decode_request(encode_request("busagentPing", {}, "m1", "r")).user_id is None


def test_example_config_builds_a_policy():
    from pathlib import Path

    from busagent import config

    example = Path(__file__).resolve().parents[2] / "config" / "security-example.toml"
    p = Policy.from_config(config.load(str(example), env={}).security)
    assert p.enabled and p.needs_readonly and p.anonymous_role is None
    assert p.decide("busagent-reader", "virDomainGetInfo", "read").readonly
    with pytest.raises(Unauthorized):
        p.decide("busagent-reader", "virDomainGetXMLDesc", "read")
    assert not p.decide("ops-oncall", "virDomainSuspend", "write").readonly
    with pytest.raises(Unauthorized):
        p.decide("ops-oncall", "virDomainDestroyFlags", "write")
    assert p.decide("helpdesk", "virDomainGetMessages", "write").readonly
    with pytest.raises(Unauthorized):
        p.decide(None, "virConnectGetHostname", "read")
