"""Hidden-Align's loss (shear_verl.baselines.hidden_align, a reading of the abstract) against plain
loops written here from the module's equation, on random groups with mixed correctness and
unused anchors; its anchor search; its start-up refusals (through verl's own validate_config,
which the plugin wraps)."""

import math

import pytest
import torch

from shear_verl.baselines.hidden_align import (
    HiddenAlignSettings,
    alignment_loss,
    anchor_states,
    check_config,
    find_anchors,
    parse_settings,
)


def cos(x, y):
    dot = sum(a * b for a, b in zip(x, y))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))


def reference(states, uids, correct, valid, loss, target):
    d = (lambda x, y: 1 - cos(x, y)) if loss == "cosine" else \
        (lambda x, y: sum((a - b) ** 2 for a, b in zip(x, y)) / len(x))
    total, groups = 0.0, 0
    for u in sorted(set(uids)):
        members = [states[i] for i in range(len(uids)) if uids[i] == u and correct[i] and valid[i]]
        if len(members) < 2:
            continue
        groups += 1
        if target == "pairwise":
            terms = [d(members[a], members[b]) for a in range(len(members)) for b in range(a + 1, len(members))]
        else:
            c = [sum(col) / len(members) for col in zip(*members)]
            terms = [d(m, c) for m in members]
        total += sum(terms) / len(terms)
    return total, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss", ["cosine", "mse"])
@pytest.mark.parametrize("target", ["pairwise", "centroid"])
def test_alignment_loss_matches_the_equation(seed, loss, target):
    g = torch.Generator().manual_seed(seed)
    B, H = 20, 6
    uids = [f"g{i // 5}" for i in range(B)]
    states = torch.randn(B, H, generator=g) + 0.5
    correct = torch.rand(B, generator=g) > 0.4
    correct[10:15] = False
    correct[10] = True  # a group with one correct rollout
    valid = torch.rand(B, generator=g) > 0.2
    valid[10] = True
    got, groups, terms = alignment_loss(states.clone().requires_grad_(), uids, correct, valid, loss, target)
    want, want_groups = reference(states.tolist(), uids, correct.tolist(), valid.tolist(), loss, target)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert groups == want_groups and terms > 0


def test_loss_is_zero_with_fewer_than_two_correct_per_group_and_keeps_the_graph():
    states = torch.randn(8, 4, requires_grad=True)
    uids = [f"g{i // 4}" for i in range(8)]
    correct = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    total, groups, terms = alignment_loss(states, uids, correct, torch.ones(8, dtype=torch.bool))
    assert float(total) == 0.0 and groups == 0 and terms == 0
    total.backward()
    assert torch.all(states.grad == 0)
    # two correct, but one anchor unused (no marker, fallback=skip): still no pair
    correct[1] = True
    valid = torch.ones(8, dtype=torch.bool)
    valid[1] = False
    assert alignment_loss(states, uids, correct, valid)[1] == 0


def test_anchor_is_the_token_before_the_last_marker_else_the_fallback():
    resp = [torch.tensor([5, 7, 8, 3, 7, 8, 2]), torch.tensor([7, 8, 1]), torch.tensor([1, 2, 3, 0]),
            torch.tensor([1, 2])]
    masks = [torch.ones(7), torch.ones(3), torch.tensor([1, 1, 0, 0]), torch.ones(2)]
    anchors, valid, found = find_anchors(resp, masks, (7, 8), "last")
    assert anchors.tolist()[:3] == [3, -1, 1]  # last occurrence; at the start: the last prompt token
    assert valid.tolist() == [True, True, True, True] and found.tolist() == [True, True, False, False]
    _, valid, _ = find_anchors(resp, masks, (7, 8), "skip")
    assert valid.tolist() == [True, True, False, False]
    anchors, _, found = find_anchors(resp, masks, (), "last")  # no marker: always the last response token
    assert anchors.tolist() == [6, 2, 1, 1] and not found.any()


def test_anchor_states_index_the_packed_rows():
    packed = torch.arange(30.0).reshape(15, 2)  # sequences of 6 and 9 rows
    cu = torch.tensor([0, 6, 15])
    out = anchor_states(packed, cu, torch.tensor([4, 5]), torch.tensor([-1, 2]))
    assert out.tolist() == [packed[1].tolist(), packed[12].tolist()]  # 6-4-1 = 1; 15-5+2 = 12


def stock(overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.strategy=fsdp",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2", *overrides])


def verl_validate(cfg):
    import verl  # noqa: F401 - the plugin installs shear-verl's patches on import
    from verl.utils.config import validate_config

    validate_config(cfg, use_reference_policy=False, use_critic=False)


def test_verls_validation_accepts_the_section_and_leaves_it_in_place():
    cfg = stock(["+actor_rollout_ref.actor.hidden_align.coef=0.1", "+actor_rollout_ref.actor.hidden_align.loss=mse"])
    verl_validate(cfg)  # verl's ActorConfig alone would refuse the unknown key
    assert parse_settings(cfg.actor_rollout_ref.actor.hidden_align) == HiddenAlignSettings(coef=0.1, loss="mse")
    assert check_config(stock([])) is None  # off by default


@pytest.mark.parametrize("overrides, message", [
    (["+actor_rollout_ref.actor.hidden_align.coef=-1"], "actor_rollout_ref.actor.hidden_align.coef must be >= 0"),
    (["+actor_rollout_ref.actor.hidden_align.coef=0.1", "+actor_rollout_ref.actor.hidden_align.loss=l1"],
     "actor_rollout_ref.actor.hidden_align.loss must be one of cosine, mse"),
    (["+actor_rollout_ref.actor.hidden_align.weight=0.1"], "unknown key.*actor_rollout_ref.actor.hidden_align.weight"),
    (["+actor_rollout_ref.actor.hidden_align.coef=0.1", "actor_rollout_ref.actor.strategy=megatron"],
     "actor_rollout_ref.actor.strategy=megatron is not supported"),
    (["+actor_rollout_ref.actor.hidden_align.coef=0.1", "actor_rollout_ref.rollout.n=1"], "rollout.n=1"),
])
def test_bad_configuration_stops_at_start_up_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        verl_validate(stock(overrides))
