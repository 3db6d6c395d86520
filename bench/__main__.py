"""Run jobspool's benchmarks: ``python -m bench [NAME...] [--quick] [--runs N] [--json FILE]``.

Without a name every benchmark runs. A benchmark joins by adding its module
to :data:`BENCHMARKS`; the module provides ``run(quick: bool, runs: int |
None) -> dict``, prints its own table and returns its results, with
``"ok": False`` when it found a regression that is not noise (the exit
status is then 1, so CI or a person sees it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

# name -> module; imported only when the benchmark runs.
BENCHMARKS: dict[str, str] = {
    "startup": "bench.startup",
    "throughput": "bench.throughput",
    "latency": "bench.latency",
    "scale": "bench.scale",
    "scheduler": "bench.scheduler",
    "bigjob": "bench.bigjob",
    "slowhandler": "bench.slowhandler",
    "cluster": "bench.cluster",  # root and glusterfs-server: a real shared file system
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run jobspool's benchmarks (all of them without a NAME).",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--quick", action="store_true", help="fewer runs: a smoke test, not a figure to quote"
    )
    parser.add_argument("--runs", type=int, metavar="N", help="runs per measurement (overrides)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)

    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    if args.runs is not None and args.runs < 2:
        parser.error("--runs needs at least 2")

    results: dict[str, Any] = {}
    started = time.monotonic()
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        results[name] = module.run(quick=args.quick, runs=args.runs)
        print()
    common.print_table(results, time.monotonic() - started)

    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0 if all(r.get("ok", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
