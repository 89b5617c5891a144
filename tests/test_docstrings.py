"""Every public name has a docstring: what ``help()`` and the documentation site show.

Public: every name in ``multispool.__all__`` and ``multispool.aio.__all__``, and the
public methods and properties of those classes (defined by multispool, not inherited from
the standard library)."""

from __future__ import annotations

import enum
import inspect
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
    doc = obj.__doc__ if isinstance(obj, property) else inspect.getdoc(obj) if not inspect.isclass(obj) else obj.__dict__.get("__doc__")
    return bool(doc and doc.strip())


def test_every_public_name_has_a_docstring() -> None:
    missing = [q for q, obj in _public_objects() if not _has_doc(obj)]
    assert not missing, f"{len(missing)} public names without a docstring: {missing}"


def test_every_public_method_and_property_has_a_docstring() -> None:
    members = list(_public_members())
    missing = [q for q, m in members if not _has_doc(m)]
    assert not missing, f"{len(missing)} of {len(members)} public methods/properties lack a docstring: {missing}"


def _init_params(cls: type) -> list[str]:
    init = cls.__dict__.get("__init__")
    if init is None or not inspect.isfunction(init):
        return []
    return [p for p in inspect.signature(init).parameters if p != "self"]


@pytest.mark.parametrize(
    "cls",
    [obj for _, obj in _public_objects() if inspect.isclass(obj) and not issubclass(obj, (BaseException, enum.Enum))],
    ids=lambda c: c.__name__,
)
def test_help_documents_every_constructor_parameter(cls: type) -> None:
    """``help(cls)`` shows the class docstring and ``__init__``'s: each parameter is named there."""
    doc = (cls.__dict__.get("__doc__") or "") + (inspect.getdoc(cls.__dict__.get("__init__")) or "")
    undocumented = [p for p in _init_params(cls) if p not in doc]
    assert not undocumented, f"{cls.__name__}: parameters not documented: {undocumented}"
