"""Who may call what: principals -> roles -> access class and per-method allow/deny (pure).

A role grants ``read`` (only methods whose access class is read, served through a
read-only libvirt connection so libvirt refuses writes too) or ``write`` (every
method). ``allow`` and ``deny`` are lists of method-name globs applied after the
access class: deny wins, allow can open a write method to a read role (it then
still runs on the read-only connection, so libvirt has the last word).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from busagent.api.errors import AgentError

ACCESS = ("read", "write")


class Unauthorized(AgentError):
    kind = "unauthorized"


class PolicyError(ValueError):
    """A security configuration that cannot be used."""


@dataclass(frozen=True)
class Role:
    name: str
    access: str  # 'read' | 'write'
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        return self.access == "read"


@dataclass(frozen=True)
class Decision:
    role: Role
    readonly: bool


@dataclass
class Policy:
    """The whole authorization policy; ``None`` principals are unauthenticated peers."""

    roles: dict[str, Role] = field(default_factory=dict)
    principals: dict[str, str] = field(default_factory=dict)
    anonymous_role: str | None = None
    enabled: bool = False

    @classmethod
    def open(cls) -> Policy:
        """No authorization configured: everyone may call everything (the embedded default)."""
        return cls(roles={"admin": Role("admin", "write")}, anonymous_role="admin", enabled=False)

    @classmethod
    def from_config(cls, doc: dict[str, Any]) -> Policy:
        """Build from the ``[security]`` table of the config file."""
        roles: dict[str, Role] = {}
        role_specs = doc.get("roles") or {}
        if not isinstance(role_specs, dict):
            raise PolicyError("[security] roles must be a table of roles")
        for name, spec in role_specs.items():
            if not isinstance(spec, dict):
                raise PolicyError(f"role {name}: must be a table (access, allow, deny)")
            access = spec.get("access", "read")
            if access not in ACCESS:
                raise PolicyError(f"role {name}: access must be read or write, not {access!r}")
            roles[name] = Role(name, access, _globs(name, spec, "allow"), _globs(name, spec, "deny"))
        principal_specs = doc.get("principals") or {}
        if not isinstance(principal_specs, dict):
            raise PolicyError("[security] principals must be a table of principal = role")
        principals = {str(k): str(v) for k, v in principal_specs.items()}
        for who, role in principals.items():
            if role not in roles:
                raise PolicyError(f"principal {who!r} has unknown role {role!r}")
        anonymous = doc.get("anonymous_role")
        if anonymous is not None and anonymous not in roles:
            raise PolicyError(f"anonymous_role {anonymous!r} is not a role")
        return cls(roles, principals, anonymous, enabled=True)

    @property
    def needs_readonly(self) -> bool:
        """Some role runs its calls on a read-only libvirt connection."""
        return any(r.readonly for r in self.roles.values())

    def describe(self) -> dict[str, Any]:
        """What the policy is, for the start-up log (names and counts only)."""
        if not self.enabled:
            return {"authz": "open"}
        return {"authz": "policy", "roles": {r.name: r.access for r in self.roles.values()},
                "principals": len(self.principals), "anonymous_role": self.anonymous_role}

    def role_of(self, principal: str | None) -> Role:
        """The role of ``principal`` (None: unauthenticated), or raise Unauthorized."""
        role_name = self.principals.get(principal) if principal is not None else None
        if role_name is None:
            role_name = self.anonymous_role if (principal is None or not self.enabled) else None
        if role_name is None:
            who = "an unauthenticated peer" if principal is None else f"principal {principal!r}"
            raise Unauthorized(f"{who} may not call this agent")
        return self.roles[role_name]

    def decide(self, principal: str | None, method: str, access: str) -> Decision:
        """Allow (returning the role) or raise Unauthorized."""
        role = self.role_of(principal)
        if any(fnmatch.fnmatchcase(method, g) for g in role.deny):
            raise Unauthorized(f"role {role.name} is denied {method}")
        allowed = (access == "read" or role.access == "write"
                   or any(fnmatch.fnmatchcase(method, g) for g in role.allow))
        if not allowed:
            raise Unauthorized(f"role {role.name} may only call read methods; {method} is a write method")
        return Decision(role, role.readonly)


def _globs(role: str, spec: dict[str, Any], key: str) -> tuple[str, ...]:
    value = spec.get(key, ())
    if not isinstance(value, (list, tuple)) or not all(isinstance(g, str) for g in value):
        raise PolicyError(f"role {role}: {key} must be a list of method-name globs")
    return tuple(value)
