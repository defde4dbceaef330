#!/usr/bin/env python3
"""Block until a Ray cluster has at least N GPUs (every node of the job has joined).

  python scripts/slurm/wait_for_gpus.py --address 10.0.0.1:6379 --gpus 16 --timeout 900

Exit status 0 once they have joined, 1 after the timeout (the message names the ray-*.log files).
"""

import argparse
import sys
import time

import ray


def cluster_gpus(address: str) -> int:
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return int(ray.cluster_resources().get("GPU", 0))
    finally:
        ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--address", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--interval", type=float, default=5.0)
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            have = cluster_gpus(args.address)
        except (ConnectionError, RuntimeError) as exc:  # head not up yet
            have = 0
            print(f"waiting for Ray at {args.address}: {type(exc).__name__}: {exc}", flush=True)
        print(f"{have}/{args.gpus} GPUs joined", flush=True)
        if have >= args.gpus:
            return 0
        if time.monotonic() > deadline:
            print(f"only {have} of {args.gpus} GPUs joined within {args.timeout:g} s: see the ray-*.log files",
                  file=sys.stderr)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
