"""Identities: label sets, the selectors that match them, and the allocator
that gives each distinct label set a stable number.

A label set maps names to a string or, for multi-valued labels such as a
user's groups, a frozenset of strings:

    {"kind": "user", "user": "alice", "group": {"eng", "oncall"},
     "device.id": "laptop-42", "device.managed": "true"}
    {"kind": "workload", "app": "api", "env": "prod"}
    {"kind": "network", "name": "partner"}   {"kind": "cidr", "cidr": "203.0.113.0/24"}

Numbers 0-255 are reserved (0 any, 1 this host, 2 world); allocated ones
start at 256 and are persisted, so a label set keeps its number across
restarts and recompiles.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

from loader.abi import ReservedIdentity
from loader.errors import DataplaneError

Labels = Mapping[str, "str | frozenset[str]"]


def label_value(v) -> str:
    """Scalars in label sets are strings: YAML's true/1 become "true"/"1"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def freeze(labels: Mapping) -> dict:
    out = {}
    for k, v in labels.items():
        out[k] = frozenset(label_value(x) for x in v) if isinstance(v, (list, tuple, set, frozenset)) \
            else label_value(v)
    return out


def canonical(labels: Labels) -> str:
    """A stable text form: the allocator's key and the golden files' spelling."""
    def enc(v):
        return sorted(v) if isinstance(v, frozenset) else v
    return json.dumps({k: enc(v) for k, v in sorted(labels.items())}, sort_keys=True, separators=(",", ":"))


def render(labels: Labels) -> str:
    parts = []
    for k, v in sorted(labels.items()):
        parts.append(f"{k}={','.join(sorted(v))}" if isinstance(v, frozenset) else f"{k}={v}")
    return " ".join(parts)


# --- selectors ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Requirement:
    """One label requirement: op is 'eq', 'in', 'notin' or 'exists'/'absent'."""

    label: str
    op: str
    values: frozenset = frozenset()

    def matches(self, labels: Labels) -> bool:
        have = labels.get(self.label)
        if self.op == "exists":
            return have is not None
        if self.op == "absent":
            return have is None
        held = have if isinstance(have, frozenset) else ({have} if have is not None else set())
        if self.op in ("eq", "in"):
            return bool(held & self.values)
        if self.op == "notin":
            return not (held & self.values)
        raise ValueError(self.op)


@dataclasses.dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)


# --- allocation --------------------------------------------------------------------

class Allocator:
    """Stable numbers for label sets (and for rule names, with another file).

    Persisted as JSON {canonical: number}, written atomically. Numbers are
    never reused while the file lives, so counters and conntrack entries
    keyed by number never change meaning."""

    def __init__(self, path: str | Path | None, first: int = ReservedIdentity.FIRST_ALLOCATED,
                 limit: int = 2 ** 32 - 1, what: str = "identity"):
        self.path = Path(path) if path else None
        self.first = first
        self.limit = limit
        self.what = what
        self.numbers: dict[str, int] = {}
        self._dirty = False
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.numbers = {str(k): int(v) for k, v in data["numbers"].items()}
            except (ValueError, KeyError, TypeError) as e:
                raise DataplaneError(f"{self.path}: corrupt {self.what} numbers ({e}); "
                                     f"restore it or move it away to renumber") from None
        self._next = max([self.first - 1, *self.numbers.values()]) + 1

    def number(self, key: str) -> int:
        n = self.numbers.get(key)
        if n is None:
            if self._next > self.limit:
                raise DataplaneError(f"out of {self.what} numbers ({self.limit - self.first + 1} in use)")
            n = self.numbers[key] = self._next
            self._next += 1
            self._dirty = True
        return n

    def save(self) -> None:
        if not self.path or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        with os.fdopen(fd, "w") as f:
            json.dump({"numbers": dict(sorted(self.numbers.items(), key=lambda kv: kv[1]))}, f, indent=1)
        os.replace(tmp, self.path)
        self._dirty = False
