"""``continuous``: softmax weights over candidate ranks, by gradient descent, narrowed in steps.

Data-free; needs torch (imported when the method runs; ``pip install 'onnx-lowrank[torch]'``).

Each candidate layer holds logits over a sampled set of its allowed ranks plus "keep dense";
``p = softmax(logits)``. The loss is the probability-weighted reconstruction error plus a size
penalty on the expected cost of the whole model:

    sum_layers sum_r p_r * err(r)  +  gamma * (sum_layers sum_r p_r * cost(r) / C_dense) ** beta

with ``err(r) = sum_{i>r} s_i^2 / sum_i s_i^2`` computed from the singular values (no
reconstruction is formed) and ``cost`` in the budget's unit (dense for "keep"). After Adam
converges, each layer's most probable rank ``r`` becomes the centre of a narrower window
``[r - s/2, r + s/2]`` sampled with the finer step ``s / f``; this repeats until the step is 1.

``gamma`` (0 = budget-driven) is bisected on a log scale until the plan fits the budget (each
round tries a grid of gammas as one batched problem); the
leftover budget is then spent greedily (``fill``). Seeded and deterministic: float64 on the
CPU, a seeded generator for the logits' initial noise, deterministic algorithms.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onnx_lowrank.errors import BudgetError, OptionError
from onnx_lowrank.search import allocate
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.global_rank import curves as build_curves
from onnx_lowrank.search.global_rank import tail_errors
from onnx_lowrank.search.method import OptionSpec, SearchContext, SearchMethod
from onnx_lowrank.search.plan import LayerDecision

log = logging.getLogger(__name__)

_GAMMA_RANGE = (1e-5, 1e5)
_GRID = 12  # gammas tried per bisection round, solved as one batch
_ROUNDS = 3


def _torch():
    try:
        import torch
    except ImportError:
        raise OptionError("method 'continuous' needs torch: pip install 'onnx-lowrank[torch]'") from None
    return torch


def search(ctx: SearchContext, budget: Budget) -> dict[str, LayerDecision]:
    torch = _torch()
    key = ("continuous", budget.kind)
    if key not in ctx.memo:
        ctx.memo[key] = build_curves(ctx, budget.kind, tail_errors)
    curves: list[allocate.Curve] = ctx.memo[key]
    dense_total, limit = allocate.budget_limit(ctx, list(ctx.candidates), budget)
    floor = allocate.minimum_cost(curves)
    if floor > limit * (1 + 1e-9):
        allocate.allocate(curves, limit, what=budget.kind)  # raises the standard BudgetError
    solver = _Solver(torch, curves, dense_total, ctx.options, ctx.seed)
    gamma = ctx.options["gamma"]
    if gamma > 0:
        states = solver.solve([gamma])[0]
        if allocate.plan_cost(curves, states) > limit * (1 + 1e-9):
            raise BudgetError(
                f"--option gamma={gamma:g} gives a plan over the {budget.kind} budget; raise gamma or use gamma=0 "
                "(found by bisection)"
            )
    else:
        states = _bisect(solver, curves, limit)
    if ctx.options["fill"]:
        states = allocate.fill(curves, states, limit)
    return {
        candidate.name: allocate.decision(ctx, candidate, None if state == allocate.DENSE else int(candidate.ranks[state]))
        for candidate, state in zip(ctx.candidates, states)
    }


def _bisect(solver: _Solver, curves: list[allocate.Curve], limit: float) -> list[int]:
    """States for the smallest gamma whose plan fits ``limit``.

    A bisection on log(gamma) that tests ``_GRID`` values per round, solved together as one
    batch: three rounds narrow the bracket ~1000-fold for the price of three solves.
    """
    low, high = (math.log(g) for g in _GAMMA_RANGE)
    best = None
    for _ in range(_ROUNDS):
        grid = np.linspace(low, high, _GRID)
        solutions = solver.solve(np.exp(grid))
        fits = [allocate.plan_cost(curves, states) <= limit * (1 + 1e-9) for states in solutions]
        if not any(fits):
            break
        first = fits.index(True)
        best = solutions[first]
        if first == 0:
            break
        low, high = grid[first - 1], grid[first]
    if best is None:  # even the largest penalty leaves a layer above its cheapest rank
        return [c.cheapest() for c in curves]
    log.info("continuous: gamma %.4g meets the budget", math.exp(high))
    return best


class _Solver:
    """The multi-step softmax search, for a batch of gammas at once (independent problems)."""

    def __init__(self, torch, curves: list[allocate.Curve], dense_total: float, options, seed: int):
        self.torch = torch
        self.curves = curves
        self.scale = dense_total or 1.0
        self.beta = options["beta"]
        self.factor = options["factor"]
        self.first_step = options["step"]
        self.iterations = options["iterations"]
        self.lr = options["lr"]
        self.seed = seed

    def solve(self, gammas) -> list[list[int]]:
        """Most probable state per layer, per gamma, after narrowing down to step 1."""
        gammas = np.atleast_1d(np.asarray(gammas, dtype=np.float64))
        sizes = [len(c.ranks) for c in self.curves]
        step = self.first_step or max(1, max(sizes, default=1) // 16)
        windows = [[self._window(n, 0, n - 1, step) for n in sizes] for _ in gammas]
        while True:
            chosen = self._optimize(gammas, windows)
            if step == 1:
                return chosen
            finer = max(1, step // self.factor)
            windows = [
                [self._window(n, *self._around(state, n, step), finer) for n, state in zip(sizes, states)]
                for states in chosen
            ]
            step = finer

    @staticmethod
    def _around(state: int, size: int, step: int) -> tuple[int, int]:
        centre = size - 1 if state == allocate.DENSE else state  # "dense" continues from the top rank
        half = max(1, step // 2)
        return max(0, centre - half), min(size - 1, centre + half)

    @staticmethod
    def _window(size: int, first: int, last: int, step: int) -> list[int]:
        """``DENSE`` plus rank indices first..last every ``step`` (last always included)."""
        if size == 0:
            return [allocate.DENSE]
        picks = list(range(first, last + 1, step))
        if picks[-1] != last:
            picks.append(last)
        return [allocate.DENSE, *picks]

    def _optimize(self, gammas: np.ndarray, windows: list[list[list[int]]]) -> list[list[int]]:
        torch = self.torch
        shape = (len(gammas), len(self.curves), max(len(w) for per_gamma in windows for w in per_gamma))
        errors, costs, mask = np.zeros(shape), np.zeros(shape), np.zeros(shape, dtype=bool)
        for g, per_gamma in enumerate(windows):
            for row, (curve, window) in enumerate(zip(self.curves, per_gamma)):
                for column, state in enumerate(window):
                    errors[g, row, column] = curve.error(state)
                    costs[g, row, column] = curve.cost(state) / self.scale
                    mask[g, row, column] = True
        generator = torch.Generator().manual_seed(self.seed)
        with _deterministic(torch):
            e, c, m = torch.from_numpy(errors), torch.from_numpy(costs), torch.from_numpy(mask)
            weight = torch.from_numpy(gammas)
            logits = (1e-3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
            optimizer = torch.optim.Adam([logits], lr=self.lr)
            for _ in range(self.iterations):
                optimizer.zero_grad()
                p = torch.softmax(logits.masked_fill(~m, -math.inf), dim=2)
                size = (p * c).sum(dim=(1, 2)).clamp_min(0)
                loss = (p * e).sum() + (weight * size**self.beta).sum()
                loss.backward()
                optimizer.step()
            best = logits.detach().masked_fill(~m, -math.inf).argmax(dim=2).tolist()
        return [[w[col] for w, col in zip(per_gamma, row)] for per_gamma, row in zip(windows, best)]


class _deterministic:
    """Deterministic algorithms and one thread for a block, restoring the caller's settings."""

    def __init__(self, torch):
        self.torch = torch

    def __enter__(self):
        self.previous = self.torch.are_deterministic_algorithms_enabled()
        self.threads = self.torch.get_num_threads()
        self.torch.use_deterministic_algorithms(True)
        self.torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and noise)

    def __exit__(self, *exc):
        self.torch.use_deterministic_algorithms(self.previous)
        self.torch.set_num_threads(self.threads)


METHOD = SearchMethod(
    name="continuous",
    search=search,
    description="data-free; softmax weights over candidate ranks by gradient descent, narrowed step by step (torch)",
    options={
        "gamma": OptionSpec(float, 0.0, "size-penalty weight; 0 = bisected until the budget is met", minimum=0.0),
        "beta": OptionSpec(float, 2.0, "exponent of the size penalty", minimum=1.0),
        "factor": OptionSpec(int, 4, "the candidate step shrinks by this factor each round", minimum=2),
        "step": OptionSpec(int, 0, "initial step between candidate ranks (in allowed ranks); 0 = ~16 candidates", minimum=0),
        "iterations": OptionSpec(int, 100, "Adam steps per round", minimum=1),
        "lr": OptionSpec(float, 0.1, "Adam learning rate", minimum=0.0),
        "fill": OptionSpec(bool, True, "spend the budget left after bisection greedily"),
    },
    requires=("torch",),
)
