"""CPU latency of each digits sample model, original vs compressed, timed interleaved.

Usage: python benchmarks/latency.py [--iters 200] [--warmup 20] [--threads N] [--batch 1,64]

Each sample model is compressed to 50% and 30% of its factorizable parameters (``plan_for`` +
``apply_plan``, as ``compress --keep-params`` does) and timed against the original in one
process, A B / B A interleaved on the same inputs with I/O binding. Printed per model, kept
fraction and batch size: the p50 latencies, the speedup (median of per-pair ratios
time(original) / time(compressed)) with its interquartile range, and the ideal speedup (the
FLOP ratio of the factorized layers). Ratios taken side by side are the figures to quote; the
absolute times move with machine load.
"""

from __future__ import annotations

import argparse
import sys

from gpu_suite import KEPT, MODEL_BUILDERS, compress_case  # benchmarks/ is on sys.path when run as a script

from onnx_lowrank.validate.latency import measure_pair, parse_batch_sizes
from onnx_lowrank.validate.runtime import RuntimeOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Original vs compressed CPU latency of the sample models.")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: onnxruntime's).")
    parser.add_argument("--batch", default="1,64", help="Batch sizes (default 1,64).")
    args = parser.parse_args(argv)
    batches = parse_batch_sizes(args.batch)
    options = RuntimeOptions(provider="cpu", threads=args.threads)
    print(f"{'model':<20} {'kept':>5} {'batch':>5} {'orig p50 ms':>12} {'comp p50 ms':>12} {'speedup':>8} {'IQR':>13} {'ideal':>6}")
    for builder in MODEL_BUILDERS:
        if not builder.__name__.startswith("build_digits_"):
            continue
        case = builder(False)
        for kept in KEPT:
            compressed, ideal, _ = compress_case(case, kept)
            for batch in batches:
                pair = measure_pair(
                    case.model, compressed, case.feeds_for(batch), options=options, warmup=args.warmup, iters=args.iters
                )
                low, high = pair.iqr
                print(
                    f"{case.name:<20} {kept:>5.0%} {batch:>5} {pair.a.p50:>12.4f} {pair.b.p50:>12.4f} "
                    f"{pair.speedup:>7.3f}x {low:>6.3f}-{high:<6.3f} {ideal or float('nan'):>5.2f}x",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
