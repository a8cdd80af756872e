"""Sequential, error-compensating refit of SVD factors on calibration data.

After the ranks are chosen and the model factorized, the factorized layers are visited in
graph order. For each one, on the calibration data:

- ``X0`` (n, in): the layer's input rows in the ORIGINAL model (onnxruntime);
- ``X``  (n, in): its input rows in the COMPRESSED model, every earlier layer already refit;
- ``Y = X0 W^T``: the original layer's pre-bias output (the bias is kept as it is),

and the rank-r matrix ``M = L @ R`` minimizing the ridge-anchored least squares

    ||X M^T - Y||^2 + lambda ||(M - W) S||^2,     lambda = alpha * trace(X^T X) / trace(S S^T)

replaces the layer's factors, so each layer also corrects the error its inputs carry from
the layers before it. Without the anchor, a calibration set smaller than the layer's input
width lets ``M`` fit the calibration rows and be arbitrary elsewhere: held-out agreement
collapses. ``alpha`` is scale-free (relative to the mean input energy per dimension).

The anchor metric ``S S^T`` (``anchor=``):
- ``"identity"`` (default): ``S = I``, the weights themselves are pulled towards ``W``;
- ``"covariance"``: ``S S^T = X0^T X0 / n + 0.1 mean(diag) I``, the output on the original
  inputs is pulled towards the original output (damped as the whitened SVD is).

Closed form (reduced-rank ridge regression), with ``A = S S^T``, ``G = X^T X``,
``H = X0^T X`` (so ``Y^T X = W H``):

    B = G + lambda A = R R^T                         (Cholesky)
    M* = (W H + lambda W A) B^(-1)                   (the unconstrained ridge solution)
    objective(M) = ||(M - M*) R||_F^2 + const        so the best rank r is
    M* R = U Sigma V^T,  L = U_r Sigma_r^(1/2),  R_f = Sigma_r^(1/2) V_r^T R^(-1)

Only ``G``, ``H`` and ``K = X0^T X0`` (in x in, float64) are accumulated, batch by batch, so
memory is bounded by one batch's activations plus three (in, in) matrices per layer; the
errors before/after (``||X M^T - Y||^2 / ||Y||^2``) come from the same sums.

The refit factors are written into the compressed model's existing ``<weight>.lowrank.*``
initializers: the graph is unchanged except those values. Layers in subgraphs and layers
factorized by other methods (tucker, tt) are left as they are, with a reason in the report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank import graph as g
from onnx_lowrank.calibrate import activation_name, activation_rows
from onnx_lowrank.decompose.svd import SVDFactors, full_svd
from onnx_lowrank.errors import InputError
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.passes.factorize import DATA_DEPENDENT
from onnx_lowrank.search.plan import RankPlan

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.1  # chosen by benchmarks/refit.py (see its docstring)
DEFAULT_ANCHOR = "identity"
ANCHORS = ("identity", "covariance")
_COVARIANCE_DAMPING = 0.1
_JITTER = 1e-10  # relative; keeps B positive definite when alpha = 0 and n < in


# ---------------------------------------------------------------------------------------------
# the maths (pure numpy)


@dataclasses.dataclass
class Moments:
    """Second moments of one layer's inputs (float64): G = X^T X, H = X0^T X, K = X0^T X0."""

    g: np.ndarray
    h: np.ndarray
    k: np.ndarray
    rows: int = 0

    @classmethod
    def zeros(cls, features: int) -> Moments:
        return cls(*(np.zeros((features, features)) for _ in range(3)))

    def add(self, x: np.ndarray, x0: np.ndarray, *, chunk: int = 1 << 15) -> None:
        """Accumulate matching rows of the compressed (``x``) and original (``x0``) inputs."""
        if x.shape != x0.shape:
            raise ValueError(f"row blocks differ: {x.shape} vs {x0.shape}")
        for start in range(0, x.shape[0], chunk):
            a = x[start : start + chunk].astype(np.float64)
            b = x0[start : start + chunk].astype(np.float64)
            self.g += a.T @ a
            self.h += b.T @ a
            self.k += b.T @ b
        self.rows += x.shape[0]


def anchor_matrix(moments: Moments, anchor: str) -> np.ndarray:
    """``A = S S^T`` of the anchor metric (see the module docstring)."""
    n = moments.k.shape[0]
    if anchor == "identity":
        return np.eye(n)
    if anchor == "covariance":
        c = moments.k / max(moments.rows, 1)
        scale = float(np.mean(np.diag(c))) or 1.0
        return c + _COVARIANCE_DAMPING * scale * np.eye(n)
    raise ValueError(f"unknown anchor {anchor!r} (known: {', '.join(ANCHORS)})")


def output_error(matrix: np.ndarray, weight: np.ndarray, moments: Moments) -> float:
    """``||X M^T - X0 W^T||^2 / ||X0 W^T||^2`` from the moments (0 when the target is 0)."""
    m = np.asarray(matrix, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    target = float(np.einsum("ij,jk,ik->", w, moments.k, w))
    if target <= 0:
        return 0.0
    fit = float(np.einsum("ij,jk,ik->", m, moments.g, m))
    cross = float(np.einsum("ij,kj,ik->", m, moments.h, w))  # tr(M H^T W^T) = <X M^T, Y>
    return max(fit - 2 * cross + target, 0.0) / target


def refit_factors(
    weight: np.ndarray,
    moments: Moments,
    rank: int,
    *,
    alpha: float = DEFAULT_ALPHA,
    anchor: str = DEFAULT_ANCHOR,
) -> SVDFactors:
    """Rank-``rank`` factors of the ridge-anchored reduced-rank regression (module docstring).

    ``weight`` is the original canonical (out, in) matrix. Factors come back in the weight's
    float type (float64 for float64 weights, else float32); singular values are split evenly
    between them and signs are fixed, like :func:`onnx_lowrank.decompose.svd.truncated_svd`.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    w = np.asarray(weight, dtype=np.float64)
    if not 1 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [1, {min(w.shape)}], got {rank}")
    a = anchor_matrix(moments, anchor)
    scale = float(np.trace(moments.g)) / float(np.trace(a))
    if scale <= 0:  # the layer never sees a non-zero input: only the anchor speaks
        scale, alpha = 1.0, max(alpha, 1.0)
    lam = alpha * scale
    b = moments.g + lam * a
    b = (b + b.T) / 2
    root = _cholesky(b, scale)
    rhs = w @ (moments.h + lam * a)  # (out, in): Y^T X + lambda W A
    # M* R = rhs B^(-1) R = rhs R^(-T): solve R Z = rhs^T, then M* R = Z^T.
    target = np.linalg.solve(root, rhs.T).T
    u, sigma, vt = full_svd(target)
    half = np.sqrt(sigma[:rank])
    left = u[:, :rank] * half
    right = np.linalg.solve(root.T, (half[:, None] * vt[:rank]).T).T  # (Sigma^1/2 V^T) R^(-1)
    dtype = np.float64 if np.asarray(weight).dtype == np.float64 else np.float32
    return SVDFactors(left=left.astype(dtype), right=right.astype(dtype))


def _cholesky(b: np.ndarray, scale: float) -> np.ndarray:
    jitter = _JITTER * scale
    eye = np.eye(b.shape[0])
    for _ in range(6):
        try:
            return np.linalg.cholesky(b + jitter * eye)
        except np.linalg.LinAlgError:
            jitter *= 100
    raise np.linalg.LinAlgError("the refit normal matrix is not positive definite")


# ---------------------------------------------------------------------------------------------
# where the factors live in the compressed model


@dataclasses.dataclass(frozen=True)
class FactorSlot:
    """The two factor initializers of one lowered node and how they store ``L`` and ``R``.

    ``codec`` keys :data:`CODECS`; ``scale`` is Gemm's alpha (folded into the first factor).
    """

    first: str
    second: str
    codec: str
    scale: float = 1.0


def _read_gemm(first, second, slot, layer):
    return second.T, (first / slot.scale).T


def _write_gemm(factors, slot, layer):
    return factors.right.T * slot.scale, factors.left.T


def _read_left(first, second, slot, layer):
    return second, first


def _write_left(factors, slot, layer):
    return factors.right, factors.left


def _read_conv(first, second, slot, layer):
    return second.reshape(second.shape[0], -1), first.reshape(first.shape[0], -1)


def _write_conv(factors, slot, layer):
    kernel = layer.weight_shape[2:]
    cout, cin = layer.weight_shape[:2]
    rank = factors.rank
    return factors.right.reshape(rank, cin, *kernel), factors.left.reshape(cout, rank, *([1] * len(kernel)))


# (read: (first, second) arrays -> (L, R); write: factors -> (first, second) arrays), mirroring
# the svd lowerings of onnx_lowrank.passes.factorize.
CODECS = {
    "gemm": (_read_gemm, _write_gemm),
    "right": (_read_gemm, _write_gemm),  # MatMul x @ W: the Gemm layout with scale 1
    "left": (_read_left, _write_left),
    "conv": (_read_conv, _write_conv),
}
_WEIGHT_INPUT = {"gemm": 1, "right": 1, "left": 0, "conv": 1}  # factor's input index in each node


def _codec(layer: Layer) -> str:
    if layer.op_type == "Conv":
        return "conv"
    if layer.op_type == "Gemm":
        return "gemm"
    return "left" if layer.form == "left" else "right"


def find_slots(original: onnx.ModelProto, compressed: onnx.ModelProto, layer: Layer) -> list[FactorSlot] | str:
    """The factor initializers of each of ``layer``'s nodes in ``compressed``, or why not found.

    The factorize pass keeps each node's output name on its second node, whose hidden input
    comes from the first; both read an initializer named ``<weight>.lowrank.*``.
    """
    labels = {g.node_label(node, i): node for i, node in enumerate(original.graph.node)}
    producers = {out: node for node in compressed.graph.node for out in node.output}
    initializers = {init.name for init in compressed.graph.initializer}
    codec = _codec(layer)
    index = _WEIGHT_INPUT[codec]
    prefix = f"{layer.weight}.lowrank."
    slots = []
    for name in layer.nodes:
        node = labels.get(name)
        if node is None:
            return "node_not_found"
        second = producers.get(node.output[0])
        if second is None or len(second.input) < 2:
            return "factors_not_found"
        hidden = second.input[1 - index]
        first = producers.get(hidden)
        if first is None or len(first.input) < 2:
            return "factors_not_found"
        names = (first.input[index], second.input[index])
        if not all(n in initializers and n.startswith(prefix) for n in names):
            return "factors_not_found"
        scale = float(g.attribute(node, "alpha", 1.0)) if codec == "gemm" else 1.0
        slots.append(FactorSlot(names[0], names[1], codec, scale))
    return slots


def _initializer_arrays(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def read_factors(model: onnx.ModelProto, slot: FactorSlot, layer: Layer) -> SVDFactors:
    """The (L, R) stored in ``slot`` of ``model`` (float64)."""
    inits = _initializer_arrays(model)
    first = numpy_helper.to_array(inits[slot.first]).astype(np.float64)
    second = numpy_helper.to_array(inits[slot.second]).astype(np.float64)
    left, right = CODECS[slot.codec][0](first, second, slot, layer)
    return SVDFactors(left=left, right=right)


def slot_arrays(factors: SVDFactors, slot: FactorSlot, layer: Layer) -> dict[str, np.ndarray]:
    """The initializer values (by name) that store ``factors`` in ``slot``."""
    first, second = CODECS[slot.codec][1](factors, slot, layer)
    return {slot.first: first, slot.second: second}


def write_arrays(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    """Replace main-graph initializers' values in place, keeping their names and dtypes."""
    for init in model.graph.initializer:
        if init.name in arrays:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            value = np.ascontiguousarray(arrays[init.name], dtype=dtype).reshape(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(value, init.name))


# ---------------------------------------------------------------------------------------------
# orchestration


@dataclasses.dataclass(frozen=True)
class LayerRefit:
    """One refit layer: its rank, calibration rows and relative output error before/after.

    Errors are ``||X M^T - X0 W^T||^2 / ||X0 W^T||^2`` on the calibration data (pre-bias
    output, squared, relative), with ``X`` the compressed model's inputs at that point.
    """

    name: str
    rank: int
    rows: int
    error_before: float
    error_after: float
    seconds: float

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "rows": self.rows,
            "rel_sq_error_before": self.error_before,
            "rel_sq_error_after": self.error_after,
            "seconds": round(self.seconds, 4),
        }


@dataclasses.dataclass(frozen=True)
class RefitReport:
    """What the refit did: per layer figures, the layers left alone (with reasons), settings."""

    layers: tuple[LayerRefit, ...]
    skipped: dict[str, str]
    alpha: float
    anchor: str
    samples: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "alpha": self.alpha,
            "anchor": self.anchor,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "layers": [layer.to_json() for layer in self.layers],
            "skipped": dict(self.skipped),
        }


def refit_targets(
    original: onnx.ModelProto, compressed: onnx.ModelProto, layers: list[Layer], plan: RankPlan
) -> tuple[list[tuple[Layer, int, list[FactorSlot]]], dict[str, str]]:
    """The plan's SVD-family layers in graph order with their factor slots; the rest, with reasons."""
    factorized = plan.factorized()
    work, skipped = [], {}
    for layer in layers:
        decision = factorized.get(layer.name)
        if decision is None:
            continue
        if DATA_DEPENDENT.get(decision.method, decision.method) != "svd":
            skipped[layer.name] = f"method_{decision.method}_not_refit"
        elif layer.scope:
            skipped[layer.name] = "in_subgraph"
        elif not layer.supported:
            skipped[layer.name] = layer.skip.code
        else:
            slots = find_slots(original, compressed, layer)
            if isinstance(slots, str):
                skipped[layer.name] = slots
            else:
                work.append((layer, decision.rank, slots))
    for name in factorized:
        if name not in {layer.name for layer in layers}:
            skipped[name] = "layer_not_found"
    return work, skipped


def refit_model(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    layers: list[Layer],
    plan: RankPlan,
    data,
    *,
    alpha: float = DEFAULT_ALPHA,
    anchor: str = DEFAULT_ANCHOR,
    batch_size: int = 32,
    on_layer: Callable[[Layer], None] | None = None,
) -> tuple[onnx.ModelProto, RefitReport]:
    """Refit the factors of ``compressed`` (made from ``original`` by ``plan``) layer by layer.

    ``layers`` are ``find_layers(original)``; ``data`` is a ``validate.data.Dataset`` of
    calibration inputs (e.g. from :func:`onnx_lowrank.calibrate.load_calibration`). Returns a
    copy of ``compressed`` whose graph is identical except the refit factor values, and the
    report. Neither input model is modified. Deterministic (CPU onnxruntime, numpy).
    """
    from onnx_lowrank.validate.capture import CaptureSession

    if alpha < 0:
        raise InputError(f"refit alpha must be >= 0, got {alpha}")
    if anchor not in ANCHORS:
        raise InputError(f"refit anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    if data.n < 1:
        raise InputError("refit needs at least one calibration sample")
    started = time.perf_counter()
    result = onnx.ModelProto()
    result.CopyFrom(compressed)
    work, skipped = refit_targets(original, result, layers, plan)
    for name, reason in skipped.items():
        log.info("refit: %s left as it is (%s)", name, reason)
    if not work:
        return result, RefitReport((), skipped, alpha, anchor, data.n, time.perf_counter() - started)

    labels = {g.node_label(node, i): node for i, node in enumerate(original.graph.node)}
    # The factorize pass keeps each node's input names, so a tensor names the same
    # activation in both models.
    inputs = {
        layer.name: [(labels[n], activation_name(labels[n], layer)) for n in layer.nodes] for layer, _, _ in work
    }
    tensors = sorted({t for pairs in inputs.values() for _, t in pairs})
    factor_names = [name for _, _, slots in work for slot in slots for name in (slot.first, slot.second)]
    reference = CaptureSession(original, tensors, label="refit original")
    current = CaptureSession(result, tensors, overridable=factor_names, label="refit compressed")
    inits = _initializer_arrays(result)
    overrides = {name: numpy_helper.to_array(inits[name]) for name in dict.fromkeys(factor_names)}

    done = []
    for layer, rank, slots in work:
        layer_started = time.perf_counter()
        moments = Moments.zeros(layer.in_features)
        batches = zip(reference.batches(data, batch_size), current.batches(data, batch_size, overrides))
        for before, now in batches:
            for node, tensor in inputs[layer.name]:
                moments.add(activation_rows(now[tensor], node, layer), activation_rows(before[tensor], node, layer))
        weight = weight_matrix(original, layer)
        start = read_factors(result, slots[0], layer).reconstruct()
        factors = refit_factors(weight, moments, rank, alpha=alpha, anchor=anchor)
        error_before = output_error(start, weight, moments)
        error_after = output_error(factors.reconstruct(), weight, moments)
        arrays = {}
        for slot in slots:
            arrays.update(slot_arrays(factors, slot, layer))
        write_arrays(result, arrays)
        inits = _initializer_arrays(result)
        overrides.update({name: numpy_helper.to_array(inits[name]) for name in arrays})
        entry = LayerRefit(
            layer.name, rank, moments.rows, error_before, error_after, time.perf_counter() - layer_started
        )
        done.append(entry)
        log.info(
            "refit %s at rank %d: output error %.4g -> %.4g (%d rows)",
            layer.name, rank, error_before, error_after, moments.rows,
        )
        if on_layer is not None:
            on_layer(layer)
    return result, RefitReport(tuple(done), skipped, alpha, anchor, data.n, time.perf_counter() - started)
