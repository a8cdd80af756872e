"""onnx-lowrank: make exported ONNX models smaller and faster with low-rank factorizations.

The command line lives in :mod:`onnx_lowrank.cli`; the library is organised as a pipeline
(load -> find layers -> search a RankPlan -> rewrite passes -> save -> validate -> report),
one module per step.
"""

__version__ = "0.1.0"
