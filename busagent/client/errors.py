"""Exceptions a caller sees."""
from __future__ import annotations

from typing import Any


class CallError(Exception):
    """A call answered with an error (libvirt's or the agent's)."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "error"))
        self.error = error
        self.kind = error.get("kind")

    @staticmethod
    def from_data(error: dict[str, Any]) -> CallError:
        return LibvirtError(error) if error.get("kind") == "libvirt" else CallError(error)


class LibvirtError(CallError):
    """libvirt's own error, with its code, domain and level (numbers and names)."""

    @property
    def code(self) -> int | None:
        return self.error.get("code")

    @property
    def code_name(self) -> str | None:
        return self.error.get("code_name")


class CallTimeout(TimeoutError):
    """No reply within the timeout (the request may or may not have run)."""


class ConnectionFailed(ConnectionError):
    """The bus connection or the request link failed."""
