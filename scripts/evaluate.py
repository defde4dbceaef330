#!/usr/bin/env python3
"""avg@k per benchmark for a list of checkpoints, and the best-checkpoint summary table.

  # re-evaluate saved checkpoints (vLLM), the paper's ks: AIME avg@32, AMC avg@8, MATH500 /
  # OlympiadBench avg@1, code benchmarks avg@4; temperature 0.1, top-p 1.0
  python scripts/evaluate.py --suite math --data-dir ~/data/shear/math \
      --checkpoints Qwen/Qwen2.5-Math-7B ~/shear_runs/shear-verl/<experiment>/checkpoints --out math_eval.json

  # best step of a run from its in-training validation (every 5 steps, verl's file logger; all
  # metrics-*.jsonl files of the run directory, one per launch)
  python scripts/evaluate.py --from-log ~/shear_runs/shear-verl/<experiment>

Checkpoints: Hugging Face model dirs, hub ids, verl `global_step_N` dirs or a verl checkpoint root
(every global_step_N in it). Benchmarks: the <name>.parquet files of scripts/prepare_*.py.
Generation: vLLM (--backend vllm, the default where vLLM and a GPU are present) or transformers
(--backend hf: slow, for small models or machines without vLLM).
"""

import argparse
import json
import sys
from pathlib import Path

from shear_verl.data.code_sets import CODE_BENCHMARKS
from shear_verl.data.evaluation import (
    BenchmarkSpec,
    Sampling,
    evaluate_checkpoint,
    format_table,
    resolve_checkpoints,
    results_to_json,
    validation_table,
)
from shear_verl.data.generation import BACKENDS, make_generator
from shear_verl.data.math_sets import MATH_BENCHMARKS

REPO = Path(__file__).resolve().parent.parent
SUITES = {
    "math": ({n: b.avg_at_k for n, b in MATH_BENCHMARKS.items()}, REPO / "reward_fns" / "math.py"),
    "code": ({n: b.avg_at_k for n, b in CODE_BENCHMARKS.items()}, REPO / "reward_fns" / "code.py"),
}


def benchmark_specs(args) -> list[BenchmarkSpec]:
    ks, reward_fn = SUITES[args.suite]
    reward_fn = args.reward_fn or str(reward_fn)
    data_dir = Path(args.data_dir or f"~/data/shear/{args.suite}").expanduser()
    specs, missing = {}, []
    # default: every benchmark of the suite, or none besides the --bench files when there are some
    names = args.benchmarks if args.benchmarks is not None else ([] if args.bench else list(ks))
    for name in names:
        if name not in ks:
            raise SystemExit(f"unknown {args.suite} benchmark {name!r}; known: {list(ks)} (or add one with --bench)")
        path = data_dir / f"{name}.parquet"
        if path.is_file():
            specs[name] = BenchmarkSpec(name, str(path), ks[name], reward_fn)
        else:
            missing.append(str(path))
    for item in args.bench:  # NAME=PATH[:K]
        name, _, rest = item.partition("=")
        path, _, k = rest.partition(":")
        if not name or not path:
            raise SystemExit(f"--bench expects NAME=PATH[:K], got {item!r}")
        specs[name] = BenchmarkSpec(name, path, int(k) if k else ks.get(name, 1), reward_fn)
    if missing and not args.skip_missing:
        raise SystemExit(f"benchmark files not found: {missing}. Write them with scripts/prepare_{args.suite}.py "
                         "or pass --skip-missing to evaluate the others.")
    if not specs:
        raise SystemExit("no benchmark to evaluate")
    return list(specs.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-log", nargs="+", metavar="PATH",
                   help="a run's output dir or metrics .jsonl files: print the per-step validation table "
                        "and the best step")
    p.add_argument("--suite", choices=sorted(SUITES), default="math")
    p.add_argument("--data-dir", help="directory with <benchmark>.parquet files (default: ~/data/shear/<suite>)")
    p.add_argument("--benchmarks", nargs="*", help="subset of the suite (default: all, or none with --bench)")
    p.add_argument("--bench", action="append", default=[], metavar="NAME=PATH[:K]",
                   help="a benchmark file (repeatable); K defaults to the suite's avg@k for NAME, else 1")
    p.add_argument("--skip-missing", action="store_true", help="evaluate the benchmark files that exist")
    p.add_argument("--checkpoints", nargs="+", help="checkpoints to evaluate, in table order")
    p.add_argument("--reward-fn", help="grader file (default: reward_fns/<suite>.py)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=3072)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="generation: vllm, hf (transformers, slow) or auto (vLLM when installed with an accelerator)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--score-workers", type=int, default=8)
    p.add_argument("--samples-dir", help="write every graded sample to <dir>/<checkpoint>/<benchmark>.jsonl")
    p.add_argument("--out", help="write all results (per-problem accuracies included) to this JSON file")
    args = p.parse_args()

    if args.from_log:
        print(format_table(validation_table(args.from_log), row_title="step"))
        return 0
    if not args.checkpoints:
        p.error("--checkpoints (or --from-log) is required")

    specs = benchmark_specs(args)
    sampling = Sampling(args.temperature, args.top_p, args.max_tokens, args.seed)
    results = {}
    for label, model_path in resolve_checkpoints(args.checkpoints):
        print(f"== {label}: {model_path}", flush=True)
        generator = make_generator(args.backend, model_path, tensor_parallel_size=args.tp, dtype=args.dtype,
                                   gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
        try:
            samples_dir = str(Path(args.samples_dir) / label.replace(" ", "_")) if args.samples_dir else None
            results[label] = evaluate_checkpoint(generator, specs, sampling, score_workers=args.score_workers,
                                                 samples_dir=samples_dir)
        finally:
            generator.close()
        print({name: round(r.avg_at_k, 4) for name, r in results[label].items()}, flush=True)
        if args.out:  # after every checkpoint, so a long sweep keeps what it has
            Path(args.out).write_text(json.dumps(results_to_json(results), indent=1))
    print(format_table({label: {n: r.avg_at_k for n, r in benches.items()} for label, benches in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
