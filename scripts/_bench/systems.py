"""The registry of system adapters, in report order. A peer that cannot be imported is
reported as skipped with the reason, and the run goes on."""

from __future__ import annotations

import importlib

from .common import System

# (system name, module, attribute)
_ADAPTERS = [
    ("multispool", "sys_multispool", "SYSTEM"),
    ("floor", "sys_floor", "SYSTEM"),
    ("dirq", "sys_dirq", "SYSTEM"),
    ("pq-file", "sys_persistqueue", "FILE_SYSTEM"),
    ("pq-sqlite", "sys_persistqueue", "SQL_SYSTEM"),
    ("kombu", "sys_kombu", "SYSTEM"),
    ("litequeue", "sys_litequeue", "SYSTEM"),
]
# the peer packages each adapter needs to import
_NEEDS = {"dirq": "dirq", "pq-file": "persistqueue", "pq-sqlite": "persistqueue",
          "kombu": "kombu", "litequeue": "litequeue", "multispool": "multispool", "floor": "os"}

NAMES = [a[0] for a in _ADAPTERS]


def get_system(name: str) -> System:
    for n, mod, attr in _ADAPTERS:
        if n == name:
            importlib.import_module(_NEEDS[n])
            s: System = getattr(importlib.import_module(f"_bench.{mod}"), attr)
            return s
    raise KeyError(name)


def load_all(wanted: list[str] | None = None) -> tuple[list[System], dict[str, str]]:
    """The systems that load, and {name: why not} for those that do not."""
    ok: list[System] = []
    skipped: dict[str, str] = {}
    for n in NAMES:
        if wanted and n not in wanted:
            continue
        try:
            ok.append(get_system(n))
        except Exception as e:
            skipped[n] = f"{type(e).__name__}: {e}"
    return ok, skipped
