"""Timings with I/O binding, interleaved pairs, the layer microbenchmark and provider checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from validate_models import gpu_test, inputs, mlp, run_model

from onnx_lowrank.errors import LowRankError, OptionError
from onnx_lowrank.validate.latency import (
    BoundModel,
    bootstrap_median_ci,
    factorized_layer_speedup,
    layer_models,
    layer_pair_timing,
    layer_speedup,
    measure,
    measure_pair,
    parse_batch_sizes,
)
from onnx_lowrank.validate.runtime import (
    ProviderUnavailable,
    RuntimeOptions,
    available_providers,
    create_session,
    cuda_session_works,
)


def test_bound_run_on_cpu_computes_the_model_outputs():
    x = inputs(5)
    session = create_session(mlp(), RuntimeOptions(threads=1))
    bound = BoundModel(session, {"input": x})
    assert bound.run() > 0
    (out,) = bound.binding.copy_outputs_to_cpu()
    np.testing.assert_allclose(out, run_model(mlp(), x), rtol=1e-6, atol=1e-6)


def test_measure_gives_ordered_positive_percentiles():
    timing = measure(mlp(), {"input": inputs(8)}, warmup=2, iters=25, options=RuntimeOptions(threads=1))
    assert len(timing.times_ms) == 25 and timing.batch == 8
    assert 0 < timing.p50 <= timing.p90 <= timing.p99 <= max(timing.times_ms)
    assert timing.throughput == pytest.approx(8 * 1000 / timing.p50)
    assert timing.provider == "CPUExecutionProvider"
    data = timing.to_json(samples=True)
    assert data["iters"] == 25 and len(data["times_ms"]) == 25


def test_interleaved_pair_sees_a_planted_slowdown():
    pair = measure_pair(mlp(slow=6), mlp(), {"input": inputs(1)}, warmup=3, iters=30)
    assert len(pair.ratios) == 30
    assert pair.speedup > 1.5  # planted ~10-20x; generous for a loaded 2-core machine
    low, high = pair.iqr
    assert low <= pair.speedup <= high
    ci_low, ci_high = pair.ci95
    assert ci_low <= pair.speedup <= ci_high


def test_min_seconds_runs_more_rounds_for_fast_models_within_ten_times_iters():
    fast = measure_pair(mlp(), mlp(), {"input": inputs(1)}, warmup=2, iters=5, min_seconds=0.05)
    assert 5 < len(fast.ratios) <= 50  # a tiny MLP runs in microseconds: 5 rounds are far below 50 ms
    slow = measure_pair(mlp(slow=6), mlp(), {"input": inputs(1)}, warmup=1, iters=5, min_seconds=1e-9)
    assert len(slow.ratios) == 5  # never fewer than asked


def test_bootstrap_interval_is_seeded_and_brackets_the_median():
    values = np.random.default_rng(0).lognormal(size=51)
    assert bootstrap_median_ci(values) == bootstrap_median_ci(values)
    low, high = bootstrap_median_ci(values)
    assert low <= np.median(values) <= high
    assert bootstrap_median_ci([2.0]) == (2.0, 2.0)


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,64") == (1, 8, 64)
    for bad in ("", "0", "1,,2", "a", "1,1", "-1"):
        with pytest.raises(OptionError, match="--batch"):
            parse_batch_sizes(bad)


def test_bad_counts_are_option_errors():
    with pytest.raises(OptionError, match="--iters"):
        measure(mlp(), {"input": inputs(1)}, iters=0)
    with pytest.raises(OptionError, match="--warmup"):
        measure(mlp(), {"input": inputs(1)}, warmup=-1)


@pytest.mark.parametrize(
    ("op", "weight", "rank", "x", "ops"),
    [
        ("Gemm", (24, 16), 4, 10, ["MatMul", "Gemm"]),
        ("MatMul", (24, 16), 4, (2, 3, 16), ["MatMul", "MatMul"]),
        ("Conv", (8, 3, 3, 3), 2, (1, 3, 6, 6), ["Conv", "Conv"]),
    ],
)
def test_layer_models_are_valid_and_shape_compatible(op, weight, rank, x, ops):
    dense, factored, feeds = layer_models(op, weight, rank, x)
    onnx.checker.check_model(dense, full_check=True)
    onnx.checker.check_model(factored, full_check=True)
    assert [n.op_type for n in factored.graph.node] == ops
    out_dense = run_model_any(dense, feeds)
    out_factored = run_model_any(factored, feeds)
    assert out_dense.shape == out_factored.shape
    assert out_dense.shape[-1 if op != "Conv" else 1] == weight[0]


def run_model_any(model, feeds):
    return create_session(model, RuntimeOptions()).run(feeds)["y"]


def test_factorized_layer_speedup_favours_a_tiny_rank_of_a_big_layer():
    # 512x512 at rank 8 does 32x fewer FLOPs; a generous bar for a noisy machine.
    speedup = factorized_layer_speedup("MatMul", (512, 512), 8, 256, warmup=2, iters=15)
    assert speedup > 1.5
    pair = layer_pair_timing("Gemm", (64, 64), 8, 4, warmup=1, iters=5)
    assert pair.b.label == "rank 8" and np.isfinite(pair.speedup) and pair.speedup > 0


def test_layer_models_reject_bad_requests():
    with pytest.raises(OptionError, match="op type"):
        layer_models("Attention", (4, 4), 2, 3)
    with pytest.raises(OptionError, match="rank"):
        layer_models("Gemm", (4, 4), 0, 3)
    with pytest.raises(OptionError, match="does not end in 4"):
        layer_models("MatMul", (4, 4), 2, (3, 5))


def test_unavailable_provider_is_a_clear_error_not_a_cpu_fallback():
    if cuda_session_works():
        pytest.skip("CUDA works here")
    with pytest.raises(ProviderUnavailable, match="--provider cuda: CUDAExecutionProvider") as info:
        measure(mlp(), {"input": inputs(1)}, provider="cuda")
    assert "\n" not in str(info.value)
    assert info.value.exit_code == 2
    assert isinstance(info.value, LowRankError)


def test_a_silent_fallback_is_detected(monkeypatch):
    """ORT listing CUDA but placing the session on the CPU must still fail."""
    import onnxruntime as ort

    listed = [*available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    real = ort.InferenceSession

    def fake_session(source, sess_options=None, providers=None):
        return real(source, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(ProviderUnavailable, match="fell back to CPUExecutionProvider"):
        create_session(mlp(), RuntimeOptions(provider="cuda"))


def test_runtime_options_validate_flags():
    with pytest.raises(OptionError, match="--provider"):
        RuntimeOptions(provider="rocm")
    with pytest.raises(OptionError, match="--cuda-graph needs --provider cuda"):
        RuntimeOptions(cuda_graph=True)
    with pytest.raises(OptionError, match="--threads"):
        RuntimeOptions(threads=0)
    assert RuntimeOptions(threads=2).to_json() == {"provider": "cpu", "threads": 2, "spin": False}


@pytest.mark.parametrize("spin", [False, True])
def test_sessions_set_threads_and_spinning_as_asked(spin):
    session = create_session(mlp(), RuntimeOptions(threads=1, spin=spin)).ort_session.get_session_options()
    assert session.intra_op_num_threads == 1
    assert session.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")


@gpu_test
def test_cuda_pair_with_io_binding_and_cuda_graph():
    options = RuntimeOptions(provider="cuda", cuda_graph=True)
    pair = measure_pair(mlp(slow=6), mlp(), {"input": inputs(64)}, options=options, warmup=3, iters=20)
    assert pair.a.provider == "CUDAExecutionProvider"
    assert pair.speedup > 0
    timing = measure(mlp(), {"input": inputs(8)}, options=RuntimeOptions(provider="cuda", tf32=False), iters=10)
    assert 0 < timing.p50 <= timing.p99


def test_layer_speedup_takes_layers_found_in_a_model():
    from onnx_lowrank.layers import find_layers

    layers = {layer.name: layer for layer in find_layers(mlp(), {"input": (8, 16)})}
    fc1 = layers["fc1"]
    assert (fc1.out_features, fc1.in_features, fc1.tokens) == (32, 16, 8)
    assert layer_speedup(fc1, 4, warmup=1, iters=5) > 0


def test_a_corrupt_model_is_an_input_error(tmp_path):
    from onnx_lowrank.errors import InputError

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a model")
    with pytest.raises(InputError, match="onnxruntime cannot load the model"):
        create_session(path, RuntimeOptions())
