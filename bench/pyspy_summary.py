"""Summarise py-spy raw (collapsed) stacks: samples per thread, top self and inclusive functions.

``python bench/pyspy_summary.py FILE [--calls N] [--top K]``: with ``--calls``, each
figure is also given in microseconds per call (sampling rate from ``--rate``).
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append((frames.split(";"), n))
    return stacks


def short(frame: str) -> str:
    """``func (file:line)`` -> ``file:func`` (line numbers dropped, so lines of one function merge)."""
    m = FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for cut in ("site-packages/", "lib/python3"):
        if cut in file:
            file = file.split(cut, 1)[1]
    return f"{file}:{m.group('func')}"


def summarise(path: str, calls: int | None, rate: float, top: int, out=sys.stdout) -> None:
    stacks = parse(path)
    total = sum(n for _, n in stacks)
    if not total:
        print("no samples", file=out)
        return
    threads: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    for frames, n in stacks:
        thread = frames[0] if frames and frames[0].startswith(("thread ", "process ")) else "(all)"
        if frames and frames[0].startswith("process "):
            thread = frames[1] if len(frames) > 1 and frames[1].startswith("thread ") else thread
        threads[thread] += n
        names = [short(f) for f in frames if not f.startswith(("process ", "thread "))]
        if names:
            own[names[-1]] += n
        for name in set(names):
            incl[name] += n

    def fmt(n: int) -> str:
        s = f"{n:6d} {100.0 * n / total:5.1f}%"
        if calls:
            s += f" {n / rate / calls * 1e6:8.1f} us/call"
        return s

    print(f"samples: {total} at {rate:g} Hz" + (f", {calls} calls" if calls else ""), file=out)
    print("by thread:", file=out)
    for name, n in threads.most_common(top):
        print(f"  {fmt(n)}  {name}", file=out)
    print(f"top {top} by own time:", file=out)
    for name, n in own.most_common(top):
        print(f"  {fmt(n)}  {name}", file=out)
    print(f"top {top} inclusive:", file=out)
    for name, n in incl.most_common(top):
        print(f"  {fmt(n)}  {name}", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--calls", type=int)
    p.add_argument("--rate", type=float, default=250.0)
    p.add_argument("--top", type=int, default=30)
    ns = p.parse_args(argv)
    summarise(ns.file, ns.calls, ns.rate, ns.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
