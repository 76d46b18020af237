"""Published names, subscription patterns and sequence stamps (pure).

Patterns use AMQP topic wildcards on dotted names: ``*`` is one word, ``#`` zero or more.
"""
from __future__ import annotations

import collections
import re
import time
import uuid
from functools import lru_cache


def event_name(namespace: str, host: str, kind: str) -> str:
    return f"{namespace}.event.{host}.{kind}"


def object_name(namespace: str, host: str, kind: str) -> str:
    return f"{namespace}.object.{host}.{kind}"


def stats_name(namespace: str, host: str, kind: str) -> str:
    return f"{namespace}.stats.{host}.{kind}"


def presence_name(namespace: str, host: str) -> str:
    return f"{namespace}.presence.{host}"


@lru_cache(maxsize=4096)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Compile a topic pattern (``libvirt.event.*.domain.#``) to a regex over dotted names."""
    out = []
    for i, word in enumerate(pattern.split(".")):
        sep = r"\." if i else ""
        if word == "#":
            out.append(r"(?:\.[^.]+)*" if i else r"(?:[^.]+(?:\.[^.]+)*)?")
        elif word == "*":
            out.append(sep + r"[^.]+")
        else:
            out.append(sep + re.escape(word))
    regex = "".join(out)
    if pattern.startswith("#.") :
        regex = regex.replace(r"(?:[^.]+(?:\.[^.]+)*)?\.", r"(?:[^.]+\.)*", 1)
    return re.compile(regex + r"\Z")


def matches(pattern: str, name: str) -> bool:
    return pattern_regex(pattern).match(name) is not None


class Stamper:
    """Epoch (new at every start) and sequence numbers: ``seq`` strictly increasing across all
    kinds within an epoch, ``kind_seq`` per published name. Used on one thread (the reactor)."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex
        self.started = time.time()
        self.seq = 0
        self.kind_seq: collections.Counter[str] = collections.Counter()

    def stamp(self, name: str) -> dict[str, object]:
        self.seq += 1
        self.kind_seq[name] += 1
        return {"topic": name, "epoch": self.epoch, "seq": self.seq, "kind_seq": self.kind_seq[name],
                "timestamp": time.time()}

    def position(self) -> dict[str, object]:
        """Where the stream stands now (for a resync reply)."""
        return {"epoch": self.epoch, "seq": self.seq, "kind_seq": dict(self.kind_seq)}
