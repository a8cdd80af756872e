"""The bundled digits sample models and their data, shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
# model name -> the npz key holding its input (the MLP takes flat pixels, the others images)
MODELS = {
    "digits_mlp": "input_flat",
    "digits_cnn": "input_image",
    "digits_resnet": "input_image",
    "digits_transformer": "input_image",
}
