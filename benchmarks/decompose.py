"""Time and accuracy of onnx_lowrank.decompose against TensorLy at equal ranks.

Usage: python benchmarks/decompose.py [--repeat N] [--quick]

For every shape and rank it prints our wall time and relative Frobenius reconstruction error
next to TensorLy's (``tensor_train``, ``tensor_train_matrix``, ``partial_tucker``), and the
ratios ours/TensorLy. Weights are float32 (as stored in ONNX) and synthetic: Gaussian tensors
whose Cout and Cin unfoldings get a power-law spectrum (sigma_i ~ (1 + i) ** -0.5), roughly
the slow decay of trained conv/Linear weights, so truncations are neither trivial nor hopeless.

Our code decomposes tensors up to 16 Mi elements in float64 (whatever the input dtype);
TensorLy computes in the input's dtype, so it is timed twice: on the float32 weight (what a
user would call it with, "TL32") and on a float64 copy (same arithmetic as ours, "TL64").
Times are the best of ``--repeat`` runs after one warm-up call, in milliseconds, with BLAS
limited to one thread by default (set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS
to override) so that ratios are not at the mercy of other processes on a small machine.
"""

from __future__ import annotations

import os

# Must happen before numpy loads its BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

from onnx_lowrank.decompose.tt import TTRank, factorize_dim, tt_conv, tt_matrix  # noqa: E402
from onnx_lowrank.decompose.tucker import TuckerRank, tucker2  # noqa: E402

try:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker, tensor_train, tensor_train_matrix
except ImportError:  # the table still shows our numbers
    tl = None


def best_time(fn, repeat: int) -> tuple[float, object]:
    result = fn()  # warm-up: first-call costs (allocations, BLAS init) are not what we compare
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, result


def rel_err(approx: np.ndarray, exact: np.ndarray) -> float:
    exact = exact.astype(np.float64)
    return float(np.linalg.norm(np.asarray(approx, dtype=np.float64) - exact) / np.linalg.norm(exact))


def decaying(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian tensor with a power-law spectrum imposed on modes 0 and 1 (float32)."""
    t = rng.standard_normal(shape)
    for mode in (0, 1):
        n = shape[mode]
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        scale = q * (1.0 + np.arange(n)) ** -0.5
        t = np.moveaxis(np.tensordot(scale, t, axes=([1], [mode])), 0, mode)
    return (t / np.linalg.norm(t) * math.sqrt(t.size)).astype(np.float32)


ROW = "{:<17} {:<12} {:<14} {:>6} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>9}"


def header() -> None:
    print(
        ROW.format(
            "shape", "method", "rank", "params", "ours ms", "TL32 ms", "TL64 ms", "t/TL32", "t/TL64",
            "err ours", "err TL32", "err/TL64",
        )
    )
    print("-" * 132)


def row(shape, method, rank, params_ratio, ours, tl32, tl64) -> None:
    """``ours``/``tl32``/``tl64`` are (ms, rel. error) or None."""

    def ms(x):
        return "-" if x is None else f"{x[0]:.1f}"

    def ratio(x):
        return "-" if x is None else f"{ours[0] / x[0]:.2f}"

    print(
        ROW.format(
            shape, method, rank, f"{params_ratio:.3f}", ms(ours), ms(tl32), ms(tl64), ratio(tl32), ratio(tl64),
            f"{ours[1]:.5f}", "-" if tl32 is None else f"{tl32[1]:.5f}",
            # err/TL64: our error relative to TensorLy's float64 run (1.000000 = identical).
            "-" if tl64 is None else f"{ours[1] / tl64[1]:.6f}",
        )
    )


def bench_conv(rng, channels: int, repeat: int, quick: bool) -> None:
    kernel = decaying(rng, (channels, channels, 3, 3))
    shape = f"{channels}x{channels}x3x3"
    k64 = kernel.astype(np.float64)
    reordered = {dt: np.ascontiguousarray(k.reshape(channels, channels, 9).transpose(1, 2, 0))
                 for dt, k in (("32", kernel), ("64", k64))}
    fractions = (8, 4) if quick else (16, 8, 4, 2)
    for div in fractions:
        r = channels // div
        # --- channel TT (tt_conv) vs tensor_train on the reordered (Cin, 9, Cout) tensor
        ranks = (1, r, r, 1)
        t, f = best_time(lambda ranks=ranks: tt_conv(kernel, TTRank(ranks)), repeat)
        ours = (t, rel_err(f.reconstruct(), kernel))
        tl32 = tl64 = None
        if tl is not None:
            res = {}
            for dt, x in reordered.items():
                t, tt = best_time(lambda x=x, ranks=ranks: tensor_train(x, list(ranks)), repeat)
                full = tl.tt_to_tensor(tt).reshape(channels, 9, channels).transpose(2, 0, 1)
                res[dt] = (t, rel_err(full.reshape(kernel.shape), kernel))
            tl32, tl64 = res["32"], res["64"]
        row(shape, "tt_conv", f"(1,{r},{r},1)", f.params / kernel.size, ours, tl32, tl64)

        # --- Tucker-2: HOSVD and HOSVD + 5 HOOI sweeps vs partial_tucker(init='svd')
        for n_iter in (0, 5):
            t, f = best_time(lambda r=r, n_iter=n_iter: tucker2(kernel, TuckerRank(r, r), n_iter_max=n_iter), repeat)
            ours = (t, rel_err(f.reconstruct(), kernel))
            if tl is not None:
                res = {}
                for dt, x in (("32", kernel), ("64", k64)):
                    t, out = best_time(
                        lambda x=x, r=r, n_iter=n_iter: partial_tucker(
                            x, [r, r], modes=[0, 1], n_iter_max=n_iter, init="svd", tol=0
                        ),
                        repeat,
                    )
                    (core, factors), _ = out
                    res[dt] = (t, rel_err(tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]), kernel))
                tl32, tl64 = res["32"], res["64"]
            method = "tucker2" if n_iter == 0 else f"tucker2+{n_iter}it"
            row(shape, method, f"({r},{r})", f.params / kernel.size, ours, tl32, tl64)


def bench_linear(rng, repeat: int, quick: bool) -> None:
    out_f, in_f = 3072, 768  # Linear 768 -> 3072 (BERT-base FFN up-projection), W (out, in)
    weight = decaying(rng, (out_f, in_f))
    out_dims, in_dims = factorize_dim(out_f), factorize_dim(in_f)  # (12, 16, 16), (8, 8, 12)
    shape = f"{out_f}x{in_f}"
    tensorized = {dt: w.T.reshape(*in_dims, *out_dims) for dt, w in (("32", weight), ("64", weight.astype(np.float64)))}
    for r in (8, 32) if quick else (8, 16, 32, 64, 128):
        ranks = (1, r, r, 1)
        t, f = best_time(lambda ranks=ranks: tt_matrix(weight, out_dims, in_dims, TTRank(ranks)), repeat)
        ours = (t, rel_err(f.reconstruct(), weight))
        tl32 = tl64 = None
        if tl is not None:
            res = {}
            for dt, x in tensorized.items():
                t, ttm = best_time(lambda x=x, ranks=ranks: tensor_train_matrix(x, list(ranks)), repeat)
                full = tl.tt_matrix_to_tensor(ttm).reshape(in_f, out_f).T
                res[dt] = (t, rel_err(full, weight))
            tl32, tl64 = res["32"], res["64"]
        row(shape, "tt_matrix", f"(1,{r},{r},1)", f.params / weight.size, ours, tl32, tl64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and ranks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="tensorly")
    rng = np.random.default_rng(0)
    if tl is None:
        print("tensorly is not installed: TensorLy columns are empty")
    print(f"BLAS threads: {os.environ['OPENBLAS_NUM_THREADS']}; best of {args.repeat} runs")
    print(f"TT-matrix dims for 3072x768: out {factorize_dim(3072)} x in {factorize_dim(768)}")
    print("params = stored values / original; err = relative Frobenius reconstruction error; t/TL = time ratio\n")
    header()
    for channels in (64, 128) if args.quick else (64, 128, 256, 512):
        bench_conv(rng, channels, args.repeat, args.quick)
    bench_linear(rng, args.repeat, args.quick)


if __name__ == "__main__":
    main()
