"""What the TT and Tucker-2 conv tests share: a random conv geometry and running a kernel chain."""

from __future__ import annotations

import numpy as np


def random_conv_case(torch, rng: np.random.Generator, spatial_ndim: int):
    """(kernel, stride, padding, dilation, x): a float32 conv of 1-12 channels each way, kernel
    1-3, stride 1-3, padding 0-2, dilation 1-2, and a batch-2 input of 9-13 per spatial axis."""
    cout, cin = (int(c) for c in rng.integers(1, 13, size=2))
    spatial = tuple(int(k) for k in rng.integers(1, 4, size=spatial_ndim))
    kernel = rng.standard_normal((cout, cin, *spatial)).astype(np.float32)
    stride = tuple(int(s) for s in rng.integers(1, 4, size=spatial_ndim))
    padding = tuple(int(p) for p in rng.integers(0, 3, size=spatial_ndim))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=spatial_ndim))
    x = torch.from_numpy(rng.standard_normal((2, cin, *rng.integers(9, 14, size=spatial_ndim))).astype(np.float32))
    return kernel, stride, padding, dilation, x


def conv_chain(torch, x, kernels, stride, padding, dilation):
    """1x1 -> k x k (with the original geometry) -> 1x1 convs, as the lowering emits them."""
    conv = torch.nn.functional.conv1d if x.ndim == 3 else torch.nn.functional.conv2d
    first, core, last = (torch.from_numpy(k) for k in kernels)
    y = conv(x, first)
    y = conv(y, core, stride=stride, padding=padding, dilation=dilation)
    return conv(y, last)
