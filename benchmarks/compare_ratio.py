"""Per-seed ratio of two cells of one `polytrain compare` directory (e.g. polytrain's allreduce against torch's
DDP at the same worker count): samples/s of A over B for every seed both finished, as a median with its
nonparametric 95 % CI; never a ratio of averages.

    python benchmarks/compare_ratio.py DIR "4 workers, allreduce" "4 workers, ddp" [--metric samples_per_s]
"""

from __future__ import annotations

import argparse
import json

from polytrain.bench.compare import load_matrix, run_dir
from polytrain.bench.stats import median_ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("a", help="the label of cell A (as in summary.md)")
    parser.add_argument("b", help="the label of cell B")
    parser.add_argument("--metric", default="samples_per_s", help="a number of result.json (default samples_per_s)")
    args = parser.parse_args()
    matrix = load_matrix(args.directory)
    cells = {cell.label: cell for cell in matrix.cells}
    for label in (args.a, args.b):
        if label not in cells:
            parser.error(f"no cell {label!r} in {args.directory}; cells: {', '.join(cells)}")
    ratios = []
    for seed in matrix.seeds:
        paths = [run_dir(args.directory, cells[label], seed) / "result.json" for label in (args.a, args.b)]
        if all(path.exists() for path in paths):
            a, b = (json.loads(path.read_text())[args.metric] for path in paths)
            ratios.append(a / b)
    if not ratios:
        parser.error("no seed finished in both cells")
    ci = median_ci(ratios)
    print(f"{args.a} / {args.b}, {args.metric}: {ci.median:.3f} [{ci.low:.3f}, {ci.high:.3f}] over {len(ratios)} "
          f"seeds (coverage {100 * ci.confidence:.1f} %); per seed {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
