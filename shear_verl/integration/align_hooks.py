"""Hidden-Align in verl's processes (the loss itself: shear_verl.baselines.hidden_align).

- driver, ``verl.utils.config.validate_config``: start-up checks of
  ``actor_rollout_ref.actor.hidden_align.*``, and the section hidden from verl's ``ActorConfig``
  (a dataclass that refuses unknown keys) while verl validates;
- actor worker, ``ActorRolloutRefWorker.init_model``: the section taken out of the worker's
  config before verl builds its ``ActorConfig``, and the run installed on the actor's engine;
- FSDP engine, update pass only (``forward_only=False``): a hook keeps the decoder output *with*
  gradient, ``prepare_model_outputs`` lays it out packed like verl's log-probs, and the loss
  function verl calls gets ``coef * (1/G) sum_g L_g`` added, with ``hidden_align/*`` metrics
  (logged by verl as ``actor/hidden_align/*``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from shear_verl.baselines.hidden_align import (
    KEY,
    HiddenAlignSettings,
    alignment_loss,
    anchor_states,
    check_config,
    find_anchors,
    parse_settings,
)

ENGINE_ATTR = "_shear_hidden_align"  # the HiddenAlignRun on the actor engine


@dataclass(frozen=True)
class HiddenAlignRun:
    settings: HiddenAlignSettings
    marker_ids: tuple[int, ...]  # answer_marker tokenized by the actor's tokenizer
    rollout_n: int  # rollouts per prompt: the mini-batch has global_batch_size / rollout_n groups


@contextlib.contextmanager
def _without_section(actor_cfg):
    """verl's ActorConfig refuses unknown keys: hide ``hidden_align`` inside the block."""
    from omegaconf import open_dict

    if KEY not in actor_cfg:
        yield None
        return
    with open_dict(actor_cfg):
        section = actor_cfg.pop(KEY)
    try:
        yield section
    finally:
        with open_dict(actor_cfg):
            actor_cfg[KEY] = section


def validate_config(orig, config, *args, **kwargs):
    """verl's start-up validation, after ours; verl never sees the section."""
    check_config(config)
    with _without_section(config.actor_rollout_ref.actor):
        return orig(config, *args, **kwargs)


def init_model(worker, orig, *args, **kwargs):
    """verl's init_model without the section in the worker's actor config; the run installed after."""
    from omegaconf import open_dict

    actor_cfg = worker.config.get("actor", None)
    section = None
    if actor_cfg is not None and KEY in actor_cfg:
        with open_dict(actor_cfg):
            section = actor_cfg.pop(KEY)  # stays out: verl rebuilds ActorConfig from it later (checkpoints)
    out = orig(*args, **kwargs)
    settings = parse_settings(section)
    if settings.active and "actor" in worker.role:
        engine = worker.actor.engine
        tokenizer = engine.model_config.tokenizer
        marker = tuple(tokenizer.encode(settings.answer_marker, add_special_tokens=False)) if settings.answer_marker else ()
        setattr(engine, ENGINE_ATTR, HiddenAlignRun(settings, marker, int(worker.config.rollout.n)))
    return out


def forward_step(engine, orig, run: HiddenAlignRun, micro_batch, loss_function):
    """verl's training forward_step with the decoder output kept (with grad) and the term added."""
    from shear_verl.integration.capture import capture_last_hidden, find_decoder

    store: list[torch.Tensor] = []
    engine._shear_align_store = store

    def loss_with_alignment(model_output, data, dp_group=None):
        loss, metrics = loss_function(model_output=model_output, data=data, dp_group=dp_group)
        packed, engine._shear_align_packed = engine._shear_align_packed, None
        if packed is None:
            raise RuntimeError("hidden_align: the decoder hook saw no forward in this micro-batch "
                               f"({type(engine).__name__}: unsupported model wrapper or engine path)")
        term, align_metrics = alignment_term(run, packed, data)
        metrics.update(align_metrics)
        return loss + term.to(loss.dtype), metrics

    try:
        with capture_last_hidden(find_decoder(engine.module), store, detach=False):
            return orig(micro_batch, loss_with_alignment, False)
    finally:
        engine._shear_align_store = None
        engine._shear_align_packed = None


def stash_packed(engine, output_args, micro_batch) -> None:
    """In prepare_model_outputs: the captured decoder output as packed rows [nnz, H] (graph kept)."""
    from verl.utils import tensordict_utils as tu

    from shear_verl.integration.capture import packed_rows_padded

    store = engine._shear_align_store
    if len(store) != 1:
        raise RuntimeError(f"hidden_align expected one decoder forward per micro-batch, saw {len(store)}")
    hidden = store.pop()
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        engine._shear_align_packed = engine._gather_and_unpad_packed(hidden.squeeze(0), output_args["pad_size"])
    else:
        engine._shear_align_packed = packed_rows_padded(hidden, micro_batch["input_ids"].offsets())


def alignment_term(run: HiddenAlignRun, packed: torch.Tensor, data) -> tuple[torch.Tensor, dict]:
    """coef * dp_size * sum_g L_g / G for one micro-batch, and its metrics (verl Metric objects)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType, Metric

    from shear_verl.integration.balance import PAD_UID_PREFIX
    from shear_verl.integration.engine_hooks import _uids
    from shear_verl.integration.worker import sequence_scores

    s = run.settings
    for field in ("rm_scores", "uid", "response_mask", "input_ids"):
        if field not in data.keys():
            raise RuntimeError(f"hidden_align needs `{field}` in the actor's update batch (correct rollouts, groups, "
                               "anchor), but verl's update pass did not receive it")
    cu_seqlens = data["input_ids"].offsets()  # [b + 1]
    response_mask = data["response_mask"]  # nested [b, resp_i]
    lens = response_mask.offsets().diff()  # [b]
    ids = data["input_ids"].values()  # [nnz]
    responses = [ids[end - n:end] for end, n in zip(cu_seqlens[1:].tolist(), lens.tolist(), strict=True)]
    anchors, valid, found = find_anchors(responses, list(response_mask.unbind()), run.marker_ids, s.fallback)
    uids = _uids(data)
    real = torch.tensor([not u.startswith(PAD_UID_PREFIX) for u in uids])
    correct = (sequence_scores(data["rm_scores"]) > s.correct_threshold).cpu() & real
    states = anchor_states(packed, cu_seqlens, lens, anchors)  # [b, H]
    total, groups, terms = alignment_loss(states, uids, correct, valid & real, s.loss, s.target)
    dp = int(tu.get_non_tensor_data(data=data, key="dp_size", default=1))
    global_rows = tu.get_non_tensor_data(data=data, key="global_batch_size", default=None)
    n_groups = global_rows / run.rollout_n if global_rows else max(len({u for u, r in zip(uids, real) if r}), 1)
    scaled = total * dp / n_groups
    n_real = max(int(real.sum()), 1)
    metrics = {
        "hidden_align/loss": Metric(value=float(scaled.detach()), aggregation=AggregationType.SUM),
        "hidden_align/groups": Metric(value=float(groups * dp), aggregation=AggregationType.SUM),
        "hidden_align/pairs": Metric(value=float(terms * dp), aggregation=AggregationType.SUM),
        "hidden_align/anchor_found_frac": Metric(value=float((found & real).sum()) / n_real,
                                                 aggregation=AggregationType.MEAN),
        "hidden_align/correct_frac": Metric(value=float(correct.sum()) / n_real, aggregation=AggregationType.MEAN),
    }
    return s.coef * scaled, metrics
