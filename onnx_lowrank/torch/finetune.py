"""Distillation fine-tuning of a compressed model's low-rank factors toward the original.

    original (ORT) -> teacher outputs
    compressed -> OnnxModule (factors trainable) -> verified against ORT -> Adam on the
    distillation loss (+ label cross-entropy) -> trained values written back BY NAME into
    the compressed graph, which is otherwise byte-identical.

``--anneal`` (TuneComp's joint mode): training starts from the original factorized at a higher
rank (``anneal_factor`` x each layer's target rank, capped at full rank) and, at scheduled
steps in the first half of the run, every factor pair (A, B) is replaced by the truncated SVD
of A @ B at the next rank down, ending at the compressed model's ranks; the result then has
exactly the compressed model's structure. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import torch

from onnx_lowrank.decompose.svd import truncated_svd
from onnx_lowrank.errors import InputError, OptionError
from onnx_lowrank.layers import Layer, find_layers
from onnx_lowrank.search.plan import LayerDecision, RankPlan
from onnx_lowrank.torch.interpreter import (
    FACTOR_MARK,
    TORCH_DTYPES,
    OnnxModule,
    Verification,
    check_supported,
    is_factor,
    train_everything,
    verify_against_onnxruntime,
)
from onnx_lowrank.torch.training import (
    LOSSES,
    Metrics,
    cosine_lr,
    deterministic,
    distill_loss,
    is_classifier,
    metrics,
    require,
    split_holdout,
    take,
    to_torch,
)
from onnx_lowrank.validate.data import check_mask_input

log = logging.getLogger(__name__)

TRAIN_SETS: dict[str, Callable[[str], bool]] = {"factors": is_factor, "all": train_everything}
ANNEAL_END = 0.5  # the last truncation happens at this fraction of the run; the rest trains at target rank


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune (parsed at the CLI boundary; errors name the flag).

    Attributes:
        epochs: passes over the training part of the data.
        lr: Adam learning rate at the start (cosine decay to 0 over the run).
        batch_size: samples per optimizer step.
        seed: seeds the split, the shuffles and torch.
        train: "factors" (initializers named ``*.lowrank.*``) or "all" (every float weight).
        loss: "mse" on every float output (output units squared), "kl" (KL divergence of
            the softmax over the last axis at ``temperature``, times T^2, for logits) or
            "mean-cosine" (1 - cosine of the outputs mean-pooled over axis 1: the sentence
            embeddings of mean-pooled encoders; 2-D outputs compared row by row).
        mask_input: the model input holding a [batch, positions] mask (1 = real token,
            0 = padding), e.g. ``attention_mask``: the MSE then ignores padded positions and
            "mean-cosine" pools over the real ones. None: every position counts.
        temperature: softmax temperature of the KL loss.
        label_weight: with labels, loss = (1 - w) * distillation + w * cross-entropy of the
            first [batch, classes] output; ignored without labels.
        holdout: fraction of the samples held out for the before/after figures.
        anneal: TuneComp's joint mode (see the module docstring).
        anneal_factor: starting rank = min(ceil(factor x target rank), full rank).
        anneal_stages: truncation steps from the starting to the target rank.
        threads: torch intra-op threads (fixed, for reproducible sums).
        verify_rtol: the interpreter must match onnxruntime within this max-relative error.
        verify_samples: how many samples that check uses.
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    train: str = "factors"
    loss: str = "mse"
    mask_input: str | None = None
    temperature: float = 2.0
    label_weight: float = 0.5
    holdout: float = 0.1
    anneal: bool = False
    anneal_factor: float = 2.0
    anneal_stages: int = 4
    threads: int = 1
    verify_rtol: float = 1e-4
    verify_samples: int = 64

    def __post_init__(self):
        checks = (
            (self.epochs >= 1, f"--epochs must be a positive integer, got {self.epochs}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.batch_size >= 1, f"--batch must be a positive integer, got {self.batch_size}"),
            (self.train in TRAIN_SETS, f"--train must be one of {', '.join(TRAIN_SETS)}, got {self.train!r}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.temperature > 0, f"--temperature must be positive, got {self.temperature}"),
            (0 <= self.label_weight <= 1, f"--label-weight must be in [0, 1], got {self.label_weight}"),
            (0 <= self.holdout < 1, f"--holdout must be in [0, 1), got {self.holdout}"),
            (self.anneal_factor >= 1, f"--anneal-factor must be >= 1, got {self.anneal_factor}"),
            (self.anneal_stages >= 1, f"--anneal-stages must be a positive integer, got {self.anneal_stages}"),
            (self.threads >= 1, f"--threads must be a positive integer, got {self.threads}"),
        )
        require(checks)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EpochStats:
    """Mean losses over one epoch's steps (loss = what was minimized; task = cross-entropy)."""

    epoch: int
    loss: float
    distill: float
    task: float | None
    seconds: float
    ranks: dict[str, int] | None = None  # annealing: each layer's rank at the end of the epoch

    def to_json(self) -> dict:
        out = {"epoch": self.epoch, "loss": self.loss, "distill": self.distill, "task": self.task,
               "seconds": round(self.seconds, 3)}
        if self.ranks is not None:
            out["ranks"] = self.ranks
        return out


@dataclasses.dataclass(frozen=True)
class FactorPair:
    """One factorized layer of the compressed model: its two factor initializers and rank."""

    layer: str
    form: str
    first: str  # applied first (``<weight>.lowrank.0``)
    second: str  # applied second (``<weight>.lowrank.1``)
    rank: int
    max_rank: int


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned model (compressed structure, trained values) and the run's figures."""

    model: onnx.ModelProto
    history: tuple[EpochStats, ...]
    original: Metrics  # the teacher against itself: accuracy only is informative
    before: Metrics
    after: Metrics
    evaluated_on: str  # "holdout" or "train" (when nothing could be held out)
    trained: tuple[str, ...]
    trained_values: int
    verification: Verification
    seconds: float
    options: FinetuneOptions
    anneal_ranks: dict[str, tuple[int, int]] | None = None  # layer -> (start rank, target rank)

    def to_json(self) -> dict:
        out = {
            "options": self.options.to_json(),
            "seconds": round(self.seconds, 3),
            "trained_tensors": list(self.trained),
            "trained_values": self.trained_values,
            "interpreter_max_rel_error": self.verification.worst,
            "evaluated_on": self.evaluated_on,
            "original": self.original.to_json(),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
            "history": [e.to_json() for e in self.history],
        }
        if self.anneal_ranks is not None:
            out["anneal"] = {name: {"start": a, "target": b} for name, (a, b) in self.anneal_ranks.items()}
        return out


def finetune(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    options: FinetuneOptions | None = None,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Distill ``compressed`` toward ``original`` on ``feeds`` (batch-first arrays by input name).

    Returns the compressed model with its trained tensors replaced by name. Raises
    :class:`UnsupportedError` when an op cannot run in torch or the interpreter disagrees with
    onnxruntime, :class:`InputError` for models that do not belong together or hold nothing to
    train.
    """
    from onnx_lowrank.validate.data import Dataset
    from onnx_lowrank.validate.reference import run_reference

    options = options or FinetuneOptions()
    started = time.perf_counter()
    check_supported(original)
    check_supported(compressed)
    _check_same_interface(original, compressed)
    n = Dataset(dict(feeds), source="the data").n  # every input must have as many samples
    if n == 0:
        raise InputError("the data has no samples")
    train_index, held_index = split_holdout(n, options.holdout, options.seed)
    eval_index, evaluated_on = (held_index, "holdout") if len(held_index) else (train_index, "train")
    if labels is not None and len(labels) != n:
        raise InputError(f"labels have {len(labels)} entries but the data has {n} samples")

    if options.mask_input is not None:
        check_mask_input(compressed, feeds, options.mask_input)
    teacher = run_reference(original, feeds, batch_size=256)
    targets = {name: array for name, array in teacher.items() if array.dtype.kind == "f"}
    if labels is not None and not any(is_classifier(a) for a in targets.values()):
        raise OptionError("labels were given but no model output is [batch, classes]; drop --labels/--labels-key")
    eval_feeds = take(feeds, eval_index)
    eval_labels = labels[eval_index] if labels is not None else None
    eval_teacher = take(teacher, eval_index)
    before = metrics(run_reference(compressed, eval_feeds, batch_size=256), eval_teacher, eval_labels)
    reference_metrics = metrics(eval_teacher, eval_teacher, eval_labels)

    with deterministic(options.seed, options.threads):
        pairs: list[FactorPair] = []
        start_model = compressed
        if options.anneal:
            pairs, start_model = anneal_start(original, compressed, options.anneal_factor)
        student = OnnxModule(start_model, TRAIN_SETS[options.train])
        check_feeds = take(feeds, train_index[: options.verify_samples])
        verification = verify_against_onnxruntime(start_model, check_feeds, options.verify_rtol, module=student)
        params = student.named_onnx_parameters()
        if not params:
            hint = " (was it written by onnx-lowrank compress? or use --train all)" if options.train == "factors" else ""
            raise InputError(f"the compressed model has no trainable {options.train} tensors{hint}")
        history = _train(
            student, take(feeds, train_index), take(targets, train_index),
            labels[train_index] if labels is not None else None, pairs, options, on_epoch,
        )
        trained = {name: p.detach() for name, p in student.named_onnx_parameters().items()}
    result_model = write_back(compressed, {name: value for name, value in trained.items() if _has_tensor(compressed, name)})
    after = metrics(run_reference(result_model, eval_feeds, batch_size=256), eval_teacher, eval_labels)
    anneal_ranks = {p.layer: (_pair_rank_start(p, options.anneal_factor), p.rank) for p in pairs} if options.anneal else None
    return FinetuneResult(
        model=result_model,
        history=tuple(history),
        original=reference_metrics,
        before=before,
        after=after,
        evaluated_on=evaluated_on,
        trained=tuple(sorted(trained)),
        trained_values=int(sum(v.numel() for v in trained.values())),
        verification=verification,
        seconds=time.perf_counter() - started,
        options=options,
        anneal_ranks=anneal_ranks,
    )


def _train(
    student: OnnxModule,
    feeds: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    labels: np.ndarray | None,
    pairs: list[FactorPair],
    options: FinetuneOptions,
    on_epoch: Callable[[EpochStats], None] | None,
) -> list[EpochStats]:
    x = to_torch(feeds)
    t = to_torch(targets)
    y = torch.from_numpy(labels) if labels is not None else None
    classifier = next((name for name, v in t.items() if is_classifier(v)), None)
    mask = x[options.mask_input] != 0 if options.mask_input is not None else None
    n = next(iter(x.values())).shape[0]
    per_epoch = -(-n // options.batch_size)
    total = options.epochs * per_epoch
    schedule = anneal_schedule(pairs, options.anneal_factor, options.anneal_stages, total)
    generator = torch.Generator().manual_seed(options.seed)
    optimizer = torch.optim.Adam(list(student.named_onnx_parameters().values()), lr=options.lr)
    label_weight = options.label_weight if y is not None else 0.0
    history: list[EpochStats] = []
    step = 0
    for epoch in range(options.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(n, generator=generator)
        sums = np.zeros(3)
        for batch in range(per_epoch):
            if step in schedule:
                truncate_pairs(student, pairs, schedule[step])
                optimizer = torch.optim.Adam(list(student.named_onnx_parameters().values()), lr=options.lr)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(options.lr, step, total)
            index = order[batch * options.batch_size : (batch + 1) * options.batch_size]
            outputs = student.run({name: value[index] for name, value in x.items()})
            distill = distill_loss(
                outputs, {k: v[index] for k, v in t.items()}, options.loss, options.temperature,
                mask[index] if mask is not None else None,
            )
            loss = distill
            task = None
            if label_weight:
                task = torch.nn.functional.cross_entropy(outputs[classifier].float(), y[index])
                loss = (1 - label_weight) * distill + label_weight * task
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += [loss.item(), distill.item(), task.item() if task is not None else 0.0]
            step += 1
        means = sums / per_epoch
        stats = EpochStats(
            epoch=epoch + 1,
            loss=float(means[0]),
            distill=float(means[1]),
            task=float(means[2]) if label_weight else None,
            seconds=time.perf_counter() - epoch_start,
            ranks=_current_ranks(student, pairs) if pairs else None,
        )
        log.info("epoch %d: loss %.6g", stats.epoch, stats.loss)
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
    pending = [ranks for at, ranks in sorted(schedule.items()) if at >= step]
    if pending:  # a run shorter than the schedule still ends at the target ranks
        truncate_pairs(student, pairs, pending[-1])
    return history


# --------------------------------------------------------------------------- write-back


def write_back(model: onnx.ModelProto, values: Mapping[str, torch.Tensor | np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the payload of each named initializer (or float Constant node
    tensor) of the main graph replaced by ``values[name]``; nothing else changes.

    Shapes must match; values are cast to the tensor's element type.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    pending = dict(values)
    for init in result.graph.initializer:
        if init.name in pending:
            _set_payload(init, pending.pop(init.name))
    for node in result.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in pending:
            for attr in node.attribute:
                if attr.name == "value":
                    _set_payload(attr.t, pending.pop(node.output[0]))
    if pending:
        raise KeyError(f"no initializer or Constant tensor named {', '.join(sorted(pending))}")
    return result


def _set_payload(proto: onnx.TensorProto, value: torch.Tensor | np.ndarray) -> None:
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if tuple(tensor.shape) != tuple(proto.dims):
        raise ValueError(f"tensor {proto.name}: new value has shape {tuple(tensor.shape)}, stored {tuple(proto.dims)}")
    data = tensor.detach().cpu().to(TORCH_DTYPES[proto.data_type]).contiguous().reshape(-1)
    typed_field = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data"}.get(proto.data_type)
    if typed_field and not proto.HasField("raw_data") and len(getattr(proto, typed_field)):
        field = getattr(proto, typed_field)  # keep the storage field the exporter chose
        del field[:]
        field.extend(data.tolist())
        return
    for name in ("float_data", "double_data", "int32_data", "int64_data"):
        proto.ClearField(name)
    proto.raw_data = data.view(torch.uint8).numpy().tobytes()  # ONNX raw data is little-endian


def _has_tensor(model: onnx.ModelProto, name: str) -> bool:
    return any(init.name == name for init in model.graph.initializer) or any(
        node.op_type == "Constant" and node.output and node.output[0] == name for node in model.graph.node
    )


# --------------------------------------------------------------------------- annealing


def factor_pairs(original: onnx.ModelProto, layers: list[Layer], compressed: onnx.ModelProto) -> list[FactorPair]:
    """The SVD factor pairs of ``compressed`` for the layers of ``original`` that it factorized."""
    shapes = {init.name: tuple(init.dims) for init in compressed.graph.initializer}
    pairs = []
    for layer in layers:
        if not layer.supported or layer.scope:
            continue
        prefix = f"{layer.weight}{FACTOR_MARK}"
        names = sorted(name for name in shapes if name.startswith(prefix))
        if not names:
            continue
        first = [name for name in names if name[len(prefix) :].startswith("0")]
        second = [name for name in names if name[len(prefix) :].startswith("1")]
        if len(names) != 2 or len(first) != 1 or len(second) != 1:
            raise OptionError(
                f"--anneal needs SVD factor pairs; layer {layer.name} has factors {', '.join(names)}"
            )
        rank = shapes[first[0]][_RANK_AXIS[layer.form]]
        pairs.append(FactorPair(layer.name, layer.form, first[0], second[0], int(rank), layer.max_rank))
    return pairs


def anneal_start(
    original: onnx.ModelProto, compressed: onnx.ModelProto, factor: float
) -> tuple[list[FactorPair], onnx.ModelProto]:
    """The factor pairs of ``compressed`` and ``original`` factorized at the starting ranks."""
    from onnx_lowrank.compress import apply_plan

    layers = find_layers(original)
    pairs = factor_pairs(original, layers, compressed)
    if not pairs:
        raise InputError("--anneal: the compressed model has no SVD factors of the original's layers")
    plan = RankPlan(
        layers={p.layer: LayerDecision("factorize", "svd", rank=_pair_rank_start(p, factor)) for p in pairs},
        method="anneal-start",
    )
    start = apply_plan(original, layers, plan).model
    start_shapes = {init.name: tuple(init.dims) for init in start.graph.initializer}
    target_shapes = {init.name: tuple(init.dims) for init in compressed.graph.initializer}
    for pair in pairs:
        for name in (pair.first, pair.second):
            if name not in start_shapes:
                raise InputError(
                    f"--anneal: factor {name} of the compressed model does not appear when the original is "
                    "re-factorized; the two models must be the input and output of onnx-lowrank compress"
                )
    others = set(start_shapes) - {n for p in pairs for n in (p.first, p.second)}
    mismatched = sorted(n for n in others if n in target_shapes and target_shapes[n] != start_shapes[n])
    if mismatched:
        raise InputError(f"--anneal: tensors {', '.join(mismatched)} differ in shape between the two models")
    log.info("anneal: start ranks %s", {p.layer: _pair_rank_start(p, factor) for p in pairs})
    return pairs, start


def _pair_rank_start(pair: FactorPair, factor: float) -> int:
    return min(math.ceil(pair.rank * factor), pair.max_rank)


def anneal_schedule(
    pairs: list[FactorPair], factor: float, stages: int, total_steps: int
) -> dict[int, dict[str, int]]:
    """Optimizer step -> the rank every pair is truncated to at that step.

    ``stages`` evenly spaced truncations over the first ``ANNEAL_END`` of the run, ranks
    decreasing linearly from the start rank to the target; the last one reaches the targets.
    """
    if not pairs:
        return {}
    schedule: dict[int, dict[str, int]] = {}
    for stage in range(1, stages + 1):
        at = min(int(total_steps * ANNEAL_END * stage / stages), max(total_steps - 1, 0))
        ranks = {}
        for pair in pairs:
            start = _pair_rank_start(pair, factor)
            ranks[pair.layer] = round(start - (start - pair.rank) * stage / stages)
        schedule[at] = ranks  # stages landing on the same step: the later (lower) one wins
    return schedule


def truncate_pairs(module: OnnxModule, pairs: list[FactorPair], ranks: Mapping[str, int]) -> None:
    """Replace each pair (A, B) by the truncated SVD of its product at ``ranks[layer]``."""
    with torch.no_grad():
        for pair in pairs:
            first, second = module.tensor(pair.first), module.tensor(pair.second)
            left, right = _TO_MATRICES[pair.form](first, second)
            if left.shape[1] <= ranks[pair.layer]:
                continue
            product = (left.double() @ right.double()).numpy()
            factors = truncated_svd(product, ranks[pair.layer])
            new_first, new_second = _FROM_MATRICES[pair.form](
                torch.from_numpy(factors.left), torch.from_numpy(factors.right), first.shape, second.shape
            )
            module.replace_tensor(pair.first, new_first)
            module.replace_tensor(pair.second, new_second)


def _current_ranks(module: OnnxModule, pairs: list[FactorPair]) -> dict[str, int]:
    return {p.layer: int(module.tensor(p.first).shape[_RANK_AXIS[p.form]]) for p in pairs}


# How each layer form stores its factors (see passes/factorize.py): the canonical matrix is
# M = L @ R (out x in); ``first``/``second`` are the initializers applied first/second.
_RANK_AXIS = {"in_out": 1, "out_in": 1, "left": 0, "conv": 0}  # the rank's axis in ``first``


def _gemm_to(first, second):
    return second.T, first.T


def _gemm_from(left, right, first_shape, second_shape):
    del first_shape, second_shape
    return right.T.contiguous(), left.T.contiguous()


def _left_to(first, second):
    return second, first


def _left_from(left, right, first_shape, second_shape):
    del first_shape, second_shape
    return right.contiguous(), left.contiguous()


def _conv_to(first, second):
    return second.reshape(second.shape[0], second.shape[1]), first.reshape(first.shape[0], -1)


def _conv_from(left, right, first_shape, second_shape):
    rank = left.shape[1]
    return right.reshape(rank, *first_shape[1:]), left.reshape(left.shape[0], rank, *second_shape[2:])


_TO_MATRICES = {"in_out": _gemm_to, "out_in": _gemm_to, "left": _left_to, "conv": _conv_to}
_FROM_MATRICES = {"in_out": _gemm_from, "out_in": _gemm_from, "left": _left_from, "conv": _conv_from}


# --------------------------------------------------------------------------- checks


def _check_same_interface(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    def interface(model):
        initializers = {i.name for i in model.graph.initializer}
        inputs = [v.name for v in model.graph.input if v.name not in initializers]
        return inputs, [v.name for v in model.graph.output]

    (in_a, out_a), (in_b, out_b) = interface(original), interface(compressed)
    if in_a != in_b or out_a != out_b:
        raise InputError(
            f"the two models do not belong together: ORIGINAL has inputs {in_a} / outputs {out_a}, "
            f"COMPRESSED has inputs {in_b} / outputs {out_b}"
        )
