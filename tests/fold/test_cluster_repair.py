"""Clustering (numpy, no ONNX) and the data-free variance repair on planted cases."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from fold_helpers import make_model, node_input, run, tensor, value
from onnx import helper

from onnx_lowrank.fold import MissingDependencyError, cluster, fold_model
from onnx_lowrank.fold.merge import merge_columns
from onnx_lowrank.fold.repair import merged_std, repair_factor


def test_kmeans_puts_exact_duplicates_in_one_cluster():
    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((6, 5))
    index = rng.permutation(np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6]))
    features = distinct[index]
    for k in (2, 4, 6):
        result = cluster.kmeans(features, k, seed=0)
        assert result.k == k
        for source in range(6):  # every copy of a row shares its label
            assert len(set(result.labels[index == source].tolist())) == 1
    exact = cluster.kmeans(features, 10, seed=0)  # more clusters than distinct rows: one per row
    assert exact.k == 6 and cluster.relative_error(features, exact) < 1e-28
    assert exact.labels[0] == 0 and np.all(np.diff([m[0] for m in exact.members()]) > 0)  # first-member order


def test_kmeans_is_deterministic_and_checks_k():
    features = np.random.default_rng(1).standard_normal((40, 7))
    first = cluster.kmeans(features, 9, seed=5)
    np.testing.assert_array_equal(first.labels, cluster.kmeans(features, 9, seed=5).labels)
    assert sorted(np.unique(first.labels).tolist()) == list(range(9))
    for bad in (0, 41):
        with pytest.raises(ValueError):
            cluster.kmeans(features, bad, seed=0)


def test_relative_error_and_error_curves():
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((3, 4)) * 10
    features = np.repeat(centers, 4, axis=0) + 0.01 * rng.standard_normal((12, 4))
    total = np.sum(features**2)
    curve = cluster.merge_error_curve(features)
    assert curve[12] == 0.0 and np.all(np.diff(curve[1:]) <= 1e-15)
    assert curve[1] == pytest.approx(np.sum((features - features.mean(0)) ** 2) / total)
    assert curve[3] < 1e-5 < 1e-2 < curve[2]  # three planted clusters
    labels = np.repeat(np.arange(3), 4)
    planted = cluster.Clustering(labels, 3, "kmeans")
    expected = sum(np.sum((features[labels == j] - features[labels == j].mean(0)) ** 2) for j in range(3)) / total
    assert cluster.relative_error(features, planted) == pytest.approx(expected)
    assert curve[3] == pytest.approx(expected)  # Ward finds the planted clusters

    rows = np.diag([4.0, 1.0, 3.0, 2.0])
    magnitude_curve = cluster.magnitude_error_curve(rows, rows)
    np.testing.assert_allclose(magnitude_curve[1:], [(1 + 4 + 9) / 30, (1 + 4) / 30, 1 / 30, 0.0])
    pruned = cluster.magnitude(rows, 2)
    assert pruned.labels.tolist() == [0, -1, 1, -1]
    assert cluster.relative_error(rows, pruned) == pytest.approx(5 / 30)


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(MissingDependencyError, match=r"onnx-lowrank\[fold\]"):
        cluster.kmeans(np.eye(5), 2, seed=0)
    cluster.magnitude(np.eye(5), 2)  # the baseline needs nothing extra


def test_merge_columns_sums_blocks():
    matrix = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 6)  # 3 channels x 2 columns each
    columns = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # channels 0 and 2 merge
    merged = merge_columns(matrix, columns, 2)
    np.testing.assert_array_equal(merged, [[0 + 4, 1 + 5, 2, 3], [6 + 10, 7 + 11, 8, 9]])


def test_merged_std_matches_the_mean_of_correlated_units():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((4, 16)) + 2 * rng.standard_normal(16)  # correlated rows
    x = rng.standard_normal((200_000, 16))  # isotropic input: cosine = correlation
    outputs = x @ rows.T
    stds = outputs.std(axis=0)
    assert merged_std(rows, stds) == pytest.approx(outputs.mean(axis=1).std(), rel=0.01)
    assert repair_factor(rows[:1], stds[:1]) == 1.0
    assert repair_factor(np.repeat(rows[:1], 3, 0), np.repeat(stds[:1], 3)) == pytest.approx(1.0, abs=1e-12)


def _planted_clusters(rng, *, n_in=32, per_cluster=4, clusters=2, noise=0.8):
    base = rng.standard_normal((clusters, n_in))
    rows = np.repeat(base, per_cluster, axis=0) + noise * rng.standard_normal((clusters * per_cluster, n_in))
    return rows.astype(np.float32), np.repeat(np.arange(clusters), per_cluster)


def test_repair_with_batchnorm_matches_the_cluster_average_std():
    """Gemm -> BN -> Relu -> Gemm whose BN statistics describe x ~ N(0, I): after folding with
    repair, each merged BN output channel has the mean and the std of its cluster's originals."""
    rng = np.random.default_rng(4)
    w1, labels = _planted_clusters(rng)
    width = w1.shape[0]
    b1 = rng.standard_normal(width).astype(np.float32)
    # similar gammas within a planted cluster, so that k-means recovers the planted clusters
    gamma = (np.array([0.8, 1.6])[labels] * rng.uniform(0.9, 1.1, width)).astype(np.float32)
    beta = rng.standard_normal(width).astype(np.float32)
    var = np.sum(w1.astype(np.float64) ** 2, axis=1).astype(np.float32)  # Var(w . x) for x ~ N(0, I)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    inits = [tensor("w1", w1), tensor("b1", b1), tensor("g", gamma), tensor("be", beta), tensor("mu", b1)]
    inits += [tensor("var", var), tensor("w2", rng.standard_normal((3, width)).astype(np.float32))]
    model = make_model(nodes, [value("x", ["batch", 32])], [value("y", ["batch", 3])], inits)
    x = rng.standard_normal((100_000, 32)).astype(np.float32)
    original = _with_output(model, "bn")
    bn_before = run(original, {"x": x})[1]
    target_std = np.array([bn_before[:, labels == j].std(axis=0).mean() for j in range(2)])
    target_mean = np.array([bn_before[:, labels == j].mean(axis=0).mean() for j in range(2)])

    outputs = {}
    for repair in (True, False):
        folded, report = fold_model(model, keep=2 / width, repair=repair, width_multiple=1)
        assert report.groups[0].kept == 2
        outputs[repair] = run(_with_output(folded, "bn"), {"x": x})[1]
        if repair:
            gamma_new, var_new = node_input(folded, "bn1", 1), node_input(folded, "bn1", 4)
            pre_bn = x.astype(np.float64) @ node_input(folded, "fc1", 1).T.astype(np.float64)
            np.testing.assert_allclose(var_new, pre_bn.var(axis=0), rtol=0.03)  # running var = merged variance
            np.testing.assert_allclose(gamma_new, [gamma[labels == j].mean() for j in range(2)], rtol=1e-3)
    np.testing.assert_allclose(outputs[True].std(axis=0), target_std, rtol=0.03)
    np.testing.assert_allclose(outputs[True].mean(axis=0), target_mean, atol=0.03 * target_std.min())
    assert np.all(outputs[False].std(axis=0) < 0.9 * target_std)  # without repair the variance collapses
    np.testing.assert_allclose(outputs[False].mean(axis=0), target_mean, atol=0.03 * target_std.min())


def test_repair_without_batchnorm_gives_the_centroid_the_mean_norm():
    rng = np.random.default_rng(5)
    w1, labels = _planted_clusters(rng, clusters=3)
    width = w1.shape[0]
    b1 = rng.standard_normal(width).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1),
    ]
    inits = [tensor("w1", w1), tensor("b1", b1), tensor("w2", rng.standard_normal((3, width)).astype(np.float32))]
    model = make_model(nodes, [value("x", ["batch", 32])], [value("y", ["batch", 3])], inits)
    repaired, report = fold_model(model, keep=3 / width, repair=True, width_multiple=1)
    plain, _ = fold_model(model, keep=3 / width, repair=False, width_multiple=1)
    rows_r, rows_p = node_input(repaired, "fc1", 1), node_input(plain, "fc1", 1)
    w64 = w1.astype(np.float64)
    for j in range(3):
        members = labels == j
        centroid = w64[members].mean(axis=0)
        np.testing.assert_allclose(rows_p[j], centroid, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(rows_r[j]), np.linalg.norm(w64[members], axis=1).mean(), rtol=1e-6)
        np.testing.assert_allclose(rows_r[j] / np.linalg.norm(rows_r[j]), centroid / np.linalg.norm(centroid), atol=1e-6)
        assert node_input(repaired, "fc1", 2)[j] == pytest.approx(b1[members].mean(), rel=1e-6)
    assert all(f > 1.05 for f in [report.groups[0].repair])


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def test_large_layers_cluster_on_principal_components():
    rng = np.random.default_rng(6)
    centers = (rng.standard_normal((60, 20)) @ rng.standard_normal((20, 400))) * 10  # 60 planted neurons
    source = np.concatenate([np.arange(60), rng.integers(0, 60, 90)])
    distinct = centers[source] + 1e-3 * rng.standard_normal((150, 400))  # 150 near-copies of them
    index = rng.permutation(np.repeat(np.arange(150), 2))  # 300 neurons: every one duplicated exactly
    features = distinct[index]
    projected = cluster.principal_components(features)
    assert projected.shape == (300, cluster.MAX_DIMS)
    i, j = rng.integers(0, 300, (2, 40))
    np.testing.assert_allclose(
        np.linalg.norm(projected[i] - projected[j], axis=1), np.linalg.norm(features[i] - features[j], axis=1), rtol=1e-6
    )
    result = cluster.kmeans(features, 60, seed=0)  # k-means on the projection (150 distinct > 60)
    assert result.k == 60 and cluster.relative_error(features, result) < 1e-8  # the planted neurons are found
    for copy in range(150):
        assert len(set(result.labels[index == copy].tolist())) == 1
    np.testing.assert_array_equal(result.labels, cluster.kmeans(features, 60, seed=0).labels)
    small = features[:40, :30]
    assert cluster.principal_components(small) is small  # small layers are clustered as they are
