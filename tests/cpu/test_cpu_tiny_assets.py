"""The tiny run's pieces: offline assets, the parity task and its reward, overrides, reporting."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from reward_fns.tiny import compute_score, first_number
from shear_verl.tiny import TinyConfig, TinySpec, build_assets, compose_tiny_config, tiny_overrides
from shear_verl.tiny import task
from shear_verl.tiny.report import plot_reward, summarize, trailing_mean
from shear_verl.tiny.run import load_metrics


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("tiny_assets"))


def test_assets_are_cached_by_spec(assets):
    again = build_assets(assets.model_dir.parent.parent)
    assert again == assets
    assert json.loads((assets.model_dir.parent / "spec.json").read_text())["hidden_size"] == TinySpec().hidden_size


def test_tokenizer_round_trips_and_applies_chat_template(assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    for text in ("Name an even number.", "12 + 7 = 19", "user\n"):
        assert tok.decode(tok.encode(text)) == text
    # Every digit is its own token (Qwen2's pre-tokenizer), so the task's answers are 1-token digits.
    assert all(len(tok.encode(d)) == 1 for d in "0123456789")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say an odd number."}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nSay an odd number.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_model_loads_with_vllm_cpu_head_dim_and_tokenizer_vocab(assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # vLLM-CPU's attention needs head_dim >= 64
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.encode("Name an even number.")])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_dataset_is_verls_rl_schema_and_balanced(assets):
    df = pd.read_parquet(assets.train_file)
    assert len(df) == TinySpec().n_train
    assert set(df.columns) >= {"data_source", "prompt", "reward_model", "extra_info"}
    truths = [rm["ground_truth"] for rm in df["reward_model"]]
    assert truths.count("even") == truths.count("odd")
    for prompt, truth in zip(df["prompt"][:20], truths[:20]):
        assert prompt[0]["role"] == "user" and truth in prompt[0]["content"]


@pytest.mark.parametrize(
    "response, truth, score",
    [
        ("42", "even", 1.0),
        ("42", "odd", 0.0),
        ("it is 17, or 4", "odd", 1.0),  # the first number counts
        ("x3y8", "odd", 1.0),
        ("no digits here", "even", 0.0),
        ("", "odd", 0.0),
        ("٤", "even", 0.0),  # Arabic-Indic digit: not an ASCII number
        ("0", "even", 1.0),
    ],
)
def test_reward_is_binary_parity_of_first_number(response, truth, score):
    assert compute_score("shear_tiny/parity", response, truth) == score


def test_reward_rejects_unknown_ground_truth():
    with pytest.raises(ValueError, match="ground_truth"):
        compute_score("shear_tiny/parity", "4", "prime")


def test_untrained_model_gives_mixed_groups(assets):
    """What the task promises the first GRPO step: the random-init model, sampled like the rollout
    (temperature 1, 16 tokens), solves some prompts some of the time, so most groups are mixed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    rows = pd.read_parquet(assets.train_file).head(8)
    torch.manual_seed(0)
    groups = []
    for prompt, rm in zip(rows["prompt"], rows["reward_model"]):
        text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids.repeat(8, 1)  # one GRPO group of 8
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=16)
        responses = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        groups.append([compute_score(task.DATA_SOURCE, r, rm["ground_truth"]) for r in responses])
    mean = sum(map(sum, groups)) / 64
    assert 0.1 < mean < 0.7, groups
    assert sum(0 < sum(g) < 8 for g in groups) >= 5, groups
    assert first_number("ab 007 c") == "007"


def test_overrides_compose_into_verls_config(assets, tmp_path):
    cfg = compose_tiny_config(tiny_overrides(assets, tmp_path, adv="grpo", config=TinyConfig(steps=2, group_size=4)))
    assert cfg.trainer.device == "cpu" and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.rollout.n == 4 and cfg.trainer.total_training_steps == 2
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.model.path == str(assets.model_dir)
    assert Path(cfg.reward.custom_reward_function.path).name == "tiny.py"


def test_shear_overrides_carry_span_knobs(assets, tmp_path):
    ov = tiny_overrides(assets, tmp_path, adv="shear", config=TinyConfig(shear_span_len=8, shear_stride=4))
    assert "algorithm.adv_estimator=shear" in ov
    assert {"+algorithm.shear.span_len=8", "+algorithm.shear.stride=4"} <= set(ov)
    cfg = compose_tiny_config(ov)  # verl's stock config has no algorithm.shear node: "+" adds it
    assert (cfg.algorithm.shear.span_len, cfg.algorithm.shear.stride) == (8, 4)


@pytest.mark.parametrize("kwargs", [{"group_size": 1}, {"steps": 0}, {"max_response_length": 0}])
def test_bad_tiny_config_is_rejected(kwargs):
    with pytest.raises(ValueError, match="TinyConfig"):
        TinyConfig(**kwargs)


def test_bad_adv_is_rejected(assets, tmp_path):
    with pytest.raises(ValueError, match="adv must be one of"):
        tiny_overrides(assets, tmp_path, adv="ppo")


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="head_dim|hidden_size / num_heads"):
        TinySpec(hidden_size=64, num_heads=2)


def _write_run(workdir: Path, k: int, rewards: dict[int, float]) -> None:
    with open(workdir / f"metrics-{k}.jsonl", "w") as f:
        for step, r in rewards.items():
            f.write(json.dumps({"step": step, "data": {"critic/score/mean": r, "actor/grad_norm": 0.5}}) + "\n")
    (workdir / f"wall-{k}.txt").write_text("10.0\n")


def test_resumed_run_metrics_merge_and_summarize(tmp_path):
    _write_run(tmp_path, 0, {1: 0.25, 2: 0.5, 3: 0.0})
    _write_run(tmp_path, 1, {3: 0.5, 4: 0.75})  # resumed from the step-2 checkpoint
    metrics, wall = load_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and metrics[2]["critic/score/mean"] == 0.5
    assert wall == 20.0
    s = summarize(metrics, wall_s=wall, window=2)
    assert (s["reward_first"], s["reward_last"], s["steps"]) == (0.25, 0.75, 4)
    assert s["reward_first2_mean"] == 0.375 and s["reward_last2_mean"] == 0.625 and s["grad_norm"] == 0.5
    png = plot_reward({"grpo": metrics}, tmp_path / "reward.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    both = plot_reward({"shear": metrics}, tmp_path / "both.png", divergence={"shear": {"1": 0.9, "4": 0.95}})
    assert Image.open(both).size[1] > Image.open(png).size[1]  # the divergence_auc panel below the reward


def test_summarize_needs_reward():
    with pytest.raises(ValueError, match="critic/score/mean"):
        summarize([{"step": 1, "actor/grad_norm": 1.0}])


def test_trailing_mean():
    assert trailing_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
