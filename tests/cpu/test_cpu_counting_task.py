"""The counting task the main job trains on: data, tokenizer invariant, warm start, known errors."""

import json
import random

import pandas as pd
import pytest
import torch

from reward_fns.counting import compute_score, expected_text
from shear_verl.tiny import TinyConfig, TinySpec, compose_tiny_config, counting, tiny_overrides


def test_demonstrations_err_once_at_uniform_terms_and_count_on():
    rng = random.Random(0)
    wrong_terms = []
    for _ in range(2000):
        prompt, response, wrong = counting.demonstration(rng, error_frac=0.5)
        step, start = (int(x) for x in prompt.removeprefix("Count by ").split(",")[0].split(" from "))
        terms = [int(t) for t in response.split(" ")]
        assert len(terms) == counting.N_TERMS
        assert all(b - a == step for i, (a, b) in enumerate(zip(terms, terms[1:])) if i + 1 != wrong)
        truth = {"start": start, "step": step, "n_terms": counting.N_TERMS}
        assert (compute_score(counting.DATA_SOURCE, response, truth)["score"] == 1.0) == (wrong == -1)
        if wrong >= 0:
            wrong_terms.append(wrong)
    assert 0.45 < len(wrong_terms) / 2000 < 0.55
    counts = [wrong_terms.count(i) for i in range(counting.N_TERMS)]
    assert min(counts) > 0.5 * max(counts)  # spread over every term


def test_dataset_and_overrides(counting_assets, tmp_path):
    df = pd.read_parquet(counting_assets.train_file)
    assert len(df) == TinySpec.counting().n_train and set(df["data_source"]) == {counting.DATA_SOURCE}
    truth = json.loads(df["reward_model"][0]["ground_truth"])
    assert df["prompt"][0][0]["content"] == counting.prompt_text(truth["start"], truth["step"])
    cfg = compose_tiny_config(tiny_overrides(counting_assets, tmp_path, adv="shear", config=TinyConfig.counting()))
    assert cfg.reward.custom_reward_function.path.endswith("counting.py")
    assert (cfg.algorithm.shear.span_len, cfg.algorithm.shear.stride, cfg.algorithm.shear.dump_every) == (16, 4, 1)
    assert cfg.data.max_response_length >= len(expected_text(699, 9, counting.N_TERMS)) + 1  # + EOS


def test_first_error_char_index_is_the_token_index(counting_assets):
    """The grader counts characters; on the matching prefix every character is one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(counting_assets.model_dir)
    rng = random.Random(1)
    for _ in range(50):
        start, step = counting.sample_problem(rng)
        text = expected_text(start, step, counting.N_TERMS)
        cut = rng.randrange(1, len(text))
        ids = tok.encode(text[:cut], add_special_tokens=False)
        assert len(ids) == cut and [tok.decode([i]) for i in ids] == list(text[:cut])


def test_warm_started_policy_gives_mixed_groups_with_spread_errors(counting_assets):
    """What the warm start promises step 1: success 0.2-0.6 at temperature 1, most groups mixed,
    first errors over the whole response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(counting_assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(counting_assets.model_dir, dtype=torch.float32).eval()
    rows = pd.read_parquet(counting_assets.train_file).head(8)
    torch.manual_seed(0)
    scores, errors, mixed = [], [], 0
    for prompt, rm in zip(rows["prompt"], rows["reward_model"]):
        text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids.repeat(8, 1)
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=96,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        graded = [compute_score(counting.DATA_SOURCE, r, rm["ground_truth"])
                  for r in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]
        group = [g["score"] for g in graded]
        scores += group
        errors += [g["first_error"] for g in graded if g["first_error"] >= 0]
        mixed += 0 < sum(group) < 8
    assert 0.2 <= sum(scores) / len(scores) <= 0.6, scores
    assert mixed >= 5
    assert min(errors) < 20 and max(errors) > 60, sorted(errors)  # early and late first errors


def test_bad_task_is_rejected():
    with pytest.raises(ValueError, match="TinySpec.task"):
        TinySpec(task="sorting")
    with pytest.raises(ValueError, match="TinyConfig.task"):
        TinyConfig(task="sorting")
