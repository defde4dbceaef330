"""The tiny counting task: "Count by 7 from 123, 20 terms." -- graded by ``reward_fns/counting.py``.

A task whose divergence points are known: a rollout is correct iff it lists every term, and the
grader names the token of its first error. Each term follows from the one before it, so an error
carries into every later term, as a wrong step carries through a chain of reasoning; before the
error an incorrect rollout is token for token a correct one. Terms have 3 digits (start 100-699,
step 2-9), so 20 terms are 79 tokens: SHEAR's spans of 16 tokens every 4 place ~4 spans before
and after a typical error.

The warm start (:mod:`shear_verl.tiny.warmstart`) learns from :func:`demonstrations`, a share of
which carry one error at a uniformly random term (the later terms counted on from it), so the
policy starts with mixed groups and errors spread over the response.
"""

from __future__ import annotations

import json
import random

from reward_fns.counting import expected_terms

DATA_SOURCE = "shear_tiny/counting"
N_TERMS = 20
START_RANGE = (100, 699)
STEP_RANGE = (2, 9)
CHAT_ROLES = ("system", "user", "assistant")


def prompt_text(start: int, step: int, n_terms: int = N_TERMS) -> str:
    return f"Count by {step} from {start}, {n_terms} terms."


def sample_problem(rng: random.Random) -> tuple[int, int]:
    return rng.randint(*START_RANGE), rng.randint(*STEP_RANGE)


def make_rows(n: int, seed: int, split: str, n_terms: int = N_TERMS) -> list[dict]:
    """``n`` rows in verl's RL dataset schema (prompt as chat messages, JSON ground truth)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for index in range(n):
        start, step = sample_problem(rng)
        truth = {"start": start, "step": step, "n_terms": n_terms}
        rows.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": prompt_text(start, step, n_terms)}],
                "ability": "counting",
                "reward_model": {"style": "rule", "ground_truth": json.dumps(truth)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def demonstration(rng: random.Random, error_frac: float, n_terms: int = N_TERMS) -> tuple[str, str, int]:
    """(prompt, response, index of the erroneous term or -1) of one warm-start demonstration.

    With probability ``error_frac`` one uniformly chosen term is off by 1 to step - 1 (never a
    multiple of the step, so the error cannot be mistaken for a skipped term) and the terms after
    it count on from the wrong one.
    """
    start, step = sample_problem(rng)
    terms = expected_terms(start, step, n_terms)
    wrong = -1
    if rng.random() < error_frac:
        wrong = rng.randrange(n_terms)
        shift = rng.choice([d for d in range(-(step - 1), step) if d != 0])
        terms = terms[:wrong] + [t + shift for t in terms[wrong:]]
    return prompt_text(start, step, n_terms), " ".join(str(t) for t in terms), wrong


def tokenizer_corpus(seed: int, n: int = 2000) -> list[str]:
    """Text to train the tiny tokenizer on: the task's prompts, answers and the chat roles."""
    rng = random.Random(seed)
    corpus = [f"{role}\n" for role in CHAT_ROLES] * 50
    for _ in range(n):
        prompt, response, _ = demonstration(rng, error_frac=0.0)
        corpus += [prompt, response]
    return corpus
