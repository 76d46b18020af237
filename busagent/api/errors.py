"""Agent errors: failures that are not libvirt's, each of a distinct kind."""
from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """An error reply produced by the agent itself (not by libvirt)."""

    kind = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_data(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


class UnknownMethod(AgentError):
    kind = "unknown_method"


class InvalidArguments(AgentError):
    kind = "invalid_arguments"

    def __init__(self, message: str, path: str = "$") -> None:
        super().__init__(message, path=path)


class NotSupported(AgentError):
    kind = "not_supported"


class BadRequest(AgentError):
    """The message itself is malformed (content type, body, properties)."""

    kind = "bad_request"


class Expired(AgentError):
    kind = "expired"


class TooLarge(AgentError):
    kind = "too_large"


class Internal(AgentError):
    kind = "internal"
