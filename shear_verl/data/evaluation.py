"""avg@k per benchmark, for a list of checkpoints, as the paper reports it (docs/method.md, "Paper settings").

avg@k of a benchmark = mean over its problems of the fraction of k samples that are correct;
a checkpoint's score = the unweighted mean of its benchmarks' avg@k; the reported number is the
best checkpoint's score. A sample is correct when the grader's score is 1 (math: the answer is
equivalent; code: every test passes).

Generation sits behind the small `Generator` protocol: `generation.VLLMGenerator` (vLLM, GPU) in
real use, `generation.HFGenerator` (transformers) as the fallback, and any object with the same
`generate` method in tests, so the scoring and aggregation here run on CPU without a model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shear_verl.data.schema import read_rows

Messages = list[dict[str, str]]
ScoreFn = Callable[..., Any]


@dataclass(frozen=True)
class Sampling:
    """The paper evaluates at temperature 0.1, top-p 1.0."""

    temperature: float = 0.1
    top_p: float = 1.0
    max_tokens: int = 3072
    seed: int = 0


class Generator(Protocol):
    def generate(self, prompts: Sequence[Messages], n: int, sampling: Sampling) -> list[list[str]]:
        """n completions (text) for every chat prompt, in prompt order."""


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: str  # parquet written by scripts/prepare_*.py (each problem once)
    k: int
    reward_fn: str  # file with verl's custom-reward `compute_score`


@dataclass
class BenchmarkResult:
    name: str
    k: int
    avg_at_k: float
    per_problem: list[float] = field(repr=False)  # fraction of the k samples that are correct


# --- scoring --------------------------------------------------------------------------------------


def load_score_fn(path: str, name: str = "compute_score") -> ScoreFn:
    """The grader, loaded exactly as verl loads `reward.custom_reward_function`."""
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def is_correct(result: Any) -> bool:
    """verl's custom reward returns a float or a dict with "score"."""
    score = result["score"] if isinstance(result, dict) else result
    return float(score) >= 1.0


def avg_at_k(correct: Sequence[Sequence[bool]]) -> tuple[float, list[float]]:
    """(mean over problems of the per-problem fraction correct, the per-problem fractions)."""
    if not correct:
        raise ValueError("avg@k of an empty benchmark is undefined")
    per_problem = []
    for i, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"problem {i} has no samples")
        per_problem.append(sum(map(bool, samples)) / len(samples))
    return sum(per_problem) / len(per_problem), per_problem


def evaluate_benchmark(
    generator: Generator,
    spec: BenchmarkSpec,
    sampling: Sampling,
    *,
    score_fn: ScoreFn | None = None,
    score_workers: int = 8,
    samples_out: str | None = None,
) -> BenchmarkResult:
    """Generate k samples per problem, grade each with the benchmark's reward function."""
    rows = read_rows(spec.path)
    if not rows:
        raise ValueError(f"{spec.name}: {spec.path} has no rows")
    score_fn = score_fn or load_score_fn(spec.reward_fn)
    completions = generator.generate([r["prompt"] for r in rows], spec.k, sampling)
    if len(completions) != len(rows) or any(len(c) != spec.k for c in completions):
        raise RuntimeError(f"{spec.name}: the generator must return {spec.k} completions for each of {len(rows)} prompts")

    jobs = [(row, text) for row, texts in zip(rows, completions) for text in texts]

    def grade(job):
        row, text = job
        return score_fn(
            data_source=row["data_source"],
            solution_str=text,
            ground_truth=row["reward_model"]["ground_truth"],
            extra_info=row.get("extra_info"),
        )

    with ThreadPoolExecutor(max_workers=max(1, score_workers)) as pool:  # graders enforce their own time limits
        results = list(pool.map(grade, jobs))
    flags = [is_correct(r) for r in results]
    correct = [flags[i * spec.k : (i + 1) * spec.k] for i in range(len(rows))]
    value, per_problem = avg_at_k(correct)
    if samples_out:
        Path(samples_out).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_out, "w", encoding="utf-8") as f:
            for (row, text), result, ok in zip(jobs, results, flags):
                f.write(json.dumps({"benchmark": spec.name, "index": row["extra_info"]["index"], "response": text,
                                    "correct": ok, "grader": _jsonable(result)}) + "\n")
    return BenchmarkResult(spec.name, spec.k, value, per_problem)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def evaluate_checkpoint(
    generator: Generator,
    specs: Sequence[BenchmarkSpec],
    sampling: Sampling,
    *,
    score_workers: int = 8,
    samples_dir: str | None = None,
) -> dict[str, BenchmarkResult]:
    """Every benchmark with one generator; graded samples go to <samples_dir>/<benchmark>.jsonl."""
    return {
        spec.name: evaluate_benchmark(
            generator, spec, sampling, score_workers=score_workers,
            samples_out=os.path.join(samples_dir, f"{spec.name}.jsonl") if samples_dir else None,
        )
        for spec in specs
    }


# --- the summary the paper reports ----------------------------------------------------------------


def benchmark_average(scores: dict[str, float]) -> float:
    """Unweighted mean over benchmarks (the paper's "math average" / "code average")."""
    if not scores:
        raise ValueError("no benchmark scores to average")
    return sum(scores.values()) / len(scores)


def best_of(table: dict[str, dict[str, float]]) -> str:
    """The row (checkpoint / step) with the highest benchmark average (first one on ties)."""
    if not table:
        raise ValueError("no checkpoints to choose from")
    return max(table, key=lambda row: benchmark_average(table[row]))


def format_table(table: dict[str, dict[str, float]], row_title: str = "checkpoint") -> str:
    """Markdown table, scores in percent, the best row marked with '*'."""
    benches = list(dict.fromkeys(b for scores in table.values() for b in scores))
    best = best_of(table)
    lines = [
        "| " + " | ".join([row_title, *benches, "average"]) + " |",
        "|" + "---|" * (len(benches) + 2),
    ]
    for row, scores in table.items():
        cells = [f"{100 * scores[b]:.1f}" if b in scores else "-" for b in benches]
        mark = " *" if row == best else ""
        lines.append("| " + " | ".join([f"{row}{mark}", *cells, f"{100 * benchmark_average(scores):.1f}"]) + " |")
    lines.append(f"\nbest {row_title}: {best} (average {100 * benchmark_average(table[best]):.1f})")
    return "\n".join(lines)


_VAL_KEY = re.compile(r"^val-core/(?P<bench>[^/]+)/(?P<var>acc|reward)/mean@(?P<n>\d+)$")


def metrics_files(source: str | os.PathLike) -> list[Path]:
    """A metrics .jsonl file, or every *.jsonl in a run directory in name (= launch time) order."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise ValueError(f"{path}: no *.jsonl metrics files (verl's file logger, trainer.logger with 'file')")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} does not exist")
    return [path]


def validation_table(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> dict[str, dict[str, float]]:
    """{"step N": {benchmark: score}} from verl's file logger (`trainer.logger` with "file").

    Uses verl's in-training validation (`val-core/<bench>/<acc|reward>/mean@n`, largest n); with
    the val.parquet of scripts/prepare_*.py this is the paper's avg@k per benchmark. Several files
    (a run and its resumptions, see recipes/common.sh) are read in order; a step validated again
    after a resume keeps the later value. Rows are sorted by step.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    files = [f for source in sources for f in metrics_files(source)]
    by_step: dict[int, dict[str, float]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                entry = json.loads(line)
                picked: dict[str, tuple[int, int, float]] = {}
                for key, value in entry.get("data", {}).items():
                    m = _VAL_KEY.match(key)
                    if m is None or value is None or (isinstance(value, float) and math.isnan(value)):
                        continue
                    rank = (int(m["n"]), 1 if m["var"] == "acc" else 0)  # prefer acc over reward
                    if m["bench"] not in picked or rank > picked[m["bench"]][:2]:
                        picked[m["bench"]] = (*rank, float(value))
                if picked:
                    by_step[int(entry["step"])] = {b: v[2] for b, v in sorted(picked.items())}
    if not by_step:
        raise ValueError(f"{[str(f) for f in files]}: no validation metrics (val-core/...) found")
    return {f"step {step}": by_step[step] for step in sorted(by_step)}


# --- checkpoints ----------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def _has_hf_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    )


def resolve_checkpoints(paths: Sequence[str]) -> list[tuple[str, str]]:
    """[(label, model path for vLLM)] from HF model dirs, verl `global_step_N` dirs, verl checkpoint
    roots (every global_step_N inside, by step) or hub ids (passed through unchanged)."""
    out: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            if raw.count("/") == 1 and not raw.startswith((".", "/", "~")):
                out.append((raw, raw))  # a hub model id such as Qwen/Qwen2.5-Math-7B
                continue
            raise FileNotFoundError(f"checkpoint {raw!r} does not exist")
        if _has_hf_weights(path):
            out.append((path.name, str(path)))
            continue
        steps = sorted(
            ((int(m[1]), p) for p in path.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))),
        )
        if _STEP_DIR.match(path.name):
            steps = [(int(_STEP_DIR.match(path.name)[1]), path)]
        if not steps:
            raise ValueError(f"{raw}: neither a Hugging Face model directory nor a verl checkpoint directory")
        for step, step_dir in steps:
            hf_dir = step_dir / "actor" / "huggingface"
            if not _has_hf_weights(hf_dir):
                raise ValueError(
                    f"{step_dir}: no Hugging Face weights in {hf_dir}. Save them during training "
                    "(actor_rollout_ref.actor.checkpoint.save_contents with 'hf_model', as the recipes do) or "
                    f"merge the FSDP shards: python -m verl.model_merger merge --backend fsdp "
                    f"--local_dir {step_dir / 'actor'} --target_dir {hf_dir}"
                )
            out.append((f"step {step}", str(hf_dir)))
    labels = [label for label, _ in out]
    # two runs' "step 25" (or two "huggingface" dirs) must stay apart: fall back to the path
    return [(label if labels.count(label) == 1 else path, path) for label, path in out]


def results_to_json(results: dict[str, dict[str, BenchmarkResult]]) -> dict[str, Any]:
    return {ckpt: {name: asdict(r) for name, r in benches.items()} for ckpt, benches in results.items()}
