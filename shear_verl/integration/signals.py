"""Per-token credit signals: one path from the actor workers to a registered advantage estimator.

verl calls an estimator with rewards, mask, config and uids only. A method whose credit needs a
per-token signal declares a :class:`TokenSignal`: the TransferQueue fields that hold the signal,
whether the actor workers compute them during the old-log-prob pass (the driver then sets
``worker_flag`` in that pass's extra_info) or verl writes them itself (``entropy``), and optional
driver-side steps before and after verl's advantage step. The driver's ``_compute_advantage``
wrapper (driver.py) fetches the fields, opens :func:`pending` around verl's own step, and the
estimator reads them with :func:`current`. SHEAR is one user (worker-computed weights);
``shear_verl.baselines`` are others (verl's own entropy).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenSignal:
    """What one registered estimator needs from the workers, and how the driver hands it over.

    name: the ``algorithm.adv_estimator`` value; the method's knobs live under ``algorithm.<name>.*``.
    fields: TransferQueue fields fetched (padded, [B, T] or [B, S]) for the estimator.
    parse: ``config.algorithm -> settings``; raises ValueError naming ``algorithm.<name>.<key>``.
    worker_flag: if set, the workers compute ``fields`` in the old-log-prob pass when that pass's
        extra_info holds the settings' JSON under this key (fields.py); None: verl writes them.
    whole_groups: the workers need every GRPO group on one data-parallel rank.
    prepare: ``(trainer, settings, padded, uids, metrics) -> payload``, driver side, before verl's
        advantage step (default: the fetched fields by name).
    finish: ``(trainer, settings, out, payload, handoff, uids, metrics) -> None``, after it.
    missing_help: the error when the fields are absent (why, and what to check).
    reward_info: keys of the rollouts' reward extra info (verl's ``extra_fields`` column, one value
        per row, e.g. a PRM's step scores) added to the payload as lists in row order.
    check: ``config -> None``, start-up refusals of set-ups the signal cannot run in (full config).
    """

    name: str
    fields: tuple[str, ...]
    parse: Callable[[Any], Any]
    worker_flag: str | None = None
    whole_groups: bool = False
    prepare: Callable | None = None
    finish: Callable | None = None
    missing_help: str = ""
    reward_info: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None


SIGNALS: dict[str, TokenSignal] = {}


def register_signal(signal: TokenSignal) -> TokenSignal:
    """Add ``signal`` (idempotent for an equal declaration; a different one under the same name raises)."""
    known = SIGNALS.get(signal.name)
    if known is not None and known != signal:
        raise ValueError(f"token signal {signal.name!r} is already registered with another declaration")
    SIGNALS[signal.name] = signal
    return signal


def active_signal(config) -> TokenSignal | None:
    """The signal of ``config.algorithm.adv_estimator``, or None for verl's own estimators."""
    return SIGNALS.get(str(config.algorithm.get("adv_estimator", "")))


# ----------------------------------------------------------------------------- driver -> estimator
@dataclass(frozen=True)
class Pending:
    """One batch's signal as the estimator sees it: payload tensors in batch row order."""

    name: str
    payload: Mapping[str, Any]
    uids: list[str]
    handoff: dict  # the estimator leaves what the driver needs afterwards here ("metrics": {...}, ...)


_PENDING: contextvars.ContextVar[Pending | None] = contextvars.ContextVar("shear_verl_pending_signal", default=None)


@contextlib.contextmanager
def pending(name: str, payload: Mapping[str, Any], uids: Sequence[str]) -> Iterator[dict]:
    """Make ``payload`` (rows in batch order, ``uids[i]`` the group of row i) visible to estimator ``name``."""
    handoff: dict = {}
    token = _PENDING.set(Pending(name, payload, [str(u) for u in uids], handoff))
    try:
        yield handoff
    finally:
        _PENDING.reset(token)


def current(name: str, index, response_mask: torch.Tensor, missing_help: str, token_keys: Sequence[str] = ()) -> Pending:
    """The pending signal of estimator ``name``, checked to belong to the batch verl passes it:
    same uids in the same order, and ``token_keys`` of the payload shaped like ``response_mask``."""
    found = _PENDING.get()
    if found is None or found.name != name:
        raise RuntimeError(missing_help)
    if index is None:
        raise RuntimeError(f"the {name} estimator needs the GRPO group ids (`uid`) of the batch")
    for key in token_keys:
        shape = tuple(found.payload[key].shape)
        if shape != tuple(response_mask.shape):
            raise RuntimeError(
                f"{name}: the workers' {key} have shape {shape} but the batch's response_mask has "
                f"{tuple(response_mask.shape)}: they belong to another batch"
            )
    if [str(u) for u in index] != found.uids:
        raise RuntimeError(f"{name}: the workers' {', '.join(token_keys) or 'signal'} are not in the batch's "
                           "row order (uid mismatch)")
    return found
