"""Driver side (verl's V1 trainer, in the TaskRunner): the steps a token-signal estimator changes.

1. `__init__`: start-up checks of `algorithm.adv_estimator` and every method's `algorithm.<name>.*`
   (:func:`validate_config`, every run).
2. `_balance_batch`: whole GRPO groups per data-parallel rank (balance.py), for signals the
   workers compute per group (SHEAR).
3. `_compute_old_log_prob`: set the signal's worker flag for verl's old-log-prob pass (SHEAR).
4. `_compute_advantage`: fetch the signal's fields and hand them to its estimator (signals.py).
Each function takes verl's original method as `orig` and is installed by patches.py; 2-4 run only
for an estimator with a registered :class:`~shear_verl.integration.signals.TokenSignal`.
SHEAR's own driver steps (metrics, fallback, credit dumps) follow, as that signal's prepare/finish.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from shear_verl.core import ShearConfig
from shear_verl.integration import signals
from shear_verl.integration.balance import assert_groups_whole, group_balanced_partitions, split_key, uid_of_key
from shear_verl.integration.dump import reward_extra_infos, write_records
from shear_verl.integration.estimator import MISSING_WEIGHTS_HELP
from shear_verl.integration.fields import FLAG_KEY, STATS_KEY, WEIGHTS_KEY
from shear_verl.integration.settings import ESTIMATOR_NAME, ShearSettings, settings_from_algorithm
from shear_verl.integration.worker import COL, GROUP_COLUMNS, sequence_scores

logger = logging.getLogger("shear_verl")

SHEAR_FIELDS = (WEIGHTS_KEY, STATS_KEY)


@dataclass(frozen=True)
class SignalRun:
    """The token signal of this run and its parsed settings (on the trainer as `_signal_run`)."""

    signal: signals.TokenSignal
    settings: Any


def is_shear(config) -> bool:
    return str(config.algorithm.get("adv_estimator", "")) == ESTIMATOR_NAME


def validate_config(config) -> Any:
    """Start-up checks; returns the active signal's parsed settings (None for verl's own estimators).

    Every run: `algorithm.adv_estimator` must be registered, and no method's `algorithm.<name>.*`
    other than the active one's may be set. A token-signal run also needs verl's old-log-prob pass
    when it reads worker fields (they are computed there), a reward model served on its own pool when
    it reads reward info (a PRM's step scores), groups of >= 2 rollouts, and the V1 trainer.
    """
    name = str(config.algorithm.get("adv_estimator", ""))
    check_estimator_name(name)
    for other, sig in signals.SIGNALS.items():
        section = config.algorithm.get(other, None)
        if other != name and section and not _is_default(sig, section):
            keys = ", ".join(f"algorithm.{other}.{k}" for k in section)
            raise ValueError(f"{keys} configure algorithm.adv_estimator={other}, but this run has "
                             f"algorithm.adv_estimator={name}: remove them or set adv_estimator={other}")
    signal = signals.SIGNALS.get(name)
    if signal is None:
        return None
    settings = signal.parse(config.algorithm)
    what = ", ".join(signal.fields)
    rc = config.algorithm.get("rollout_correction", None)
    if signal.fields and rc is not None and rc.get("bypass_mode", False):
        raise ValueError(
            f"algorithm.adv_estimator={name} needs verl's old-log-prob pass (it computes {what} there), but "
            "algorithm.rollout_correction.bypass_mode=true skips it. Set algorithm.rollout_correction.bypass_mode=false."
        )
    n = int(config.actor_rollout_ref.rollout.get("n", 1))
    if n < 2:
        raise ValueError(
            f"algorithm.adv_estimator={name} compares rollouts of the same prompt, but "
            f"actor_rollout_ref.rollout.n={n}; set it to 2 or more (the paper uses 8)."
        )
    reward = config.get("reward", None)
    if signal.reward_info and not (reward is not None and reward.reward_model.get("enable", False)
                                   and reward.reward_model.get("enable_resource_pool", False)):
        raise ValueError(f"algorithm.adv_estimator={name} reads {', '.join(signal.reward_info)} from the reward "
                         "model, but reward.reward_model.enable / enable_resource_pool are not both true. "
                         + signal.missing_help)
    if not config.trainer.get("use_v1", True):
        raise ValueError(f"algorithm.adv_estimator={name} supports verl's V1 trainer only: set trainer.use_v1=true")
    if signal.check is not None:
        signal.check(config)
    return settings


def _is_default(signal: signals.TokenSignal, section) -> bool:
    """Whether ``algorithm.<signal.name>`` only spells out that method's defaults (the package yaml does)."""
    try:
        return signal.parse({signal.name: section}) == signal.parse({})
    except ValueError:
        return False


def check_estimator_name(name: str) -> None:
    """verl looks the estimator up only at the first advantage step; refuse an unknown one at start-up."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY

    if name not in ADV_ESTIMATOR_REGISTRY:
        raise ValueError(f"algorithm.adv_estimator={name} is not a registered advantage estimator; known: "
                         f"{', '.join(sorted(ADV_ESTIMATOR_REGISTRY))} (shear-verl's register when its plugin "
                         "loads: check `python -c 'import verl, shear_verl.plugin as p; print(p.status())'`)")


def balance_batch(trainer, orig, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
    """verl's `_balance_batch`, with whole GRPO groups as the items that are balanced."""
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
    from verl.utils.seqlen_balancing import calculate_workload, log_seqlen_unbalance

    worker_group = trainer.actor_rollout_wg
    if "actor" not in worker_group._dispatch_info:
        worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
    dp_size = max(worker_group._dispatch_info["actor"]) + 1

    batch = upsample_batch_to_divisible_size(
        batch, trainer._get_required_batch_multiple(dp_size), trainer.tokenizer.eos_token_id
    )
    seqlens = torch.tensor([tag["seq_len"] for tag in batch.tags], dtype=torch.int64)
    workloads = calculate_workload(seqlens).tolist()
    uids = [uid_of_key(k) for k in batch.keys]
    partitions = group_balanced_partitions(uids, workloads, dp_size)
    batch.reorder([row for part in partitions for row in part])
    assert_groups_whole([uid_of_key(k) for k in batch.keys], dp_size)
    metrics.update(log_seqlen_unbalance(seqlen_list=seqlens.tolist(), partitions=partitions, prefix=logging_prefix))
    return batch


def compute_old_log_prob(trainer, orig, batch, metrics):
    """Run verl's old-log-prob pass with the signal's worker flag set, then drop its fields from the meta."""
    run: SignalRun = trainer._signal_run
    flag = run.signal.worker_flag
    batch.extra_info[flag] = run.settings.to_json()
    try:
        out = orig(batch, metrics)
    finally:
        batch.extra_info.pop(flag, None)
    out.extra_info.pop(flag, None)
    return strip_worker_fields(out, run.signal)


def compute_advantage(trainer, orig, batch, metrics):
    """Fetch the signal's fields, hand them to its estimator around verl's own advantage step."""
    import transfer_queue as tq
    from verl.protocol import DataProto

    run: SignalRun = trainer._signal_run
    signal = run.signal
    refuse_multi_output_sessions(batch.keys, signal.name)
    fields = [*signal.fields, "uid", "response_mask", "rm_scores", *(["extra_fields"] if signal.reward_info else [])]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
    if any(f not in data.keys() for f in signal.fields):
        raise RuntimeError(signal.missing_help)
    padded = DataProto(batch=data.exclude("extra_fields").to_padded_tensor()).batch  # extra_fields: not tensors
    uids = [str(u) for u in padded.pop("uid").tolist()]  # as verl reads it
    if signal.prepare is not None:
        payload = signal.prepare(trainer, run.settings, padded, uids, metrics)
    else:
        payload = {f: padded[f] for f in signal.fields}
    if signal.reward_info:
        payload = {**payload, **reward_info_columns(reward_extra_infos(data, len(uids)), signal, uids)}
    with signals.pending(signal.name, payload, uids) as handoff:
        out = orig(batch, metrics)
    metrics.update(handoff.get("metrics", {}))
    if signal.finish is not None:
        signal.finish(trainer, run.settings, out, payload, handoff, uids, metrics)
    return strip_worker_fields(out, signal)


def reward_info_columns(infos: list[dict], signal: signals.TokenSignal, uids) -> dict[str, list]:
    """The signal's reward-extra-info keys per row (lists in row order) from the rows' extra info.

    A real row without them stops the step (signal.missing_help): no row silently gets a default.
    verl's padding rows (balance.PAD_UID_PREFIX) get None.
    """
    from shear_verl.integration.balance import PAD_UID_PREFIX

    out: dict[str, list] = {key: [] for key in signal.reward_info}
    for info, uid in zip(infos, uids, strict=True):
        for key in signal.reward_info:
            if key not in info and not uid.startswith(PAD_UID_PREFIX):
                raise RuntimeError(signal.missing_help)
            out[key].append(info.get(key))
    return out


def strip_worker_fields(batch, signal: signals.TokenSignal):
    """Later worker calls fetch every field listed in the meta: keep the workers' signal out of them
    (fields verl writes itself, such as `entropy`, stay as verl leaves them)."""
    if signal.worker_flag is not None and batch.fields is not None:
        batch.fields = [f for f in batch.fields if f not in signal.fields]
    return batch


# ----------------------------------------------------------------------------- SHEAR's signal
def shear_prepare(trainer, settings: ShearSettings, padded, uids, metrics) -> dict:
    """SHEAR before verl's advantage step: `shear/*` metrics, the capped-solve warning, the fallback weights."""
    weights = padded[WEIGHTS_KEY].float()  # [B, T]
    mask = padded["response_mask"].bool()  # [B, T]
    scores = sequence_scores(padded["rm_scores"])  # [B], as the workers decided correctness
    stats = padded[STATS_KEY].float()  # [B, S]
    metrics.update(shear_metrics(weights, mask, scores, uids, stats, settings.correct_threshold))
    warning = capped_warning(metrics, settings.engine)
    if warning is not None and not getattr(trainer, "_shear_warned_capped", False):
        trainer._shear_warned_capped = True  # once per run: shear/capped_solves is logged every step
        logger.warning(warning)
    fallback = fallback_rows(stats, uids)  # [B]
    weights = apply_fallback(weights, mask, fallback, settings.fallback)
    return {"weights": weights, "mask": mask, "scores": scores, "fallback": fallback}


def shear_finish(trainer, settings: ShearSettings, out, payload, handoff, uids, metrics) -> None:
    """SHEAR after verl's advantage step: the fallback metric and warning, the credit dump."""
    fallback, mask = payload["fallback"], payload["mask"]
    active = int((fallback[:, None] & mask & (handoff["grpo_advantages"] != 0)).any(dim=1).sum())
    metrics["shear/fallback_active_rollouts"] = float(active)
    if active and not getattr(trainer, "_shear_warned_fallback", False):
        trainer._shear_warned_fallback = True  # once per run: the metric counts them every step
        logger.warning(fallback_warning(active, settings.fallback))
    if settings.dump_every > 0 and trainer.global_steps % settings.dump_every == 0:
        metrics["shear/dump_rollouts"] = float(dump_credit(
            trainer, out, uids, payload["scores"], payload["weights"], handoff["grpo_advantages"], settings))


SHEAR_SIGNAL = signals.TokenSignal(
    name=ESTIMATOR_NAME, fields=SHEAR_FIELDS, parse=settings_from_algorithm, worker_flag=FLAG_KEY,
    whole_groups=True, prepare=shear_prepare, finish=shear_finish, missing_help=MISSING_WEIGHTS_HELP,
)


def refuse_multi_output_sessions(keys, estimator: str = ESTIMATOR_NAME) -> None:
    """Stop on agent sessions with several outputs ("{uid}_{session}_{index}", index > 0).

    verl's GRPO (v1/utils.py, compute_advantage_for_multi_trajectories) normalises over each
    session's final output only and broadcasts that scalar to the session's other outputs; any other
    estimator, the token-signal ones included, gets every output row as a group member, so such a
    run and its GRPO twin would use different groups; the signals have no answer for them yet.
    """
    extra = [k for k in keys if split_key(k)[2] > 0]
    if extra:
        raise RuntimeError(
            f"algorithm.adv_estimator={estimator} got {len(extra)} rows that are non-final outputs of multi-output agent "
            f"sessions (e.g. key {extra[0]!r}). verl's GRPO groups such sessions by their final output only; "
            f"{estimator} does not support them: use an agent loop that returns one output per session "
            "(actor_rollout_ref.rollout.multi_turn / agent loop settings), or algorithm.adv_estimator=grpo."
        )


def dump_credit(trainer, batch, uids, scores, weights, grpo_advantages, settings: ShearSettings):
    """Write this step's credit dump (shear_verl.integration.dump); returns its number of rollouts."""
    import os

    import transfer_queue as tq

    from shear_verl.integration.balance import PAD_UID_PREFIX
    from shear_verl.integration.dump import DUMP_SUBDIR, credit_records, dump_path, select_groups

    fields = ["responses", "response_mask", "advantages", "extra_fields"]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
    correct = scores > settings.correct_threshold  # [B]
    real = [i for i, u in enumerate(uids) if not u.startswith(PAD_UID_PREFIX)]
    chosen = set(select_groups([uids[i] for i in real], [bool(correct[i]) for i in real], settings.dump_groups))
    extra = reward_extra_infos(data, len(uids))
    records = credit_records(
        step=trainer.global_steps, estimator=ESTIMATOR_NAME, uids=uids,
        rows=[i for i in real if uids[i] in chosen],
        response_ids=list(data["responses"].unbind()), response_mask=list(data["response_mask"].unbind()),
        scores=scores, correct=correct, weights=weights, grpo_advantages=grpo_advantages,
        advantages=list(data["advantages"].unbind()), extra_info=extra,
        decode=lambda ids: trainer.tokenizer.decode(ids),
    )
    root = settings.dump_dir or os.path.join(trainer.config.trainer.default_local_dir, DUMP_SUBDIR)
    path = write_records(records, dump_path(root, trainer.global_steps))
    logger.info("SHEAR credit dump: %d rollouts -> %s", len(records), path)
    return len(records)


# Share of a step's Sinkhorn solves that may stop at max_iter before a warning (a few slow problems
# per group are normal at small eps: on a trained LM's groups at eps = 0.02, 0-1 of 1150-2020 solves
# with Anderson acceleration, 38-46 % with over-relaxation alone; 2000 iterations gave values within
# 5.3e-6 of converged ones on 60 of its span problems: the warning says what precision is lost, not
# that the weights are wrong).
CAPPED_WARN_FRAC = 0.01


def capped_warning(metrics: dict[str, float], engine: ShearConfig) -> str | None:
    """A message when more than CAPPED_WARN_FRAC of the step's solves hit max_iter, naming the knobs."""
    capped, solves = metrics["shear/capped_solves"], metrics["shear/sinkhorn_solves"]
    if solves <= 0 or capped <= CAPPED_WARN_FRAC * solves:
        return None
    return (f"SHEAR: {capped:.0f} of {solves:.0f} Sinkhorn solves this step reached max_iter={engine.max_iter} before "
            f"their marginal error fell below tol={engine.tol:g}: those span distances are less exact than tol asks "
            f"(epsilon={engine.epsilon:g} {engine.epsilon_mode}; smaller eps converges more slowly). Raise "
            "algorithm.shear.max_iter for full precision, or epsilon; shear/capped_solves counts them every step.")


def fallback_rows(stats: torch.Tensor, uids) -> torch.Tensor:
    """Real rows whose group had no (non-empty) opposing side: they hold the fallback weight. [B]"""
    from shear_verl.integration.balance import PAD_UID_PREFIX

    real = torch.tensor([not u.startswith(PAD_UID_PREFIX) for u in uids])
    return (stats[:, COL["fallback"]] > 0) & real


def apply_fallback(weights: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor, mode: str) -> torch.Tensor:
    """The fallback rows' weights: 1 as the workers left them ("one"), or the mean weight over the
    loss tokens of the step's other rows ("group_mean"; 1 when the step has none). [B, T]"""
    if mode == "one" or not fallback.any():
        return weights
    scored = mask & ~fallback[:, None]  # [B, T]
    mean = weights[scored].mean() if scored.any() else weights.new_tensor(1.0)
    return torch.where(fallback[:, None], mean * mask.to(weights.dtype), weights)


def fallback_warning(active: int, mode: str) -> str:
    given = "weight 1 (algorithm.shear.fallback=one)" if mode == "one" else \
        "the mean weight of the step's mixed groups (algorithm.shear.fallback=group_mean)"
    return (f"SHEAR: {active} rollouts of groups with no opposing side (all of one outcome by "
            "correct_threshold, or the other side only empty responses) have a nonzero GRPO advantage: "
            f"partial-credit rewards. They get {given}"
            + (", so their updates can be several times larger than a mixed group's; "
               "algorithm.shear.fallback=group_mean scales them like the mixed groups." if mode == "one" else ".")
            + " shear/fallback_active_rollouts counts them every step.")


def shear_metrics(weights, mask, scores, uids, stats, threshold: float) -> dict[str, float]:
    """`shear/*` metrics of one step. weights/mask [B, T], scores [B], stats [B, S]."""
    from shear_verl.integration.balance import PAD_UID_PREFIX

    real = torch.tensor([not u.startswith(PAD_UID_PREFIX) for u in uids])
    correct = scores > threshold  # [B]
    groups: dict[str, list[int]] = {}
    for row, u in enumerate(uids):
        if real[row]:
            groups.setdefault(u, []).append(row)
    mixed = [rows for rows in groups.values() if 0 < int(correct[rows].sum()) < len(rows)]
    in_mixed = torch.zeros(len(uids), dtype=torch.bool)
    for rows in mixed:
        in_mixed[rows] = True
    tok = mask & real[:, None]

    def mean_over(rows_mask: torch.Tensor) -> float:
        sel = tok & rows_mask[:, None]
        return float(weights[sel].mean()) if sel.any() else 0.0

    col = {name: stats[:, COL[name]].sum().item() for name in GROUP_COLUMNS}
    # Each rank's SHEAR time is the sum over its groups; the step waits for the slowest rank.
    rank_time: dict[int, float] = {}
    for rank, t in zip(stats[:, COL["rank"]].tolist(), stats[:, COL["time_s"]].tolist()):
        rank_time[int(rank)] = rank_time.get(int(rank), 0.0) + t
    n_mixed = max(col["mixed_groups"], 1.0)
    fallback = fallback_rows(stats, uids)
    n_real = int(real.sum())
    return {
        "shear/weight_mean": mean_over(torch.ones_like(real)),
        "shear/weight_max": float(weights[tok].max()) if tok.any() else 0.0,
        "shear/weight_mean_correct": mean_over(correct & in_mixed),
        "shear/weight_mean_incorrect": mean_over(~correct & in_mixed),
        "shear/mixed_group_frac": len(mixed) / max(len(groups), 1),
        "shear/fallback_rollout_frac": float(fallback.sum()) / max(n_real, 1),
        "shear/sinkhorn_solves": col["sinkhorn_solves"],
        "shear/pruned_frac": col["pruned_pairs"] / max(col["candidate_pairs"], 1.0),
        "shear/dual_pruned_frac": col["dual_pruned_pairs"] / max(col["candidate_pairs"], 1.0),
        "shear/capped_solves": col["capped_solves"],
        "shear/n_bar": col["n_bar_sum"] / n_mixed,
        "shear/epsilon_raw": col["epsilon_raw_sum"] / n_mixed,
        "shear/time_s": max(rank_time.values(), default=0.0),
        "shear/time_s_sum": sum(rank_time.values()),
        "shear/capture_mb": float(stats[:, COL["capture_mb"]].max()) if len(uids) else 0.0,
    }
