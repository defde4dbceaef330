"""Capture through verl's real Megatron engine on a tiny megatron-core GPTModel (CPU, gloo).

Two gloo processes: TP=2 with sequence parallelism, so the final-norm output is split across
the TP ranks, then TP=1 with data parallelism (see megatron_capture_worker.py `engine`). The reference is each sequence
run alone through the plain model, with no verl and no SHEAR code: its final-norm rows (the
FSDP path's convention: row P-1+t for response token t) and its logits; with TP=2 the
reference shards are joined here in the test, independently of the capture's gather.
"""

import pytest
import torch

from shear_verl.core import group_token_weights
from shear_verl.integration.capture import HIDDEN_KEY
from shear_verl.integration.settings import ShearSettings
from shear_verl.integration.worker import STATS_COLUMNS, STATS_KEY, WEIGHTS_KEY

LENGTHS = [(5, 9), (7, 3), (4, 12), (6, 6), (3, 8), (8, 2), (5, 11), (4, 7)]  # the worker's (prompt, response)


def joined_reference(results):
    """Full-sequence final-norm rows and full-vocab logits and output weight, joined across TP ranks."""
    norm = [torch.cat([r["norm_shards"][i] for r in results]) for i in range(len(LENGTHS))]  # [S, H] (SP split)
    logits = [torch.cat([r["logits_shards"][i] for r in results], -1) for i in range(len(LENGTHS))]  # [S, V]
    weight = torch.cat([r["output_weight"] for r in results])  # [V, H] (vocab split)
    return norm, logits, weight


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2_sp", "tp1_dp2"])
def test_megatron_engine_capture(world2, tp):
    engine_runs = [r["engine"][tp] for r in world2]
    if tp == 1:  # two data-parallel ranks, each its own TP group: each collects its outputs
        assert [r["collects"] for r in engine_runs] == [True, True]
        for run in engine_runs:
            check_tp_group([run])
    else:
        assert [r["collects"] for r in engine_runs] == [True, False]
        check_tp_group(engine_runs)


def check_tp_group(results):
    """results: the ranks of one TP group, TP rank 0 (the one verl collects outputs from) first."""
    src = results[0]
    norm, logits, weight = joined_reference(results)

    for dynamic in (True, False):
        raw = src[f"raw_dynamic={dynamic}"]
        assert raw["keys"] == ["log_probs", HIDDEN_KEY]
        for peer in results[1:]:  # TP peers took part in the gather but keep no copy
            assert peer[f"raw_dynamic={dynamic}"]["hidden"] is None
        for i, (p, n) in enumerate(LENGTHS):
            where = f"dynamic={dynamic} sequence {i}"
            rows = raw["hidden"][i]  # [n, H]
            # rows equal the plain model's final-norm rows P-1 .. P+n-2 (FSDP convention)
            torch.testing.assert_close(rows, norm[i][p - 1 : p + n - 1], rtol=1e-5, atol=1e-6, msg=where)
            # captured state x output-layer weight == the model's logits at those positions
            torch.testing.assert_close(rows @ weight.T, logits[i][p - 1 : p + n - 1], rtol=1e-5, atol=1e-5, msg=where)
            # and the same rows give the log-probs verl computed for old_log_probs in this pass
            tokens = src["ids"][i][p : p + n]
            from_rows = torch.log_softmax(rows @ weight.T, -1).gather(-1, tokens[:, None])[:, 0]
            verl_lp = raw["log_probs"][i][p - 1 : p + n - 1]  # what response_from_nested takes
            torch.testing.assert_close(from_rows, verl_lp, rtol=1e-5, atol=1e-5, msg=where)

    # The unflagged pass (ref / update) is verl's own: no capture, same log-probs.
    assert src["plain"]["keys"] == ["log_probs"]
    for a, b in zip(src["plain"]["log_probs"], src["raw_dynamic=True"]["log_probs"]):
        torch.testing.assert_close(a, b)

    # The weights step (shared with FSDP) on the captured rows == group_token_weights on the reference.
    settings = ShearSettings.from_json(src["settings"])
    got = src["weighted"]
    assert set(got) == {"log_probs", WEIGHTS_KEY, STATS_KEY}
    for peer in results[1:]:
        assert set(peer["weighted"]) == {"log_probs"}  # computed once per data-parallel rank
    masks = [m.bool() for m in src["response_mask"]]
    correct = [bool(i % 2) for i in range(len(LENGTHS))]  # rm_scores put i % 2 on the last token
    for g0 in range(0, len(LENGTHS), 4):
        members = range(g0, g0 + 4)
        states = [norm[i][p - 1 : p + n - 1][masks[i]] for i, (p, n) in zip(members, LENGTHS[g0 : g0 + 4])]
        expect = group_token_weights(states, [correct[i] for i in members], settings.engine)
        for i, w in zip(members, expect):
            assert got[WEIGHTS_KEY][i].shape == masks[i].shape
            torch.testing.assert_close(got[WEIGHTS_KEY][i][masks[i]], w, rtol=1e-3, atol=1e-5)
            assert torch.all(got[WEIGHTS_KEY][i][~masks[i]] == 0)
    assert got[STATS_KEY].shape == (len(LENGTHS), len(STATS_COLUMNS)) and got[STATS_KEY][:, 0].sum() > 0


def test_megatron_tp_group_splits_the_weights(world2):
    """TP=2: each TP peer computes the weights of its own groups from its own (gathered) rows and
    keeps only those rows; the collecting rank's weights are those of the single-rank path."""
    from shear_verl.integration.worker import COL, compute_batch_weights

    runs = [r["engine"][2] for r in world2]
    split = [r["split"] for r in runs]
    assert [s["peers"] for s in split] == [(0, 2, True, True), (1, 2, True, False)]
    uids, masks = split[0]["uids"], [m.bool() for m in runs[0]["response_mask"]]

    # Each peer stashed exactly its share's rows (whole groups), every group on one peer, none idle.
    owner: dict[str, int] = {}
    for rank, s in enumerate(split):
        kept = {u for u, n in zip(uids, s["stash_rows"]) if n > 0}
        assert kept, f"TP rank {rank} computed no group"
        for i, (u, n) in enumerate(zip(uids, s["stash_rows"])):
            assert n == (masks[i].shape[0] if u in kept else 0), f"TP rank {rank} row {i}"
            if u in kept:
                assert owner.setdefault(u, rank) == rank, f"group {u} stashed on two peers"
        # After the pass no rank holds captured rows or a share.
        assert HIDDEN_KEY not in s["output"] and s["share_after"] is None
    assert set(owner) == set(uids)
    assert set(split[1]["output"]) == {"log_probs"}  # weights returned once per TP group
    out = split[0]["output"]
    assert set(out) == {"log_probs", WEIGHTS_KEY, STATS_KEY}

    # Single-rank path: compute_batch_weights on every row the collecting rank captured (unsplit pass).
    src_rows = runs[0]["raw_dynamic=True"]["hidden"]
    scores = torch.tensor([float(i % 2) for i in range(len(LENGTHS))])  # the worker's rm_scores
    settings = ShearSettings.from_json(runs[0]["settings"])
    single, single_stats = compute_batch_weights(src_rows, runs[0]["response_mask"], scores, uids, settings)
    for i, (got, want) in enumerate(zip(out[WEIGHTS_KEY], single)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"row {i}")
    counters = [COL[c] for c in ("sinkhorn_solves", "candidate_pairs", "n_bar_sum")]
    torch.testing.assert_close(out[STATS_KEY][:, counters], single_stats[:, counters], rtol=0, atol=0)
    for u, rank in owner.items():  # the group's stats row names the peer that computed it
        first = uids.index(u)
        assert out[STATS_KEY][first, COL["rank"]].item() == rank
        assert out[STATS_KEY][first, COL["sinkhorn_solves"]].item() > 0
