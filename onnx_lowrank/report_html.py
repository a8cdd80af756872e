"""One self-contained HTML page from the JSON reports of compress, validate and bench.

Sections appear when their data is present: compression totals and per-layer rank allocation
(``layers``, ``totals``), singular value spectra (``spectra`` as {layer: [s1, s2, ...]}, or a
``spectrum`` list in a layer row), the accuracy-versus-size curve (``sweep``: a list of
{kept_params, metric}), accuracy against the original (``validation``) and latency
(``latency``). Plots are PNGs embedded as base64, drawn with matplotlib's object API on the Agg
canvas (no pyplot, no global backend change). matplotlib is the optional ``[plots]`` extra:
without it the page holds the tables only and says how to get the plots.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
from collections.abc import Callable

from onnx_lowrank import __version__

log = logging.getLogger(__name__)

PLOTS_HINT = "plots need matplotlib: pip install onnx-lowrank[plots]"
MAX_CHART_LAYERS = 60  # the largest layers are charted; the table always lists them all
MAX_SPECTRA = 12


@dataclasses.dataclass(frozen=True)
class HtmlReport:
    """The page, its PNGs by name (also embedded in the page) and notes for the user."""

    html: str
    images: dict[str, bytes]
    notes: tuple[str, ...]


def merge_reports(reports: list[dict]) -> tuple[dict, list[str]]:
    """Combine several JSON reports (compress, validate, bench) into one; later keys win."""
    merged: dict = {}
    notes: list[str] = []
    for report in reports:
        for key, value in report.items():
            if key == "tool":
                continue
            if key in merged and merged[key] != value:
                notes.append(f"section {key!r} appears in several reports; the last one is shown")
            merged[key] = value
    return merged, notes


def build_html(report: dict, *, title: str | None = None, plots: bool = True) -> HtmlReport:
    """Render ``report`` (a merged dict, see the module docstring) as one HTML page."""
    figure_module = _matplotlib() if plots else None
    notes: list[str] = []
    if plots and figure_module is None:
        notes.append(PLOTS_HINT)
    images: dict[str, bytes] = {}
    body: list[str] = []
    for name, section in SECTIONS:
        if not section.applies(report):
            continue
        try:
            body.append(section.render(report, figure_module, images))
        except (KeyError, TypeError, ValueError) as exc:  # a malformed section must not sink the page
            log.debug("section %s failed", name, exc_info=True)
            notes.append(f"section {name!r} skipped: malformed data ({type(exc).__name__}: {exc})")
    if not body:
        notes.append("the report holds no section this page knows (layers, sweep, validation, latency)")
    page_title = title or _default_title(report)
    banner = f'<p class="note">{html.escape(PLOTS_HINT)}</p>' if plots and figure_module is None else ""
    page = _PAGE.format(
        title=html.escape(page_title),
        version=html.escape(__version__),
        banner=banner,
        notes="".join(f'<p class="note">{html.escape(n)}</p>' for n in notes if n != PLOTS_HINT),
        body="\n".join(body),
    )
    return HtmlReport(page, images, tuple(notes))


@dataclasses.dataclass(frozen=True)
class Section:
    applies: Callable[[dict], bool]
    render: Callable[[dict, object, dict], str]


# ---------------------------------------------------------------------------------------------
# Sections


def _compression(report: dict, mpl, images: dict) -> str:
    totals = report.get("totals", {})
    rows = report.get("layers", [])
    parts = ["<h2>Compression</h2>"]
    facts = []
    if "input" in report and "output" in report:
        source, target = (html.escape(str(report[k].get("path"))) for k in ("input", "output"))
        facts.append(("model", f"{source} &rarr; {target}", True))
        if "bytes" in report["input"] and "bytes" in report["output"]:
            facts.append(("file size", f"{_human(report['input']['bytes'])}B &rarr; {_human(report['output']['bytes'])}B", True))
    if "model_params_before" in totals:
        before, after = totals["model_params_before"], totals["model_params_after"]
        facts.append(("model params", f"{_human(before)} &rarr; {_human(after)} ({after / before:.1%} kept)", True))
    if "layer_flops_before" in totals:
        fb, fa = totals["layer_flops_before"], totals["layer_flops_after"]
        facts.append(("Gemm/MatMul/Conv FLOPs", f"{_human(fb)} &rarr; {_human(fa)} ({fa / fb:.1%})", True))
    if "layers_factorized" in totals:
        facts.append(("layers factorized", f"{totals['layers_factorized']} of {totals.get('layers_supported', '?')} supported "
                      f"({totals.get('layers_total', '?')} found)", False))
    parts.append('<div class="row">' + _facts(facts))
    if mpl is not None and rows:
        parts.append(_image(images, "rank_allocation", _plot_allocation(mpl, rows), "parameters per layer before and after"))
    parts.append("</div>")
    header = ["layer", "op", "weight", "action", "rank", "params before", "params after", "FLOPs before",
              "FLOPs after", "weight rel. error"]
    table_rows = []
    for row in rows:
        action = row.get("action", "")
        if action != "factorize" and row.get("reason"):
            action = f"keep ({row['reason']})"
        table_rows.append([
            row.get("name", ""), row.get("op", ""), "x".join(str(d) for d in row.get("weight_shape", [])), action,
            row.get("rank", ""), _human(row.get("params_before")), _human(row.get("params_after")),
            _human(row.get("flops_before")), _human(row.get("flops_after")),
            f"{row['weight_rel_error']:.4f}" if isinstance(row.get("weight_rel_error"), (int, float)) else "",
        ])
    parts.append("<h3>Per-layer rank allocation</h3>" + _table(header, table_rows, numeric_from=4))
    return "\n".join(parts)


def _spectra(report: dict, mpl, images: dict) -> str:
    spectra = _collect_spectra(report)
    ranks = {row.get("name"): row.get("rank") for row in report.get("layers", []) if row.get("rank")}
    parts = ["<h2>Singular value spectra</h2>", '<div class="row">']
    if mpl is not None:
        parts.append(_image(images, "spectra", _plot_spectra(mpl, spectra, ranks), "normalized singular values"))
    rows = []
    for name, values in spectra.items():
        energy = [v * v for v in values]
        total = sum(energy) or 1.0
        kept = ranks.get(name)
        kept_energy = sum(energy[:kept]) / total if kept else None
        rows.append([name, len(values), f"{values[0]:.4g}" if values else "", kept or "",
                     f"{kept_energy:.2%}" if kept_energy is not None else ""])
    parts.append(_table(["layer", "singular values", "largest", "kept rank", "energy kept"], rows, numeric_from=1))
    parts.append("</div>")
    return "\n".join(parts)


def _sweep(report: dict, mpl, images: dict) -> str:
    points = sorted(report["sweep"], key=lambda p: p["kept_params"])
    metric_name = report.get("sweep_metric") or next((p.get("metric_name") for p in points if p.get("metric_name")), "metric")
    parts = ["<h2>Accuracy versus size</h2>", '<div class="row">']
    if mpl is not None:
        parts.append(_image(images, "accuracy_vs_size", _plot_sweep(mpl, points, metric_name), "accuracy versus kept parameters"))
    rows = [[_fraction_or_count(p["kept_params"]), f"{p['metric']:.4f}"] for p in points]
    parts.append(_table(["kept params", metric_name], rows, numeric_from=0))
    parts.append("</div>")
    return "\n".join(parts)


def _validation(report: dict, mpl, images: dict) -> str:
    del mpl, images
    v = report["validation"]
    parts = ["<h2>Accuracy against the original</h2>"]
    facts = [("samples", str(v.get("samples", "?")), False)]
    if v.get("original") and v.get("compressed"):
        facts.insert(0, ("models", f"{html.escape(str(v['original']))} vs {html.escape(str(v['compressed']))}", True))
    runtime = v.get("runtime") or {}
    if runtime:
        facts.append(("provider", str(runtime.get("provider_used", runtime.get("provider", "?"))), False))
    parts.append(_facts(facts))
    rows = []
    for out in v.get("outputs", []):
        rows.append([
            out["name"], "x".join(str(d) for d in out.get("shape", [])), _fmt(out.get("max_abs_error"), "{:.4g}"),
            _fmt(out.get("rel_l2_error"), "{:.4g}"), _fmt(out.get("cosine"), "{:.5f}"), _fmt(out.get("cosine_min"), "{:.5f}"),
            _fmt(out.get("top1_agreement"), "{:.2%}"),
        ])
    parts.append(_table(["output", "shape", "max abs error", "rel. L2 error", "cosine (mean)", "cosine (min)",
                         "top-1 agreement"], rows, numeric_from=2))
    acc = v.get("accuracy")
    if acc:
        parts.append(
            f"<p>Accuracy on <code>{html.escape(str(acc['output']))}</code> ({acc.get('samples', '?')} labels): "
            f"original {_fmt(acc.get('original'), '{:.2%}')} &rarr; compressed {_fmt(acc.get('compressed'), '{:.2%}')} "
            f"(drop {_fmt(acc.get('drop_points'), '{:.2f}')} points)</p>"
        )
    failures = v.get("failures") or []
    if failures:
        items = "".join(f"<li>{html.escape(_failure_text(f))}</li>" for f in failures)
        parts.append(f'<div class="fail"><strong>Thresholds not met</strong><ul>{items}</ul></div>')
    elif v.get("thresholds"):
        parts.append('<p class="pass">All thresholds met.</p>')
    return "\n".join(parts)


def _latency(report: dict, mpl, images: dict) -> str:
    lat = report["latency"]
    results = lat.get("results", [])
    models = lat.get("models", [])
    parts = ["<h2>Latency</h2>"]
    runtime = lat.get("runtime") or {}
    facts = [("provider", str(runtime.get("provider_used", runtime.get("provider", "?"))), False),
             ("threads", str(runtime.get("threads", "?")), False),
             ("onnxruntime", str(runtime.get("onnxruntime", "?")), False)]
    if "spin" in runtime:
        facts.append(("thread spinning", "on" if runtime["spin"] else "off", False))
    if "tf32" in runtime:
        facts.append(("TF32", "on" if runtime["tf32"] else "off", False))
    parts.append(_facts(facts))
    if mpl is not None and results:
        parts.append(_image(images, "latency", _plot_latency(mpl, results, models), "median latency per batch size"))
    rows = []
    for r in results:
        for key in ("a", "b"):
            if key not in r:
                continue
            t = r[key]
            speed = ""
            if key == "b" and "speedup" in r:
                low, high = r.get("speedup_iqr", [None, None])
                speed = f"{r['speedup']:.3f}x" + (f" ({low:.3f}&ndash;{high:.3f})" if low is not None else "")
            rows.append([t.get("label", key), r["batch"], f"{t['p50_ms']:.4f}", f"{t['p90_ms']:.4f}", f"{t['p99_ms']:.4f}",
                         f"{t['throughput_per_s']:,.0f}", speed])
    parts.append(_table(["model", "batch", "p50 (ms)", "p90 (ms)", "p99 (ms)", "samples/s", "speedup (IQR)"], rows,
                        numeric_from=1, raw_columns={6}))
    return "\n".join(parts)


def _collect_spectra(report: dict) -> dict[str, list[float]]:
    spectra = {}
    for name, values in (report.get("spectra") or {}).items():
        spectra[str(name)] = [float(v) for v in values]
    for row in report.get("layers", []):
        if isinstance(row.get("spectrum"), list):
            spectra[str(row["name"])] = [float(v) for v in row["spectrum"]]
    return {k: v for k, v in spectra.items() if v}


SECTIONS: tuple[tuple[str, Section], ...] = (
    ("compression", Section(lambda r: bool(r.get("layers")) or bool(r.get("totals")), _compression)),
    ("spectra", Section(lambda r: bool(_collect_spectra(r)), _spectra)),
    ("sweep", Section(lambda r: bool(r.get("sweep")), _sweep)),
    ("validation", Section(lambda r: isinstance(r.get("validation"), dict), _validation)),
    ("latency", Section(lambda r: isinstance(r.get("latency"), dict), _latency)),
)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's Figure + Agg canvas; no pyplot state)


def _matplotlib():
    """matplotlib.figure, or None when matplotlib is not installed."""
    try:
        import matplotlib.figure
        from matplotlib.backends import backend_agg  # noqa: F401  (the PNG canvas must exist)
    except ImportError:
        return None
    return matplotlib.figure


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _plot_allocation(mpl, rows: list[dict]) -> bytes:
    rows = [r for r in rows if isinstance(r.get("params_before"), (int, float))]
    if len(rows) > MAX_CHART_LAYERS:
        rows = sorted(rows, key=lambda r: -r["params_before"])[:MAX_CHART_LAYERS]
    names = [_short(r.get("name", "?")) for r in rows]
    before = [r["params_before"] for r in rows]
    after = [r.get("params_after", r["params_before"]) for r in rows]
    height = max(2.2, 0.3 * len(rows) + 1.0)
    fig = mpl.Figure(figsize=(7, height))
    ax = fig.add_subplot()
    positions = list(range(len(rows)))
    ax.barh([p + 0.2 for p in positions], before, height=0.4, label="before", color="#9aa5b1")
    ax.barh([p - 0.2 for p in positions], after, height=0.4, label="after", color="#2b6cb0")
    for p, r in zip(positions, rows):
        if r.get("rank"):
            ax.text(r.get("params_after", 0), p - 0.2, f"  r={r['rank']}", va="center", fontsize=8)
    ax.set_yticks(positions)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("parameters")
    ax.legend(loc="lower right")
    ax.set_title("Per-layer parameters before and after factorization")
    return _png(fig)


def _plot_spectra(mpl, spectra: dict[str, list[float]], ranks: dict) -> bytes:
    fig = mpl.Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot()
    for name, values in list(spectra.items())[:MAX_SPECTRA]:
        top = values[0] or 1.0
        line = ax.plot(range(1, len(values) + 1), [v / top for v in values], label=_short(name))[0]
        rank = ranks.get(name)
        if rank and rank <= len(values):
            ax.plot([rank], [values[rank - 1] / top], "o", color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / largest")
    ax.set_title("Singular value spectra (dots: kept rank)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _plot_sweep(mpl, points: list[dict], metric_name: str) -> bytes:
    fig = mpl.Figure(figsize=(6.5, 3.2))
    ax = fig.add_subplot()
    xs = [p["kept_params"] for p in points]
    ax.plot(xs, [p["metric"] for p in points], "o-", color="#2b6cb0")
    ax.set_xlabel("kept parameters" + (" (fraction)" if all(x <= 1 for x in xs) else ""))
    ax.set_ylabel(metric_name)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy versus size")
    return _png(fig)


def _plot_latency(mpl, results: list[dict], models: list[str]) -> bytes:
    paired = all("b" in r for r in results)
    fig = mpl.Figure(figsize=(9 if paired else 6, 3.2))
    ax = fig.add_subplot(1, 2 if paired else 1, 1)
    labels = [str(r["batch"]) for r in results]
    positions = list(range(len(results)))
    width = 0.38 if paired else 0.6
    names = [_short(m) for m in models] or ["a", "b"]
    ax.bar([p - (width / 2 if paired else 0) for p in positions], [r["a"]["p50_ms"] for r in results], width,
           label=names[0], color="#9aa5b1")
    if paired:
        ax.bar([p + width / 2 for p in positions], [r["b"]["p50_ms"] for r in results], width,
               label=names[1] if len(names) > 1 else "b", color="#2b6cb0")
    ax.set_xticks(positions)
    ax.set_xticklabels(labels)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    if paired:
        ax2 = fig.add_subplot(1, 2, 2)
        speed = [r["speedup"] for r in results]
        low = [r["speedup"] - r.get("speedup_iqr", [r["speedup"]] * 2)[0] for r in results]
        high = [r.get("speedup_iqr", [r["speedup"]] * 2)[1] - r["speedup"] for r in results]
        ax2.bar(positions, speed, 0.6, yerr=[low, high], capsize=4, color="#38a169")
        ax2.axhline(1.0, color="black", linewidth=0.8)
        ax2.set_xticks(positions)
        ax2.set_xticklabels(labels)
        ax2.set_xlabel("batch size")
        ax2.set_ylabel("speedup (x, IQR)")
        ax2.set_title("time(A) / time(B)")
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML helpers


def _image(images: dict, name: str, png: bytes, alt: str) -> str:
    images[name] = png
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _table(header: list[str], rows: list[list], *, numeric_from: int = 99, raw_columns: set[int] | None = None) -> str:
    raw_columns = raw_columns or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            text = str(cell) if index in raw_columns else html.escape(str(cell))
            cls = ' class="num"' if index >= numeric_from else ""
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _facts(facts: list[tuple[str, str, bool]]) -> str:
    """A definition list; the bool says the value is already HTML (escaped by the caller)."""
    if not facts:
        return ""
    items = "".join(
        f"<dt>{html.escape(k)}</dt><dd>{v if is_html else html.escape(v)}</dd>" for k, v, is_html in facts
    )
    return f"<dl>{items}</dl>"


def _failure_text(failure: dict) -> str:
    where = f" of {failure['output']}" if failure.get("output") else ""
    text = f"{failure.get('metric')}{where}: {failure.get('value')} (limit {failure.get('limit')})"
    if failure.get("passing") is not None:
        text += f"; {failure.get('flag')} {failure['passing']} would pass"
    return text


def _default_title(report: dict) -> str:
    for path in ((report.get("output") or {}).get("path"), (report.get("validation") or {}).get("compressed")):
        if path:
            return f"onnx-lowrank report: {path}"
    return "onnx-lowrank report"


def _short(name: str, limit: int = 40) -> str:
    name = str(name)
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def _human(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "" if value is None else str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def _fmt(value, pattern: str) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(value)


def _fraction_or_count(value) -> str:
    return f"{value:.0%}" if isinstance(value, float) and value <= 1 else _human(value)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #1a202c; }}
h1 {{ font-size: 1.5rem; margin-bottom: 0.2rem; }}
h2 {{ font-size: 1.2rem; border-bottom: 1px solid #cbd5e0; padding-bottom: 0.2rem; margin-top: 2rem; }}
h3 {{ font-size: 1rem; }}
.sub {{ color: #4a5568; margin-top: 0; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }}
th, td {{ border: 1px solid #e2e8f0; padding: 0.25rem 0.5rem; text-align: left; }}
th {{ background: #edf2f7; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; font-size: 0.9rem; }}
dt {{ font-weight: 600; }}
dd {{ margin: 0; }}
figure {{ margin: 0.5rem 0; }}
.row {{ display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }}
.row > dl {{ flex: 0 1 420px; }}
dd {{ overflow-wrap: anywhere; }}
img {{ max-width: 100%; }}
.note {{ background: #fefcbf; border: 1px solid #ecc94b; padding: 0.4rem 0.6rem; }}
.fail {{ background: #fed7d7; border: 1px solid #f56565; padding: 0.4rem 0.6rem; }}
.pass {{ color: #276749; font-weight: 600; }}
code {{ background: #edf2f7; padding: 0 0.2rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="sub">onnx-lowrank {version}</p>
{banner}
{notes}
{body}
</body>
</html>
"""
