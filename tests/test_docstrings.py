"""Every public name has a docstring: what ``help()`` and the documentation site show.

Public: every name in ``multispool.__all__`` and ``multispool.aio.__all__``, and the
public methods and properties of those classes (defined by multispool, not inherited from
the standard library)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest

import multispool
import multispool.aio


def _own(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("multispool")


def _public_objects() -> Iterator[tuple[str, Any]]:
    for mod in (multispool, multispool.aio):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj


def _public_members() -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for qual, cls in _public_objects():
        if not inspect.isclass(cls):
            continue
        for klass in cls.__mro__:
            if not _own(klass):
                continue
            for name, member in vars(klass).items():
                if name.startswith("_") or id(member) in seen:
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property) or inspect.isfunction(member):
                    seen.add(id(member))
                    yield f"{qual}.{name}", member


def _has_doc(obj: Any) -> bool:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")  # its own, not one inherited from a base
    elif isinstance(obj, property):
        doc = obj.__doc__
    else:
        doc = inspect.getdoc(obj)
    return bool(doc and doc.strip())


def test_every_public_name_has_a_docstring() -> None:
    missing = [q for q, obj in _public_objects() if not _has_doc(obj)]
    assert not missing, f"{len(missing)} public names without a docstring: {missing}"


def test_every_public_method_and_property_has_a_docstring() -> None:
    members = list(_public_members())
    missing = [q for q, m in members if not _has_doc(m)]
    assert not missing, f"{len(missing)} of {len(members)} public members lack a docstring: {missing}"


# Classes users construct themselves: ``help(cls)`` must explain every parameter.
CONSTRUCTED = [
    "Spoolable", "MsgspecData", "Entry", "Save", "Limits", "Monitor", "MonitorDaemon", "FileWithMtime",
    "TooOld", "Orphaned", "Duplicated", "Start", "End",
    # when present in this version:
    "Retry", "Backoff", "FileData", "DeadCheckout",
]
# Methods whose options users pass: each parameter is explained in the docstring.
METHODS = [
    (multispool.Spool, ["load", "create", "load_unsafe", "reader", "with_entry",
                        "recover_checkouts", "clean_abandoned", "reserve_name"]),
    (multispool.QueueReader, ["iter", "iter_available", "dequeue"]),
    (multispool.MonitorDaemon, ["start"]),
    (multispool.aio.AsyncSpool, ["load", "create", "reader"]),
    (multispool.aio.AsyncQueueReader, ["iter", "dequeue"]),
]


def _params(fn: Any) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


def _undocumented(params: list[str], doc: str) -> list[str]:
    return [p for p in params if not re.search(rf"\b{re.escape(p)}\b", doc)]


@pytest.mark.parametrize("name", [n for n in CONSTRUCTED if hasattr(multispool, n)])
def test_help_documents_every_constructor_parameter(name: str) -> None:
    """``help(cls)`` shows the class docstring and ``__init__``'s: each parameter is named there."""
    cls = getattr(multispool, name)
    doc = (cls.__dict__.get("__doc__") or "") + (inspect.getdoc(cls.__init__) or "")
    params = _params(cls.__init__) if "__init__" in vars(cls) else _params(cls)
    assert _undocumented(params, doc) == [], f"{name}: parameters not documented"


@pytest.mark.parametrize(
    "method", [getattr(cls, m) for cls, ms in METHODS for m in ms], ids=lambda m: m.__qualname__
)
def test_options_of_common_methods_are_documented(method: Any) -> None:
    assert _undocumented(_params(method), inspect.getdoc(method) or "") == []
