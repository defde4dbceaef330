"""The on-disk layout both tasks write (see math_sets' docstring), built in one place.

train.parquet from the training set, one parquet per benchmark, and val.parquet with each
benchmark repeated avg@k times; the math and code tasks differ only in their sources and in how
records become rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from shear_verl.data.schema import repeat_rows, write_parquet
from shear_verl.data.sources import MissingSourceError, Record, SourceSpec, load_records

logger = logging.getLogger(__name__)


class BenchmarkLike(Protocol):
    source: SourceSpec
    avg_at_k: int


def prepare_sets(
    out_dir: str | Path,
    *,
    task: str,
    train: SourceSpec,
    train_rows: Callable[[list[Record]], tuple[list[dict], int]],
    benchmarks: Mapping[str, BenchmarkLike],
    benchmark_rows: Callable[[str, list[Record]], tuple[list[dict], int | None]],
    names: list[str] | None,
    files: dict[str, str] | None,
    with_train: bool,
    allow_hub: bool,
    prefer_hub: bool,
    skip_missing: bool,
    repeats: dict[str, int] | None,
) -> dict[str, Any]:
    """Write the layout; returns {name: {"rows", "source", "path", ...}}. ``benchmark_rows`` returns
    (rows, dropped), dropped None where a task does not drop benchmark records."""
    out = Path(out_dir)
    files = dict(files or {})
    names = list(benchmarks) if names is None else list(names)
    unknown = [n for n in [*names, *files] if n not in benchmarks and n != train.name]
    if unknown:
        raise ValueError(f"unknown {task} data set(s) {unknown}; known: {[train.name, *benchmarks]}")
    repeats = {n: benchmarks[n].avg_at_k for n in names} | dict(repeats or {})
    summary: dict[str, Any] = {}

    if with_train:
        records, origin = load_records(train, files.get(train.name), allow_hub=allow_hub, prefer_hub=prefer_hub)
        rows, dropped = train_rows(records)
        path = out / "train.parquet"
        write_parquet(rows, path)
        summary[train.name] = {"rows": len(rows), "dropped": dropped, "source": origin, "path": str(path)}

    val_rows: list[dict] = []
    missing: dict[str, str] = {}
    for name in names:
        try:
            records, origin = load_records(benchmarks[name].source, files.get(name), allow_hub=allow_hub,
                                           prefer_hub=prefer_hub)
        except MissingSourceError as exc:
            if not skip_missing:
                raise
            missing[name] = str(exc)
            logger.warning("skipping %s: %s", name, exc)
            continue
        rows, dropped = benchmark_rows(name, records)
        path = out / f"{name}.parquet"
        write_parquet(rows, path)
        val_rows += repeat_rows(rows, repeats[name])
        summary[name] = {"rows": len(rows), **({} if dropped is None else {"dropped": dropped}),
                         "avg_at_k": repeats[name], "source": origin, "path": str(path)}
    if val_rows:
        write_parquet(val_rows, out / "val.parquet")
        summary["val"] = {"rows": len(val_rows), "path": str(out / "val.parquet")}
    if missing:
        summary["missing"] = missing
    return summary
