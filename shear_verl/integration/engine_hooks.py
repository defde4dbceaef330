"""Engine-side steps, called by the wrappers patches.py installs on verl's actor engines.

Only the old-log-prob pass carries the flag (the driver puts the JSON settings under
`extra_info["shear"]`, which reaches every micro-batch as non-tensor data); the ref pass and the
update never see it, so they run verl's code untouched.
"""

from __future__ import annotations

import torch

from shear_verl.integration import align_hooks
from shear_verl.integration.align_hooks import ENGINE_ATTR
from shear_verl.integration.capture import (
    HIDDEN_KEY,
    capture_last_hidden,
    find_decoder,
    response_rows,
    rows_per_sequence_padded,
    rows_per_sequence_rmpad,
)
from shear_verl.integration.fields import FLAG_KEY, OAR_FLAG
from shear_verl.integration.peer_split import Peers, keep_share, share_of, split_batch_weights
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import STATS_KEY, WEIGHTS_KEY, sequence_scores


def _flag(data):
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=data, key=FLAG_KEY, default=None)


def fsdp_forward_step(engine, orig, micro_batch, loss_function, forward_only):
    """verl's forward_step, with a hook on the decoder while the capture flag is set (or, in the
    update pass, while Hidden-Align is on: align_hooks)."""
    align = getattr(engine, ENGINE_ATTR, None)
    if align is not None and not forward_only and loss_function is not None:
        return align_hooks.forward_step(engine, orig, align, micro_batch, loss_function)
    if _flag(micro_batch) is None:
        return orig(micro_batch, loss_function, forward_only)
    store: list[torch.Tensor] = []
    engine._shear_store = store
    try:
        with capture_last_hidden(find_decoder(engine.module), store):
            return orig(micro_batch, loss_function, forward_only)
    finally:
        engine._shear_store = None


def fsdp_prepare_model_outputs(engine, orig, output, output_args, micro_batch, *args, **kwargs):
    """verl's prepare_model_outputs, plus the captured response rows under HIDDEN_KEY (or Hidden-Align's
    packed rows, on the engine)."""
    from verl.utils import tensordict_utils as tu

    model_output = orig(output, output_args, micro_batch, *args, **kwargs)
    if getattr(engine, "_shear_align_store", None) is not None:
        align_hooks.stash_packed(engine, output_args, micro_batch)
        return model_output
    store = getattr(engine, "_shear_store", None)
    flag = _flag(micro_batch)
    if store is None or flag is None:
        return model_output
    if len(store) != 1:
        raise RuntimeError(f"SHEAR expected one decoder forward per micro-batch, saw {len(store)}")
    hidden = store.pop()
    cu_seqlens = micro_batch["input_ids"].offsets()
    if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
        pad_size = output_args["pad_size"]
        per_sequence = rows_per_sequence_rmpad(
            hidden, cu_seqlens, lambda t: engine._gather_and_unpad_packed(t, pad_size)
        )
    else:
        per_sequence = rows_per_sequence_padded(hidden, cu_seqlens)
    stash_response_rows(engine, model_output, per_sequence, micro_batch, hidden.device, flag)
    return model_output


def stash_response_rows(engine, model_output, per_sequence, micro_batch, device, flag) -> None:
    """Put a micro-batch's response rows (old_log_probs convention) under HIDDEN_KEY, next to its
    log-probs, so verl's own merge / dynamic-bsz restore orders them; shared by every engine.
    Inside infer_batch_with_weights only the rows of this peer's share are kept (others: length 0)."""
    rows = response_rows(per_sequence, micro_batch["response_mask"])  # nested [b, resp_i, H]
    share = getattr(engine, "_shear_share", None)
    if share is not None:
        rows = keep_share(rows, _uids(micro_batch), share)
    engine._shear_device = device
    settings = ShearSettings.from_json(flag)
    if settings.offload_to_cpu:
        rows = rows.to("cpu")  # host memory by request; weights are computed back on the device
    held = getattr(engine, "_shear_capture_bytes", 0) + rows.values().numel() * rows.values().element_size()
    engine._shear_capture_bytes = held
    check_capture_budget(held, settings, where="host" if settings.offload_to_cpu else str(device))
    model_output[HIDDEN_KEY] = rows


def check_capture_budget(held_bytes: int, settings: ShearSettings, where: str) -> None:
    """Stop the pass, naming the knobs, once this rank's captured rows pass max_capture_mb."""
    limit = settings.max_capture_mb
    if limit and held_bytes > limit * 2**20:
        raise RuntimeError(
            f"SHEAR's captured hidden states on this rank hold {held_bytes / 2**20:.1f} MB ({where}), above "
            f"algorithm.shear.max_capture_mb={limit:g}. They are kept until the pass ends (one row per "
            "response token, hidden size wide). Set algorithm.shear.offload_to_cpu=true to keep them in host "
            "memory, lower actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu / "
            "log_prob_max_token_len_per_gpu or the rollouts per rank, or raise max_capture_mb."
        )


def _uids(data) -> list[str]:
    uids = data["uid"]
    return [str(u) for u in (uids.tolist() if hasattr(uids, "tolist") else list(uids))]


def fsdp_peers(engine) -> Peers:
    """The Ulysses SP group (verl's `ulysses_device_mesh["sp"]`): same batch, same gathered rows."""
    mesh = getattr(engine, "ulysses_device_mesh", None)
    if mesh is None or mesh["sp"].size() == 1:
        return Peers(None, 0, 1, True, True)
    return Peers(mesh["sp"].get_group(), mesh["sp"].get_local_rank(), mesh["sp"].size(), True,
                 engine.is_mp_src_rank_with_outputs())


def fsdp_infer_batch(engine, orig, data, *args, **kwargs):
    """verl's infer_batch on the FSDP engine: the OAR-G saliency pass (saliency.py) or SHEAR's weights."""
    from verl.utils import tensordict_utils as tu

    from shear_verl.integration.saliency import infer_batch_with_saliency

    if tu.get_non_tensor_data(data=data, key=OAR_FLAG, default=None) is not None:
        return infer_batch_with_saliency(engine, orig, data, *args, **kwargs)
    return infer_batch_with_weights(engine, orig, data, *args, **kwargs)


def infer_batch_with_weights(engine, orig, data, *args, peers: Peers | None = None, **kwargs):
    """verl's infer_batch; on the flagged pass, turn the captured rows into SHEAR weights.

    The data-parallel rank's groups are split among its `peers` (default: the FSDP Ulysses SP
    group; see peer_split), each keeping only its share's rows; the rank verl collects from
    (`is_mp_src_rank_with_outputs`) returns every row's weights.
    """
    flag = _flag(data)
    engine._shear_capture_bytes = 0  # this pass's captured rows, counted by stash_response_rows
    if flag is None:
        return orig(data, *args, **kwargs)
    peers = peers if peers is not None else fsdp_peers(engine)
    settings = ShearSettings.from_json(flag)
    uids = _uids(data)
    scores = sequence_scores(data["rm_scores"])
    n_tokens = [int(m.sum()) for m in data["response_mask"].unbind()]
    share = share_of(uids, n_tokens, (scores > settings.correct_threshold).tolist(), settings, peers)
    engine._shear_share = share if peers.has_rows else None
    try:
        output = orig(data, *args, **kwargs)
    finally:
        engine._shear_share = None
    if output is None:
        return output
    model_output = output.get("model_output", {})
    hidden = model_output.pop(HIDDEN_KEY, None)
    if not peers.has_rows:
        return output
    if hidden is None:
        raise RuntimeError(
            f"SHEAR capture produced no hidden states in {type(engine).__name__}: the decoder hook did "
            "not run (unsupported model wrapper or engine path)"
        )
    rows = list(hidden.unbind())
    del hidden  # the rows go as soon as this peer's weights exist (split_batch_weights drops `rows`)
    weights, stats = split_batch_weights(
        rows, list(data["response_mask"].unbind()), scores, uids, settings, share, peers,
        device=getattr(engine, "_shear_device", None), capture_mb=engine._shear_capture_bytes / 2**20,
        release=rows.clear,
    )
    if peers.collects:
        model_output[WEIGHTS_KEY] = torch.nested.as_nested_tensor(weights, layout=torch.jagged)  # [b, resp_i]
        model_output[STATS_KEY] = stats  # [b, S]
    return output
