"""Reproduces the convolution algorithm finder tables of BENCHMARKS.md ("Convolution algorithm finder").

Runs `polytrain.bench.ops.find_algorithms` (what `polytrain bench ops MODEL` runs) on AlexNet and
ResNet-20 and prints one Markdown table per model: median milliseconds of forward + backward with the
95 % confidence interval of the median, per distinct convolution, for torch's F.conv2d and each of our
algorithms. Usage:

    python benchmarks/bench_ops.py [--threads 1] [--repeats 11] [--warmup 2] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from polytrain.bench.ops import TORCH, LayerResult, find_algorithms, layer_label
from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.train.environment import environment

# (model, sample shape, batch): AlexNet at its published 224x224 (batch 1 keeps direct and FFT, which
# transform 64x3 to 384x256 kernels at the input size, to about a minute), ResNet-20 on CIFAR-sized input.
RUNS = (("alexnet", (3, 224, 224), 1), ("resnet20", (3, 32, 32), 32))


def markdown_table(results: list[LayerResult]) -> str:
    """Median ms [95 % CI] per candidate and convolution; the fastest in bold, '-' where unsupported."""
    names = [TORCH, *CONV_ALGORITHMS.names()]
    header = ["layers", "input -> out, kernel/stride pad", *names, "fastest", "best ours / torch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = []
        for name in names:
            timing = result.times.get(name)
            text = "-" if timing is None else (f"{1e3 * timing.median_s:.2f} "
                                               f"[{1e3 * timing.ci_low_s:.2f}, {1e3 * timing.ci_high_s:.2f}]")
            cells.append(f"**{text}**" if name == result.fastest else text)
        ratio = result.times[result.fastest_ours].median_s / result.times[TORCH].median_s
        lines.append(f"| {layer_label(result.layers)} | {result.config.describe()} | " + " | ".join(cells)
                     + f" | {result.fastest} | {result.fastest_ours} {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json-out", default=None, help="also write every timing here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment(seed=0)
    print(f"{env['cpu']}, {env['cores']} cores, {torch.get_num_threads()} thread(s); torch {torch.__version__}, "
          f"Python {platform.python_version()}; forward + backward, {args.repeats} interleaved runs after "
          f"{args.warmup} warm-up\n")
    report = {"environment": env, "repeats": args.repeats, "warmup": args.warmup, "runs": []}
    for model, in_shape, batch in RUNS:
        results = find_algorithms(model, in_shape, batch_size=batch, repeats=args.repeats, warmup=args.warmup)
        print(f"{model}, batch {batch} x {'x'.join(map(str, in_shape))}\n\n{markdown_table(results)}\n")
        report["runs"].append({"model": model, "input_shape": list(in_shape), "batch_size": batch,
                               "layers": [result.to_dict() for result in results]})
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
