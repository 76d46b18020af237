"""Credentials from a file or the environment, kept out of logs, errors and metrics."""
from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass


class CredentialsError(ValueError):
    """Credentials that cannot be used (the message never contains the secret)."""


class Secret:
    """A string that does not print itself."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Credentials:
    user: str
    password: Secret


def load_file(path: str) -> Credentials:
    """Read ``user`` and ``password`` from a TOML file that only its owner may read."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"credentials file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o});"
            " chmod 600 it")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CredentialsError(f"credentials file {path} is not valid TOML ({type(exc).__name__})") from None
    user, password = doc.get("user"), doc.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or not user:
        raise CredentialsError(f"credentials file {path} needs string keys 'user' and 'password'")
    return Credentials(user, Secret(password))


def load(path: str | None = None, env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials from ``path``, else BUSAGENT_BUS_USER / BUSAGENT_BUS_PASSWORD, else None."""
    env = os.environ if env is None else env
    path = path or env.get("BUSAGENT_CREDENTIALS_FILE")
    if path:
        return load_file(path)
    user, password = env.get("BUSAGENT_BUS_USER"), env.get("BUSAGENT_BUS_PASSWORD")
    if user and password is not None:
        return Credentials(user, Secret(password))
    if user or password:
        raise CredentialsError("set both BUSAGENT_BUS_USER and BUSAGENT_BUS_PASSWORD")
    return None
