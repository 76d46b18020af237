import os

import pytest

from busagent.credentials import CredentialsError, Secret, load, load_file


def write(tmp_path, text, mode=0o600):
    p = tmp_path / "creds.toml"
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


def test_file(tmp_path):
    c = load_file(write(tmp_path, 'user = "agent1"\npassword = "s3cret"\n'))
    assert c.user == "agent1" and c.password.reveal() == "s3cret"
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.password)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_refuses_files_others_can_read(tmp_path, mode):
    with pytest.raises(CredentialsError) as exc:
        load_file(write(tmp_path, 'user = "a"\npassword = "s3cret"\n', mode))
    assert "chmod 600" in str(exc.value) and "s3cret" not in str(exc.value)


@pytest.mark.parametrize("text", ['user = "a"\n', 'password = "s3cret"\n', "user = = s3cret"])
def test_bad_files_do_not_echo_the_secret(tmp_path, text):
    with pytest.raises(CredentialsError) as exc:
        load_file(write(tmp_path, text))
    assert "s3cret" not in str(exc.value)


def test_env_and_none():
    assert load(env={}) is None
    c = load(env={"BUSAGENT_BUS_USER": "u", "BUSAGENT_BUS_PASSWORD": "p"})
    assert c.user == "u" and c.password == Secret("p")
    with pytest.raises(CredentialsError):
        load(env={"BUSAGENT_BUS_USER": "u"})
