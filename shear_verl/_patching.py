"""The checks every shear-verl monkeypatch runs before touching verl / vLLM, and its patched marker.

Each patch module (shear_verl.integration.patches, shear_verl.cpu.patches) keeps its own patches
and supported versions; sharing the checks here makes every refusal name the supported versions
the same way, and one marker keeps every patch idempotent.
"""

from __future__ import annotations

import inspect
from typing import Any

PATCHED_ATTR = "__shear_verl_patched__"


class UnsupportedVersionError(RuntimeError):
    """The installed verl / vLLM is not one shear-verl's patches were written against."""


UnsupportedVerlError = UnsupportedVersionError  # the name integration code (patches, megatron_capture) uses


def versions(supported: tuple[str, ...]) -> str:
    """``("0.9.", "0.10.1")`` -> ``"0.9.x / 0.10.1"``, for messages."""
    return " / ".join(v + "x" if v.endswith(".") else v for v in supported)


def check_version(dist: str, installed: str, supported: tuple[str, ...], who: str, remedy: str) -> str:
    """``installed``, if one of ``supported`` (an entry ending in "." is a prefix: "0.9." is any 0.9.x)."""
    base = installed.split("+")[0]  # local build tags (+cpu, +cu128) do not change the API
    if not any(base == v or (v.endswith(".") and base.startswith(v)) for v in supported):
        raise UnsupportedVersionError(
            f"{who} supports {dist} {versions(supported)}, but {dist} {installed} is installed. {remedy}"
        )
    return installed


def require(owner: Any, name: str, dist: str, supported: tuple[str, ...], params: tuple[str, ...] = ()) -> Any:
    """``owner.name`` (its own, not inherited), checked to exist and to start with ``params``."""
    where = f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type) else owner.__name__
    found = vars(owner).get(name)
    if found is None:
        raise UnsupportedVersionError(
            f"shear-verl cannot patch {where}.{name}: not found; this patch supports {dist} {versions(supported)}."
        )
    got = tuple(inspect.signature(found).parameters)[: len(params)] if params else ()
    if got != params:
        raise UnsupportedVersionError(
            f"shear-verl cannot patch {where}.{name}: expected parameters {params}, found {got}; "
            f"this patch supports {dist} {versions(supported)}."
        )
    return found


def mark(obj: Any) -> Any:
    """Flag ``obj`` as a shear-verl patch, so applying the patch again is a no-op."""
    setattr(obj, PATCHED_ATTR, True)
    return obj


def is_patched(obj: Any) -> bool:
    return getattr(obj, PATCHED_ATTR, False)
