"""``python -m multispool``: the command line (see multispool.cli)."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
