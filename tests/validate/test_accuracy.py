"""Output metrics, label accuracy and thresholds of onnx_lowrank.validate.accuracy."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from validate_models import CLASSES, inputs, mlp, run_model

from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.validate.accuracy import (
    Thresholds,
    check_thresholds,
    compare_models,
    compare_outputs,
    limit_failure,
)
from onnx_lowrank.validate.data import Dataset


def test_identical_models_have_zero_error(models):
    result = compare_models(models["original"], models["copy"], {"input": models["x"]}, batch_size=7)
    (logits,) = result.outputs
    assert result.samples == 48
    assert logits.max_abs_error == 0.0
    assert logits.rel_l2_error == 0.0
    assert logits.cosine == pytest.approx(1.0, abs=1e-12)
    assert logits.cosine_min == pytest.approx(1.0, abs=1e-12)
    assert logits.top1_agreement == 1.0
    assert logits.shape == (CLASSES,)
    assert result.runtime["provider_used"] == "CPUExecutionProvider"


def test_scaled_output_has_the_planted_relative_error():
    x = inputs(40)
    result = compare_models(mlp(), mlp(scale=1.25), {"input": x}, batch_size=16)
    (logits,) = result.outputs
    reference = run_model(mlp(), x)
    assert logits.rel_l2_error == pytest.approx(0.25, rel=1e-6)
    assert logits.cosine == pytest.approx(1.0, abs=1e-9)  # a scaled vector points the same way
    assert logits.max_abs_error == pytest.approx(0.25 * np.abs(reference).max(), rel=1e-5)
    assert logits.top1_agreement == 1.0


def test_offset_output_has_the_planted_absolute_error():
    offset = np.array([0.0, 0.5, -0.125, 0.0], np.float32)
    result = compare_models(mlp(), mlp(offset=offset), {"input": inputs(20)})
    assert result.outputs[0].max_abs_error == pytest.approx(0.5, abs=1e-6)


def test_negated_model_is_anti_correlated(models):
    result = compare_models(models["original"], models["negated"], {"input": models["x"]})
    (logits,) = result.outputs
    assert logits.cosine == pytest.approx(-1.0, abs=1e-9)
    assert logits.rel_l2_error == pytest.approx(2.0, rel=1e-6)
    expected = np.mean(models["logits"].argmax(1) == models["logits"].argmin(1))
    assert logits.top1_agreement == pytest.approx(expected)


def test_label_accuracy_and_drop_in_points(models):
    labels = models["logits"].argmax(axis=1)
    labels[:12] = (labels[:12] + 1) % CLASSES  # the original is now wrong on exactly 12 of 48
    dataset = Dataset({"input": models["x"]}, labels)
    result = compare_models(models["original"], models["negated"], dataset, batch_size=10)
    acc = result.accuracy
    assert acc.original == pytest.approx(36 / 48)
    negated_pred = models["logits"].argmin(axis=1)
    assert acc.compressed == pytest.approx(np.mean(negated_pred == labels))
    assert acc.drop_points == pytest.approx((acc.original - acc.compressed) * 100)
    assert result.worst()["accuracy_drop"] == pytest.approx(acc.drop_points)


def test_compare_outputs_on_planted_arrays():
    ref = {"y": np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]], np.float32)}
    test = {"y": np.array([[0.0, 1.0], [0.0, 0.0], [3.0, 4.0]], np.float32)}
    (metrics,) = compare_outputs(ref, test)
    assert metrics.max_abs_error == 1.0
    assert metrics.rel_l2_error == pytest.approx(math.sqrt(2) / math.sqrt(26))
    # per-sample cosines: orthogonal 0, both-zero 1, identical 1
    assert metrics.cosine == pytest.approx(2 / 3)
    assert metrics.cosine_min == pytest.approx(0.0)
    assert metrics.top1_agreement == pytest.approx(2 / 3)


def test_non_classifier_output_has_no_top1_agreement():
    ref = {"emb": np.ones((3, 2, 5), np.float32)}
    (metrics,) = compare_outputs(ref, {"emb": ref["emb"] * 2})
    assert metrics.top1_agreement is None
    assert metrics.rel_l2_error == pytest.approx(1.0)


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(InputError, match="shape"):
        compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((2, 4))})


def test_nan_output_fails_every_threshold_without_a_passing_value():
    failure = limit_failure("cosine", "--min-cosine", "y", math.nan, 0.9, "min")
    assert failure is not None and failure.passing is None
    assert "not a finite number" in failure.message


def test_thresholds_name_the_flag_and_a_value_that_passes():
    x = inputs(40)
    result = compare_models(mlp(), mlp(scale=1.25), {"input": x})
    failures = check_thresholds(result, Thresholds(max_rel_error=0.1, min_cosine=0.5))
    assert [f.flag for f in failures] == ["--max-rel-error"]
    failure = failures[0]
    assert "--max-rel-error" in failure.message and "would pass" in failure.message
    assert failure.passing >= failure.value
    assert not check_thresholds(result, Thresholds(max_rel_error=failure.passing))


@pytest.mark.parametrize("kind", ["min", "max"])
def test_suggested_limits_always_pass(kind):
    rng = np.random.default_rng(3)
    for value in rng.uniform(-2, 2, 200).tolist() + [1e-9, 0.99999999, 123456.789]:
        limit = value + 1 if kind == "min" else value - 1
        failure = limit_failure("m", "--min-x" if kind == "min" else "--max-x", None, value, limit, kind)
        assert failure is not None
        assert limit_failure("m", failure.flag, None, value, failure.passing, kind) is None


def test_accuracy_threshold_without_labels_is_an_option_error(models):
    result = compare_models(models["original"], models["copy"], {"input": models["x"]})
    with pytest.raises(OptionError, match="--max-accuracy-drop needs labels"):
        check_thresholds(result, Thresholds(max_accuracy_drop=1.0))


@pytest.mark.parametrize(
    ("field", "value"), [("min_cosine", 2.0), ("min_top1_agreement", -0.1), ("max_rel_error", -1.0), ("min_cosine", math.nan)]
)
def test_out_of_range_thresholds_are_rejected(field, value):
    with pytest.raises(OptionError, match="--"):
        Thresholds(**{field: value})


def test_outputs_are_paired_by_name_else_position():
    other = mlp()
    other.graph.output[0].name = "other"
    other.graph.node[-1].output[0] = "other"
    extra = mlp()
    extra.graph.output.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["batch", 32]))
    result = compare_models(mlp(), other, {"input": inputs(4)})
    assert "compared by position" in result.notes[0]
    with pytest.raises(InputError, match="different outputs"):
        compare_models(mlp(), extra, {"input": inputs(4)})
