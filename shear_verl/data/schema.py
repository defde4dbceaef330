"""verl's RL parquet row format, built and checked in one place.

verl's `RLHFDataset` reads `prompt` (chat messages); its reward managers read `data_source`,
`reward_model.ground_truth` and `extra_info`. Every file this project writes uses the same
`extra_info` struct, because verl concatenates train/val files with `datasets`, which refuses
files whose columns have different types.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

EXTRA_INFO_FIELDS = ("split", "index", "source_id", "repeat")
REQUIRED_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


def make_row(
    *,
    data_source: str,
    messages: Sequence[dict[str, str]],
    ability: str,
    ground_truth: str,
    split: str,
    index: int,
    source_id: str = "",
    repeat: int = 0,
) -> dict[str, Any]:
    """One verl row. `ground_truth` is always a string (code tests travel as JSON text)."""
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise ValueError(f"{data_source}[{index}]: ground_truth must be a non-empty string, got {ground_truth!r}")
    for m in messages:
        if set(m) != {"role", "content"} or not isinstance(m["content"], str):
            raise ValueError(f"{data_source}[{index}]: each message needs exactly 'role' and str 'content': {m!r}")
    return {
        "data_source": data_source,
        "prompt": [dict(m) for m in messages],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {
            "split": split,
            "index": int(index),
            "source_id": str(source_id),
            "repeat": int(repeat),
        },
    }


def repeat_rows(rows: Sequence[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Each row k times (extra_info.repeat = 0..k-1).

    verl's validation gives every row its own uid and reports mean@n per data source, so a file
    in which every problem appears k times makes `val-core/<bench>/acc/mean@1` the paper's avg@k.
    """
    if k < 1:
        raise ValueError(f"repeat count must be >= 1, got {k}")
    out = []
    for row in rows:
        for r in range(k):
            copy = {**row, "extra_info": {**row["extra_info"], "repeat": r}}
            out.append(copy)
    return out


def write_parquet(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> int:
    """Write rows (see `make_row`) to parquet; returns the row count."""
    import pandas as pd

    rows = list(rows)
    if not rows:
        raise ValueError(f"refusing to write an empty dataset to {path}")
    for i, row in enumerate(rows):
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing or tuple(row["extra_info"]) != EXTRA_INFO_FIELDS:
            raise ValueError(f"row {i} of {path} is not a verl row (missing {missing}); build rows with make_row")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return len(rows)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a parquet file written by `write_parquet`, as plain Python objects."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
