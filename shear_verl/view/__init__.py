"""The credit view: per-token SHEAR credit dumps rendered as one self-contained HTML page.

    python -m shear_verl.view DUMP.jsonl --out credit.html

    from shear_verl.view import read_dump, render_page, write_credit_page
    write_credit_page(["dump.jsonl"], "credit.html", scale="dump")
"""

from .dump import DumpError, Rollout, group_rollouts, holds_both_outcomes, parse_rollout, read_dump, read_dumps
from .page import SCALES, render_page, rollout_stats, write_credit_page

__all__ = [
    "SCALES",
    "DumpError",
    "Rollout",
    "group_rollouts",
    "holds_both_outcomes",
    "parse_rollout",
    "read_dump",
    "read_dumps",
    "render_page",
    "rollout_stats",
    "write_credit_page",
]
