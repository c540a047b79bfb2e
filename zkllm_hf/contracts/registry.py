"""The registry of check kinds: each contract entry's ``kind`` names one implementation registered here,
at one scope, and the run functions of each scope ask it for the implementation behind an entry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .spec import CheckSpec, Contract

SCOPES = ("capture", "file", "layer", "dataset", "replay")
_KINDS: dict[str, tuple[str, Callable[..., Any]]] = {}


def register_check(kind: str, scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the implementation behind contract entries of ``kind``."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; one of {SCOPES}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _KINDS[kind] = (scope, fn)
        return fn

    return deco


def scope_of(kind: str) -> str | None:
    """The scope the implementation of ``kind`` runs at; None if no implementation is registered."""
    found = _KINDS.get(kind)
    return None if found is None else found[0]


def implementation(spec: CheckSpec) -> Callable[..., Any]:
    """The function that runs contract entry ``spec`` (registered for its kind)."""
    return _KINDS[spec.kind][1]


def run_entries(contract: Contract, scope: str, *args: Any) -> list[Any]:
    """Each of the contract's entries of ``scope`` run on ``args``, in contract order: one result per entry."""
    return [implementation(spec)(spec, *args) for spec in entries_of(contract, scope)]


def entries_of(contract: Contract, scope: str) -> Sequence[CheckSpec]:
    """The contract's entries of ``scope``, refusing a scope no check runs at."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; one of {SCOPES}")
    return contract.entries(scope=scope)
