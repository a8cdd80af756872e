"""Cache, method registry (plugins), budgets parsing and the rank guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from onnx_lowrank.errors import BudgetError, OptionError
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import engine, parse_budget, plan_totals, prepare_search, registry, run_search
from onnx_lowrank.search.budget import Budget
from onnx_lowrank.search.cache import CACHE_ENV, Cache, default_cache_dir, open_cache
from onnx_lowrank.search.guard import LatencyTable, LayerLatency, apply_latency_guard, enforce, rank_lattice
from onnx_lowrank.search.method import SearchMethod
from onnx_lowrank.search.plan import LayerDecision


def test_second_run_reads_spectra_from_the_cache(mlp_model, tmp_path, monkeypatch):
    calls = []
    original = engine.spectrum
    monkeypatch.setattr(engine, "spectrum", lambda matrix: calls.append(matrix.shape) or original(matrix))
    layers = find_layers(mlp_model)
    first = prepare_search(mlp_model, layers, min_params=0, cache=Cache(tmp_path), model_sha256="m1")
    assert len(calls) == 3
    second_cache = Cache(tmp_path)
    second = prepare_search(mlp_model, layers, min_params=0, cache=second_cache, model_sha256="m1")
    assert len(calls) == 3, "a cache hit must not recompute the SVD"
    assert second_cache.stats.hits == 3 and second_cache.stats.misses == 0
    for a, b in zip(first.candidates, second.candidates):
        np.testing.assert_array_equal(a.spectrum.values, b.spectrum.values)
    # Another model hash (or weight) is another entry.
    prepare_search(mlp_model, layers, min_params=0, cache=Cache(tmp_path), model_sha256="m2")
    assert len(calls) == 6


def test_calibrated_measurements_are_cached(mlp_model, tmp_path):
    from onnx_lowrank.validate.data import Dataset

    layers = find_layers(mlp_model)
    data = Dataset({"x": np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)}, source="t")
    plans = []
    for _ in range(2):
        cache = Cache(tmp_path)
        ctx = prepare_search(mlp_model, layers, min_params=0, cache=cache, calibration=data, model_sha256="m")
        plans.append(run_search(ctx, "calibrated", parse_budget("params=0.4")))
    assert plans[0] == plans[1]
    assert cache.stats.misses == 0
    assert ctx.calibration._covariances is None, "a full cache hit captures no activations"


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert open_cache().directory == tmp_path / "env"
    assert open_cache(tmp_path / "flag").directory == tmp_path / "flag"
    assert not open_cache(enabled=False).enabled
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-2:] == (".cache", "onnx-lowrank")


def test_unreadable_cache_entry_is_recomputed(tmp_path):
    cache = Cache(tmp_path)
    value = cache.array("spectra", "g", {"k": 1}, lambda: np.arange(3.0))
    for path in tmp_path.rglob("*.npy"):
        path.write_bytes(b"garbage")
    again = Cache(tmp_path).array("spectra", "g", {"k": 1}, lambda: np.arange(3.0))
    np.testing.assert_array_equal(value, again)


@dataclasses.dataclass
class FakeEntryPoint:
    name: str
    value: str
    loader: object

    def load(self):
        if isinstance(self.loader, Exception):
            raise self.loader
        return self.loader


def _keep_all(ctx, budget):
    del budget
    return {c.name: LayerDecision("keep", reason="plugin") for c in ctx.candidates}


def test_plugins_load_and_broken_ones_are_unavailable(monkeypatch, mlp_model):
    good = SearchMethod("whatever", _keep_all, "keeps everything")
    monkeypatch.setattr(
        registry,
        "_entry_points",
        lambda: [
            FakeEntryPoint("broken", "pkg.broken:METHOD", ImportError("No module named 'pkg'")),
            FakeEntryPoint("wrong", "pkg.wrong:METHOD", 42),
            FakeEntryPoint("keeper", "pkg.keeper:METHOD", lambda: good),
            FakeEntryPoint("global", "pkg.clash:METHOD", good),
        ],
    )
    entries = registry.discover()
    assert entries["keeper"].available and entries["keeper"].method.name == "keeper"
    assert not entries["broken"].available and "No module named 'pkg'" in entries["broken"].error
    assert not entries["wrong"].available and "not a SearchMethod" in entries["wrong"].error
    assert entries["global"].origin == "built-in"
    assert not entries["global@pkg.clash"].available
    with pytest.raises(OptionError, match="unavailable"):
        registry.get_method("broken")
    with pytest.raises(OptionError, match="unknown search method"):
        registry.get_method("nope")
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    plan = run_search(ctx, "keeper", parse_budget("params=1.0"))
    assert plan.method == "keeper" and not plan.factorized()
    with pytest.raises(BudgetError, match="over the budget"):
        run_search(ctx, "keeper", parse_budget("params=0.5"))


def test_continuous_is_unavailable_without_torch(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    entry = registry.discover()["continuous"]
    assert not entry.available and "torch" in entry.error and "onnx-lowrank[torch]" in entry.error


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("params=0.4", Budget("params", fraction=0.4)),
        ("flops=50%", Budget("flops", fraction=0.5)),
        ("params=1.5M", Budget("params", absolute=1.5e6)),
        ("latency-ms=0.8", Budget("latency-ms", absolute=0.8)),
        ("latency-ms=60%", Budget("latency-ms", fraction=0.6)),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["latency-ms=1k", "latency-ms=0", "latency=0.5", "params=0", "params="])
def test_bad_budgets_name_the_flag(text):
    with pytest.raises(OptionError, match="--budget"):
        parse_budget(text)


def test_rank_multiple_limits_the_ranks(mlp_model):
    layers = find_layers(mlp_model)
    fc1 = layers[0]  # 64 x 32: break-even 21.3
    assert rank_lattice(fc1, 1).tolist() == list(range(1, 22))
    assert rank_lattice(fc1, 8).tolist() == [8, 16]
    ctx = prepare_search(mlp_model, layers, min_params=0, rank_multiple=8)
    plan = run_search(ctx, "global", parse_budget("params=0.5"))
    for decision in plan.factorized().values():
        assert decision.rank % 8 == 0


def _fake_timer(model, feeds, provider):
    """A layer is 1 ms dense; factorized it costs 0.05 ms per rank (slower above rank 20)."""
    del feeds, provider
    hidden = [init for init in model.graph.initializer if init.name.endswith(".lowrank.0")]
    if not hidden:
        return 1.0
    rank = min(hidden[0].dims)
    return 0.05 * rank


def test_latency_guard_and_latency_budget(mlp_model):
    layers = find_layers(mlp_model, {"x": (4, 32)})
    ctx = prepare_search(mlp_model, layers, min_params=0, provider="cpu", rank_multiple=4, timer=_fake_timer)
    for candidate in ctx.candidates:
        assert candidate.ranks.max(initial=0) < 20, "ranks measured slower than dense are not allowed"
        assert all(r % 4 == 0 for r in candidate.ranks)
    assert ctx.latency.ms(ctx.candidates[0].layer, None) == pytest.approx(1.0)
    plan = run_search(ctx, "global", parse_budget("latency-ms=1.5"))
    totals = plan_totals(ctx, plan)
    assert totals["latency_ms_dense"] == pytest.approx(3.0)
    assert totals["latency_ms_planned"] <= 1.5 + 1e-9
    for decision in plan.factorized().values():
        assert decision.predicted["latency_ms"] < decision.predicted["dense_latency_ms"]
    energy_plan = run_search(ctx, "energy", parse_budget("latency-ms=50%"))
    assert plan_totals(ctx, energy_plan)["latency_ms_planned"] <= 1.5 + 1e-9


def test_latency_budget_needs_a_provider(mlp_model):
    ctx = prepare_search(mlp_model, find_layers(mlp_model), min_params=0)
    with pytest.raises(OptionError, match="--provider"):
        run_search(ctx, "global", parse_budget("latency-ms=1"))


def test_guard_blocks_layers_that_are_never_faster(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=0)
    slow = LayerLatency(dense_ms=1.0, ranks=(1, 21), ms=(1.5, 3.0))
    table = LatencyTable("CPUExecutionProvider", "test", {c.name: slow for c in ctx.candidates})
    guarded = apply_latency_guard(list(ctx.candidates), table)
    assert all(len(c.ranks) == 0 and c.blocked == "latency_guard" for c in guarded)
    # Plugins' ranks are snapped down onto the allowed ranks, or the layer is kept.
    decisions = {"fc1": LayerDecision("factorize", rank=13), "fc2": LayerDecision("factorize", rank=3)}
    candidates = [dataclasses.replace(c, ranks=np.array([4, 8, 12])) for c in ctx.candidates]
    fixed = enforce(decisions, candidates)
    assert fixed["fc1"].rank == 12 and fixed["fc2"].action == "keep"


def test_a_layer_without_any_allowed_rank_still_counts_its_dense_latency(mlp_model):
    """With a rank multiple above a small layer's break-even, the layer stays dense, and a
    latency budget still prices it (it used to fail with 'no latency measurement')."""
    layers = find_layers(mlp_model, {"x": (4, 32)})
    ctx = prepare_search(mlp_model, layers, min_params=0, provider="cpu", rank_multiple=16, timer=_fake_timer)
    stuck = [c for c in ctx.candidates if len(c.ranks) == 0]
    assert stuck, "the planted model needs a layer whose break-even is below 16"
    for candidate in stuck:
        assert ctx.latency.ms(candidate.layer, None) == pytest.approx(1.0)
    plan = run_search(ctx, "global", parse_budget("latency-ms=90%"))
    assert all(plan.layers[c.name].action == "keep" for c in stuck)


def test_budget_below_the_untouchable_layers_says_so(mlp_model):
    layers = find_layers(mlp_model)
    ctx = prepare_search(mlp_model, layers, min_params=1000)  # fc2 (32 x 6) is below it
    with pytest.raises(BudgetError, match="below --min-params alone keep"):
        run_search(ctx, "global", parse_budget("params=2"))
