"""pytest-onnx-lowrank: the ``onnx_lowrank_gate`` fixture (see :mod:`pytest_onnx_lowrank.plugin`)."""

__version__ = "0.1.0"
