"""Capture of the LM-head input on verl's Megatron engine (`MegatronEngineWithLMHead`).

The Megatron counterpart of capture.py + the FSDP wrappers: only the capture and the un-sharding
differ; the weights step is engine_hooks.infer_batch_with_weights, shared with FSDP.

* Hook: `GPTModel.decoder.final_layernorm` on the last pipeline stage. Its output is the LM-head
  input on every verl path (fused kernels or not, THD or BSHD), sequence-first
  `[s_local, b, H]`, and with sequence parallelism each TP rank holds `1/TP` of the rows.
* Un-sharding: SP gather across TP ranks (Megatron's own `gather_from_sequence_parallel_region`,
  as verl's fused forward does before its LM head), then verl's own `postprocess_thd_engine` /
  `postprocess_bshd_engine` with the exact packing arguments the model was called with (CP
  all-gather, zigzag order, padding strip), then `response_from_nested`: the rows are laid out
  exactly like verl's `log_probs`, so row t is the state that predicts response token t (the
  `old_log_probs` convention, docs/method.md, "Row convention").
* The rows travel in the micro-batch's output dict next to `log_probs`, so verl's own
  postprocess merges micro-batches and restores the dynamic-batch order for both alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from shear_verl._patching import UnsupportedVerlError
from shear_verl.integration import engine_hooks
from shear_verl.integration.fields import FLAG_KEY, OAR_FLAG
from shear_verl.integration.peer_split import Peers

# megatron-core versions the capture is written for: [0.16, 0.18). Tested with 0.16.1 (the newest
# release that installs on Python 3.11; >= 0.17 declares Python >= 3.12).
SUPPORTED_MCORE = ((0, 16), (0, 18))


def check_megatron_core_version() -> str:
    from megatron.core.package_info import __version__

    major_minor = tuple(int(p) for p in __version__.split(".")[:2])
    low, high = SUPPORTED_MCORE
    if not low <= major_minor < high:
        raise UnsupportedVerlError(
            f"shear-verl's Megatron capture supports megatron-core >=0.16,<0.18 (tested with 0.16.1), "
            f"found megatron-core {__version__}. Install megatron-core==0.16.1 or use the FSDP engine."
        )
    return __version__


# ----------------------------------------------------------------------------- model structure
def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside verl's DDP / Float16Module wrappers (what verl's forward_step unwraps to)."""
    from verl.utils.megatron_utils import unwrap_model

    return unwrap_model(model)


def _language_model(model: nn.Module) -> nn.Module:
    """The GPTModel (VLMs hold it as `language_model`)."""
    m = _unwrapped(model)
    return getattr(m, "language_model", m)


def find_final_layernorm(model: nn.Module) -> nn.Module | None:
    """`decoder.final_layernorm` of this model chunk; None on chunks without it."""
    lm = _language_model(model)
    decoder = getattr(lm, "decoder", None)
    if decoder is None:
        raise RuntimeError(
            f"SHEAR cannot find `decoder` in {type(lm).__name__}: the Megatron capture expects a "
            "megatron-core GPTModel (or a VLM holding one as `language_model`)"
        )
    return getattr(decoder, "final_layernorm", None)


def check_engine_config(engine) -> None:
    """Refuse the Megatron configurations whose hidden states the capture cannot un-shard."""
    cfg = engine.engine_config
    if cfg.dynamic_context_parallel:
        raise ValueError(
            "algorithm.adv_estimator=shear does not support Megatron dynamic context parallelism yet "
            "(its micro-batches are scheduled across the DPxCP plane, so captured rows cannot follow "
            "verl's log-prob layout). Set actor_rollout_ref.actor.megatron.dynamic_context_parallel=False "
            "and use context_parallel_size for static CP."
        )
    is_vlm = hasattr(engine.model_config.hf_config, "vision_config")
    if is_vlm and not cfg.use_remove_padding:
        raise ValueError(
            "algorithm.adv_estimator=shear on a vision-language model with the Megatron engine needs "
            "the THD path: set actor_rollout_ref.actor.megatron.use_remove_padding=True (the BSHD VLM "
            "attention mask is not the padding mask verl un-pads with)."
        )
    for chunk in engine.module:
        if _unwrapped(chunk).post_process and find_final_layernorm(chunk) is None:
            raise ValueError(
                "algorithm.adv_estimator=shear needs decoder.final_layernorm on the last pipeline stage "
                "(the LM-head input), but this model places it in an earlier stage (multi-token "
                "prediction in its own pipeline stage). Put the MTP layers in the last decoder stage or "
                "disable MTP (actor_rollout_ref.model.mtp.enable=False)."
            )


# ----------------------------------------------------------------------------- capture + un-sharding
@contextlib.contextmanager
def capture_final_norm(model: nn.Module, store: dict) -> Iterator[None]:
    """Record the model's packing arguments and every `decoder.final_layernorm` output inside the block.

    store["packed_seq_params"] / store["attention_mask"]: the arguments verl called the model with
    (seen before any other pre-hook); store["hidden"]: list of `[s_local(/TP), b, H]` tensors.
    """
    top = _unwrapped(model)  # the module verl calls with the packing arguments
    norm = find_final_layernorm(model)
    if norm is None:
        raise RuntimeError("SHEAR capture: this pipeline stage has no decoder.final_layernorm")
    store["hidden"] = []

    def record_inputs(_module, _args, kwargs):
        store["packed_seq_params"] = kwargs.get("packed_seq_params")
        store["attention_mask"] = kwargs.get("attention_mask")

    def record_output(_module, _inputs, output):
        store["hidden"].append(output.detach())

    handles = [
        top.register_forward_pre_hook(record_inputs, with_kwargs=True, prepend=True),
        norm.register_forward_hook(record_output),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def per_sequence_rows(
    hidden: torch.Tensor,
    *,
    sequence_parallel: bool,
    input_ids: torch.Tensor,
    packed_seq_params,
    attention_mask: torch.Tensor | None,
    cp_layout: str,
) -> torch.Tensor:
    """One micro-batch's final-norm output -> nested [b, seq_len_i, H], laid out like verl's log_probs.

    hidden: [s_local / TP, b, H] with sequence parallelism, else [s_local, b, H], where s_local is
    this CP rank's share of the (packed or padded) sequence. THD: b == 1 and packed_seq_params is
    the model's; BSHD: attention_mask is the model's [b, s_local] padding mask. Collective over the
    TP group (SP) and the CP group: every rank of the last stage calls it for every micro-batch.
    """
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
    from verl.models.mcore.util import postprocess_bshd_engine, postprocess_thd_engine

    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)  # [s_local, b, H]
    hidden = hidden.transpose(0, 1).contiguous()  # [b, s_local, H]: the layout of verl's logits
    if packed_seq_params is not None:
        return postprocess_thd_engine(
            hidden, packed_seq_params, input_ids, input_ids.shape[0], post_process=True, cp_layout=cp_layout
        )
    if attention_mask is None:
        raise RuntimeError("SHEAR capture: BSHD forward without an attention mask (cannot strip padding)")
    return postprocess_bshd_engine(hidden, attention_mask, post_process=True)


# ----------------------------------------------------------------------------- engine wrappers
def megatron_forward_step(engine, orig, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
    """verl's forward_step; on the flagged pass and the last stage, add the response rows under HIDDEN_KEY."""
    from verl.utils import tensordict_utils as tu

    batch = next(batch_iter)  # verl's forward_step takes exactly one micro-batch from the iterator
    flag = tu.get_non_tensor_data(data=batch, key=FLAG_KEY, default=None)
    if flag is None or not _unwrapped(model).post_process:
        return orig(iter([batch]), model, logits_processor_func, postprocess_micro_batch_func)

    store: dict = {}
    with capture_final_norm(model, store):
        output, postprocess = orig(iter([batch]), model, logits_processor_func, postprocess_micro_batch_func)
    if len(store["hidden"]) != 1:
        raise RuntimeError(f"SHEAR expected one final-layernorm call per micro-batch, saw {len(store['hidden'])}")
    hidden = store["hidden"][0]
    per_sequence = per_sequence_rows(
        hidden,
        sequence_parallel=bool(_language_model(model).config.sequence_parallel),
        input_ids=batch["input_ids"],
        packed_seq_params=store["packed_seq_params"],
        attention_mask=store["attention_mask"],
        cp_layout=engine._get_context_parallel_layout(_unwrapped(model)),
    )
    # Outside infer_batch_with_weights' split (no share set) the TP / CP peers only take part in the gathers.
    if engine.is_mp_src_rank_with_outputs() or getattr(engine, "_shear_share", None) is not None:
        engine_hooks.stash_response_rows(engine, output, per_sequence, batch, hidden.device, flag)
    return output, postprocess


def megatron_peers(engine) -> Peers:
    """The TP x CP group (megatron's `get_tensor_and_context_parallel_group`): on the last pipeline
    stage its ranks hold the same un-sharded rows after the SP / CP gathers; earlier stages hold none."""
    from megatron.core import parallel_state as mpu

    size = mpu.get_tensor_and_context_parallel_world_size()
    return Peers(mpu.get_tensor_and_context_parallel_group() if size > 1 else None,
                 mpu.get_tensor_and_context_parallel_rank(), size,
                 mpu.is_pipeline_last_stage(ignore_virtual=True), engine.is_mp_src_rank_with_outputs())


def megatron_infer_batch(engine, orig, data, *args, **kwargs):
    """verl's infer_batch + the shared weights step; refuses unsupported configs on the flagged pass."""
    from verl.utils import tensordict_utils as tu

    if tu.get_non_tensor_data(data=data, key=OAR_FLAG, default=None) is not None:
        raise ValueError("algorithm.adv_estimator=oar_g supports the FSDP actor only (its input-gradient pass calls the "
                         "HF model; untested on Megatron): use model_engine=dp")
    if tu.get_non_tensor_data(data=data, key=FLAG_KEY, default=None) is None:
        return orig(data, *args, **kwargs)
    check_engine_config(engine)
    return engine_hooks.infer_batch_with_weights(engine, orig, data, *args, peers=megatron_peers(engine), **kwargs)

