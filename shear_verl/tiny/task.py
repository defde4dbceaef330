"""The tiny parity task: "Name an even number." -- graded by ``reward_fns/tiny.py``.

Chosen so that a randomly initialised tiny model already solves it often enough: its tokenizer
(Qwen2's pre-tokenizer, which writes every digit as its own token) has ~160 tokens, 10 of them
digits, so a random 16-token response contains a number about 2 times in 3 and that number has
the asked parity about half the time (reward ~0.3 at step 0). GRPO groups of 4-8 rollouts then
hold both outcomes from the first step, and the reward rises as the policy learns to write a
digit of the asked parity early and to end the number there.
"""

from __future__ import annotations

import random

from reward_fns.tiny import PARITIES

DATA_SOURCE = "shear_tiny/parity"

TEMPLATES = (
    "Give an {parity} number.",
    "Name an {parity} number.",
    "Write an {parity} number.",
    "Say an {parity} number.",
    "Reply with an {parity} number.",
    "Answer with an {parity} number.",
    "Pick an {parity} number.",
    "Tell me an {parity} number.",
)

CHAT_ROLES = ("system", "user", "assistant")


def make_rows(n: int, seed: int, split: str) -> list[dict]:
    """``n`` rows in verl's RL dataset schema (prompt as chat messages, rule ground truth)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        parity = PARITIES[index % 2]  # balanced: every batch of even size asks both
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": rng.choice(TEMPLATES).format(parity=parity)}],
                "ability": "parity",
                "reward_model": {"style": "rule", "ground_truth": parity},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def tokenizer_corpus(seed: int, n: int = 2000) -> list[str]:
    """Text to train the tiny tokenizer on: the task's prompts and the chat roles."""
    rng = random.Random(seed)
    corpus = [f"{role}\n" for role in CHAT_ROLES] * 50
    corpus += [rng.choice(TEMPLATES).format(parity=rng.choice(PARITIES)) for _ in range(n)]
    return corpus
