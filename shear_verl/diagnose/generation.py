"""Sampling of rollouts and continuations: vLLM on a GPU when installed, else transformers' generate."""

from __future__ import annotations

import importlib.util

import torch


class HFGenerator:
    """transformers ``generate`` with sampling; returns the new token ids (EOS kept, padding cut)."""

    def __init__(self, model, tokenizer, max_new_tokens: int, temperature: float, batch: int = 64):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.batch = max_new_tokens, temperature, batch

    @torch.no_grad()
    def sample(self, prompt_ids: list[int], n: int, max_new_tokens: int | None = None) -> list[list[int]]:
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit <= 0:
            return [[] for _ in range(n)]
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt_ids], device=device)
        eos = self.tok.eos_token_id
        out: list[list[int]] = []
        while len(out) < n:
            m = min(self.batch, n - len(out))
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                      temperature=self.temperature, top_p=1.0, top_k=0, max_new_tokens=limit,
                                      num_return_sequences=m, pad_token_id=self.tok.pad_token_id, eos_token_id=eos)
            for row in gen[:, ids.shape[1]:].tolist():
                out.append(row[:row.index(eos) + 1] if eos in row else row)
        return out


class VLLMGenerator:
    """vLLM sampling from token ids (GPU); the HF model for hidden states shares the card."""

    def __init__(self, model_path: str, max_new_tokens: int, temperature: float, gpu_memory_utilization: float):
        from vllm import LLM, SamplingParams

        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        self.params = SamplingParams
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def sample(self, prompt_ids: list[int], n: int, max_new_tokens: int | None = None) -> list[list[int]]:
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit <= 0:
            return [[] for _ in range(n)]
        params = self.params(n=n, temperature=self.temperature, top_p=1.0, max_tokens=limit)
        res = self.llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0]
        return [list(o.token_ids) for o in res.outputs]


def use_vllm() -> bool:
    """vLLM only with a GPU: the CPU build here serves verl and is not meant for this."""
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@torch.no_grad()
def response_states(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Last-layer states (the decoder's last_hidden_state, after the final norm: the LM head's
    input) that predict each response token: row t is the state at position len(prompt) + t - 1,
    as in training. The decoder alone runs, so no [L, vocab] logits are made. [T, d] float32"""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]  # [L, d]
    p = len(prompt_ids)
    return hidden[p - 1:p - 1 + len(response_ids)].float()
