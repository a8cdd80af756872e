"""Learning on the exported graph (needs torch, the ``[torch]`` extra).

- :mod:`onnx_lowrank.torch.interpreter`: run an ONNX graph as a ``torch.nn.Module``;
- :mod:`onnx_lowrank.torch.finetune`: distill a compressed model's factors toward the original;
- :mod:`onnx_lowrank.torch.acip`: ACIP-style learned global ranking of singular values;
- :func:`smooth_penalty`: a regularizer that makes a model you train yourself compressible.

Only this package imports torch; the rest of onnx_lowrank never does at import time.
"""

from onnx_lowrank.torch.smooth import smooth_penalty

__all__ = ["smooth_penalty"]
