"""Rank selection across decompositions (svd, tucker, tt) by one common weight-error bound.

For every candidate layer, each allowed method offers options (ranks with their stored values,
FLOPs and relative Frobenius error of the weight). For an error bound eps each layer takes the
cheapest option whose error is <= eps, or stays dense when nothing is cheaper than the dense
weight. With a budget, eps is bisected until the plan fits. With several methods (``auto``)
each layer thereby gets whichever decomposition reaches its error target with the fewest
parameters (or FLOPs, following the budget).

SVD's options are every rank; Tucker-2 / channel-TT options come from a grid of per-mode
truncations (their error is computed exactly); TT-matrix options from a grid of TT-SVD error
bounds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx

from onnx_lowrank.decompose.svd import Spectrum, spectrum
from onnx_lowrank.decompose.tt import TTErrorBound, TTRank, tt_conv, tt_matrix
from onnx_lowrank.errors import BudgetError, OptionError
from onnx_lowrank.layers import Layer, weight_matrix
from onnx_lowrank.passes.tensor_lowerings import tt_dims
from onnx_lowrank.search.plan import LayerDecision

log = logging.getLogger(__name__)

METHODS = ("svd", "tucker", "tt")
# Relative weight errors at which Tucker / TT options are generated.
ERROR_GRID = tuple(float(e) for e in np.concatenate([[0.0], np.geomspace(1e-3, 0.95, 23)]))


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to store a layer: method, rank(s), stored values, FLOPs, weight error."""

    method: str
    params: int
    flops: int | None
    rel_error: float
    rank: int | None = None
    ranks: tuple[int, ...] | None = None
    options: dict = dataclasses.field(default_factory=dict)

    def cost(self, kind: str) -> float:
        return float(self.params if kind == "params" else self.flops)

    def decision(self) -> LayerDecision:
        predicted = {"params": self.params, "rel_error": round(self.rel_error, 6)}
        if self.flops is not None:
            predicted["flops"] = self.flops
        return LayerDecision(
            "factorize", method=self.method, rank=self.rank, ranks=self.ranks, predicted=predicted, options=self.options
        )


def methods_for(layer: Layer, methods: Iterable[str]) -> list[str]:
    """The requested methods that can lower this layer."""
    allowed = {"Conv": ("svd", "tucker", "tt"), "Gemm": ("svd", "tt"), "MatMul": ("svd", "tt")}[layer.op_type]
    # Tucker-2 of a matrix is its truncated SVD: for Linear layers "tucker" means svd.
    requested = ["svd" if m == "tucker" and layer.op_type != "Conv" else m for m in methods]
    chosen = list(dict.fromkeys(m for m in requested if m in allowed))
    if layer.form == "left":
        chosen = [m for m in chosen if m == "svd"]
    return chosen


def layer_options(model: onnx.ModelProto, layer: Layer, methods: Iterable[str]) -> list[Option]:
    """Every option the given methods offer for ``layer``, cheapest first."""
    matrix = weight_matrix(model, layer).astype(np.float64)
    options: list[Option] = []
    for method in methods_for(layer, methods):
        options.extend(_OPTION_BUILDERS[(method, "conv" if layer.op_type == "Conv" else "linear")](matrix, layer))
    return sorted(options, key=lambda o: (o.params, o.rel_error))


def _flops(layer: Layer, params: int) -> int | None:
    # Every factor is applied once per token (output position for convs at stride 1).
    return None if layer.tokens is None else 2 * layer.tokens * params


def _svd_options(matrix: np.ndarray, layer: Layer) -> list[Option]:
    values: Spectrum = spectrum(matrix)
    return [
        Option("svd", layer.factor_params(r), layer.factor_flops(r), values.relative_error(r), rank=r)
        for r in range(1, layer.max_rank + 1)
    ]


def _mode_ranks(kernel: np.ndarray) -> list[tuple[int, int]]:
    """(r_out, r_in) pairs that discard at most eps^2/2 of the energy in each mode, per eps."""
    cout, cin = kernel.shape[:2]
    s_out = np.linalg.svd(kernel.reshape(cout, -1), compute_uv=False) ** 2
    s_in = np.linalg.svd(np.moveaxis(kernel, 1, 0).reshape(cin, -1), compute_uv=False) ** 2
    total = float(s_out.sum()) or 1.0
    pairs = []
    for eps in ERROR_GRID:
        pairs.append((_rank_with_tail(s_out, total, eps**2 / 2), _rank_with_tail(s_in, total, eps**2 / 2)))
    return sorted(set(pairs))


def _rank_with_tail(squares: np.ndarray, total: float, tail: float) -> int:
    tails = np.concatenate([np.cumsum(squares[::-1])[::-1], [0.0]]) / total  # tails[r] = sum_{i>=r}
    return max(1, int(np.argmax(tails <= tail + 1e-15)))


def _conv_chain_params(layer: Layer, r_out: int, r_in: int) -> int:
    cout, cin, *spatial = layer.weight_shape
    return cin * r_in + r_out * r_in * math.prod(spatial) + cout * r_out


def _tucker_options(matrix: np.ndarray, layer: Layer) -> list[Option]:
    from onnx_lowrank.decompose.tucker import TuckerRank, tucker2

    kernel = matrix.reshape(layer.weight_shape)
    norm = float(np.linalg.norm(kernel)) or 1.0
    options = []
    for r_out, r_in in _mode_ranks(kernel):
        factors = tucker2(kernel, TuckerRank(r_out, r_in))  # HOSVD; the lowering adds HOOI sweeps
        error = float(np.linalg.norm(factors.reconstruct() - kernel)) / norm
        r_out, r_in = factors.ranks.r_out, factors.ranks.r_in
        params = _conv_chain_params(layer, r_out, r_in)
        options.append(Option("tucker", params, _flops(layer, params), error, ranks=(r_out, r_in)))
    return options


def _tt_conv_options(matrix: np.ndarray, layer: Layer) -> list[Option]:
    kernel = matrix.reshape(layer.weight_shape)
    norm = float(np.linalg.norm(kernel)) or 1.0
    options = []
    for r_out, r_in in _mode_ranks(kernel):
        factors = tt_conv(kernel, TTRank((1, r_in, r_out, 1)))
        error = float(np.linalg.norm(factors.reconstruct() - kernel)) / norm
        _, r1, r2, _ = factors.ranks
        params = _conv_chain_params(layer, r2, r1)
        options.append(Option("tt", params, _flops(layer, params), error, ranks=(r1, r2)))
    return options


def _tt_linear_options(matrix: np.ndarray, layer: Layer) -> list[Option]:
    out_dims, in_dims = tt_dims(layer)
    norm = float(np.linalg.norm(matrix)) or 1.0
    options = []
    seen = set()
    for eps in ERROR_GRID:
        bound = TTRank.full([o * i for o, i in zip(out_dims, in_dims)]) if eps == 0 else TTErrorBound(eps)
        factors = tt_matrix(matrix, out_dims, in_dims, bound)
        if factors.ranks in seen:
            continue
        seen.add(factors.ranks)
        error = float(np.linalg.norm(factors.reconstruct() - matrix)) / norm
        flops = None if layer.tokens is None else factors.flops(layer.tokens)
        dims = {"out_dims": list(out_dims), "in_dims": list(in_dims)}
        options.append(Option("tt", factors.params, flops, error, ranks=tuple(factors.ranks), options=dims))
    return options


_OPTION_BUILDERS: dict[tuple[str, str], Callable[[np.ndarray, Layer], list[Option]]] = {
    ("svd", "conv"): _svd_options,
    ("svd", "linear"): _svd_options,
    ("tucker", "conv"): _tucker_options,
    ("tt", "conv"): _tt_conv_options,
    ("tt", "linear"): _tt_linear_options,
}


def choose(layer: Layer, options: list[Option], eps: float, kind: str) -> Option | None:
    """The cheapest option with error <= ``eps`` that beats the dense layer, or None."""
    dense = float(layer.params if kind == "params" else layer.flops)
    best = None
    for option in options:
        if option.rel_error <= eps + 1e-12 and option.cost(kind) < dense:
            if best is None or option.cost(kind) < best.cost(kind):
                best = option
    return best


def plan_error(table: dict[Layer, list[Option]], eps: float, kind: str = "params") -> dict[str, LayerDecision]:
    """Decisions for a common error bound ``eps``."""
    decisions = {}
    for layer, options in table.items():
        option = choose(layer, options, eps, kind)
        decisions[layer.name] = option.decision() if option else LayerDecision("keep", reason="no_cheaper_option")
    return decisions


def _cost(table, eps, kind) -> float:
    total = 0.0
    for layer, options in table.items():
        option = choose(layer, options, eps, kind)
        total += option.cost(kind) if option else float(layer.params if kind == "params" else layer.flops)
    return total


def search_error_bound(
    table: dict[Layer, list[Option]], kind: str, limit: float, *, fixed_cost: float = 0.0
) -> tuple[dict[str, LayerDecision], float]:
    """The smallest common error bound whose plan costs at most ``limit`` (fixed cost included)."""
    if kind == "flops" and any(layer.flops is None for layer in table):
        raise OptionError("a FLOP budget needs static shapes; pin dynamic dimensions with --input-shape")
    errors = sorted({o.rel_error for options in table.values() for o in options} | {1.0})
    budget = limit - fixed_cost
    if _cost(table, errors[-1], kind) > budget:
        smallest = _cost(table, errors[-1], kind) + fixed_cost
        raise BudgetError(f"budget {kind} <= {limit:.0f} cannot be met: the smallest factorization keeps {smallest:.0f}")
    low, high = 0, len(errors) - 1  # cost is non-increasing in eps: find the smallest eps that fits
    while low < high:
        middle = (low + high) // 2
        if _cost(table, errors[middle], kind) <= budget:
            high = middle
        else:
            low = middle + 1
    eps = errors[low]
    return plan_error(table, eps, kind), eps


def fixed_rank_decision(model: onnx.ModelProto, layer: Layer, method: str, rank: int | None) -> LayerDecision:
    """``method`` at a uniform rank cap (``None``: full rank, ignoring break-even)."""
    if method == "svd":
        r = layer.max_rank if rank is None else min(rank, layer.max_rank)
        if rank is not None and r >= layer.break_even_rank:
            return LayerDecision("keep", reason="above_break_even")
        return LayerDecision("factorize", method="svd", rank=r, predicted={"params": layer.factor_params(r)})
    if layer.op_type == "Conv":
        cout, cin = layer.weight_shape[:2]
        ranks = (cout, cin) if method == "tucker" else (cin, cout)
        if rank is not None:
            ranks = (min(rank, ranks[0]), min(rank, ranks[1]))
        r_first, r_second = (ranks[1], ranks[0]) if method == "tucker" else ranks
        params = _conv_chain_params(layer, r_second, r_first)
        if rank is not None and params >= layer.params:
            return LayerDecision("keep", reason="above_break_even")
        return LayerDecision("factorize", method=method, ranks=ranks, predicted={"params": params})
    out_dims, in_dims = tt_dims(layer)
    modes = [o * i for o, i in zip(out_dims, in_dims)]
    full = TTRank.full(modes).ranks
    ranks = full if rank is None else tuple(min(rank, f) for f in full)
    factors_params = sum(ranks[k] * modes[k] * ranks[k + 1] for k in range(len(modes)))
    if rank is not None and factors_params >= layer.params:
        return LayerDecision("keep", reason="above_break_even")
    dims = {"out_dims": list(out_dims), "in_dims": list(in_dims)}
    return LayerDecision("factorize", method="tt", ranks=tuple(ranks), predicted={"params": factors_params}, options=dims)


def plan_with_methods(
    model: onnx.ModelProto,
    layers: list[Layer],
    request,
    methods: tuple[str, ...],
    *,
    min_params: int,
    model_sha256: str | None = None,
    on_layer: Callable[[Layer], None] | None = None,
):
    """Like :func:`onnx_lowrank.search.plan_for`, choosing among ``methods`` per layer."""
    from onnx_lowrank.search import BudgetRequest, EnergyRequest, FullRankRequest, RankRequest
    from onnx_lowrank.search.analysis import candidate_layers
    from onnx_lowrank.search.budget import layer_cost
    from onnx_lowrank.search.energy import make_plan

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise OptionError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    floor = 0 if isinstance(request, FullRankRequest) else min_params
    candidates = [layer for layer in candidate_layers(layers, min_params=floor) if methods_for(layer, methods)]
    fixed = [layer for layer in layers if layer.supported and layer not in candidates]
    options: dict = {"min_params": floor, "methods": list(methods)}
    budget = None
    if isinstance(request, (RankRequest, FullRankRequest)):
        if len(methods) > 1:
            raise OptionError("--rank with several methods is ambiguous: pick one --method")
        rank = request.rank if isinstance(request, RankRequest) else None
        decisions = {}
        for layer in candidates:
            decisions[layer.name] = fixed_rank_decision(model, layer, methods_for(layer, methods)[0], rank)
            if on_layer is not None:
                on_layer(layer)
        options["rank"] = rank if rank is not None else "full"
    else:
        table = {}
        for layer in candidates:
            table[layer] = layer_options(model, layer, methods)
            if on_layer is not None:
                on_layer(layer)
        if isinstance(request, EnergyRequest):
            eps = math.sqrt(max(0.0, 1.0 - request.energy))
            decisions = plan_error(table, eps)
        elif isinstance(request, BudgetRequest):
            budget = request.budget
            kind = budget.kind
            if kind not in ("params", "flops"):
                raise OptionError(f"{kind} budgets are not supported with --method {','.join(methods)}")
            fixed_cost = sum(layer_cost(layer, None, kind) for layer in fixed)
            dense = sum(layer_cost(layer, None, kind) for layer in candidates) + fixed_cost
            decisions, eps = search_error_bound(table, kind, budget.limit(dense), fixed_cost=fixed_cost)
        else:
            raise OptionError(f"unsupported request {type(request).__name__}")
        options["error_bound"] = round(eps, 9)
    method = "auto" if len(methods) > 1 else methods[0]
    return make_plan(layers, decisions, min_params=floor, method=method, budget=budget, options=options, model_sha256=model_sha256)
