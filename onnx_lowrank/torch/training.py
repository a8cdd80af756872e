"""What fine-tuning and ACIP share: determinism, data splits, distillation losses, metrics.

Distillation losses are looked up by name in ``LOSSES``; each takes the student's and the
teacher's value of one output, the temperature and an optional [batch, positions] mask (1 =
real position, 0 = padding; None = every position counts) and returns a 0-D tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from onnx_lowrank.errors import InputError, OptionError


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic torch for the block; every global setting is restored after.

    Fixes the intra-op thread count (floating-point sums depend on how work is split), turns
    on deterministic algorithms and forks the global RNG so the caller's stream is untouched.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
            torch.set_num_threads(previous_threads)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) sample indices; ``fraction`` of ``n`` is held out.

    At least one sample is held out when ``fraction`` > 0 and ``n`` >= 2, and at least one is
    left for training. Both index arrays are sorted.
    """
    if n < 1:
        raise InputError("no samples to train on")
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    held = min(max(1, round(n * fraction)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def take(feeds: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``index`` of every array (contiguous copies)."""
    return {name: np.ascontiguousarray(array[index]) for name, array in feeds.items()}


def to_torch(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in feeds.items()}


def is_classifier(array: np.ndarray | torch.Tensor) -> bool:
    """A [batch, classes] float output with at least two classes."""
    if array.ndim != 2 or array.shape[1] < 2:
        return False
    if isinstance(array, torch.Tensor):
        return array.is_floating_point()
    return array.dtype.kind == "f"


def require(checks) -> None:
    """Raise :class:`OptionError` with the message of the first ``(ok, message)`` that fails."""
    for ok, message in checks:
        if not ok:
            raise OptionError(message)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` at step 0 to 0 after ``total`` steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# --------------------------------------------------------------------------- losses


def _applies(mask: torch.Tensor | None, value: torch.Tensor) -> bool:
    """Whether ``mask`` ([batch, positions]) describes the first two axes of a >= 3-D ``value``."""
    return mask is not None and value.dim() >= 3 and tuple(value.shape[:2]) == tuple(mask.shape)


def _mse(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with a mask, over the real positions only (padding is ignored)."""
    del temperature
    if not _applies(mask, student):
        return F.mse_loss(student.float(), teacher.float())
    per_position = ((student.float() - teacher.float()) ** 2).flatten(2).mean(-1)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def _mean_cosine(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - cosine between student and teacher embeddings, averaged over the batch.

    For [batch, positions, features] outputs the embedding is the mean over the positions
    (the real ones only with a mask), the sentence embedding of mean-pooled encoders; 2-D
    outputs are compared row by row; 1-D outputs fall back to the MSE.
    """
    if student.dim() < 2:
        return _mse(student, teacher, temperature)
    s, t = student.float(), teacher.float()
    if s.dim() >= 3:
        weights = (mask if _applies(mask, s) else torch.ones(s.shape[:2])).to(s.dtype)
        weights = weights.reshape(*weights.shape, *([1] * (s.dim() - 2)))
        count = weights.sum(1).clamp_min(1.0)
        s, t = (s * weights).sum(1) / count, (t * weights).sum(1) / count
    return 1.0 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=-1).mean()


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the softmax over the last axis at ``temperature``, times T^2.

    Outputs that are not distributions (1-D, or one class) fall back to the MSE. The mask is
    not used.
    """
    del mask
    if student.dim() < 2 or student.shape[-1] < 2:
        return _mse(student, teacher, temperature)
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=-1).mean()
    return kl * temperature**2


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": _mse, "kl": _kl, "mean-cosine": _mean_cosine}


def distill_loss(
    outputs: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    kind: str,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the float outputs of ``LOSSES[kind]`` (student vs teacher).

    ``mask`` ([batch, positions], nonzero = real position) applies to every output whose first
    two axes have its shape; the others are compared whole.
    """
    terms = [LOSSES[kind](outputs[name], target, temperature, mask) for name, target in targets.items()]
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A model's outputs against the original's (and labels) on some samples.

    ``rel_error``: ||y - y_orig|| / ||y_orig|| over every float output (dimensionless);
    ``agreement``: fraction of samples whose argmax (first [batch, classes] output) matches the
    original's; ``accuracy``: fraction matching the labels. Both None when not applicable.
    """

    samples: int
    rel_error: float
    agreement: float | None
    accuracy: float | None

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "rel_error": round(self.rel_error, 6),
            "agreement": None if self.agreement is None else round(self.agreement, 6),
            "accuracy": None if self.accuracy is None else round(self.accuracy, 6),
        }


def metrics(
    outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], labels: np.ndarray | None
) -> Metrics:
    """:class:`Metrics` of ``outputs`` against ``reference`` (the original's) and ``labels``."""
    names = [name for name, array in reference.items() if array.dtype.kind == "f"]
    diff = sum(float(np.sum((outputs[n].astype(np.float64) - reference[n].astype(np.float64)) ** 2)) for n in names)
    norm = sum(float(np.sum(reference[n].astype(np.float64) ** 2)) for n in names)
    rel = math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
    first = next((n for n in names if is_classifier(reference[n])), None)
    samples = int(next(iter(reference.values())).shape[0]) if reference else 0
    agreement = accuracy = None
    if first is not None:
        predicted = outputs[first].argmax(axis=1)
        agreement = float(np.mean(predicted == reference[first].argmax(axis=1)))
        if labels is not None:
            accuracy = float(np.mean(predicted == labels))
    return Metrics(samples, rel, agreement, accuracy)
