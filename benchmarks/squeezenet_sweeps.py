"""SqueezeNet's design space in shape (Iandola's thesis Sec. 5.5.2-5.5.3, Figs. 5.3 and 5.4): the squeeze-ratio
and pct3x3 sweeps of two `polytrain compare` directories, as a table (setting, parameters, median test accuracy
with its nonparametric 95 % CI over seeds) and a plot of accuracy against each metaparameter beside model size.

    polytrain compare --config benchmarks/squeezenet_sr.toml --out runs/squeezenet_sr
    polytrain compare --config benchmarks/squeezenet_pct3x3.toml --out runs/squeezenet_pct3x3
    python benchmarks/squeezenet_sweeps.py --sr runs/squeezenet_sr --pct3x3 runs/squeezenet_pct3x3 \
        --plot docs/squeezenet_sweeps.png

Each setting is read from its single-worker baseline cell. Before commit 9c92ad3, a `vary`-only matrix also
ran a "base workers" cell that resolves to the same settings; where a directory has one, its accuracies are
compared seed by seed with the baseline's (a determinism check) and reported, not pooled, since they are the
same runs again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from polytrain.bench.compare import load_matrix, load_runs
from polytrain.bench.stats import median_ci
from polytrain.models import build_model

# Where Iandola's thesis sees accuracy stop rising on ImageNet (Sec. 5.5.2: SR = 0.75, 86.0 % top-5, 19 MB;
# Sec. 5.5.3: 50 % 3x3 filters, 85.6 % top-5, 13 MB).
THESIS_PLATEAU = {"sr": 0.75, "pct3x3": 0.5}
AXIS_LABEL = {"sr": "squeeze ratio SR", "pct3x3": "3x3 expand filters pct3x3"}


@dataclass(frozen=True)
class Point:
    """One setting of a sweep: its model size and the test accuracies of its seeds."""

    value: float
    num_parameters: int
    accuracies: list[float]  # final test accuracy per finished seed, in seed order
    train_losses: list[float]  # training loss of the last epoch per finished seed, in seed order
    num_failed: int
    num_duplicates_equal: int  # seeds where the duplicate "base workers" cell gave the same accuracy
    num_duplicates: int

    @property
    def ci(self):
        return median_ci(self.accuracies)


def count_parameters(result: dict) -> int:
    """Parameters of the run's model, rebuilt from the zoo with its settings (and the stored count, if any)."""
    config, dataset = result["config"], result["dataset"]
    model = build_model(config["model"], dataset["num_classes"], tuple(dataset["in_shape"]), **config["model_args"])
    count = sum(p.numel() for p in model.parameters())
    stored = result.get("model", {}).get("parameters")
    if stored is not None and stored != count:
        raise SystemExit(f"{config['model']} {config['model_args']}: result.json says {stored} parameters, "
                         f"the zoo builds {count}")
    return count


def sweep(root: str, key: str) -> list[Point]:
    """The points of the sweep over model_args.`key` in the compare directory `root`, by increasing value."""
    matrix = load_matrix(root)
    setting = f"model_args.{key}"
    cells = [cell for cell in matrix.cells if setting in cell.vary]
    if not cells:
        raise SystemExit(f"{root}: no cell varies {setting}; cells: {', '.join(c.label for c in matrix.cells)}")
    points = []
    for baseline in (cell for cell in cells if cell.baseline):
        runs = load_runs(Path(root), baseline, matrix.seeds)
        finished = [run for run in runs if run["ok"]]
        if not finished:
            continue
        twins = [cell for cell in cells if not cell.baseline and cell.vary == baseline.vary]
        twin = {run["seed"]: run["result"]["final_test_accuracy"]
                for cell in twins for run in load_runs(Path(root), cell, matrix.seeds) if run["ok"]}
        mine = {run["seed"]: run["result"]["final_test_accuracy"] for run in finished}
        points.append(Point(
            value=baseline.vary[setting], num_parameters=count_parameters(finished[0]["result"]),
            accuracies=[mine[seed] for seed in sorted(mine)],
            train_losses=[run["result"]["epochs"][-1]["train_loss"] for run in sorted(finished, key=lambda r: r["seed"])],
            num_failed=len(runs) - len(finished),
            num_duplicates_equal=sum(twin[seed] == mine[seed] for seed in twin if seed in mine),
            num_duplicates=sum(seed in mine for seed in twin)))
    return sorted(points, key=lambda point: point.value)


def _first_result(root: str) -> tuple[dict, dict]:
    """One finished run's result.json, and the `vary` values of its cell."""
    matrix = load_matrix(root)
    cell = next(cell for cell in matrix.cells if cell.baseline)
    return next(run["result"] for run in load_runs(Path(root), cell, matrix.seeds) if run["ok"]), cell.vary


def fixed_metaparameters(root: str) -> dict:
    """The model metaparameters the sweep in `root` holds fixed."""
    result, vary = _first_result(root)
    return {k: v for k, v in result["config"]["model_args"].items() if f"model_args.{k}" not in vary}


def describe(root: str, metaparameters: bool = True) -> str:
    """The settings every run of the directory shares, from one result.json (with the model's metaparameters
    that the sweep does not vary, unless not `metaparameters`)."""
    result, _ = _first_result(root)
    config, dataset = result["config"], result["dataset"]
    fixed = fixed_metaparameters(root)
    return (f"{config['model']}{' ' + json.dumps(fixed) if metaparameters else ''} on {dataset['name']} "
            f"({dataset['num_train']} train / {dataset['num_test']} test, {'x'.join(map(str, dataset['in_shape']))}), "
            f"{config['epochs']} epochs, batch {config['batch_size']}, {config['optimizer']} lr {config['lr']}, "
            f"{config['schedule']}, weight decay {config['weight_decay']}, "
            + (f"gradient norm clipped to {config['grad_clip']:g}" if config["grad_clip"] else "no gradient clipping"))


def table(key: str, points: list[Point]) -> str:
    """Markdown: setting, parameters, float32 size, median test accuracy [95 % CI], seeds, each seed, and the
    median final training loss (ln 10 = 2.30 is a network that predicts nothing)."""
    lines = [f"| {key} | parameters | float32 KiB | test acc (median [95 % CI]) | CI coverage | seeds | per seed | "
             "train loss (median) |", "|---:|---:|---:|---|---:|---:|---|---:|"]
    for point in points:
        ci = point.ci
        seeds = f"{len(point.accuracies)}" + (f" ({point.num_failed} failed)" if point.num_failed else "")
        lines.append(f"| {point.value:g} | {point.num_parameters:,} | {4 * point.num_parameters / 1024:.0f} | "
                     f"{100 * ci.median:.2f} % [{100 * ci.low:.2f}, {100 * ci.high:.2f}] | "
                     f"{100 * ci.confidence:.1f} % | {seeds} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in point.accuracies)} | "
                     f"{median_ci(point.train_losses).median:.3f} |")
    return "\n".join(lines)


def plot(sweeps: dict[str, list[Point]], path: str, title: str) -> None:
    """Two panels: median accuracy with CI bars and every seed, parameters on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.6))
    for ax, (key, points) in zip(list(axes) if len(sweeps) > 1 else [axes], sweeps.items()):
        scale = 100 if key == "pct3x3" else 1  # pct3x3 is shown in percent, as in the thesis's Fig. 5.4
        values = [scale * p.value for p in points]
        medians = [100 * p.ci.median for p in points]
        below = [100 * (p.ci.median - p.ci.low) for p in points]
        above = [100 * (p.ci.high - p.ci.median) for p in points]
        jitter = 0.012 * (values[-1] - values[0])  # the seeds beside their median's bar, not behind it
        for x, point in zip(values, points):
            offsets = [jitter * (i - (len(point.accuracies) - 1) / 2) for i in range(len(point.accuracies))]
            ax.scatter([x + 2 * jitter + o for o in offsets], [100 * a for a in point.accuracies], s=10,
                       color="0.5", zorder=2, label="one seed" if x == values[0] else None)
        ax.errorbar(values, medians, yerr=[below, above], fmt="o-", color="C0", capsize=4, zorder=3,
                    label="median, 95 % CI over seeds")
        ax.axvline(scale * THESIS_PLATEAU[key], color="C3", linestyle=":", label="thesis plateau (ImageNet)")
        ax.axhline(10, color="0.3", linestyle="-.", linewidth=0.8, label="chance (10 classes)")
        ax.set_xlabel(AXIS_LABEL[key] + (" (%)" if scale == 100 else ""))
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 102)
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.grid(alpha=0.3)
        size = ax.twinx()
        size.plot(values, [p.num_parameters / 1e3 for p in points], "s--", color="C1", label="parameters")
        size.set_ylabel("parameters (thousands)", color="C1")
        size.tick_params(axis="y", colors="C1")
        size.set_ylim(bottom=0)
    handles = axes[0].get_legend_handles_labels()[0] + size.get_legend_handles_labels()[0]
    figure.legend(handles, [h.get_label() for h in handles], loc="lower center", ncol=len(handles), fontsize=8,
                  bbox_to_anchor=(0.5, -0.04))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sr", default="runs/squeezenet_sr", help="compare directory of the SR sweep")
    parser.add_argument("--pct3x3", default="runs/squeezenet_pct3x3", help="compare directory of the pct3x3 sweep")
    parser.add_argument("--plot", default=None, help="write the two-panel plot here (e.g. docs/squeezenet_sweeps.png)")
    args = parser.parse_args()
    sweeps = {key: sweep(root, key) for key, root in (("sr", args.sr), ("pct3x3", args.pct3x3))}
    for key, root in (("sr", args.sr), ("pct3x3", args.pct3x3)):
        print(f"{AXIS_LABEL[key]}: {describe(root)}\n")
        print(table(key, sweeps[key]) + "\n")
        equal = sum(p.num_duplicates_equal for p in sweeps[key])
        total = sum(p.num_duplicates for p in sweeps[key])
        if total:  # directories made before compare ran such a cell once, as its baseline
            print(f"duplicate 'base workers' cells: {equal} of {total} seeds give the baseline's accuracy exactly\n")
    if args.plot:
        fixed = "; ".join(f"{key} sweep at " + ", ".join(f"{k} = {v}" for k, v in fixed_metaparameters(root).items())
                          for key, root in (("SR", args.sr), ("pct3x3", args.pct3x3)))
        plot(sweeps, args.plot, describe(args.sr, metaparameters=False) + "\n" + fixed)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
