"""Pure pieces of transport security: settings, SASL choices, URL options, secret masking."""
from __future__ import annotations

import pytest

from busagent import config
from busagent.bus import tls
from busagent.client.connecting import split_tls
from busagent.config import ConfigError, Settings
from busagent.virt.errors import mask_secrets


def test_client_mechanisms_never_fall_back_to_anonymous():
    assert tls.client_mechanisms("user", certificate=False) == "PLAIN"
    assert tls.client_mechanisms("user", certificate=True) == "PLAIN"
    assert tls.client_mechanisms(None, certificate=True) == "EXTERNAL"
    assert tls.client_mechanisms(None, certificate=False) == "ANONYMOUS"


def test_server_mechanisms_follow_client_auth():
    assert tls.server_mechanisms(Settings()) == "ANONYMOUS"
    assert tls.server_mechanisms(Settings(tls_cert="c", tls_key="k")) == "ANONYMOUS"
    assert tls.server_mechanisms(Settings(tls_cert="c", tls_key="k", tls_ca="a", tls_client_auth="required")) \
        == "EXTERNAL"


@pytest.mark.parametrize(("kw", "match"), [
    ({"tls_client_auth": "optional"}, "tls_client_auth"),
    ({"tls_cert": "c.pem"}, "go together"),
    ({"tls_cert": "c.pem", "tls_key": "k.pem", "tls_client_auth": "required"}, "tls_ca"),
    ({"max_json_depth": 1}, "max_json_depth"),
])
def test_bad_security_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        Settings(**kw).validate()


def test_client_auth_without_a_certificate_is_refused():
    with pytest.raises(ConfigError, match="needs TLS"):
        tls.server_domain(Settings(tls_ca="ca.pem", tls_client_auth="required"))


def test_security_settings_load_from_file_and_environment(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('[tls]\ncert = "c.pem"\nkey = "k.pem"\nverify_hostname = false\n'
                    '[security.roles.r]\naccess = "read"\n[security.principals]\n"CN=x,O=y" = "r"\n')
    s = config.load(str(path), env={})
    assert (s.tls_cert, s.tls_key, s.tls_verify_hostname) == ("c.pem", "k.pem", False)
    assert s.security["principals"] == {"CN=x,O=y": "r"}
    s = config.load(str(path), env={"BUSAGENT_TLS_VERIFY_HOSTNAME": "true", "BUSAGENT_CREDENTIALS_FILE": "/x"})
    assert s.tls_verify_hostname is True and s.credentials_file == "/x"
    with pytest.raises(ConfigError, match="true or false"):
        config.load(str(path), env={"BUSAGENT_TLS_VERIFY_HOSTNAME": "maybe"})


def test_tls_options_ride_on_the_url():
    url, options = split_tls("amqps://h:5671?ca=/a/ca.pem&cert=me.pem&key=me-key.pem")
    assert url == "amqps://h:5671"
    assert options == {"ca": "/a/ca.pem", "cert": "me.pem", "key": "me-key.pem"}
    assert split_tls("amqp://u:p@h:5672") == ("amqp://u:p@h:5672", {})
    with pytest.raises(ValueError, match="unknown URL option"):
        split_tls("amqps://h?cafile=x")


@pytest.mark.parametrize(("text", "masked"), [
    ("<graphics type='vnc' passwd='s3cret'/>", "<graphics type='vnc' passwd='***'/>"),
    ('<secret password="p" passphrase="q" key="k"/>', '<secret password="***" passphrase="***" key="***"/>'),
    ("no XML here", "no XML here"),
    ("<disk type='file'><source file='/x'/></disk>", "<disk type='file'><source file='/x'/></disk>"),
])
def test_libvirt_messages_have_secret_attributes_masked(text, masked):
    assert mask_secrets(text) == masked

