"""refit_model on small ONNX graphs, checked on onnxruntime outputs."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.refit import refit_model
from onnx_lowrank.search.plan import LayerDecision, RankPlan
from onnx_lowrank.validate.capture import capture
from onnx_lowrank.validate.data import Dataset

FLOAT = onnx.TensorProto.FLOAT


def _model(nodes, inits, in_shape, out_shape):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", FLOAT, out_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _low_rank(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r * n)


def _single_layer(op, rng, rank):
    if op == "Gemm":  # transB=1, alpha != 1, with a bias
        w = _low_rank(rng, 24, 32, rank)
        node = helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1, alpha=0.5)
        return _model([node], {"W": w, "b": rng.standard_normal(24)}, [None, 32], [None, 24]), (32,)
    if op == "MatMul":
        w = _low_rank(rng, 24, 32, rank).T
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
        return _model([node], {"W": w}, [None, 5, 32], [None, 5, 24]), (5, 32)
    w = _low_rank(rng, 12, 4 * 9, rank).reshape(12, 4, 3, 3)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    return _model([node], {"W": w, "b": rng.standard_normal(12)}, [None, 4, 6, 6], [None, 12, 6, 6]), (4, 6, 6)


def _plan(ranks):
    return RankPlan({name: LayerDecision("factorize", "svd", rank) for name, rank in ranks.items()})


def _data(rng, shape, n):
    return Dataset({"x": rng.standard_normal((n, *shape)).astype(np.float32)})


def _run(model, data):
    return capture(model, ["y"], data)["y"].astype(np.float64)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _perturb_factors(model, rng):
    for init in model.graph.initializer:
        if ".lowrank." in init.name:
            value = numpy_helper.to_array(init)
            noisy = value + 0.5 * np.abs(value).mean() * rng.standard_normal(value.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(value.dtype), init.name))


@pytest.mark.parametrize("op", ["Gemm", "MatMul", "Conv"])
def test_planted_rank_is_reproduced_from_a_perturbed_start(op):
    rng = np.random.default_rng(0)
    original, shape = _single_layer(op, rng, rank=3)
    layers = find_layers(original)
    plan = _plan({layers[0].name: 3})
    compressed = apply_plan(original, layers, plan).model
    _perturb_factors(compressed, rng)
    data, held = _data(rng, shape, 64), _data(rng, shape, 32)
    assert _rel(_run(compressed, held), _run(original, held)) > 0.1
    refit, report = refit_model(original, compressed, layers, plan, data, batch_size=16)
    assert _rel(_run(refit, held), _run(original, held)) < 1e-4
    (entry,) = report.layers
    assert entry.error_before > 0.01 and entry.error_after < 1e-8
    assert entry.rows == 64 * int(np.prod(shape[1:]) if op == "Conv" else shape[0] if op == "MatMul" else 1)


def _chain(rng):
    w1 = rng.standard_normal((32, 32)) / np.sqrt(32)
    w2 = rng.standard_normal((32, 16)) / np.sqrt(32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2"),
    ]
    return _model(nodes, {"W1": w1, "W2": w2}, [None, 32], [None, 16])


def _correlated(rng, n, mix):
    return Dataset({"x": (rng.standard_normal((n, 32)) @ mix).astype(np.float32)})


def test_refit_compensates_a_hard_cut_earlier_layer():
    # mm1 is cut hard by plain SVD; the inputs are correlated, so part of what the cut drops
    # is predictable from what it keeps: refitting mm2 alone on the compressed model's
    # activations must win that back on held-out data.
    rng = np.random.default_rng(1)
    original = _chain(rng)
    layers = find_layers(original)
    plan = _plan({"mm1": 4, "mm2": 8})
    compressed = apply_plan(original, layers, plan).model
    mix = rng.standard_normal((32, 32)) * np.geomspace(1, 0.05, 32)[:, None]
    data, held = _correlated(rng, 256, mix), _correlated(rng, 256, mix)
    reference = _run(original, held)
    plain_error = _rel(_run(compressed, held), reference)
    second_only = RankPlan({"mm2": plan.layers["mm2"]})
    compensated, report = refit_model(original, compressed, layers, second_only, data)
    assert _rel(_run(compensated, held), reference) < 0.8 * plain_error
    (entry,) = report.layers
    assert entry.name == "mm2" and entry.error_after < 0.7 * entry.error_before
    both, report = refit_model(original, compressed, layers, plan, data)
    assert [entry.name for entry in report.layers] == ["mm1", "mm2"]
    assert _rel(_run(both, held), reference) < 0.8 * plain_error


def _structure(model):
    nodes = [n.SerializeToString() for n in model.graph.node]
    inits = [(i.name, tuple(i.dims), i.data_type) for i in model.graph.initializer]
    io = [v.SerializeToString() for v in list(model.graph.input) + list(model.graph.output)]
    return nodes, inits, io, model.ir_version, [(o.domain, o.version) for o in model.opset_import]


def test_graph_is_unchanged_except_factor_values_and_inputs_are_untouched():
    rng = np.random.default_rng(2)
    original = _chain(rng)
    layers = find_layers(original)
    plan = _plan({"mm1": 4, "mm2": 8})
    compressed = apply_plan(original, layers, plan).model
    before = (original.SerializeToString(), compressed.SerializeToString())
    refit, _ = refit_model(original, compressed, layers, plan, _data(rng, (32,), 64))
    assert (original.SerializeToString(), compressed.SerializeToString()) == before
    assert _structure(refit) == _structure(compressed)
    old = {i.name: numpy_helper.to_array(i) for i in compressed.graph.initializer}
    changed = {
        i.name for i in refit.graph.initializer if not np.array_equal(numpy_helper.to_array(i), old[i.name])
    }
    assert changed and all(".lowrank." in name for name in changed)
    onnx.checker.check_model(refit, full_check=True)


def test_refit_is_deterministic():
    rng = np.random.default_rng(3)
    original = _chain(rng)
    layers = find_layers(original)
    plan = _plan({"mm1": 4, "mm2": 8})
    compressed = apply_plan(original, layers, plan).model
    data = _data(rng, (32,), 100)
    first, _ = refit_model(original, compressed, layers, plan, data, batch_size=7)
    second, _ = refit_model(original, compressed, layers, plan, data, batch_size=7)
    assert first.SerializeToString() == second.SerializeToString()


def test_unknown_plan_layers_are_reported_not_refit():
    rng = np.random.default_rng(4)
    original = _chain(rng)
    layers = find_layers(original)
    plan = _plan({"mm2": 8})
    compressed = apply_plan(original, layers, plan).model
    wider = RankPlan({**plan.layers, "ghost": LayerDecision("factorize", "svd", 2)})
    _, report = refit_model(original, compressed, layers, wider, _data(rng, (32,), 16))
    assert [entry.name for entry in report.layers] == ["mm2"]
    assert report.skipped == {"ghost": "layer_not_found"}
    # mm1 was not factorized in the compressed model: a plan that claims it cannot find factors.
    claims = RankPlan({"mm1": LayerDecision("factorize", "svd", 4)})
    _, report = refit_model(original, compressed, layers, claims, _data(rng, (32,), 16))
    assert report.layers == () and report.skipped == {"mm1": "factors_not_found"}
