"""compress_to_floor on a planted model: what it compresses, isolation, determinism, cache."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank import calibrate
from onnx_lowrank.errors import FloorNotMet
from onnx_lowrank.floor import compress_to_floor, parse_floors, split_dataset
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search.cache import Cache

MIN = 1024


def run(model, data, floors, **kw):
    kw.setdefault("min_params", MIN)
    return compress_to_floor(model, find_layers(model), data, parse_floors(floors), **kw)


def test_compresses_the_low_rank_layer_and_keeps_the_fragile_one(planted):
    _, _, model, data = planted
    result = run(model, data, ["top1-agreement=0.98"])
    low, frag = result.plan.layers["low"], result.plan.layers["frag"]
    assert low.action == "factorize" and 4 <= low.rank <= 8
    assert frag.action == "keep"
    floor = result.report
    assert floor["held_back"]["passed"] and floor["held_back"]["realized"]["top1_agreement"] >= 0.98
    assert floor["split"]["held_back"]["samples"] == 60 and floor["split"]["calibration"]["samples"] == 140
    assert floor["layers"]["frag"]["action"] == "keep" and "floor" in floor["layers"]["frag"]["reason"]
    assert floor["curve"][0]["cost_kept"] == 1.0 and len(floor["curve"]) > 2


def test_greedy_baseline_runs_and_holds(planted):
    _, _, model, data = planted
    result = run(model, data, ["top1-agreement=0.98"], method="greedy")
    assert result.plan.layers["frag"].action == "keep"
    assert result.report["held_back"]["realized"]["top1_agreement"] >= 0.98


def test_impossible_floor_names_the_closest_point(planted):
    _, _, model, data = planted
    with pytest.raises(FloorNotMet) as info:
        run(model, data, ["rel-error=1e-12"])
    message = str(info.value)
    assert "no compression keeps relative error <= 1e-12" in message
    assert "the closest:" in message and "fewer parameters" in message and "\n" not in message


def test_search_never_sees_the_held_back_part(planted, monkeypatch):
    _, _, model, data = planted
    split = split_dataset(data, 0.3, 0)
    seen = []
    real_probe, real_capture = calibrate.OutputProbe.__init__, calibrate.capture_covariances

    def probe(self, model, layers, data, **kw):
        seen.append(data.sha256)
        real_probe(self, model, layers, data, **kw)

    def capture(model, layers, data, **kw):
        seen.append(data.sha256)
        return real_capture(model, layers, data, **kw)

    monkeypatch.setattr(calibrate.OutputProbe, "__init__", probe)
    monkeypatch.setattr(calibrate, "capture_covariances", capture)
    run(model, data, ["top1-agreement=0.98"], seed=0, holdout=0.3)
    assert seen and set(seen) == {split.calibration.sha256}
    assert split.held_back.sha256 not in seen


def test_deterministic(planted):
    _, _, model, data = planted
    a = run(model, data, ["cosine=0.99"], seed=3)
    b = run(model, data, ["cosine=0.99"], seed=3)
    assert a.plan.to_json() == b.plan.to_json()
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.report["split"] == b.report["split"]


def test_second_floor_reuses_the_cached_analysis(planted, tmp_path, monkeypatch):
    _, _, model, data = planted
    cache = Cache(tmp_path / "cache")
    first = run(model, data, ["top1-agreement=0.98"], cache=cache, model_sha256="planted")
    assert first.table.evaluated > 0 and first.table.cached == 0
    runs = []
    real = calibrate.OutputProbe.outputs

    def counting(self, subs):
        runs.append(len(subs))
        return real(self, subs)

    monkeypatch.setattr(calibrate.OutputProbe, "outputs", counting)
    second = run(model, data, ["cosine=0.95"], cache=cache, model_sha256="planted")
    assert second.table.evaluated == 0 and second.table.cached == first.table.planned
    # only whole-model verifications ran (several layers substituted), no single-layer evaluation
    assert all(n >= 1 for n in runs) and len(runs) <= 16


def test_split_is_deterministic_and_disjoint(planted):
    _, _, _, data = planted
    a, b = split_dataset(data, 0.25, 7), split_dataset(data, 0.25, 7)
    assert a.calibration.sha256 == b.calibration.sha256 and a.held_back.n == 50
    rows = {tuple(r) for r in a.calibration.feeds["x"]}
    assert not rows & {tuple(r) for r in a.held_back.feeds["x"]}
    assert np.array_equal(a.held_back.labels, b.held_back.labels)
