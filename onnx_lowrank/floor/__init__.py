"""Accuracy-targeted compression: the smallest or fastest model above the user's floor.

    from onnx_lowrank.floor import compress_to_floor, parse_floors
    result = compress_to_floor(model, layers, data, parse_floors(["top1-agreement=0.99"]), "params")

See :mod:`onnx_lowrank.floor.run` for the pipeline and :mod:`onnx_lowrank.floor.spec` for floors.
"""

from onnx_lowrank.floor.run import METHODS, OBJECTIVES, FloorResult, compress_to_floor
from onnx_lowrank.floor.spec import METRICS, Floor, parse_floor, parse_floors
from onnx_lowrank.floor.split import Split, split_dataset

__all__ = [
    "METHODS", "METRICS", "OBJECTIVES", "Floor", "FloorResult", "Split", "compress_to_floor", "parse_floor",
    "parse_floors", "split_dataset",
]
