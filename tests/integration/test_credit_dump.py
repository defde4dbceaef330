"""Per-token credit dumps: the pure pieces, then verl's stock CLI writing them on the counting task."""

import json
import math

import pytest
import torch

from reward_fns.counting import compute_score
from shear_verl.integration.dump import credit_records, dump_path, select_groups, write_records
from shear_verl.integration.settings import settings_from_algorithm


def test_select_groups_prefers_mixed_groups_in_batch_order():
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    correct = [1, 1, 0, 1, 0, 0, 1, 0]
    assert select_groups(uids, correct, 0) == ["b", "d", "a", "c"]
    assert select_groups(uids, correct, 1) == ["b"]
    assert select_groups(uids, correct, 3) == ["b", "d", "a"]


def test_dump_settings_are_validated():
    s = settings_from_algorithm({"shear": {"dump_every": 2, "dump_groups": 0, "dump_dir": "/tmp/x"}})
    assert (s.dump_every, s.dump_groups, s.dump_dir) == (2, 0, "/tmp/x")
    assert s == type(s).from_json(s.to_json())
    for bad in ({"dump_every": -1}, {"dump_groups": 1.5}, {"dump_every": True}, {"dump_dir": 3}):
        with pytest.raises(ValueError, match="algorithm.shear.dump_"):
            settings_from_algorithm({"shear": bad})


def test_records_cut_rows_to_their_length_and_round_trip(tmp_path):
    weights = torch.tensor([[0.5, 0.25, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]])  # padded [B, T]
    grpo = torch.tensor([[1.0, 1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    recs = credit_records(
        step=3, estimator="shear", uids=["u", "u"], rows=[1],
        response_ids=[torch.tensor([5, 6]), torch.tensor([7, 8, 9])],
        response_mask=[torch.tensor([1, 1]), torch.tensor([1, 0, 1])],
        scores=torch.tensor([1.0, 0.0]), correct=torch.tensor([True, False]), weights=weights,
        grpo_advantages=grpo, advantages=[torch.tensor([0.5, 0.25]), torch.tensor([-1.0, 0.0, -3.0])],
        extra_info=[{}, {"first_error": 1, "acc": float("nan")}], decode=lambda ids: f"<{ids[0]}>",
    )
    (rec,) = recs
    assert rec["tokens"] == ["<7>", "<8>", "<9>"] and rec["weights"] == [1.0, 2.0, 3.0]
    assert rec["grpo_advantage"] == [-1.0, -1.0, -1.0] and rec["reward_extra_info"] == {"first_error": 1, "acc": None}
    path = write_records(recs, dump_path(tmp_path, 3))
    assert path.name == "credit_step3.jsonl" and json.loads(path.read_text()) == rec


@pytest.mark.e2e
@pytest.mark.slow
def test_stock_cli_writes_credit_dumps_next_to_verls_rollout_dump(main_job_runs, tmp_path):
    from shear_verl.view import read_dump, write_credit_page

    workdir, rollout_dir, first, resumed = main_job_runs  # dump_groups=0; resumed at step 3 (tests/conftest.py)
    metrics = first + resumed
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert sorted(p.name for p in rollout_dir.glob("*.jsonl")) == ["1.jsonl", "2.jsonl", "3.jsonl"]  # verl's own dump
    for step in (1, 2, 3):
        path = workdir / "credit" / f"credit_step{step}.jsonl"
        rollouts = read_dump(path)  # the view's reader checks the schema line by line
        assert len(rollouts) == 16 == metrics[step - 1]["shear/dump_rollouts"]  # dump_groups=0: all
        assert {r.step for r in rollouts} == {step} and {r.estimator for r in rollouts} == {"shear"}
        groups = {}
        for r in rollouts:
            groups.setdefault(r.uid, []).append(r)
            n = len(r.tokens)
            assert n == len(r.response_ids) == len(r.weights) == len(r.advantage) == len(r.grpo_advantage)
            for w, g, a, m in zip(r.weights, r.grpo_advantage, r.advantage, r.response_mask):
                assert a == pytest.approx(g * w, abs=1e-5) if m else a == 0.0
            assert r.correct == (r.score > 0.5) and r.first_error is not None
            assert (r.first_error == -1) == r.correct
        assert len(groups) == 4 and all(len(g) == 4 for g in groups.values())
        for group in groups.values():  # verl's GRPO advantage, recomputed from the scores
            scores = torch.tensor([r.score for r in group])
            for r, expect in zip(group, (scores - scores.mean()) / (scores.std() + 1e-6)):
                assert all(math.isclose(g, float(expect), abs_tol=1e-5) for g in r.grpo_advantage)
    # the dumped first errors are those the grader gives the text verl logged for the same rollouts
    verl_rows = [json.loads(line) for line in (rollout_dir / "3.jsonl").read_text().splitlines()]
    wrong = [r for r in rollouts if not r.correct]
    for r in wrong:
        text = "".join(t for t in r.tokens if t != "<|im_end|>")
        assert any(compute_score("shear_tiny/counting", text, row["gts"])["first_error"] == r.first_error
                   for row in verl_rows if row["output"] == text)
    page = write_credit_page([path], tmp_path / "credit.html")
    html = page.read_text()
    assert all(r.uid in html for r in rollouts)
