"""Worker side of OAR-G (baselines/oar_g.py): each rollout's input-gradient saliency, on the actor.

Runs inside verl's old-log-prob pass (FSDP engine) when its extra_info holds ``oar_g``: after
verl's own forward, each rollout with an answer span gets a clean forward (no gradient) for the
answer distribution P_0 and a noisy forward + one backward w.r.t. the input embeddings only
(``torch.autograd.grad`` on the embedding output: no parameter gradient is formed or accumulated).
The model is called as a HF causal LM, one sequence at a time (no padding, no packing), so the
numbers do not depend on verl's micro-batching; every FSDP rank makes the same number of calls
(the others run a 3-token dummy), as FSDP's all-gathers need.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shear_verl.integration.capture import unwrap_model
from shear_verl.integration.fields import OAR_FLAG, OAR_REASONING_KEY, OAR_SALIENCY_KEY, OAR_STATS_KEY

KL_EPS = 1e-12  # the authors' eps in log(P_0 + eps)


def answer_span(response_ids: Sequence[int], decode: Callable[[list[int]], str], marker: str,
                special_ids: Sequence[int], no_marker: str, tail_tokens: int) -> tuple[int | None, int, bool]:
    """(start, end, marker_found): the answer is response tokens [start, end), reasoning [0, start).

    end drops trailing special tokens (EOS, pad); start is the token holding the first character of
    the last ``marker`` in the decoded response, else (no_marker="tail") end - tail_tokens; None when
    there is no span with at least one reasoning token.
    """
    ids = list(response_ids)
    special = set(special_ids)
    end = len(ids)
    while end > 0 and ids[end - 1] in special:
        end -= 1
    if marker:
        pos = decode(ids[:end]).rfind(marker)
        if pos >= 0:
            lo, hi = 0, end - 1  # the first token whose prefix text reaches past the marker's position
            while lo < hi:
                mid = (lo + hi) // 2
                if len(decode(ids[: mid + 1])) > pos:
                    hi = mid
                else:
                    lo = mid + 1
            return (lo if lo >= 1 else None), end, True
    if no_marker == "tail" and end - tail_tokens >= 1:
        return end - tail_tokens, end, False
    return None, end, False


def _logits_kwargs(model: nn.Module, keep: int) -> dict:
    """Ask HF for the last ``keep`` positions' logits only, where the model's forward takes it."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": keep} if "logits_to_keep" in params else {}


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token-embedding module, through FSDP1 / PEFT wrappers (called through the root forward)."""
    return unwrap_model(model).get_input_embeddings()


def _answer_logits(model, ids: torch.Tensor, first: int) -> torch.Tensor:
    """Logits of positions first..L-1 of the sequence ids [L], at least float32. [L - first, V]"""
    keep = ids.shape[0] - first
    pos = torch.arange(ids.shape[0], device=ids.device)[None]
    out = model(input_ids=ids[None], position_ids=pos, use_cache=False, **_logits_kwargs(model, keep))
    return _at_least_fp32(out.logits[0, -keep:])


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 logits and gradients in float32 (the authors' `.float()`); float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _objective(logits: torch.Tensor, teacher: torch.Tensor, answer_ids: torch.Tensor, target: str) -> torch.Tensor:
    """J of the noisy logits [A + 1, V] (row k predicts answer token k) against the clean ``teacher``."""
    if target == "answer_joint":
        return teacher - _joint(logits, answer_ids)
    logq = F.log_softmax(_pooled(logits, answer_ids.shape[0], target), dim=-1)  # [V]
    return torch.sum(teacher * (torch.log(teacher + KL_EPS) - logq))


def _pooled(logits: torch.Tensor, n_answer: int, target: str) -> torch.Tensor:
    """answer_mean: the mean logits of the positions predicting the answer; last: the first one's. [V]"""
    return logits[:n_answer].mean(dim=0) if target == "answer_mean" else logits[0]


def _joint(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood of the answer tokens (answer_joint)."""
    logp = F.log_softmax(logits[: answer_ids.shape[0]], dim=-1)  # [A, V]
    return logp.gather(-1, answer_ids[:, None]).squeeze(-1).mean()


def input_gradient_saliency(model: nn.Module, ids: torch.Tensor, start: int, answer_start: int, end: int,
                            target: str = "answer_mean", noise: torch.Tensor | None = None) -> torch.Tensor:
    """I_t = |<dJ/de_t, e_t>| for the reasoning tokens t in [start, answer_start) of the sequence ids [>= end].

    The answer is tokens [answer_start, end); J = KL(P_0 || P(e + xi)) (answer_mean / last) or
    phi_0 - phi(e + xi) (answer_joint, phi the answer's mean log-likelihood), P_0 / phi_0 from the
    clean embeddings; ``noise`` xi: [answer_start - start, H] on the reasoning embeddings (None: 0).
    Returns [answer_start - start] float32.
    """
    ids = ids[:end]
    first = answer_start - 1  # the position that predicts the first answer token
    answer_ids = ids[answer_start:end]  # [A]
    with torch.no_grad():
        clean = _answer_logits(model, ids, first)  # [A + 1, V]
        teacher = (_joint(clean, answer_ids) if target == "answer_joint"
                   else F.softmax(_pooled(clean, answer_ids.shape[0], target), dim=-1))
    store: list[torch.Tensor] = []

    def leaf_with_noise(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)  # [1, L, H]: the only tensor the gradient is taken for
        store.append(leaf)
        if noise is None:
            return leaf
        shift = torch.zeros_like(leaf)
        shift[0, start:answer_start] = noise.to(device=leaf.device, dtype=leaf.dtype)
        return leaf + shift

    handle = input_embeddings(model).register_forward_hook(leaf_with_noise)
    try:
        with torch.enable_grad():
            objective = _objective(_answer_logits(model, ids, first), teacher, answer_ids, target)
            (grad,) = torch.autograd.grad(objective, store[0])  # [1, L, H]
    finally:
        handle.remove()
    e = _at_least_fp32(store[0][0, start:answer_start].detach())  # [R, H] clean embeddings
    return (_at_least_fp32(grad[0, start:answer_start]) * e).sum(dim=-1).abs().float()  # [R]


def batch_saliency(model: nn.Module, input_ids: Sequence[torch.Tensor], response_mask: Sequence[torch.Tensor],
                   settings, tokenizer, group=None, seed: int = 0):
    """Per row (prompt + response ids [L_i], response mask [R_i]): saliency and reasoning mask [R_i]
    (float32, response coordinates), and stats [b, 3] (span found, marker found, seconds).

    Every rank of ``group`` (torch.distributed) makes the same number of model calls: the spans are
    found first, the ranks agree on the most calls (before any FSDP collective), the lighter ones pad.
    """
    device = next(model.parameters()).device
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False,  # noqa: E731
                                          clean_up_tokenization_spaces=False)
    special = list(getattr(tokenizer, "all_special_ids", []) or [])
    stats = torch.zeros(len(input_ids), 3, dtype=torch.float32)
    spans = []
    for row, (ids, mask) in enumerate(zip(input_ids, response_mask)):
        prompt = ids.shape[0] - mask.shape[0]
        start, end, found = answer_span(ids[prompt:].tolist(), decode, settings.answer_marker, special,
                                        settings.no_marker, settings.tail_tokens)
        stats[row, 1] = float(found)
        spans.append((prompt, start, end))
    most = _most_calls(sum(start is not None for _, start, _ in spans), group, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    saliency, reasoning = [], []
    for row, ((prompt, start, end), ids, mask) in enumerate(zip(spans, input_ids, response_mask)):
        t0 = time.perf_counter()
        sal = torch.zeros(mask.shape[0], dtype=torch.float32)
        keep = torch.zeros(mask.shape[0], dtype=torch.float32)
        if start is not None:
            noise = None
            if settings.noise_std > 0:
                h = input_embeddings(model).embedding_dim
                noise = torch.randn(start, h, generator=gen, device=device) * settings.noise_std  # [R, H]
            sal[:start] = input_gradient_saliency(model, ids.to(device), prompt, prompt + start, prompt + end,
                                                  settings.target, noise).cpu()
            keep[:start] = mask[:start].float().cpu()
            stats[row, 0] = 1.0
        saliency.append(sal * keep)
        reasoning.append(keep)
        stats[row, 2] = time.perf_counter() - t0
    dummy = torch.zeros(3, dtype=torch.long, device=device)
    for _ in range(most - int(stats[:, 0].sum())):  # 3 tokens: reasoning [0, 1), answer [1, 3)
        input_gradient_saliency(model, dummy, 0, 1, 3, settings.target, None)
    return saliency, reasoning, stats


def _most_calls(calls: int, group, device) -> int:
    """The most saliency calls any rank of ``group`` makes this pass (``calls`` without a group)."""
    if group is None or not torch.distributed.is_initialized() or torch.distributed.get_world_size(group) == 1:
        return calls
    most = torch.tensor([calls], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(most.item())


def infer_batch_with_saliency(engine, orig, data, *args, **kwargs):
    """verl's infer_batch; on the flagged pass, the OAR-G saliency of every row next to its log-probs."""
    from verl.utils import tensordict_utils as tu

    from shear_verl.baselines.oar_g import OarGSettings

    flag = tu.get_non_tensor_data(data=data, key=OAR_FLAG, default=None)
    if flag is None:
        return orig(data, *args, **kwargs)
    if getattr(engine, "ulysses_sequence_parallel_size", 1) > 1:
        raise RuntimeError("algorithm.adv_estimator=oar_g does not support Ulysses sequence parallelism: set "
                           "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1")
    if tu.get_non_tensor_data(data=data, key="use_fused_kernels", default=False):
        raise RuntimeError("algorithm.adv_estimator=oar_g needs the logits: set "
                           "actor_rollout_ref.model.use_fused_kernels=false")
    settings = OarGSettings.from_json(flag)
    input_ids, response_mask = list(data["input_ids"].unbind()), list(data["response_mask"].unbind())
    output = orig(data, *args, **kwargs)
    calls = getattr(engine, "_oar_calls", 0)  # a fresh noise draw per pass
    engine._oar_calls = calls + 1
    group = engine.get_data_parallel_group() if torch.distributed.is_initialized() else None
    with _autocast(engine):
        saliency, reasoning, stats = batch_saliency(engine.module, input_ids, response_mask, settings,
                                                    engine.model_config.tokenizer, group, settings.seed + calls)
    if output is None:
        return output
    model_output = output["model_output"]
    model_output[OAR_SALIENCY_KEY] = torch.nested.as_nested_tensor(saliency, layout=torch.jagged)  # [b, resp_i]
    model_output[OAR_REASONING_KEY] = torch.nested.as_nested_tensor(reasoning, layout=torch.jagged)  # [b, resp_i]
    model_output[OAR_STATS_KEY] = stats  # [b, 3]
    return output


def _autocast(engine):
    """The dtype verl's own forward runs the actor in (mixed precision); none for float32."""
    dtype = getattr(engine, "_autocast_dtype", None)
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(engine.module.parameters()).device.type, dtype=dtype)
