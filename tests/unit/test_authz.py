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
])
def test_bad_policies(doc):
    with pytest.raises(PolicyError):
        Policy.from_config(doc)
