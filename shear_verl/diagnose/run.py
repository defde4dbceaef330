"""The diagnostic over a data set, one problem (one group of G rollouts) at a time, cached in DIR."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from shear_verl.core import ShearConfig
from shear_verl.diagnose.distances import mean_norm, pairwise_span_matrix, prefix_span_distances
from shear_verl.diagnose.generation import HFGenerator, VLLMGenerator, response_states, use_vllm
from shear_verl.diagnose.stats import binned_auc, continuation_success, prefix_positions, shift_events, spearman

DEFAULT_REWARD = "reward_fns.math:compute_score"


@dataclasses.dataclass
class Settings:
    """Defaults are the paper's where it gives them (G=8, k=16, w=100, s=25, temperature 1.0, 3k-token
    rollouts, eps 0.05 relative); prefix_start / prefix_stride are this project's (the paper names a
    sliding window but we found no values): the first full span, then every 2 s tokens. ``QUICK``
    scales them to the tiny task's ~80-token responses (``--quick``)."""

    model: str
    data: str
    out: str
    rollouts: int = 8  # G
    continuations: int = 16  # k
    span_len: int = 100  # w
    span_stride: int = 25  # s: spans of the opposing rollouts
    prefix_start: int = 100  # ours: the first full span
    prefix_stride: int = 50  # ours: 2 s
    temperature: float = 1.0
    max_new_tokens: int = 3072
    limit: int | None = None
    reward_fn: str = DEFAULT_REWARD
    correct_threshold: float = 0.5
    answer_marker: str | None = "\\boxed"
    epsilon: float = 0.05
    tol: float = 1e-4  # the tiny job's Sinkhorn tolerance; the engine's default is 1e-6
    max_iter: int = 2000
    bins: int = 5
    seed: int = 0
    gpu_memory_utilization: float = 0.5
    matrix_spans: int = 64

    def __post_init__(self) -> None:
        for name in ("rollouts", "continuations", "span_len", "span_stride", "prefix_start", "prefix_stride",
                     "max_new_tokens", "bins", "matrix_spans", "max_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rollouts < 2:
            raise ValueError(f"--rollouts must be >= 2 (a group needs both outcomes), got {self.rollouts}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


# --quick: the tiny counting task (~80-token responses, CPU): the tiny job's spans (w=16, s=4), the
# same prefix rule (start w, stride 2 s), 8 problems, the paper's G, k and temperature.
QUICK = dict(span_len=16, span_stride=4, prefix_start=16, prefix_stride=8, max_new_tokens=96, limit=8,
             matrix_spans=48)


def load_reward(spec: str) -> Callable:
    """'module:name' or 'path/to/file.py:name' -> a verl-signature grader."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"--reward-fn {spec!r}: expected PATH:NAME or MODULE:NAME")
    if path.endswith(".py"):
        if not Path(path).is_file():
            raise ValueError(f"--reward-fn: no file {path}")
        spec_ = importlib.util.spec_from_file_location(f"_diagnose_reward_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(path)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn: {path} has no function {name!r}")
    return fn


def answer_start(tokenizer, ids: list[int], marker: str | None) -> int | None:
    """First token of the final answer: the token where the last ``marker`` begins (None if absent)."""
    if not marker:
        return None
    text = tokenizer.decode(ids, skip_special_tokens=True)
    at = text.rfind(marker)
    if at < 0:
        return None
    lo, hi = 0, len(ids)  # smallest k whose decoded prefix reaches past the marker's first character
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) > at:
            hi = mid
        else:
            lo = mid + 1
    return max(lo - 1, 0)


def continuation_successes(sample: Callable, grade: Callable, prompt_ids: list[int], response_ids: list[int],
                           positions: Sequence[int], k: int, max_new_tokens: int,
                           seed: Callable[[int], None] | None = None) -> list[float]:
    """Continuation success of each prefix response_ids[:p]: the share of k sampled completions
    (``sample(prompt_ids + prefix, k, budget)``, budget = max_new_tokens - p) that ``grade`` (the
    full response ids -> bool) finds correct. ``seed(p)``, if given, is called before each prefix."""
    out = []
    for p in positions:
        if seed is not None:
            seed(p)
        prefix = list(response_ids[:p])
        conts = sample(list(prompt_ids) + prefix, k, max_new_tokens - p)
        out.append(continuation_success([grade(prefix + list(c)) for c in conts]))
    return out


class Diagnostic:
    def __init__(self, s: Settings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.s = s
        self.out = Path(s.out)
        (self.out / "problems").mkdir(parents=True, exist_ok=True)
        self.cfg = ShearConfig(span_len=s.span_len, stride=s.span_stride, epsilon=s.epsilon, tol=s.tol,
                               max_iter=s.max_iter)
        self.grade_fn = load_reward(s.reward_fn)
        self.tok = AutoTokenizer.from_pretrained(s.model)
        accel = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accel if accel is not None else torch.device("cpu")
        dtype = torch.float32 if accel is None else torch.bfloat16  # host matmuls in bf16 are slow
        self.model = AutoModelForCausalLM.from_pretrained(s.model, dtype=dtype).to(device).eval()
        self.gen = (VLLMGenerator(s.model, s.max_new_tokens, s.temperature, s.gpu_memory_utilization) if use_vllm()
                    else HFGenerator(self.model, self.tok, s.max_new_tokens, s.temperature))

    def grade(self, row, ids: list[int]) -> bool:
        text = self.tok.decode(ids, skip_special_tokens=True)
        r = self.grade_fn(row["data_source"], text, row["reward_model"]["ground_truth"], row.get("extra_info"))
        score = r["score"] if isinstance(r, dict) else r
        return float(score) > self.s.correct_threshold

    def prompt_ids(self, row) -> list[int]:
        messages = [dict(m) for m in row["prompt"]]
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def problem(self, idx: int, row) -> dict:
        """Stages cached in problems/<idx>.json: rollouts, then distances (+ the span matrix), then
        continuations rollout by rollout; a rerun picks up after the last saved stage."""
        path = self.out / "problems" / f"{idx}.json"
        rec = json.loads(path.read_text()) if path.exists() else {"index": idx}

        def save() -> None:  # write then rename: an interrupted save leaves the last good record
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec))
            tmp.replace(path)

        prompt = self.prompt_ids(row)
        if "rollouts" not in rec:
            torch.manual_seed(self.s.seed * 100003 + idx)
            ids = self.gen.sample(prompt, self.s.rollouts)
            rec["rollouts"] = [{"ids": r, "correct": self.grade(row, r)} for r in ids]
            save()
        flags = [r["correct"] for r in rec["rollouts"]]
        rec["mixed"] = any(flags) and not all(flags)
        if not rec["mixed"]:
            save()
            return rec
        if "distances" not in rec:
            states = [response_states(self.model, prompt, r["ids"]) for r in rec["rollouts"]]  # G x [T_i, d]
            n_bar = mean_norm(states)
            rec["n_bar"] = n_bar
            for i, r in enumerate(rec["rollouts"]):
                a = answer_start(self.tok, r["ids"], self.s.answer_marker)
                r["answer_start"] = a
                r["positions"] = prefix_positions(len(r["ids"]), self.s.span_len, self.s.prefix_start,
                                                  self.s.prefix_stride, a)
                opposing = [states[j] for j in range(len(states)) if flags[j] != flags[i] and states[j].shape[0]]
                r["distance"] = prefix_span_distances(states[i], r["positions"], opposing, self.cfg, n_bar)
            rec["matrix"] = self.group_matrix(states, flags, n_bar)
            rec["distances"] = True
            save()
            del states
        for i, r in enumerate(rec["rollouts"]):
            if "success" in r:
                continue
            base = self.s.seed * 7919 + idx * 1009 + i * 101
            r["success"] = continuation_successes(
                self.gen.sample, lambda ids: self.grade(row, ids), prompt, r["ids"], r["positions"],
                self.s.continuations, self.s.max_new_tokens, seed=lambda p: torch.manual_seed(base + p))
            save()
        return rec

    def group_matrix(self, states, flags, n_bar) -> dict | None:
        """Full spans (stride s) of every rollout of the group, correct rollouts first, at most
        matrix_spans of them evenly picked, and their pairwise distances."""
        spans, labels = [], []
        w = self.s.span_len
        for i in sorted(range(len(states)), key=lambda i: not flags[i]):
            for st in range(0, states[i].shape[0] - w + 1, self.s.span_stride):
                spans.append(states[i][st:st + w])
                labels.append({"rollout": i, "start": st, "correct": flags[i]})
        if len(spans) < 2:
            return None
        keep = np.linspace(0, len(spans) - 1, min(len(spans), self.s.matrix_spans)).round().astype(int).tolist()
        m = pairwise_span_matrix([spans[k] for k in keep], self.cfg, n_bar)
        return {"spans": [labels[k] for k in keep], "distance": m.cpu().tolist()}

    def run(self) -> dict:
        df = pd.read_parquet(self.s.data)
        rows = df.to_dict("records")[: self.s.limit] if self.s.limit else df.to_dict("records")
        records = [self.problem(i, row) for i, row in enumerate(tqdm(rows, desc="problems", unit="problem"))]
        return summarize(records, self.s)


def summarize(records: list[dict], s: Settings) -> dict:
    """Every number of the diagnostic, from the per-problem records."""
    min_shift = 1.0 / s.continuations
    events, spans = [], []
    for rec in records:
        if not rec.get("mixed"):
            continue
        for i, r in enumerate(rec["rollouts"]):
            for e in shift_events(r["positions"], r["success"], r["distance"], min_shift):
                events.append({**e, "problem": rec["index"], "rollout": i, "correct": r["correct"]})
            for p, d, sc in zip(r["positions"], r["distance"], r["success"]):
                spans.append({"problem": rec["index"], "rollout": i, "position": p, "distance": d,
                              "success": sc, "correct": r["correct"]})
    rho = spearman([e["delta_distance"] for e in events], [e["delta_success"] for e in events])
    by_side = {side: spearman([e["delta_distance"] for e in events if e["correct"] == flag],
                              [e["delta_success"] for e in events if e["correct"] == flag])
               for side, flag in (("correct", True), ("incorrect", False))}
    bins = binned_auc([x["distance"] for x in spans], [x["success"] for x in spans],
                      [x["correct"] for x in spans], s.bins) if spans else []
    aucs = [b["auc"] for b in bins if b["auc"] is not None]
    return {
        "settings": dataclasses.asdict(s),
        "problems": len(records),
        "mixed_groups": sum(bool(r.get("mixed")) for r in records),
        "rollout_accuracy": float(np.mean([x["correct"] for r in records for x in r["rollouts"]])) if records else math.nan,
        "spans": len(spans),
        "shift_events": events,
        "spearman_delta": rho,
        "spearman_delta_by_side": by_side,
        "spans_detail": spans,
        "auc_bins": bins,
        "auc_rising": bool(len(aucs) >= 2 and aucs[-1] > aucs[0]),
        "auc_spearman_with_bin": spearman(list(range(len(aucs))), aucs) if len(aucs) >= 3 else None,
        "groups": [{"index": r["index"], "n_bar": r.get("n_bar"), "matrix": r.get("matrix"),
                    "rollouts": [{k: x[k] for k in ("correct", "positions", "distance", "success", "answer_start") if k in x}
                                 | {"length": len(x["ids"])} for x in r["rollouts"]]}
                   for r in records if r.get("mixed")],
    }
