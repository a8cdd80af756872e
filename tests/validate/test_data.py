"""Matching .npz arrays to model inputs, labels, and seeded random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.validate.data import (
    Dataset,
    concrete_shape,
    load_dataset,
    load_npz,
    parse_input_map,
    random_dataset,
)
from onnx_lowrank.validate.runtime import InputSpec

FLAT = InputSpec("input", ("batch", 64), np.dtype(np.float32))
IMAGE = InputSpec("input", ("batch", 1, 8, 8), np.dtype(np.float32))


@pytest.fixture
def digits_like(tmp_path):
    """The layout of sample_models/digits_test.npz: input_flat, input_image, labels."""
    rng = np.random.default_rng(0)
    images = rng.random((10, 1, 8, 8), dtype=np.float32)
    path = tmp_path / "digits.npz"
    np.savez(path, input_flat=images.reshape(10, 64), input_image=images, labels=rng.integers(0, 10, 10))
    return path


def test_auto_pick_by_shape_says_which_key(digits_like):
    flat = load_dataset(digits_like, [FLAT])
    image = load_dataset(digits_like, [IMAGE])
    assert flat.feeds["input"].shape == (10, 64)
    assert image.feeds["input"].shape == (10, 1, 8, 8)
    assert any("'input_flat'" in note for note in flat.notes)
    assert any("'input_image'" in note for note in image.notes)
    assert any("labels" in note for note in flat.notes)
    assert flat.labels.shape == (10,) and flat.labels.dtype == np.int64


def test_explicit_input_map_wins_over_a_matching_name(tmp_path):
    path = tmp_path / "named.npz"
    np.savez(path, input=np.zeros((3, 64), np.float32), other=np.ones((3, 64), np.float32))
    assert load_dataset(path, [FLAT]).feeds["input"].sum() == 0
    chosen = load_dataset(path, [FLAT], input_map={"input": "other"})
    assert chosen.feeds["input"].sum() == 3 * 64
    assert not any("<-" in note for note in chosen.notes)


def test_ambiguous_npz_asks_for_input_map(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((3, 64), np.float32), b=np.ones((3, 64), np.float32))
    with pytest.raises(InputError, match=r"several arrays fit \(a, b\).*--input-map input=KEY"):
        load_dataset(path, [FLAT])


def test_single_array_is_used_whatever_its_name(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, whatever=np.ones((5, 64), np.float64))
    data = load_dataset(path, [FLAT])
    assert data.feeds["input"].dtype == np.float32  # cast, and said so
    assert any("float64 -> float32" in note for note in data.notes)
    assert any("only unused array" in note for note in data.notes)


def test_bad_input_map_entries_name_the_flag(digits_like):
    with pytest.raises(OptionError, match="--input-map nope=input_flat: the model has no input 'nope'"):
        load_dataset(digits_like, [FLAT], input_map={"nope": "input_flat"})
    with pytest.raises(OptionError, match="--input-map input=missing: .* has no array 'missing'"):
        load_dataset(digits_like, [FLAT], input_map={"input": "missing"})
    for bad in ("input", "=x", "input="):
        with pytest.raises(OptionError, match="--input-map"):
            parse_input_map([bad])
    assert parse_input_map(["input = input_image"]) == {"input": "input_image"}


def test_wrong_shape_or_kind_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((3, 63), np.float32))
    with pytest.raises(InputError, match="expects \\[batch, 64\\]"):
        load_dataset(path, [FLAT])
    np.savez(path, input=np.zeros((3, 64), np.int64))
    with pytest.raises(InputError, match="int64 but input 'input' expects float32"):
        load_dataset(path, [FLAT])


def test_labels_sources(digits_like, tmp_path):
    one_hot = np.eye(10)[np.arange(10) % 10]
    np.save(tmp_path / "labels.npy", one_hot)
    data = load_dataset(digits_like, [FLAT], labels_path=tmp_path / "labels.npy")
    assert data.labels.tolist() == list(range(10))
    with pytest.raises(OptionError, match="--labels-key 'nope'"):
        load_dataset(digits_like, [FLAT], labels_key="nope")
    with pytest.raises(OptionError, match="not both"):
        load_dataset(digits_like, [FLAT], labels_key="labels", labels_path=tmp_path / "labels.npy")
    assert load_dataset(digits_like, [FLAT], want_labels=False).labels is None


def test_unreadable_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such data file"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")


def test_random_inputs_are_seeded_and_shaped():
    specs = [
        InputSpec("ids", ("batch", "seq"), np.dtype(np.int64)),
        InputSpec("attention_mask", ("batch", "seq"), np.dtype(np.int64)),
        InputSpec("x", ("batch", 3), np.dtype(np.float32)),
    ]
    a = random_dataset(specs, 6, shapes={"ids": (1, 5), "attention_mask": (1, 5)}, seed=4)
    b = random_dataset(specs, 6, shapes={"ids": (1, 5), "attention_mask": (1, 5)}, seed=4)
    c = random_dataset(specs, 6, shapes={"ids": (1, 5), "attention_mask": (1, 5)}, seed=5)
    assert a.feeds["ids"].shape == (6, 5) and a.feeds["x"].shape == (6, 3)
    assert set(np.unique(a.feeds["ids"])) <= {0, 1}
    assert (a.feeds["attention_mask"] == 1).all()
    for key in a.feeds:
        np.testing.assert_array_equal(a.feeds[key], b.feeds[key])
    assert not np.array_equal(a.feeds["x"], c.feeds["x"])


def test_dynamic_dims_default_to_one_with_a_note_and_fixed_batch_is_enforced():
    notes: list[str] = []
    spec = InputSpec("x", ("batch", "seq", 8), np.dtype(np.float32))
    assert concrete_shape(spec, 4, notes=notes) == (4, 1, 8)
    assert "pin it with --input-shape" in notes[0]
    fixed = InputSpec("x", (1, 8), np.dtype(np.float32))
    with pytest.raises(OptionError, match="fixed batch dimension 1"):
        concrete_shape(fixed, 8)
    with pytest.raises(OptionError, match="rank 3"):
        concrete_shape(spec, 2, {"x": (2, 8)})


def test_batches_and_take():
    data = Dataset({"x": np.arange(10).reshape(10, 1)}, np.arange(10))
    sizes = [(len(f["x"]), len(labels)) for f, labels in data.batches(4)]
    assert sizes == [(4, 4), (4, 4), (2, 2)]
    assert data.n_batches(4) == 3
    assert data.take(13)["x"][:, 0].tolist() == [*range(10), 0, 1, 2]
    with pytest.raises(OptionError, match="--batch-size"):
        next(data.batches(0))
