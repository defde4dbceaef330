"""The view tests' kit: a synthetic credit dump, a small DOM built with the standard library's
HTML parser (the page's structure is checked on the tree, not by substring), and headless Chromium.

The dump is written here from the README's schema, not by the driver, so every case the page must
handle appears at least once: mixed / all-correct groups, positive / negative / zero advantages,
masked tokens inside and after a response, a first error at the first, a middle and a past-the-end
token, no first error at all, tokens with HTML specials, whitespace, control characters and the
empty string, extra fields, two steps sharing a uid, and one 3000-token rollout.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<b>", "&amp;", '"q"', "'", "\n", " ", "  ", "\t", "", "</script>", "<!--", "\x00", "\u00e9",
                  "\u65e5\u672c", "\r\n", " x", "a<b&c>\"d'"]
WORDS = ["The", " next", " term", " is", " 7", ",", " 10", " 13", " so", " we", " add", " 3", ".", "\n"]
# Inverse of the page's whitespace / control glyphs (the README's legend), to read tokens back.
UNGLYPH = {"\u00b7": " ", "\u21b5": "\n", "\u2192": "\t", "\u240d": "\r", "\u2400": "\x00"}


def make_rollout(rng, step, uid, correct, length, *, first_error=None, masked=(), extra=None, grpo=None,
                 estimator="shear", specials=True):
    """One dump row as the driver would write it (advantage = grpo_advantage * weights on the mask)."""
    vocab = WORDS + (SPECIAL_TOKENS if specials else [])
    ids = [rng.randrange(len(vocab)) for _ in range(length)]
    if specials:  # every special token early in the response
        ids[: len(SPECIAL_TOKENS)] = [len(WORDS) + k for k in range(len(SPECIAL_TOKENS))][:length]
    tokens = [vocab[k] for k in ids]
    mask = [0 if i in masked else 1 for i in range(length)]
    weights = [round(rng.uniform(0.02, 0.4), 6) * m for m in mask]
    if length > 20 and mask[20]:
        weights[20] = 0.0  # a loss token with zero weight: zero advantage
    g = (1.0 if correct else -1.0) if grpo is None else grpo
    grpo_adv = [g * m for m in mask]
    row = {
        "step": step, "uid": uid, "estimator": estimator, "score": 1.0 if correct else 0.0, "correct": correct,
        "response_ids": [100 + k for k in ids], "tokens": tokens,
        "response_mask": mask, "weights": weights, "grpo_advantage": grpo_adv,
        "advantage": [a * w if m else 0.0 for a, w, m in zip(grpo_adv, weights, mask)],
        "reward_extra_info": {} if first_error is None else {"first_error": first_error, "n_terms": 8},
    }
    row.update(extra or {})
    return row


def fallback(row: dict) -> dict:
    """A rollout of a single-outcome group: weight 1 on every loss token (SHEAR's fallback)."""
    row["weights"] = [float(m) for m in row["response_mask"]]
    return row


def synthetic_rows() -> list[dict]:
    rng = random.Random(18)
    return [
        # step 2, a mixed group
        make_rollout(rng, 2, "q-17", True, 40, first_error=-1),
        make_rollout(rng, 2, "q-17", False, 48, first_error=5),
        make_rollout(rng, 2, "q-17", False, 44, first_error=0, masked=set(range(25, 29)) | {41, 42, 43}),
        make_rollout(rng, 2, "q-17", True, 36, first_error=-1, extra={"prompt": "count by 3 from 7"}),
        # step 2, an all-correct group: SHEAR's fallback weight 1, GRPO advantages 0, no first_error
        fallback(make_rollout(rng, 2, "q-3", True, 30, grpo=0.0)),
        fallback(make_rollout(rng, 2, "q-3", True, 33, grpo=0.0, extra={"extra_info": {"index": 3}})),
        # step 4: the same uid again (another group), a long rollout, a truncated one
        make_rollout(rng, 4, "q-17", False, 3000, first_error=1234, specials=False),
        make_rollout(rng, 4, "q-17", False, 40, first_error=40),
        make_rollout(rng, 4, "q-17", True, 52, first_error=-1),
    ]


def write_dump(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, dict(attrs), parent, []

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag=None, cls=None):
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _TreeBuilder(HTMLParser):
    VOID = {"br", "meta", "img", "input", "hr", "link", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        n = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is None:
            raise AssertionError(f"stray </{tag}> in the page")
        self.cur = n.parent

    def handle_data(self, data):
        self.cur.children.append(data)


def parse_html(text: str) -> Node:
    b = _TreeBuilder()
    b.feed(text)
    b.close()
    return b.root


def token_text(span: Node) -> str:
    """A token span's text read back to the token (the page's glyphs undone)."""
    t = span.text()
    return "" if t == "\u2205" else "".join(UNGLYPH.get(ch, ch) for ch in t)


def chromium() -> str:
    """Debian's chromium: scripts/setup_cpu.sh installs it, so its absence fails the test."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium not found on PATH: scripts/setup_cpu.sh installs it "
                    "(apt-get install -y --no-install-recommends chromium)")
    return exe


def run_chromium(args: list[str], profile: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Headless Chromium, offline and sandbox-free (root in CI), with a throwaway profile."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           "--disable-background-networking", "--disable-sync", "--disable-component-update",
           "--virtual-time-budget=10000", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"chromium did not finish within {timeout} s: {' '.join(cmd)}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"chromium exited {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def kit():
    """This module (tests import nothing by path under --import-mode=importlib)."""
    return sys.modules[__name__]


@pytest.fixture
def dump(tmp_path) -> Path:
    return write_dump(tmp_path / "dump.jsonl", synthetic_rows())
