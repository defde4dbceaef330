"""Warm start of the tiny counting model: a short, seeded supervised pass on the CPU.

A random-init model never counts right, so every GRPO group would be all-wrong and SHEAR would
have nothing to compare. A few hundred AdamW steps on :func:`~shear_verl.tiny.counting.demonstrations`
(a share with one error at a uniformly random term) give a policy whose groups are mixed from
step 1, with first errors spread over the response. Loss on the response tokens and the EOS only,
the way verl's SFT trainer masks prompts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from . import counting


@dataclass(frozen=True)
class WarmStart:
    """Hyper-parameters of the supervised pass (all of them key the asset cache)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    error_frac: float = 0.5  # share of demonstrations with one wrong term
    seed: int = 0


def encode_demonstration(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat-formatted demonstration; labels -100 on the prompt."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(head, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def warm_start(model, tokenizer, cfg: WarmStart = WarmStart(), log=print) -> list[float]:
    """Train ``model`` in place on demonstrations; returns the loss of every step."""
    import torch

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.0, 1 - s / cfg.steps)
    )
    pad = tokenizer.pad_token_id
    model.train()
    losses, t0 = [], time.monotonic()
    for step in range(cfg.steps):
        pairs = [encode_demonstration(tokenizer, *counting.demonstration(rng, cfg.error_frac)[:2]) for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((cfg.batch_size, width), pad, dtype=torch.long)  # [B, L]
        labels = torch.full((cfg.batch_size, width), -100, dtype=torch.long)  # [B, L]
        mask = torch.zeros((cfg.batch_size, width), dtype=torch.long)  # [B, L]
        for row, (x, y) in enumerate(pairs):
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None and (step + 1) % 100 == 0:
            log(f"[warm start] step {step + 1}/{cfg.steps} loss {sum(losses[-100:]) / 100:.4f} ({time.monotonic() - t0:.0f} s)")
    model.eval()
    return losses
