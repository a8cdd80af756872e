#!/usr/bin/env python
"""Train and export small real ONNX models on scikit-learn's bundled digits data.

Usage::

    python sample_models/build.py [--out DIR] [--seed 0]
    python sample_models/build.py --smooth [--out DIR] [--seed 0]

Writes into DIR (default: the folder of this script):

* ``digits_mlp.onnx``          MLP 64-256-256-10 (Gemm), input ``input`` [batch, 64]
* ``digits_cnn.onnx``          Conv/BatchNorm CNN, input ``input`` [batch, 1, 8, 8]
* ``digits_resnet.onnx``       small ResNet (2 residual blocks), input [batch, 1, 8, 8]
* ``digits_transformer.onnx``  2-layer transformer encoder (hand-written attention,
                               MatMul + Add projections), input [batch, 1, 8, 8]
* ``digits_test.npz``          held-out test split
* ``digits_calib.npz``         512 training samples for calibration
* ``accuracy.json``            onnxruntime test accuracy, parameter counts, file sizes

With ``--smooth`` it writes ONLY the smooth variants (nothing else is touched):

* ``digits_mlp_smooth.onnx``   the MLP trained with ``onnx_lowrank.torch.smooth_penalty``
* ``digits_cnn_smooth.onnx``   the CNN trained with ``onnx_lowrank.torch.smooth_penalty``

Same data, seeds, epochs and optimizer as the plain models; the loss adds
``smooth_penalty(model, **SMOOTH_STRENGTHS)`` (nuclear norm + first/second differences of
every weight matrix), which makes them compress with little loss and no fine-tuning.

All models output ``logits`` [batch, 10], are exported with opset 17, a dynamic
batch dimension and IR version <= 9, and keep their weights as float32
initializers. The digits data ships with scikit-learn, so nothing is downloaded.
Requires torch (tested with 2.13.0, CPU), scikit-learn, onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import random
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OPSET = 17
MAX_IR_VERSION = 9
N_CALIB = 512
ATOL = 1e-4


# --------------------------------------------------------------------------- models


class DigitsMLP(nn.Module):
    """64-256-256-10 MLP with ReLU; input [batch, 64]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, MaxPool, Flatten, Linear-ReLU-Linear; input [batch, 1, 8, 8]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, bias=False)  # 8x8 -> 6x6
        self.bn2 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)  # 6x6 -> 3x3
        self.fc1 = nn.Linear(64 * 3 * 3, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN + shortcut, then ReLU (1x1 strided projection if needed)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem conv, identity block (32), projection block (32->64, stride 2), GAP, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.block1 = BasicBlock(32, 32, stride=1)
        self.block2 = BasicBlock(32, 64, stride=2)  # 8x8 -> 4x4, 1x1 projection
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V/out nn.Linear projections."""

    def __init__(self, d_model: int, n_heads: int, n_tokens: int) -> None:
        super().__init__()
        assert d_model % n_heads == 0
        self.n_tokens = n_tokens
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, D] -> [B, H, T, Dh]; python-int shape (-1 = batch) so the export is
        # a single Reshape with a constant shape instead of Shape/Gather/Concat chains
        return x.reshape(-1, self.n_tokens, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)  # [B, H, T, Dh]
        out = out.transpose(1, 2).reshape(-1, self.n_tokens, self.d_model)  # [B, T, D]
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: x + MHSA(LN(x)); x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_tokens: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, n_tokens)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return x


class DigitsTransformer(nn.Module):
    """8 tokens (image rows) of 8 pixels -> Linear(8, 64) + learned positions,
    2 encoder layers (4 heads, FFN 64-256-64), final LayerNorm, mean pool, Linear.
    Input [batch, 1, 8, 8]."""

    def __init__(self, d_model: int = 64, n_heads: int = 4, d_ff: int = 256,
                 n_layers: int = 2, n_tokens: int = 8, d_token: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(d_token, d_model)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            [EncoderLayer(d_model, n_heads, d_ff, n_tokens) for _ in range(n_layers)]
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.squeeze(1)  # [B, 1, 8, 8] -> [B, 8 tokens, 8 features]
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        x = self.ln_f(x).mean(dim=1)
        return self.head(x)


# (name, constructor, input key in the npz files, epochs, learning rate)
MODELS = [
    ("digits_mlp", DigitsMLP, "input_flat", 40, 1e-3),
    ("digits_cnn", DigitsCNN, "input_image", 30, 1e-3),
    ("digits_resnet", DigitsResNet, "input_image", 30, 1e-3),
    ("digits_transformer", DigitsTransformer, "input_image", 60, 1e-3),
]
# --smooth: which models get a smooth variant, and the regularizer's weights. The nuclear norm
# does the work; the difference terms are kept small because a summed squared difference over
# ~1e5 weights otherwise outweighs the cross-entropy (see onnx_lowrank/torch/smooth.py).
SMOOTH_MODELS = ("digits_mlp", "digits_cnn")
SMOOTH_STRENGTHS = {"nuclear": 1e-2, "first": 1e-4, "second": 1e-4}


# --------------------------------------------------------------------------- helpers


def set_determinism(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def load_data(seed: int) -> dict[str, dict[str, np.ndarray]]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # [1797, 64], pixels in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    rng = np.random.RandomState(seed)
    calib_idx = np.sort(rng.choice(len(x_tr), size=N_CALIB, replace=False))

    def pack(xf: np.ndarray, yy: np.ndarray) -> dict[str, np.ndarray]:
        xf = np.ascontiguousarray(xf, dtype=np.float32)
        return {
            "input_flat": xf,
            "input_image": xf.reshape(-1, 1, 8, 8).copy(),
            "labels": np.ascontiguousarray(yy, dtype=np.int64),
        }

    return {
        "train": pack(x_tr, y_tr),
        "test": pack(x_te, y_te),
        "calib": pack(x_tr[calib_idx], y_tr[calib_idx]),
    }


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float,
          seed: int, batch_size: int = 64, penalty=None) -> None:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


def _unalias_initializers(proto: onnx.ModelProto) -> None:
    """The TorchScript exporter deduplicates bit-identical parameters and re-creates
    the duplicate as ``Identity(initializer)`` (here: in the ResNet projection block
    the shortcut-BN bias and the main-branch BN bias receive identical gradients, so
    they stay equal). Turn each such Identity back into its own float32 initializer
    so every weight is a plain initializer."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation / PRESERVE notes
        torch.onnx.export(
            model,
            (example,),
            buf,
            dynamo=False,  # TorchScript exporter: no onnxscript needed, Linear -> Gemm
            export_params=True,
            opset_version=OPSET,
            # PRESERVE on an eval-mode model keeps BatchNormalization nodes
            # (inference form) instead of folding them into Conv.
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
            keep_initializers_as_inputs=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_from_string(buf.getvalue())
    _unalias_initializers(proto)
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)
    return proto


def ort_run(path: str, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(proto: onnx.ModelProto) -> dict:
    def shape(vi: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {
        "inputs": {vi.name: shape(vi) for vi in proto.graph.input},
        "outputs": {vi.name: shape(vi) for vi in proto.graph.output},
        "ops": dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items())),
        "n_initializers": len(proto.graph.initializer),
        "ir_version": proto.ir_version,
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
    }


def smooth_penalty_function():
    """``onnx_lowrank.torch.smooth_penalty`` bound to SMOOTH_STRENGTHS (repo root on the path
    when the package is not installed)."""
    try:
        from onnx_lowrank.torch import smooth_penalty
    except ImportError:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from onnx_lowrank.torch import smooth_penalty
    return lambda model: smooth_penalty(model, **SMOOTH_STRENGTHS)


def build_smooth(out: str, seed: int) -> int:
    """Train and export the smooth variants only (``--smooth``)."""
    penalty = smooth_penalty_function()
    set_determinism(seed)
    data = load_data(seed)
    for i, (name, ctor, key, epochs, lr) in enumerate(MODELS):
        if name not in SMOOTH_MODELS:
            continue
        t0 = time.perf_counter()
        torch.manual_seed(seed + i)  # the plain model's seed: the penalty is the only difference
        model = ctor()
        train(model, data["train"][key], data["train"]["labels"], epochs, lr, seed=seed + i, penalty=penalty)
        x_test, y_test = data["test"][key], data["test"]["labels"]
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(x_test)).numpy()
        path = os.path.join(out, f"{name}_smooth.onnx")
        export_onnx(model, torch.from_numpy(x_test[:2]), path)
        ort_logits = ort_run(path, x_test)
        max_diff = float(np.abs(ort_logits - torch_logits).max())
        if max_diff > ATOL:
            raise SystemExit(f"{name}_smooth: onnxruntime vs torch max |diff| {max_diff:.3g} > {ATOL}")
        acc = float((ort_logits.argmax(1) == y_test).mean())
        print(f"{name}_smooth: test acc (onnxruntime) {acc:.4f}  strengths {SMOOTH_STRENGTHS}  "
              f"size {os.path.getsize(path) / 1024:.1f} KiB  ({time.perf_counter() - t0:.1f}s)")
    return 0


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output folder (default: the folder of this script)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smooth", action="store_true",
                    help="write only the smooth variants digits_{mlp,cnn}_smooth.onnx "
                         "(trained with onnx_lowrank.torch.smooth_penalty)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.smooth:
        return build_smooth(args.out, args.seed)
    t_start = time.perf_counter()

    set_determinism(args.seed)
    data = load_data(args.seed)
    for split in ("test", "calib"):
        path = os.path.join(args.out, f"digits_{split}.npz")
        np.savez_compressed(path, **data[split])
    print(f"data: train={len(data['train']['labels'])} test={len(data['test']['labels'])} "
          f"calib={len(data['calib']['labels'])}")

    report: dict[str, dict] = {}
    for i, (name, ctor, key, epochs, lr) in enumerate(MODELS):
        t0 = time.perf_counter()
        torch.manual_seed(args.seed + i)
        model = ctor()
        train(model, data["train"][key], data["train"]["labels"], epochs, lr,
              seed=args.seed + i)

        x_test = data["test"][key]
        y_test = data["test"]["labels"]
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(x_test)).numpy()

        path = os.path.join(args.out, f"{name}.onnx")
        proto = export_onnx(model, torch.from_numpy(x_test[:2]), path)
        ort_logits = ort_run(path, x_test)
        max_diff = float(np.abs(ort_logits - torch_logits).max())
        if max_diff > ATOL:
            raise SystemExit(f"{name}: onnxruntime vs torch max |diff| {max_diff:.3g} > {ATOL}")
        # also check a different batch size (dynamic batch axis)
        ort_one = ort_run(path, x_test[:1])
        if np.abs(ort_one - torch_logits[:1]).max() > ATOL:
            raise SystemExit(f"{name}: batch-1 output differs from torch")

        acc_ort = float((ort_logits.argmax(1) == y_test).mean())
        acc_torch = float((torch_logits.argmax(1) == y_test).mean())
        size = os.path.getsize(path)
        info = describe(proto)
        report[name] = {
            "test_accuracy": round(acc_ort, 4),
            "test_accuracy_torch": round(acc_torch, 4),
            "params": count_params(model),
            "file_size_bytes": size,
            "input_key": key,
            "input_shape": info["inputs"]["input"],
            "ir_version": info["ir_version"],
            "opset": info["opset"]["ai.onnx"],
        }
        print(f"{name}: test acc (onnxruntime) {acc_ort:.4f}  torch {acc_torch:.4f}  "
              f"max|ort-torch| {max_diff:.2e}  params {count_params(model)}  "
              f"size {size / 1024:.1f} KiB  ir {info['ir_version']}  "
              f"({time.perf_counter() - t0:.1f}s)")
        print(f"    inputs {info['inputs']} outputs {info['outputs']}")
        print(f"    ops {info['ops']}")

    meta = {
        "dataset": "sklearn.datasets.load_digits, pixels/16, "
                   "train_test_split(test_size=0.2, stratify=y, random_state=0)",
        "n_test": int(len(data["test"]["labels"])),
        "n_calib": int(len(data["calib"]["labels"])),
        "seed": args.seed,
        "models": report,
    }
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False)
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(args.out, fn)) for fn in os.listdir(args.out)
                if os.path.isfile(os.path.join(args.out, fn)))
    print(f"total size of {args.out}: {total / 1024:.1f} KiB; "
          f"elapsed {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
