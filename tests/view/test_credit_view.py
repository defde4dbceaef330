"""The credit view: the dump reader's checks, the page's structure token by token (on a parsed
tree, against the dump's own numbers), the CLI, and the page as headless Chromium renders it."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from shear_verl.view import DumpError, read_dump, render_page, rollout_stats, write_credit_page
from shear_verl.view.__main__ import main as view_main
from shear_verl.view.page import LEVELS


def _rollout_nodes(root):
    return root.find_all("details", "ro")


def _token_spans(ro):
    (tx,) = ro.find_all("div", "tx")
    return [c for c in tx.children if getattr(c, "tag", None) == "span"]


def test_reader_round_trips_every_row(kit, dump):
    rows = kit.synthetic_rows()
    rollouts = read_dump(dump)
    assert len(rollouts) == len(rows)
    for r, row in zip(rollouts, rows):
        assert r.tokens == row["tokens"] and r.weights == row["weights"] and r.advantage == row["advantage"]
        assert r.first_error == row["reward_extra_info"].get("first_error")
    assert [r.line for r in rollouts] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda row: row.pop("weights"), r"missing field\(s\) 'weights'"),
        (lambda row: row["tokens"].pop(), r"one length .*tokens=\d+"),
        (lambda row: row.update(correct=1), r"field 'correct' must be a bool"),
        (lambda row: row["weights"].__setitem__(3, "x"), r"field 'weights'\[3\] must be finite numbers"),
        (lambda row: row["response_mask"].__setitem__(0, 2), r"'response_mask'\[0\] must be 0 or 1"),
        (lambda row: row["reward_extra_info"].update(first_error=-2), r"first_error' must be an int >= -1"),
    ],
)
def test_reader_names_file_line_and_field_of_a_bad_row(kit, tmp_path, edit, message):
    rows = kit.synthetic_rows()
    edit(rows[2])
    path = kit.write_dump(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DumpError, match=rf"bad\.jsonl:3: .*{message}"):
        read_dump(path)


def test_reader_rejects_broken_json_and_empty_dumps(kit, tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(kit.synthetic_rows()[0]) + "\n" + '{"step": 1, "uid"\n')
    with pytest.raises(DumpError, match=r"cut\.jsonl:2: not valid JSON"):
        read_dump(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DumpError, match="no rollouts"):
        read_dump(tmp_path / "empty.jsonl")


def test_every_token_is_shown_once_shaded_by_weight_and_coloured_by_advantage_sign(kit, dump):
    rollouts = read_dump(dump)
    root = kit.parse_html(render_page(rollouts))
    nodes = _rollout_nodes(root)
    assert len(nodes) == len(rollouts)
    mixed = {(r.step, r.uid) for r in rollouts} - {
        (r.step, r.uid) for r in rollouts
        if all(x.correct == r.correct for x in rollouts if (x.step, x.uid) == (r.step, r.uid))}
    assert mixed == {(2, "q-17"), (4, "q-17")}
    # the scale: mixed groups only (the all-correct group's weights may pass it and clip at full shade)
    dump_max = max(w for r in rollouts if (r.step, r.uid) in mixed for w, m in zip(r.weights, r.response_mask) if m)
    for node, r in zip(nodes, rollouts):  # steps ascending, groups and rollouts in dump order
        spans = _token_spans(node)
        assert [kit.token_text(s) for s in spans] == r.tokens
        for i, (s, w, a, m) in enumerate(zip(spans, r.weights, r.advantage, r.response_mask)):
            cls = [c for c in s.classes if c != "e"]
            if not m:
                assert cls == ["m"], (r.line, i)
                continue
            sign = "p" if a > 0 else "n" if a < 0 else "z"
            assert cls == [f"{sign}{min(LEVELS, round(LEVELS * w / dump_max))}"], (r.line, i, w, a)
            assert f"w={w:.4g}" in s.attrs["title"] and s.attrs["title"].startswith(f"#{i} ")


def test_first_error_marker_sits_before_its_token_or_past_the_end(kit, dump):
    rollouts = read_dump(dump)
    nodes = _rollout_nodes(kit.parse_html(render_page(rollouts)))
    seen = set()
    for node, r in zip(nodes, rollouts):
        (tx,) = node.find_all("div", "tx")
        items = [c for c in tx.children if getattr(c, "tag", None) in ("span", "b")]
        markers = [k for k, c in enumerate(items) if c.tag == "b"]
        flagged = [k for k, c in enumerate(_token_spans(node)) if "e" in c.classes]
        fe = r.first_error
        if fe is None or fe < 0:
            assert markers == [] and flagged == [] and "first error" not in node.find_all("summary")[0].text()
            seen.add("none")
        elif fe < r.length:
            assert flagged == [fe] and markers == [fe]  # the marker is item fe; token fe follows it
            assert f"first error at token {fe}" in node.find_all("summary")[0].text()
            seen.add("inside")
        else:
            assert flagged == [] and markers == [len(items) - 1] and "past the end" in items[-1].text()
            seen.add("past")
    assert seen == {"none", "inside", "past"}


def test_badges_and_group_tables_match_the_dump(kit, dump):
    rollouts = read_dump(dump)
    root = kit.parse_html(render_page(rollouts))
    for node, r in zip(_rollout_nodes(root), rollouts):
        (badge,) = node.find_all("summary")[0].find_all("span", "b")
        assert badge.text() == ("correct" if r.correct else "incorrect")
    rows = [tr for t in root.find_all("table", "sum") for tr in t.find_all("tr")[1:]]
    assert len(rows) == len(rollouts)
    for tr, r in zip(rows, rollouts):
        w = np.array([w for w, m in zip(r.weights, r.response_mask) if m])
        cell = {td.attrs["class"]: td.text() for td in tr.find_all("td") if td.attrs.get("class", "l") != "l"}
        assert float(cell["wmean"]) == pytest.approx(w.mean(), rel=1e-3)
        assert float(cell["wmax"]) == pytest.approx(w.max(), rel=1e-3)
        assert int(cell["loss"]) == len(w) and int(cell["len"]) == r.length
    groups = root.find_all("details", "grp")
    assert len(groups) == 3  # (step 2, q-17), (step 2, q-3), (step 4, q-17): a uid per step


def test_group_scale_shades_by_the_groups_own_max(kit, dump):
    rollouts = read_dump(dump)
    root = kit.parse_html(render_page(rollouts, scale="group"))
    step2_q3 = [r for r in rollouts if (r.step, r.uid) == (2, "q-3")]
    gmax = max(rollout_stats(r)["weight_max"] for r in step2_q3)
    node = [n for n in _rollout_nodes(root) if n.attrs["data-uid"] == "q-3"][0]
    r = step2_q3[0]
    arg = int(np.argmax(r.weights))
    assert round(LEVELS * r.weights[arg] / gmax) == LEVELS == int(_token_spans(node)[arg].classes[0][1:])
    with pytest.raises(ValueError, match="scale must be one of"):
        render_page(rollouts, scale="log")


def test_page_is_self_contained_and_linear_in_tokens(kit, dump):
    rollouts = read_dump(dump)
    page = render_page(rollouts)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page) and "@import" not in page
    assert "<link" not in page
    n_tokens = sum(r.length for r in rollouts)
    assert len(page.encode()) < 120 * n_tokens + 20_000  # ~60 bytes a token plus a fixed head


def test_cli_writes_the_page_filters_steps_and_reports_bad_dumps(kit, dump, tmp_path, capsys):
    out = tmp_path / "site" / "credit.html"
    assert view_main([str(dump), "--out", str(out), "--step", "4"]) == 0
    root = kit.parse_html(out.read_text(encoding="utf-8"))
    assert {n.attrs["data-step"] for n in _rollout_nodes(root)} == {"4"} and len(_rollout_nodes(root)) == 3
    assert view_main([str(dump), "--out", str(out), "--step", "9"]) == 2
    assert "step(s) [9] not in the dump" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n")
    assert view_main([str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:1: expected a JSON object" in capsys.readouterr().err


@pytest.mark.slow
def test_chromium_renders_every_rollout_without_script_errors(kit, dump, tmp_path):
    """The browser's DOM after scripts ran: every rollout and token present, no JS error, and a
    screenshot whose pixels carry both advantage colours."""
    page = write_credit_page([dump], tmp_path / "credit.html")
    url = page.resolve().as_uri()
    dom = kit.run_chromium(["--dump-dom", url], tmp_path / "profile").stdout
    root = kit.parse_html(dom)
    (html_node,) = root.find_all("html")
    assert "data-js-errors" not in html_node.attrs
    rollouts = read_dump(dump)
    assert html_node.attrs.get("data-rendered") == str(len(rollouts))
    long = [n for n in _rollout_nodes(root) if n.attrs["data-n"] == "3000"]
    assert len(long) == 1 and len(_token_spans(long[0])) == 3000

    mixed = write_credit_page([dump], tmp_path / "step2.html", steps=[2])  # the mixed group on screen
    shot = tmp_path / "shot.png"
    kit.run_chromium([f"--screenshot={shot}", "--window-size=1200,1600", mixed.resolve().as_uri()],
                     tmp_path / "profile2")
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    greenish = ((g - r > 40) & (g - b > 40)).mean()  # positive-advantage shades
    reddish = ((r - g > 40) & (r - b > 40)).mean()  # negative-advantage shades, incorrect badges
    assert greenish > 0.002 and reddish > 0.002, (greenish, reddish)
