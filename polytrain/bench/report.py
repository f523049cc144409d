"""`polytrain report DIR`: a comparison's plots and tables as one self-contained web page and as markdown.

Plots (matplotlib): scaling (speed-up against workers, the ideal line and the alpha-beta bound of the
counted bytes), test accuracy against wall time with 95 % CI bands over seeds, time to target per cell,
bytes per step against accuracy, the per-step time distribution (epoch means over seeds) and staleness
histograms. Tables: the summary (accuracy always beside speed, with the flags) and every run's
environment manifest. The HTML embeds its images; the markdown links PNG files written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from polytrain.bench.compare import SUMMARY_HEAD, CellSummary, Summary, table_row, load_matrix, summarize
from polytrain.bench.stats import median_ci
from polytrain.train.io import atomic_write_bytes

MANIFEST_KEYS = ("git_sha", "polytrain", "python", "torch", "numpy", "platform", "cpu", "cores", "threads", "cuda",
                 "hostname", "network")


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    png: bytes
    caption: str


def _figure(name: str, title: str, caption: str, draw) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.2), dpi=100)
    draw(axes)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Figure(name, title, buffer.getvalue(), caption)


def _ok_results(summary: CellSummary) -> list[dict]:
    return [run["result"] for run in summary.runs if run["ok"]]


def _family(label: str) -> str:
    """A cell's label without its worker count: the line a scaling plot draws over workers."""
    return re.sub(r"^\d+ workers(, | \+ )?", "", label) or "default policy"


def _workers(summary: CellSummary) -> int | None:
    results = _ok_results(summary)
    return results[0]["config"]["workers"] if results else None


def alpha_beta_bound(step_1: float, workers: int, bytes_per_step: float, messages_per_step: float,
                     alpha_s: float, beta_s_per_byte: float) -> float:
    """The speed-up a perfectly divided step could reach beside its communication: T1 / (T1 / N + T_comm),
    T_comm = messages x alpha + bytes x beta (the survey's alpha-beta model, with the counted bytes)."""
    return step_1 / (step_1 / workers + messages_per_step * alpha_s + bytes_per_step * beta_s_per_byte)


def _link(bandwidth: str) -> tuple[float, float] | None:
    """(alpha, beta) of a cell's link: the calibration profile's where there is one, else the rate's beta."""
    from polytrain.launch.cluster import parse_bandwidth
    from polytrain.perf.profile import load_profile

    try:
        cluster = load_profile().cluster(bandwidth, 2)
        return cluster.inter.alpha_s, cluster.inter.beta_s_per_byte
    except (ValueError, OSError, KeyError, AttributeError):
        rate = parse_bandwidth(bandwidth)
        return (0.0, 8.0 / rate) if rate else None


def _scaling(axes, summary: Summary) -> None:
    families: dict[tuple[str, str], list[tuple[int, CellSummary]]] = {}
    for cell in summary.cells.values():
        workers = _workers(cell)
        if workers is not None and not cell.cell.baseline:
            families.setdefault((_family(cell.cell.label), cell.cell.bandwidth), []).append((workers, cell))
    largest = max([w for points in families.values() for w, _ in points] + [2])
    axes.plot([1, largest], [1, largest], "k:", label="ideal (linear)")
    baseline = next((c for c in summary.cells.values() if c.cell.baseline), None)
    step_1 = None
    if baseline is not None and _ok_results(baseline):
        step_1 = statistics.median(r["config"]["batch_size"] / r["samples_per_s"] for r in _ok_results(baseline))
    for (family, bandwidth), points in sorted(families.items()):
        points.sort(key=lambda point: point[0])
        xs = [1] + [w for w, _ in points]  # the baseline's own point: speed-up 1 on one worker
        stats = [c.speedup["samples_per_s"] for _, c in points]
        ys = [1.0] + [s.median if s else math.nan for s in stats]
        errors = [[0] + [s.median - s.low if s else 0 for s in stats], [0] + [s.high - s.median if s else 0 for s in stats]]
        line = axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{family} (samples/s)")
        link = _link(bandwidth)
        if step_1 is not None and link is not None:
            bound = [alpha_beta_bound(step_1, w, c.stats["bytes_sent_per_step"].median,
                                      _messages_per_step(c), *link) if c.stats["bytes_sent_per_step"] else math.nan
                     for w, c in points]
            axes.plot(xs[1:], bound, "--", color=line[0].get_color(), alpha=0.6, label=f"{family}: alpha-beta bound")
    axes.set_xlabel("workers")
    axes.set_ylabel("speed-up over 1 worker (per seed, median)")


def _messages_per_step(cell: CellSummary) -> float:
    rows = [r["comm"].get("messages", 0) / max(1, r["steps"]) for r in _ok_results(cell)]
    return statistics.median(rows) if rows else 0.0


def _accuracy_curves(axes, summary: Summary, metric: str) -> None:
    for cell in summary.cells.values():
        results = _ok_results(cell)
        if not results:
            continue
        epochs = min(len(r["epochs"]) for r in results)
        xs, mids, lows, highs = [], [], [], []
        for e in range(epochs):
            values = [r["epochs"][e][f"test_{metric}"] for r in results]
            ci = median_ci(values)
            xs.append(statistics.median(r["epochs"][e]["wall_s"] for r in results))
            mids.append(ci.median)
            lows.append(ci.low)
            highs.append(ci.high)
        line, = axes.plot(xs, mids, marker=".", label=cell.cell.label)
        axes.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
    if summary.target is not None:
        axes.axhline(summary.target, color="k", linestyle=":", label=f"target {summary.target}")
    axes.set_xlabel("wall time s (median over seeds)")
    axes.set_ylabel(f"test {metric}")


def _time_to_target(axes, summary: Summary) -> None:
    labels, mids, errors, never = [], [], [[], []], []
    for cell in summary.cells.values():
        stat = cell.stats["time_to_target_s"]
        labels.append(cell.cell.label)
        if stat is None or math.isinf(stat.median):
            mids.append(0.0)
            errors[0].append(0)
            errors[1].append(0)
            never.append(len(labels) - 1)
            continue
        mids.append(stat.median)
        errors[0].append(stat.median - stat.low)
        errors[1].append((stat.high if math.isfinite(stat.high) else stat.median) - stat.median)
    positions = range(len(labels))
    axes.barh(positions, mids, xerr=errors, capsize=3, color="tab:blue", alpha=0.7)
    for i in never:
        axes.text(0, i, " never reached", va="center", color="tab:red")
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("seconds to the target (median, 95 % CI)")


def _bytes_against_accuracy(axes, summary: Summary) -> None:
    for cell in summary.cells.values():
        sent, accuracy = cell.stats["bytes_sent_per_step"], cell.stats["final_test_metric"]
        if sent is None or accuracy is None:
            continue
        axes.errorbar([max(sent.median, 1.0)], [accuracy.median],
                      yerr=[[accuracy.median - accuracy.low], [accuracy.high - accuracy.median]], marker="o",
                      capsize=3, label=cell.cell.label)
    axes.set_xscale("log")
    axes.set_xlabel("bytes sent per step by rank 0 (counted; 1 = none)")
    axes.set_ylabel("final test metric (median, 95 % CI)")


def _step_times(axes, summary: Summary) -> None:
    data, labels = [], []
    for cell in summary.cells.values():
        steps = [1e3 * row["train_s"] / row["steps"] for r in _ok_results(cell) for row in r["epochs"][1:] or r["epochs"]
                 if row["steps"]]
        if steps:
            data.append(steps)
            labels.append(cell.cell.label)
    if data:
        axes.boxplot(data, orientation="horizontal")
        axes.set_yticks(range(1, len(labels) + 1), labels, fontsize=7)
        axes.invert_yaxis()
    axes.set_xlabel("ms per step (each epoch's mean, warm-up epoch excluded, all seeds)")


def _staleness(axes, cells: list[CellSummary]) -> None:
    width = 0.8 / max(1, len(cells))
    for i, cell in enumerate(cells):
        keys = [int(k) for k in cell.staleness]
        total = sum(cell.staleness.values())
        axes.bar([k + i * width for k in keys], [n / total for n in cell.staleness.values()], width=width,
                 label=cell.cell.label)
    axes.set_xlabel("staleness (updates the gradient's weights were behind)")
    axes.set_ylabel("share of updates")


def figures(summary: Summary) -> list[Figure]:
    metric = "accuracy" if any(c.stats["final_test_accuracy"] for c in summary.cells.values()) else None
    if metric is None:
        results = [r for c in summary.cells.values() for r in _ok_results(c)]
        metric = results[0]["metric"] if results else "accuracy"
    shown = [
        _figure("scaling", "Scaling: speed-up against workers", "Throughput speed-up per seed against the "
                "single worker of the same seed (median, 95 % CI); dotted: linear; dashed: T1 / (T1/N + "
                "messages alpha + bytes beta) with the counted bytes and the link's alpha and beta.",
                lambda axes: _scaling(axes, summary)),
        _figure("accuracy", f"Test {metric} against wall time", "Median over seeds per epoch, shaded: the "
                "95 % CI of the median (the whole range for fewer than 6 seeds).",
                lambda axes: _accuracy_curves(axes, summary, metric)),
        _figure("bytes", f"Bytes per step against final test {metric}", "Counted bytes rank 0 sent per "
                "step (log scale) against the final test metric.", lambda axes: _bytes_against_accuracy(axes, summary)),
        _figure("steps", "Per-step time", "Distribution of the epochs' mean step times over every seed.",
                lambda axes: _step_times(axes, summary)),
    ]
    if summary.target is not None:
        shown.insert(2, _figure("target", f"Time to target {summary.target}", "Median seconds (evaluation "
                                "included) until the test metric first reaches the target; failed runs and runs "
                                "that never reach it count as never.", lambda axes: _time_to_target(axes, summary)))
    stale = [c for c in summary.cells.values() if c.staleness]
    if stale:
        shown.append(_figure("staleness", "Staleness", "Updates by staleness, all seeds of each cell.",
                             lambda axes: _staleness(axes, stale)))
    return shown


def _manifests(summary: Summary) -> list[list[str]]:
    rows = []
    for cell in summary.cells.values():
        for run in cell.runs:
            environment = run["result"]["environment"] if run["ok"] else {}
            rows.append([cell.cell.label, str(run["seed"]), run["dir"], "ok" if run["ok"] else "failed",
                         *[str(environment.get(key, "")) for key in MANIFEST_KEYS]])
    return rows


def _html_table(head: list[str], rows: list[list[str]], name: str) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{name}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(clean(v) for v in row) + " |" for row in rows])


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:12px;
margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figcaption{font-size:12px;color:#444;max-width:750px}.flags li{color:#a40}"""


def write_report(root: str | Path) -> tuple[Path, Path]:
    """Writes DIR/report.html (self-contained) and DIR/report.md (with DIR/report/*.png); returns both."""
    root = Path(root)
    matrix = load_matrix(root)
    summary = summarize(root, matrix)
    shown = figures(summary)
    rows = [table_row(cell) for cell in summary.cells.values()]
    manifest_head = ["cell", "seed", "directory", "status", *MANIFEST_KEYS]
    manifests = _manifests(summary)
    base = ", ".join(f"{k}={json.dumps(v)}" for k, v in matrix.base.items())
    title = f"polytrain comparison: {root.name}"

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>Base settings: <code>{html.escape(base or 'defaults')}</code>; seeds {matrix.seeds}; "
             f"{len(matrix.cells)} cells with the single-worker baseline.</p>",
             "<h2>Summary</h2>", _html_table(SUMMARY_HEAD, rows, "summary")]
    if summary.flags:
        parts.append("<ul class='flags'>" + "".join(f"<li>{html.escape(f)}</li>" for f in summary.flags) + "</ul>")
    for figure in shown:
        data = base64.b64encode(figure.png).decode()
        parts.append(f"<figure id='{figure.name}'><img alt='{html.escape(figure.title)}' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(figure.caption)}</figcaption>"
                     f"</figure>")
    parts += ["<h2>Environment of every run</h2>", _html_table(manifest_head, manifests, "manifests"),
              "</body></html>"]
    html_path = root / "report.html"
    atomic_write_bytes(html_path, "\n".join(parts).encode())

    images = root / "report"
    lines = [f"# {title}", "", f"Base settings: `{base or 'defaults'}`; seeds {matrix.seeds}.", "", "## Summary", "",
             _md_table(SUMMARY_HEAD, rows), ""] + [f"- {flag}" for flag in summary.flags] + [""]
    for figure in shown:
        atomic_write_bytes(images / f"{figure.name}.png", figure.png)
        lines += [f"## {figure.title}", "", f"![{figure.title}](report/{figure.name}.png)", "", figure.caption, ""]
    lines += ["## Environment of every run", "", _md_table(manifest_head, manifests), ""]
    md_path = root / "report.md"
    atomic_write_bytes(md_path, "\n".join(lines).encode())
    return html_path, md_path
