"""Capture of the LM-head input (last-layer hidden states after the final norm) on the FSDP engine.

A forward hook on the decoder base model (`model.model` of a HF causal LM) sees the LM-head input
on every verl path: fused kernels or not (the fused kernel consumes it; a hook on `lm_head` would
not fire), remove-padding or not, Ulysses SP or not. The captured rows are then laid out exactly
like verl lays out `log_probs` (nested per sample over prompt+response, gathered across the SP
group, static/SP padding stripped) and cut to response rows with verl's own
`response_from_nested`, i.e. the state at the position that *predicts* each response token --
the convention of `old_log_probs` (docs/method.md, "Row convention").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from shear_verl.integration.fields import HIDDEN_KEY  # noqa: F401 - re-exported


def unwrap_model(module: nn.Module) -> nn.Module:
    """The HF model inside FSDP1 / PEFT wrappers (FSDP2 wraps in place: returned as is)."""
    m = module
    for _ in range(4):  # FSDP1 -> PEFT -> LoRA model -> HF model, at most
        if hasattr(m, "_fsdp_wrapped_module"):
            m = m._fsdp_wrapped_module
        elif hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
        else:
            break
    return m


def find_decoder(module: nn.Module) -> nn.Module:
    """The decoder base model whose output is the LM-head input, through FSDP1 / PEFT wrappers."""
    m = unwrap_model(module)
    if hasattr(m, "get_decoder") and callable(m.get_decoder):
        decoder = m.get_decoder()
        if isinstance(decoder, nn.Module) and decoder is not m:
            return decoder
    if isinstance(getattr(m, "model", None), nn.Module):
        return m.model
    raise RuntimeError(
        f"SHEAR cannot find the decoder base model inside {type(m).__name__}: expected a HF causal "
        "LM with `get_decoder()` or a `.model` attribute (the module that returns last_hidden_state)"
    )


@contextlib.contextmanager
def capture_last_hidden(decoder: nn.Module, store: list, detach: bool = True) -> Iterator[None]:
    """Append the decoder's `last_hidden_state` of every forward inside the block to `store`
    (detached, or with its graph for a loss on it: hidden_align)."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        store.append(hidden.detach() if detach else hidden)

    handle = decoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def rows_per_sequence_rmpad(hidden: torch.Tensor, cu_seqlens: torch.Tensor, unpad) -> torch.Tensor:
    """Packed decoder output -> nested [b, seq_len_i, H] (remove-padding path).

    hidden: [1, nnz_local + pad, H] on this SP rank; `unpad` is the engine's
    `_gather_and_unpad_packed` bound to this micro-batch's pad size (SP gather + pad strip).
    """
    packed = unpad(hidden.squeeze(0))  # [nnz, H]
    return torch.nested.nested_tensor_from_jagged(packed, cu_seqlens)


def packed_rows_padded(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Right-padded decoder output [b, S, H] -> packed rows [nnz, H] (no remove-padding)."""
    return torch.cat([hidden[i, :n] for i, n in enumerate(cu_seqlens.diff().tolist())])


def rows_per_sequence_padded(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Right-padded decoder output [b, S, H] -> nested [b, seq_len_i, H] (no remove-padding)."""
    return torch.nested.nested_tensor_from_jagged(packed_rows_padded(hidden, cu_seqlens), cu_seqlens)


def response_rows(per_sequence: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """nested [b, seq_len_i, H] -> nested [b, response_len_i, H], with verl's log-prob shift."""
    from verl.workers.utils.padding import response_from_nested

    return response_from_nested(per_sequence, response_mask)
