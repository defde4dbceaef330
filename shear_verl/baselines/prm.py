"""Process-reward-model step credit: PURE's step segmentation, the PRM's input, its per-step scores.

Used by the `pure` and `prm_reshape` estimators. The PRM is served by verl 0.9.1's own reward-model
machinery: ``reward.reward_model.enable=true`` starts it as a vLLM pooling server (vLLM's
``Qwen2ForProcessRewardModel``) behind verl's reward router, and verl's reward loop calls
:class:`PRMRewardManager` (``reward.reward_manager.source=importlib``) for every rollout. The
manager computes the verifiable reward with the configured rule (verl's naive manager), splits the
response into steps, posts the PRM's input to the router and returns, as reward extra info, the
step ends (response token positions) and one score per step. Those travel to the driver in verl's
``extra_fields`` column; the estimators read them there (TokenSignal.reward_info).

Segmentation follows the official PURE code (CJReinforce/PURE, branch ``verl`` @ 83f9869,
verl/workers/fsdp_workers.py, ``_init_separator`` l. 1312-1321 and ``_split_steps`` l. 1355-1392): a
step ends at every response token whose decoded text ends with the split string (``"\\n\\n"``),
and the last step ends at the last valid response token (EOS, or the last token of a truncated
response). Two differences, both stated: a last token that is itself a split token ends one step
(PURE appends it a second time, giving an empty extra step), and the PRM's input is the model card's
(Qwen2.5-Math-PRM: the steps' text, without the split string, joined and closed by ``<extra_0>``, in
the PRM's chat template after the prompt's messages) rather than PURE's own PRM's (prompt ids, step
ids minus their last token, ``"\\n"``).

Score of a step: p(positive) - p(negative) of the PRM's two-way softmax at the step's separator
(PURE, fsdp_workers.py l. 1525-1527).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPLIT_STEP_CHAR = "\n\n"  # PURE's `split_step_char` default
PRM_SEPARATOR = "<extra_0>"  # Qwen2.5-Math-PRM-7B's step separator (its model card)

# reward extra info keys (per rollout, lists): where the steps end and what the PRM gave them
STEP_ENDS_KEY = "prm_step_ends"
STEP_SCORES_KEY = "prm_step_scores"


class PRMError(RuntimeError):
    """The PRM could not score a rollout; the message names the reward-model settings."""


def split_token_ids(tokenizer, split_char: str = SPLIT_STEP_CHAR) -> torch.Tensor:
    """Ids of every vocabulary token whose text ends with ``split_char`` (PURE's `_init_separator`). [V']"""
    ids = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith(split_char)]
    return torch.tensor(ids, dtype=torch.long)


def step_ends(response_ids: torch.Tensor, length: int, split_ids: torch.Tensor) -> list[int]:
    """Response positions where a step ends: each split token before ``length``, then ``length - 1``.

    ``response_ids`` [T] is one response (padding after ``length`` valid tokens); [] when length is 0.
    """
    if length <= 0:
        return []
    valid = response_ids[:length]  # [L]
    ends = torch.nonzero(torch.isin(valid, split_ids.to(valid.device)), as_tuple=True)[0].tolist()
    if not ends or ends[-1] != length - 1:
        ends.append(length - 1)  # the last step ends at EOS (or where the response was cut)
    return ends


def step_texts(tokenizer, response_ids: torch.Tensor, ends: Sequence[int],
               split_char: str = SPLIT_STEP_CHAR) -> list[str]:
    """The text of every step, special tokens (EOS) and the trailing split string removed."""
    texts, start = [], 0
    for end in ends:
        text = tokenizer.decode(response_ids[start:end + 1].tolist(), skip_special_tokens=True)
        texts.append(text[: -len(split_char)] if text.endswith(split_char) else text)
        start = end + 1
    return texts


def prm_input_ids(prm_tokenizer, messages: Sequence[dict], steps: Sequence[str],
                  separator: str = PRM_SEPARATOR) -> list[int]:
    """The PRM's token ids: the prompt's chat messages, then the steps each closed by ``separator``
    as the assistant's turn, in the PRM's chat template (Qwen2.5-Math-PRM's model card)."""
    chat = [*messages, {"role": "assistant", "content": "".join(f"{s}{separator}" for s in steps)}]
    text = prm_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    return prm_tokenizer(text, add_special_tokens=False)["input_ids"]


def separator_id(prm_tokenizer, separator: str = PRM_SEPARATOR) -> int:
    ids = prm_tokenizer.encode(separator, add_special_tokens=False)
    if len(ids) != 1:
        raise PRMError(f"the PRM's tokenizer splits its step separator {separator!r} into {len(ids)} tokens {ids}: "
                       "it must be one token (Qwen2.5-Math-PRM: '<extra_0>'); set reward.reward_kwargs.prm_separator")
    return ids[0]


def scores_from_pooling(rows: Sequence[Sequence[float]], input_ids: Sequence[int], sep_id: int,
                        n_steps: int) -> list[float]:
    """p(positive) - p(negative) at each separator, from the PRM server's token_classify output.

    ``rows`` holds [p_neg, p_pos] for every input token (vLLM's default STEP pooling with no
    step_tag_id) or for the separators only (a server started with pooler step_tag_id set).
    """
    at = [i for i, t in enumerate(input_ids) if t == sep_id]
    if len(at) != n_steps:
        raise PRMError(f"the PRM input holds {len(at)} step separators for {n_steps} steps (does the prompt "
                       "contain the separator text?)")
    if len(rows) == len(input_ids):
        rows = [rows[i] for i in at]
    if len(rows) != n_steps or any(len(r) != 2 for r in rows):
        raise PRMError(f"the PRM returned {len(rows)} rows of widths {sorted({len(r) for r in rows})} for "
                       f"{len(input_ids)} tokens and {n_steps} steps: expected 2 probabilities per token "
                       "(a 2-label process reward model such as Qwen2ForProcessRewardModel)")
    return [float(p_pos) - float(p_neg) for p_neg, p_pos in rows]


def back_fill(values: Sequence[float], ends: Sequence[int], width: int, dtype=torch.float32,
              device=None) -> torch.Tensor:
    """Every token of step k carries ``values[k]`` (tokens after the last end: 0). [width]"""
    out = torch.zeros(width, dtype=dtype, device=device)
    start = 0
    for value, end in zip(values, ends, strict=True):
        out[start:end + 1] = value
        start = end + 1
    return out


def at_ends(values: Sequence[float], ends: Sequence[int], width: int, dtype=torch.float32,
            device=None) -> torch.Tensor:
    """``values[k]`` at step k's last token, 0 elsewhere (PURE's `rm_scores * reward_mask`). [width]"""
    out = torch.zeros(width, dtype=dtype, device=device)
    if len(ends):
        out[torch.tensor(list(ends), dtype=torch.long, device=out.device)] = torch.tensor(
            list(values), dtype=dtype, device=out.device)
    return out
