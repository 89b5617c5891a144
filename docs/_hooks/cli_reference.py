"""MkDocs hook: the command-line reference is generated from the CLI's own argparse
parser, so it cannot drift from ``multispool --help``.

A page containing ``<!-- multispool-cli -->`` gets, in its place, the help of the
``multispool`` command and of every subcommand.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- multispool-cli -->"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render() -> str:
    """Markdown: ``multispool --help`` and each ``multispool COMMAND --help``."""
    from multispool.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: make it fixed
    try:
        parser = build_parser()
        parts = ["## multispool", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in _subcommands(parser).items():
            parts += [f"## {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
