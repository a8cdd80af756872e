"""Fixtures of the validation tests; the model builders live in validate_models.py."""

from __future__ import annotations

import numpy as np
import pytest
from validate_models import inputs, mlp, run_model, write


@pytest.fixture
def models(tmp_path):
    """Paths: the MLP, an identical copy, a 5x+ slower twin with the same outputs, data."""
    x = inputs(48)
    logits = run_model(mlp(), x)
    np.savez(tmp_path / "data.npz", features=x, labels=logits.argmax(axis=1))
    return {
        "original": write(mlp(), tmp_path / "original.onnx"),
        "copy": write(mlp(), tmp_path / "copy.onnx"),
        "slow": write(mlp(slow=6), tmp_path / "slow.onnx"),
        "negated": write(mlp(scale=-1.0), tmp_path / "negated.onnx"),
        "data": str(tmp_path / "data.npz"),
        "x": x,
        "logits": logits,
    }


