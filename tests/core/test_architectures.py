"""Real torch exports of the architecture families users bring (small widths, random weights).

Each is exported by torch's ONNX exporter at a modern and a legacy opset, compressed at full
rank (outputs must not change) and at a budget (the model must stay valid and run).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from builders import full_rank, rel_error, run

from onnx_lowrank.compress import apply_plan
from onnx_lowrank.layers import find_layers
from onnx_lowrank.search import BudgetRequest, plan_for
from onnx_lowrank.search.budget import fraction_budget

torch = pytest.importorskip("torch")
nn = torch.nn


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 16), nn.MaxPool2d(2), conv_bn(16, 32), conv_bn(32, 32), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, 7, 2)
        self.blocks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class DenseInceptionish(nn.Module):
    """Dense concatenation, parallel 1x1 / 3x3 / 5x5 / pool branches, asymmetric kxl convs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.Conv2d(8, 12, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(16, 4, 1), nn.Conv2d(4, 8, (1, 5), padding=(0, 2)), nn.Conv2d(8, 8, (5, 1), padding=(2, 0)))
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(16, 8, 1))
        self.dense = conv_bn(16 + 36, 24)
        self.fc = nn.Linear(16 + 36 + 24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)
        x = torch.cat([x, self.dense(x)], 1)
        return self.fc(x.mean((2, 3)))


class ShuffleSqueezeish(nn.Module):
    """Grouped + depthwise convs, channel shuffle, SqueezeNet fire module."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 24)
        self.group = conv_bn(24, 24, 1, groups=3)
        self.depthwise = conv_bn(24, 24, 3, groups=24)
        self.squeeze = nn.Conv2d(24, 8, 1)
        self.expand1 = nn.Conv2d(8, 16, 1)
        self.expand3 = nn.Conv2d(8, 16, 3, padding=1)
        self.classifier = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        x = self.group(self.stem(x))
        b, c, h, w = x.shape
        x = x.view(b, 3, c // 3, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = torch.relu(self.squeeze(self.depthwise(x)))
        x = torch.cat([torch.relu(self.expand1(x)), torch.relu(self.expand3(x))], 1)
        return self.classifier(x).mean((2, 3))


class Encoderish(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        return self.out(self.encoder(self.embed(x)))


ARCHITECTURES = {
    "vgg": (VGGish, (2, 3, 16, 16)),
    "resnet": (ResNetish, (2, 3, 16, 16)),
    "dense_inception": (DenseInceptionish, (2, 3, 12, 12)),
    "shuffle_squeeze": (ShuffleSqueezeish, (2, 3, 12, 12)),
    "encoder": (Encoderish, (2, 6, 12)),
}


def export(module, shape, opset, fold_constants):
    torch.manual_seed(0)
    module = module().eval()
    with torch.no_grad():
        for param in module.parameters():  # BatchNorm statistics too, so BN does real work
            param.add_(torch.randn_like(param) * 0.01)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            buffer,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=fold_constants,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = min(model.ir_version, 9)
    return model


@pytest.mark.parametrize("era", ["modern", "legacy"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_export_compresses_exactly_at_full_rank_and_validly_at_budget(arch, era):
    module, shape = ARCHITECTURES[arch]
    # Legacy: an old opset without constant folding (weights reach layers through more nodes).
    opset, fold = (17, True) if era == "modern" else (14 if arch == "encoder" else 9, False)
    model = export(module, shape, opset, fold)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = run(model, {"input": x})[0]
    layers = find_layers(model)
    assert any(layer.supported for layer in layers)
    rewritten = full_rank(model)
    assert rel_error(run(rewritten, {"input": x})[0], expected) < 1e-5
    plan = plan_for(model, layers, BudgetRequest(fraction_budget("params", 0.5, flag="t")), min_params=64)
    compressed = apply_plan(model, layers, plan)
    assert compressed.totals["layer_params_after"] <= 0.5 * compressed.totals["layer_params_before"] + 1
    assert run(compressed.model, {"input": x})[0].shape == expected.shape
    skipped = {layer.skip.code for layer in layers if layer.skip}
    if arch == "shuffle_squeeze":
        assert "grouped_conv" in skipped
