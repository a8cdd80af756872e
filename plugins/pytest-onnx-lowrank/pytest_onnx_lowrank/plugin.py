"""pytest plugin: gate a compressed ONNX model on accuracy and latency inside a test.

The fixture ``onnx_lowrank_gate`` is a callable; each call measures the compressed model
against its original with :mod:`onnx_lowrank.validate.gate` (accuracy metrics, interleaved
speedup), checks absolute limits and, with ``baseline=``, regressions against a stored
baseline, and fails the test with one readable message when something is not met. Every
result is kept for the ``--onnx-lowrank-results`` JSON artifact and the terminal summary.

onnx_lowrank (and so onnxruntime) is imported only when a gate runs, so installing the plugin
costs other test sessions nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

RESULTS_FORMAT = "onnx-lowrank-pytest-results"
_RESULTS = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("onnx-lowrank", "onnx-lowrank accuracy/latency gates")
    group.addoption("--onnx-lowrank-results", metavar="PATH", default=None,
                    help="Write every onnx_lowrank_gate result to PATH as JSON.")
    group.addoption("--onnx-lowrank-provider", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                    help="Execution provider gates run on unless a test says otherwise (default: cpu).")
    group.addoption("--onnx-lowrank-update-baseline", action="store_true", default=False,
                    help="Write gates' baseline files from this run instead of comparing with them.")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULTS] = []


@dataclasses.dataclass(frozen=True)
class GateOutcome:
    """What one gate call measured and decided (also one entry of the results artifact)."""

    passed: bool
    metrics: dict
    failures: tuple[str, ...]
    record: dict


class Gate:
    """The callable behind the ``onnx_lowrank_gate`` fixture."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request
        self._config = request.config

    def __call__(
        self,
        original: str | os.PathLike,
        compressed: str | os.PathLike,
        *,
        data: str | os.PathLike | None = None,
        random: int | None = None,
        labels_key: str | None = None,
        input_map: dict[str, str] | None = None,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        min_speedup: float | None = None,
        max_accuracy_drop: float | None = None,
        min_cosine: float | None = None,
        max_rel_error: float | None = None,
        min_top1_agreement: float | None = None,
        baseline: str | os.PathLike | None = None,
        tolerances: list[str] | tuple[str, ...] = (),
        provider: str | None = None,
        threads: int | None = None,
        batch: int = 1,
        warmup: int = 10,
        iters: int = 50,
        latency: bool | None = None,
        seed: int = 0,
    ) -> GateOutcome:
        """Measure ``compressed`` against ``original`` and fail the test on an unmet limit.

        ``data``: an .npz of inputs (labels from an npz key "labels" or ``labels_key``), or
        ``random`` seeded samples (default 64). ``min_speedup`` is in x (median of interleaved
        per-run ratios original/compressed), ``max_accuracy_drop`` in percentage points.
        ``latency`` defaults to on unless no latency limit and no baseline is given.
        """
        from onnx_lowrank.errors import LowRankError
        from onnx_lowrank.validate import gate as gate_lib
        from onnx_lowrank.validate.accuracy import Thresholds
        from onnx_lowrank.validate.data import load_dataset, random_dataset
        from onnx_lowrank.validate.runtime import RuntimeOptions, input_specs

        original_path, compressed_path = self._path(original), self._path(compressed)
        baseline_path = self._path(baseline) if baseline is not None else None
        if latency is None:
            latency = min_speedup is not None or baseline_path is not None
        error = None
        try:
            parsed_tolerances = gate_lib.parse_tolerances(tolerances, flag="tolerances")
            options = RuntimeOptions(provider=provider or self._config.getoption("onnx_lowrank_provider"), threads=threads)
            thresholds = Thresholds(max_rel_error, min_cosine, min_top1_agreement, max_accuracy_drop)
            update = self._config.getoption("onnx_lowrank_update_baseline")
            stored = None
            if baseline_path is not None and not update:
                stored = gate_lib.Baseline.load(baseline_path)
            specs = input_specs(original_path)
            if data is not None:
                dataset = load_dataset(self._path(data), specs, input_map=input_map, labels_key=labels_key)
            else:
                dataset = random_dataset(specs, random or 64, shapes=input_shapes, seed=seed)
            current = gate_lib.measure_gate(
                original_path, compressed_path, dataset, options=options, batch=batch, warmup=warmup, iters=iters,
                latency=latency,
            )
            report = gate_lib.compare_to_baseline(
                current, stored, tolerances=parsed_tolerances, thresholds=thresholds, min_speedup=min_speedup,
            )
            if baseline_path is not None and update and not report.failures:
                gate_lib.save_baseline(baseline_path, current)
        except LowRankError as exc:
            error = str(exc)
        if error is not None:  # failed outside the except block, so pytest shows no chained exception
            self._record({"original": str(original_path), "compressed": str(compressed_path), "passed": False,
                          "error": error})
            pytest.fail(f"onnx-lowrank gate could not run: {error}", pytrace=False)
        failures = tuple(_failure_text(f) for f in report.failures) + tuple(
            f"{r.metric} regressed vs baseline: {r.baseline:.4g} -> {r.current:.4g} (tolerance {r.tolerance.text()}"
            + (f", p={r.p_value:.2g})" if r.p_value is not None else ")")
            for r in report.regressions
        )
        limits = {k: v for k, v in {
            "min_speedup": min_speedup, "max_accuracy_drop": max_accuracy_drop, "min_cosine": min_cosine,
            "max_rel_error": max_rel_error, "min_top1_agreement": min_top1_agreement,
        }.items() if v is not None}
        record = {
            "original": str(original_path),
            "compressed": str(compressed_path),
            "passed": not failures,
            "metrics": current.metrics,
            "limits": limits,
            "failures": list(failures),
            "baseline": str(baseline_path) if baseline_path else None,
            "comparison": report.to_json() if baseline_path else None,
            "context": current.context,
        }
        self._record(record)
        if failures:
            pytest.fail("onnx-lowrank gate failed: " + "; ".join(failures), pytrace=False)
        return GateOutcome(True, dict(current.metrics), (), record)

    def _record(self, record: dict) -> None:
        self._config.stash[_RESULTS].append({"test": self._request.node.nodeid, **record})

    def _path(self, value: str | os.PathLike) -> Path:
        """``value`` if it exists (or is absolute), else beside the test file if it exists there,
        else ``value`` as given (relative to the working directory)."""
        path = Path(value)
        if path.is_absolute() or path.exists():
            return path
        beside = Path(self._request.path).parent / path
        return beside if beside.exists() else path


def _failure_text(failure) -> str:
    """A threshold failure phrased with the fixture's keyword names instead of CLI flags."""
    keyword = failure.flag.lstrip("-").replace("-", "_")
    where = f" of {failure.output}" if failure.output else ""
    op = ">" if keyword.startswith("max") else "<"
    would = f"; {keyword}={failure.passing:g} would pass" if failure.passing is not None else ""
    return f"{failure.metric}{where} is {failure.value:.6g} {op} {keyword}={failure.limit:g}{would}"


@pytest.fixture
def onnx_lowrank_gate(request: pytest.FixtureRequest) -> Gate:
    """``onnx_lowrank_gate(original=..., compressed=..., min_speedup=..., max_accuracy_drop=..., data=...)``."""
    return Gate(request)


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    del exitstatus
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    terminalreporter.section("onnx-lowrank gates")
    for r in results:
        metrics = r.get("metrics") or {}
        figures = ", ".join(
            text for text in (
                f"speedup {metrics['speedup']:.3f}x" if "speedup" in metrics else "",
                f"cosine {metrics['cosine']:.5f}" if "cosine" in metrics else "",
                f"accuracy drop {metrics['accuracy_drop']:.2f} points" if "accuracy_drop" in metrics else "",
            ) if text
        ) or r.get("error", "")
        terminalreporter.write_line(f"{'PASSED' if r['passed'] else 'FAILED'} {r['test']}: {figures}")


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    del exitstatus
    config = session.config
    path = config.getoption("onnx_lowrank_results")
    results = config.stash.get(_RESULTS, [])
    if not path:
        return
    target = Path(path)
    if not target.is_absolute():
        target = Path(config.invocation_params.dir) / target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"format": RESULTS_FORMAT, "version": 1, "results": results}, indent=2, default=_default) + "\n")
    os.replace(tmp, target)


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
