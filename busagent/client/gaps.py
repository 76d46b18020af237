"""Gap detection for consumers of published messages (pure).

Every message carries ``epoch`` (new at each agent start), ``seq`` (across all of
an agent's names) and ``kind_seq`` (per published name, ``topic``). A consumer of
any subset of names sees a gap exactly when a name's ``kind_seq`` skips.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Gap:
    """Something was missed (``missed`` messages on ``topic``) or the agent restarted."""

    host: str
    topic: str | None
    missed: int
    restarted: bool = False


@dataclass
class GapTracker:
    """Remembers the last position seen per host and topic."""

    epochs: dict[str, str] = field(default_factory=dict)
    last: dict[tuple[str, str], int] = field(default_factory=dict)

    def seed(self, host: str, epoch: str, kind_seq: dict[str, int]) -> None:
        """Start from a known position (a resync reply)."""
        self.epochs[host] = epoch
        for k in [k for k in self.last if k[0] == host]:
            del self.last[k]
        for topic, n in kind_seq.items():
            self.last[(host, topic)] = n

    def observe(self, doc: dict[str, Any]) -> Gap | None:
        """Account for one message; returns the gap it reveals, if any."""
        host, topic, epoch, n = doc.get("host"), doc.get("topic"), doc.get("epoch"), doc.get("kind_seq")
        if host is None or epoch is None or not isinstance(n, int):
            return None
        known = self.epochs.get(host)
        if known is not None and known != epoch:
            for k in [k for k in self.last if k[0] == host]:
                del self.last[k]
            self.epochs[host] = epoch
            self.last[(host, topic)] = n
            return Gap(host, topic, n - 1, restarted=True)
        self.epochs[host] = epoch
        prev = self.last.get((host, topic))
        self.last[(host, topic)] = max(n, prev or 0)
        if prev is not None and n > prev + 1:
            return Gap(host, topic, n - prev - 1)
        return None
