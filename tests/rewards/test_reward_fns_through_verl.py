"""Both graders run through verl 0.9.1's own reward path: the hydra-composed trainer config,
``RewardLoopWorker`` (in process, without Ray), ``load_reward_manager`` -> ``NaiveRewardManager``,
which decodes the response tokens and calls ``compute_score`` from an executor thread.

The tokenizer is a byte-level BPE trained here in well under a second (no model hub offline);
verl only decodes with it, and byte-level decoding gives back exactly the text encoded.
"""

import json
from functools import partial
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from verl import DataProto
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

REPO = Path(__file__).resolve().parents[2]

MATH_CASES = [  # (response, ground truth, expected score)
    (r"We get $\sqrt{8} = 2\sqrt{2}$, so the answer is $\boxed{2\sqrt{2}}$.", r"\sqrt{8}", 1.0),
    (r"Half: $\boxed{0.5}$", r"\frac{1}{2}", 1.0),
    (r"The answer is $\boxed{3}$.", "4", 0.0),
    (r"I am not sure.", "4", 0.0),
    (r"$\boxed{9^{9^{9^{9}}}}$", "1", 0.0),  # timed out by reward_kwargs.timeout_s
]
ADD = json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]})
CODE_CASES = [
    ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", ADD, 1.0),
    ("```python\na, b = map(int, input().split())\nprint(a * b)\n```", ADD, 0.0),
    ("```python\nwhile True:\n    pass\n```", ADD, 0.0),
    ("```python\nimport os\nwhile True:\n    os.fork()\n```", ADD, 0.0),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    texts = [case[0] for case in MATH_CASES + CODE_CASES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts * 5, trainer)
    path = tmp_path_factory.mktemp("tokenizer")
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos).save_pretrained(path)
    return path


def _config(tokenizer_dir: Path, path: str, **reward_kwargs):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [f"actor_rollout_ref.model.path={tokenizer_dir}", f"reward.custom_reward_function.path={path}"]
    overrides += [f"+reward.custom_reward_function.reward_kwargs.{k}={v}" for k, v in reward_kwargs.items()]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def _batch(tok, cases) -> DataProto:
    """Prompts and right-padded responses with their attention mask, as verl's rollout hands them over."""
    prompt = tok("Question:")["input_ids"]
    responses = [tok(text)["input_ids"] for text, _, _ in cases]
    width = max(map(len, responses)) + 3
    resp = torch.full((len(cases), width), tok.pad_token_id)  # [B, R]
    mask = torch.zeros(len(cases), len(prompt) + width, dtype=torch.long)  # [B, P + R]
    for i, ids in enumerate(responses):
        resp[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(prompt) + len(ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt] * len(cases)), "responses": resp, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["test"] * len(cases), dtype=object),
            "reward_model": np.array([{"ground_truth": gt, "style": "rule"} for _, gt, _ in cases], dtype=object),
            "extra_info": np.array([{"index": i} for i in range(len(cases))], dtype=object),
        },
    )


def _run(tokenizer_dir: Path, path: str, cases, **reward_kwargs) -> list[dict]:
    worker = RewardLoopWorker(_config(tokenizer_dir, path, **reward_kwargs))
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(_batch(worker.input_tokenizer, cases)))
    assert [o["reward_score"] for o in outputs] == [expected for _, _, expected in cases], outputs
    return outputs


@pytest.mark.parametrize("path", ["pkg://reward_fns.math", str(REPO / "reward_fns" / "math.py")])
def test_math_grader_through_verl(tokenizer_dir, path):
    outputs = _run(tokenizer_dir, path, MATH_CASES, timeout_s=1.0)
    infos = [o["reward_extra_info"] for o in outputs]
    assert all(set(info) == {"score", "acc", "pred", "reason"} for info in infos)  # same keys: stackable
    assert infos[0]["pred"] == "2*sqrt(2)"
    assert infos[4]["reason"].startswith("timed out after 1.0 s")


@pytest.mark.parametrize("path", ["pkg://reward_fns.code", str(REPO / "reward_fns" / "code.py")])
def test_code_grader_through_verl(tokenizer_dir, path):
    outputs = _run(tokenizer_dir, path, CODE_CASES, timeout_s=1.0, max_processes=4)
    infos = [o["reward_extra_info"] for o in outputs]
    assert len({frozenset(info) for info in infos}) == 1  # same keys: stackable
    assert [json.loads(info["outcomes"])[0] for info in infos] == ["passed", "wrong_answer", "timeout", "runtime_error"]
    assert infos[0]["pass_fraction"] == 1.0 and infos[1]["pass_fraction"] == 0.0



def test_code_batch_function_through_verls_batch_reward_manager(tokenizer_dir):
    """``compute_score_batch`` has the keyword signature verl's ``BatchRewardManager`` calls."""
    from transformers import AutoTokenizer
    from verl.workers.reward_manager import BatchRewardManager

    from reward_fns.code import compute_score_batch

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = _batch(tokenizer, CODE_CASES)
    manager = BatchRewardManager(tokenizer, 0, partial(compute_score_batch, timeout_s=1.0, max_processes=4))
    out = manager(data, return_dict=True)
    rewards = out["reward_tensor"].sum(dim=-1)  # [B]: the score sits on the last response token
    assert rewards.tolist() == [expected for _, _, expected in CODE_CASES]
    assert out["reward_extra_info"]["pass_fraction"] == [1.0, 0.0, 0.0, 0.0]
