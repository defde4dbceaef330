"""The diagnostic end to end on the warm-started counting model: every output, and its report in chromium."""

import json

import pytest

from shear_verl.diagnose.__main__ import main

FIGURES = ("fig1a_prefix_curves", "fig1b_shift_events", "fig3_auc_bins", "fig11_span_matrix")


@pytest.mark.slow
def test_diagnose_limit_2_writes_all_outputs(counting_assets, tmp_path, kit):
    out = tmp_path / "diag"
    argv = ["--model", str(counting_assets.model_dir), "--data", str(counting_assets.val_file), "--out", str(out),
            "--quick", "--limit", "2", "--continuations", "4", "--reward-fn", "reward_fns/counting.py:compute_score",
            "--answer-marker", ""]
    assert main(argv) == 0
    result = json.loads((out / "diagnostic.json").read_text())
    assert result["problems"] == 2 and len(list((out / "problems").glob("*.json"))) == 2
    for g in result["groups"]:
        for r in g["rollouts"]:
            assert len(r["positions"]) == len(r["distance"]) == len(r["success"])
            assert all(0.0 <= s <= 1.0 for s in r["success"]) and all(d >= 0 for d in r["distance"])
    assert result["spans"] == sum(len(r["positions"]) for g in result["groups"] for r in g["rollouts"])
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 1000
    # a rerun finds every stage cached and reproduces the numbers
    mtime = (out / "problems" / "0.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "problems" / "0.json").stat().st_mtime_ns == mtime
    assert json.loads((out / "diagnostic.json").read_text())["spearman_delta"] == result["spearman_delta"]

    dom = kit.run_chromium(["--dump-dom", (out / "report.html").resolve().as_uri()], tmp_path / "profile").stdout
    page = kit.parse_html(dom)
    (body,) = page.find_all("body")
    assert body.attrs.get("data-figures") == str(len(FIGURES)), "chromium did not decode every figure"
    assert sorted(img.attrs["id"] for img in page.find_all("img")) == sorted(FIGURES)
    (reading,) = [ul for ul in page.find_all("ul") if ul.attrs.get("id") == "reading"]
    assert "Spearman of Delta distance" in reading.text()
