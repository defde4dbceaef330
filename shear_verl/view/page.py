"""The credit page: one self-contained HTML file of a dump's rollouts, token by token.

Rendered here, in Python, as one short-classed ``<span>`` per token (its hover title carries the
index, id, weight and advantage), so the page needs no script to show its content and its size
grows linearly with the tokens (~60 bytes a token). The inline script only records errors,
expands sections and counts what the browser shows (``data-rendered``, for the browser test).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from .dump import Rollout, group_rollouts, holds_both_outcomes, read_dumps

SCALES = ("dump", "group")  # weight / max weight of the dump's mixed groups, or of the rollout's group
LEVELS = 10  # shading steps of weight / max weight
MAX_ALPHA = 0.75  # strongest shade's opacity: the darkest shade leaves the text readable
SIGN_RGB = {"p": (22, 163, 74), "n": (220, 38, 38), "z": (128, 128, 128)}  # advantage > 0, < 0, = 0

# Whitespace and control characters drawn as one visible glyph each (one token may be "\n\n").
_GLYPHS = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}


def visible_text(token: str) -> str:
    """A token as visible, escaped HTML text: spaces as middle dots, newlines as arrows, C0 controls
    as their control pictures, lone surrogates as U+FFFD, the empty token as an empty-set sign."""
    if token == "":
        return "\u2205"
    out = []
    for ch in token:
        c = ord(ch)
        if ch in _GLYPHS:
            out.append(_GLYPHS[ch])
        elif c < 0x20:
            out.append(chr(0x2400 + c))
        elif c == 0x7F:
            out.append("\u2421")
        elif 0xD800 <= c <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append(ch)
    return html.escape("".join(out), quote=True)


def _num(x: float) -> str:
    return f"{x:.4g}"


def shade_class(weight: float, advantage: float, masked_in: int, scale_max: float) -> str:
    """CSS class of a token: ``m`` off the loss mask, else sign (p/n/z) + level 0..LEVELS."""
    if not masked_in:
        return "m"
    sign = "p" if advantage > 0 else "n" if advantage < 0 else "z"
    level = round(LEVELS * weight / scale_max) if scale_max > 0 else 0
    return f"{sign}{min(LEVELS, max(0, level))}"


def _css() -> str:
    shades = []
    for sign, (r, g, b) in SIGN_RGB.items():
        shades.append(f".{sign}0" + "".join(f",.{sign}{k}" for k in range(1, LEVELS + 1)) + f"{{border-bottom-color:rgb({r},{g},{b})}}")
        for k in range(1, LEVELS + 1):
            shades.append(f".{sign}{k}{{background:rgba({r},{g},{b},{MAX_ALPHA * k / LEVELS:.3f})}}")
    return "\n".join([
        "body{font:14px/1.45 'DejaVu Sans',system-ui,sans-serif;margin:1em 1.5em;color:#1a1a1a;background:#fff}",
        "h1{font-size:1.3em;margin:.2em 0} summary{cursor:pointer} .muted{color:#666}",
        "details.step>summary{font-size:1.15em;font-weight:bold;margin:.6em 0}",
        "details.grp{border:1px solid #ccc;border-radius:6px;margin:.5em 0 .8em;padding:.3em .7em}",
        "details.grp>summary{font-weight:bold}",
        "details.ro{margin:.4em 0 .4em .6em} details.ro>summary{font-size:.95em}",
        "table{border-collapse:collapse;margin:.4em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:1px 7px;text-align:right}",
        "th{background:#f4f4f4} td.l,th.l{text-align:left}",
        ".b{display:inline-block;padding:0 6px;border-radius:8px;color:#fff;font-size:.85em;font-weight:bold}",
        ".ok{background:#15803d} .bad{background:#b91c1c}",
        ".tx{font:13px/1.75 'DejaVu Sans Mono',monospace;padding:.3em .4em;background:#fcfcfc;border-left:3px solid #ddd;overflow-wrap:anywhere}",
        ".tx span{display:inline-block;margin:0 1px 1px 0;padding:0 1px;border-bottom:2px solid transparent;max-width:100%}",
        ".m{color:#999;background:#eee;font-style:italic}",
        ".e{outline:2px solid #7f1d1d;outline-offset:0}",
        ".fe{color:#7f1d1d;font-weight:bold;margin:0 2px} .fet{color:#7f1d1d;font-weight:bold}",
        ".legend{border:1px solid #ddd;border-radius:6px;padding:.4em .8em;margin:.6em 0;font-size:.9em}",
        ".legend .tx{display:inline;border:0;padding:0;background:none} nav a{margin-right:.6em}",
        *shades,
    ])


# Recorded errors land in <html data-js-errors>: the browser test reads them from the dumped DOM.
_HEAD_SCRIPT = (
    "window.onerror=function(m,s,l){var d=document.documentElement;"
    "d.setAttribute('data-js-errors',(d.getAttribute('data-js-errors')||'')+m+' (line '+l+'); ');};"
)
_TAIL_SCRIPT = """(function(){
function openTo(id){var el=document.getElementById(id);while(el){if(el.tagName==='DETAILS')el.open=true;el=el.parentElement;}}
window.addEventListener('hashchange',function(){openTo(location.hash.slice(1));});
if(location.hash)openTo(location.hash.slice(1));
document.querySelectorAll('button[data-open]').forEach(function(b){b.addEventListener('click',function(){
var o=b.getAttribute('data-open')==='1';document.querySelectorAll('details.'+b.getAttribute('data-what')).forEach(function(d){d.open=o;});});});
document.documentElement.setAttribute('data-rendered',String(document.querySelectorAll('details.ro').length));
})();"""


def rollout_stats(r: Rollout) -> dict:
    """Summary numbers of one rollout over its loss-mask tokens (None where it has none)."""
    w = r.masked_weights()
    g = [a for a, m in zip(r.grpo_advantage, r.response_mask) if m]
    return {
        "length": r.length,
        "loss_tokens": len(w),
        "weight_mean": sum(w) / len(w) if w else None,
        "weight_max": max(w) if w else None,
        "grpo_advantage_mean": sum(g) / len(g) if g else None,
    }


def _max_weight(rollouts: Sequence[Rollout]) -> float:
    return max((w for r in rollouts for w in r.masked_weights()), default=0.0)


def mixed_groups_max_weight(steps: dict[int, dict[str, list[Rollout]]]) -> float:
    """The dump scale: the max weight over groups holding both outcomes. Single-outcome groups keep
    SHEAR's fallback weight (1), which would wash every mixed group's shades out; with no mixed
    group at all, the max over everything."""
    mixed = [r for groups in steps.values() for g in groups.values() if holds_both_outcomes(g) for r in g]
    return _max_weight(mixed) if mixed else _max_weight([r for gs in steps.values() for g in gs.values() for r in g])


def _first_error_text(r: Rollout) -> str:
    fe = r.first_error
    if fe is None or fe < 0:
        return ""
    if fe >= r.length:
        return f"first error at token {fe} (past the end of the {r.length}-token response: truncated)"
    return f"first error at token {fe}"


def render_tokens(r: Rollout, scale_max: float) -> str:
    """The rollout's tokens as shaded spans, with the first-error marker before its token."""
    fe = r.first_error
    marker = f'<b class="fe" title="first error at token {fe}">\u2691</b>'
    parts = []
    for i, (tok, tid, m, w, a) in enumerate(zip(r.tokens, r.response_ids, r.response_mask, r.weights, r.advantage)):
        cls = shade_class(w, a, m, scale_max)
        if i == fe:
            parts.append(marker)
            cls += " e"
        title = f"#{i} id={tid} w={_num(w)} a={_num(a)}" + ("" if m else " (masked)")
        parts.append(f'<span class="{cls}" title="{title}">{visible_text(tok)}</span>')
        if "\n" in tok:
            parts.append("<br>")
    if fe is not None and fe >= r.length:
        parts.append(f'<b class="fe" title="first error at token {fe}: past the end">\u2691 past the end</b>')
    return "".join(parts)


def _badge(r: Rollout) -> str:
    return '<span class="b ok">correct</span>' if r.correct else '<span class="b bad">incorrect</span>'


def _cell(value, fmt=_num) -> str:
    return "\u2013" if value is None else fmt(value)


def _group_html(step: int, gi: int, uid: str, group: Sequence[Rollout], scale: str, dump_max: float) -> str:
    scale_max = _max_weight(group) if scale == "group" else dump_max
    n_ok = sum(r.correct for r in group)
    estimators = ", ".join(dict.fromkeys(r.estimator for r in group))
    gid = f"s{step}-g{gi}"
    head = (f"group {gi} \u00b7 uid {html.escape(uid)} \u00b7 {html.escape(estimators)} \u00b7 "
            f"{len(group)} rollouts, {n_ok} correct")
    if scale == "group":
        head += f' \u00b7 <span class="muted">shade max = group max weight {_num(scale_max)}</span>'
    rows = []
    for ri, r in enumerate(group):
        s = rollout_stats(r)
        badge = _badge(r)
        fe = r.first_error
        rows.append(
            f'<tr><td><a href="#{gid}-r{ri}">{ri}</a></td><td class="l">{badge}</td><td class="score">{_num(r.score)}</td>'
            f'<td class="len">{s["length"]}</td><td class="loss">{s["loss_tokens"]}</td>'
            f'<td class="wmean">{_cell(s["weight_mean"])}</td><td class="wmax">{_cell(s["weight_max"])}</td>'
            f'<td class="gadv">{_cell(s["grpo_advantage_mean"])}</td><td class="ferr">{_cell(fe if fe is not None and fe >= 0 else None, str)}</td></tr>'
        )
    table = (
        '<table class="sum"><tr><th>#</th><th class="l">result</th><th>score</th><th>length</th><th>loss tokens</th>'
        '<th>weight mean</th><th>weight max</th><th>GRPO adv</th><th>first error</th></tr>' + "".join(rows) + "</table>"
    )
    bodies = []
    for ri, r in enumerate(group):
        s = rollout_stats(r)
        badge = _badge(r)
        fet = _first_error_text(r)
        summary = (f"{badge} rollout {ri} \u00b7 score {_num(r.score)} \u00b7 {r.length} tokens \u00b7 weight mean "
                   f"{_cell(s['weight_mean'])} / max {_cell(s['weight_max'])}" + (f' \u00b7 <span class="fet">{fet}</span>' if fet else ""))
        bodies.append(
            f'<details class="ro" id="{gid}-r{ri}" data-step="{step}" data-uid="{html.escape(uid, quote=True)}" data-n="{r.length}" open>'
            f'<summary>{summary}</summary><div class="tx">{render_tokens(r, scale_max)}</div></details>'
        )
    return f'<details class="grp" id="{gid}" open><summary>{head}</summary>{table}{"".join(bodies)}</details>'


def _legend(scale: str, dump_max: float) -> str:
    def sw(cls, text):
        return f'<span class="{cls}">{text}</span>'

    ramp = "".join(sw(f"p{k}", "&nbsp;") for k in range(0, LEVELS + 1, 2))
    nramp = "".join(sw(f"n{k}", "&nbsp;") for k in range(0, LEVELS + 1, 2))
    zramp = "".join(sw(f"z{k}", "&nbsp;") for k in range(0, LEVELS + 1, 2))
    scale_text = (f"the max weight of the dump's mixed groups ({_num(dump_max)}; a single-outcome group's "
                  "fallback weight shows at full shade)" if scale == "dump"
                  else "the max weight of the token's group (shown in each group's header)")
    return (
        '<div class="legend"><b>Legend.</b> Each token is shaded by its SHEAR weight: shade = weight / '
        f"{scale_text}, in {LEVELS} steps; colour = sign of its advantage (what the loss gets): "
        f'<span class="tx">{ramp}</span> positive, <span class="tx">{nramp}</span> negative, '
        f'<span class="tx">{zramp}</span> zero; <span class="tx">{sw("m", "tok")}</span> masked out of the loss. '
        f'<span class="tx">{sw("n6 e", "tok")}</span> with <b class="fe">\u2691</b> before it: the grader\'s first error '
        "(\u2691 past the end: the error lies beyond a truncated response). Whitespace: \u00b7 space, \u21b5 newline, "
        "\u2192 tab, \u2205 empty token. Hover a token for #index, id, w = weight, a = advantage. "
        "Summary numbers are over the loss-mask tokens.</div>"
    )


def render_page(rollouts: Sequence[Rollout], scale: str = "dump", title: str = "SHEAR credit view",
                source: str = "") -> str:
    """The whole page. ``scale``: shade by weight / the mixed groups' max ("dump") or the group's max
    ("group"). The last step's section starts open, earlier ones collapsed."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not rollouts:
        raise ValueError("no rollouts to render")
    steps = group_rollouts(rollouts)
    dump_max = mixed_groups_max_weight(steps)
    last = max(steps)
    n_ok = sum(r.correct for r in rollouts)
    nav = " ".join(f'<a href="#s{s}">step {s}</a>' for s in steps)
    sections = []
    for step, groups in steps.items():
        body = "".join(_group_html(step, gi, uid, g, scale, dump_max) for gi, (uid, g) in enumerate(groups.items()))
        n = sum(len(g) for g in groups.values())
        ok = sum(r.correct for g in groups.values() for r in g)
        sections.append(
            f'<details class="step" id="s{step}"{" open" if step == last else ""}><summary>step {step} '
            f'<span class="muted">\u00b7 {len(groups)} groups, {n} rollouts, {ok} correct</span></summary>{body}</details>'
        )
    buttons = " ".join(
        f'<button data-open="{o}" data-what="{w}">{label}</button>'
        for o, w, label in (("1", "step", "expand steps"), ("0", "step", "collapse steps"),
                            ("1", "ro", "expand rollouts"), ("0", "ro", "collapse rollouts"))
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<script>{_HEAD_SCRIPT}</script><style>{_css()}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<div class="muted">{html.escape(source) + " &middot; " if source else ""}{len(steps)} steps, '
        f"{sum(len(g) for g in steps.values())} groups, {len(rollouts)} rollouts, {n_ok} correct</div>"
        f"{_legend(scale, dump_max)}<nav>Steps: {nav}</nav><p>{buttons}</p>"
        f"{''.join(sections)}<script>{_TAIL_SCRIPT}</script></body></html>\n"
    )


def write_credit_page(dumps: Sequence[str | os.PathLike], out: str | os.PathLike, scale: str = "dump",
                      steps: Sequence[int] | None = None) -> Path:
    """Read dump files, render them (only ``steps`` if given) and write the page to ``out``."""
    rollouts = read_dumps(dumps)
    if steps:
        have = sorted({r.step for r in rollouts})
        wanted = set(steps)
        if wanted - set(have):
            raise ValueError(f"step(s) {sorted(wanted - set(have))} not in the dump (it has steps {have})")
        rollouts = [r for r in rollouts if r.step in wanted]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = ", ".join(os.fspath(d) for d in dumps)
    out.write_text(render_page(rollouts, scale=scale, source=source), encoding="utf-8")
    return out
