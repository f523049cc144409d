"""Convolution algorithm finder: times every algorithm on each convolution of a model, like cuDNN's.

cuDNN's `cudnnFindConvolutionForwardAlgorithm` and oneDNN's implementation dispatch run each candidate on
the layer's shapes and keep the fastest (Ben-Nun & Hoefler 2019 Sec. 6.3: no convolution method fits all
shapes). Here the candidates are `polytrain.ops.conv`'s algorithms and torch's own `F.conv2d` as the
baseline, timed forward and backward (the work of one training step) unless asked for forward only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from polytrain.bench.stats import median_ci
from polytrain.models import build_model
from polytrain.ops.conv import CONV_ALGORITHMS, conv2d
from polytrain.cost.geometry import ConvGeometry
from polytrain.train.environment import environment

# The baseline's name in the results: torch.nn.functional.conv2d (oneDNN or torch's own kernels on CPU).
TORCH = "torch"


@dataclass(frozen=True)
class ConvConfig:
    """One convolution as the finder sees it: input shape (N, C, H, W), weight shape and window."""

    input_shape: tuple[int, int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool

    @property
    def geometry(self) -> ConvGeometry:
        """The window, for the algorithms' support checks."""
        return ConvGeometry(self.kernel, self.stride, self.padding, self.dilation)

    def describe(self) -> str:
        """E.g. "3x32x32 -> 16, 3x3/1 p1" (per sample)."""
        _, c, h, w = self.input_shape
        text = (f"{c}x{h}x{w} -> {self.out_channels}, {self.kernel[0]}x{self.kernel[1]}/{self.stride[0]} "
                f"p{self.padding[0]}")
        return text + (f" g{self.groups}" if self.groups > 1 else "")


@dataclass(frozen=True)
class Timing:
    """Median seconds of one candidate on one layer, with its nonparametric confidence interval."""

    median_s: float
    ci_low_s: float
    ci_high_s: float
    confidence: float


@dataclass
class LayerResult:
    """Timings of every candidate on one convolution configuration, and the winners."""

    layers: list[str]
    config: ConvConfig
    times: dict[str, Timing] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)

    @property
    def fastest(self) -> str:
        """The candidate with the smallest median, torch included."""
        return min(self.times, key=lambda name: self.times[name].median_s)

    @property
    def fastest_ours(self) -> str:
        """Our algorithm with the smallest median."""
        return min((name for name in self.times if name != TORCH), key=lambda name: self.times[name].median_s)

    def to_dict(self) -> dict:
        """JSON-ready: the configuration, the timings, the unsupported algorithms and the winners."""
        times = {name: asdict(timing) for name, timing in self.times.items()}
        return {"layers": self.layers, **asdict(self.config), "times": times, "unsupported": self.unsupported,
                "fastest": self.fastest, "fastest_ours": self.fastest_ours}


def conv_configs(model: nn.Module, sample: torch.Tensor) -> dict[ConvConfig, list[str]]:
    """Every nn.Conv2d of `model` with the input it sees on `sample`, grouped by identical configuration.

    Forward hooks record each convolution's input shape during one forward pass (eval mode, no grad).
    Layers with the same configuration (ResNet's repeated blocks) are timed once, as cuDNN's benchmark
    mode caches by shape; the result lists their names.
    """
    configs: dict[ConvConfig, list[str]] = {}

    def record(name: str):
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ValueError(f"layer {name}: only explicit zero padding is supported; got "
                                 f"padding={module.padding!r}, padding_mode={module.padding_mode!r}")
            config = ConvConfig(tuple(inputs[0].shape), module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.groups, module.bias is not None)
            configs.setdefault(config, []).append(name)
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return configs


def _operands(config: ConvConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random input, weight and (if any) bias, all requiring grad, and an output gradient."""
    n, c, h, w = config.input_shape
    operands = [torch.randn(n, c, h, w), torch.randn(config.out_channels, c // config.groups, *config.kernel)]
    if config.bias:
        operands.append(torch.randn(config.out_channels))
    for tensor in operands:
        tensor.requires_grad_(True)
    out_hw = config.geometry.output_hw((h, w))
    return operands, torch.randn(n, config.out_channels, *out_hw)


def _conv(algorithm: str, x, weight, bias, window: dict) -> torch.Tensor:
    """torch's F.conv2d for TORCH, else our `conv2d` with `algorithm`."""
    if algorithm == TORCH:
        return F.conv2d(x, weight, bias, **window)
    return conv2d(x, weight, bias, algorithm=algorithm, **window)


def _step(algorithm: str, config: ConvConfig, operands: list[torch.Tensor], grad_y: torch.Tensor,
          forward_only: bool) -> None:
    """One forward (and backward: gradients of input, weight and bias) of `algorithm` on the layer."""
    x, weight, *rest = operands
    bias = rest[0] if rest else None
    window = dict(stride=config.stride, padding=config.padding, dilation=config.dilation, groups=config.groups)
    if forward_only:
        with torch.no_grad():
            _conv(algorithm, x, weight, bias, window)
        return
    torch.autograd.grad(_conv(algorithm, x, weight, bias, window), operands, grad_y)


def time_layer(config: ConvConfig, layers: list[str], repeats: int, warmup: int,
               forward_only: bool = False) -> LayerResult:
    """Times torch and every algorithm that supports `config`, interleaved, and summarises each.

    Each candidate first runs `warmup` untimed steps; then the `repeats` timed rounds run every candidate
    once each, in turn, so that a slow phase of a shared machine hits all of them alike (Hoefler & Belli
    2015: ratios from runs interleaved in one session).
    """
    result = LayerResult(layers, config)
    candidates = [TORCH]
    for name in CONV_ALGORITHMS.names():
        try:
            CONV_ALGORITHMS.get(name)().check(config.geometry)
            candidates.append(name)
        except ValueError as error:
            result.unsupported[name] = str(error)
    operands, grad_y = _operands(config)
    for name in candidates:
        for _ in range(warmup):
            _step(name, config, operands, grad_y, forward_only)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name in candidates:
            start = time.perf_counter()
            _step(name, config, operands, grad_y, forward_only)
            samples[name].append(time.perf_counter() - start)
    for name, times_s in samples.items():
        result.times[name] = Timing(*median_ci(times_s))
    return result


def find_algorithms(model_name: str, in_shape: tuple[int, ...], num_classes: int = 10, batch_size: int = 1,
                    repeats: int = 11, warmup: int = 2, forward_only: bool = False,
                    seed: int = 0) -> list[LayerResult]:
    """Times every convolution algorithm on each convolution of a zoo model and finds the fastest per layer.

    Args:
        model_name: a name in `polytrain.models.MODELS`.
        in_shape: one sample's shape, (C, H, W).
        num_classes: output classes of the model (changes no convolution, but the builder needs it).
        batch_size: samples per timed step.
        repeats: timed steps per candidate and layer (11 gives a 95 % interval between the 2nd and 10th).
        warmup: untimed steps per candidate and layer before timing.
        forward_only: time the forward pass alone instead of forward + backward.
        seed: seed of the random input and weights.

    Returns:
        One result per distinct convolution configuration, in the order the model first uses each.

    Raises:
        ValueError: for an unknown model, a shape it cannot take, or repeats < 1 / warmup < 0.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and batch size >= 1; got {repeats}, {warmup}, "
                         f"{batch_size}")
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes, tuple(in_shape))
    configs = conv_configs(model, torch.randn(batch_size, *in_shape))
    if not configs:
        raise ValueError(f"model {model_name} has no 2-D convolutions")
    return [time_layer(config, layers, repeats, warmup, forward_only) for config, layers in configs.items()]


def parse_input_shape(text: str) -> tuple[int, ...]:
    """"3,32,32" -> (3, 32, 32); ValueError naming the flag for anything but positive integers."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape must be positive integers separated by commas, like 3,32,32; "
                         f"got {text!r}")
    return shape


def _cell(timing: Timing | None, best: bool) -> str:
    """"12.3 [11.9, 13]" in ms (3 significant digits), bold for the layer's fastest, "-" where unsupported."""
    if timing is None:
        return "-"
    text = f"{1e3 * timing.median_s:.3g} [{1e3 * timing.ci_low_s:.3g}, {1e3 * timing.ci_high_s:.3g}]"
    return f"[bold]{text}[/bold]" if best else text


def layer_label(layers: list[str]) -> str:
    """The first layer's name, and how many more share its configuration."""
    return layers[0] + (f" (+{len(layers) - 1})" if len(layers) > 1 else "")


def results_table(results: list[LayerResult], title: str) -> Table:
    """One row per convolution configuration, one column per candidate: median ms [95 % CI]."""
    names = [TORCH, *CONV_ALGORITHMS.names()]
    table = Table(title=title)
    table.add_column("layers", no_wrap=True)
    table.add_column("input -> out, kernel/stride pad", no_wrap=True)
    for name in names:
        table.add_column(f"{name} ms", justify="right")
    table.add_column("fastest")
    table.add_column("best ours / torch", justify="right", no_wrap=True)
    for result in results:
        ours = result.times[result.fastest_ours].median_s / result.times[TORCH].median_s
        table.add_row(layer_label(result.layers), result.config.describe(),
                      *(_cell(result.times.get(name), name == result.fastest) for name in names),
                      result.fastest, f"{result.fastest_ours} {ours:.2f}x")
    return table




def run_bench_ops(model_name: str, in_shape: tuple[int, ...], num_classes: int, batch_size: int, repeats: int,
                  warmup: int, forward_only: bool = False, threads: int | None = None,
                  as_json: bool = False) -> dict:
    """`polytrain bench ops`: runs `find_algorithms` and prints a table (or JSON); returns the report.

    The report holds the settings, the timed pass, the environment manifest (threads included) and one
    entry per convolution configuration (`LayerResult.to_dict`).
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1; got {threads}")
        torch.set_num_threads(threads)
    results = find_algorithms(model_name, in_shape, num_classes, batch_size, repeats, warmup, forward_only)
    timed = "forward" if forward_only else "forward+backward"
    report = {"model": model_name, "input_shape": list(in_shape), "num_classes": num_classes,
              "batch_size": batch_size, "repeats": repeats, "warmup": warmup, "pass": timed,
              "environment": environment(seed=0), "layers": [result.to_dict() for result in results]}
    if as_json:
        print(json.dumps(report, indent=2))
        return report
    console = Console()
    console.width = max(console.width, 220)  # six columns of "12.3 [11.9, 13]" and four more
    title = (f"{model_name}, batch {batch_size} x {'x'.join(map(str, in_shape))}, {timed}: median ms "
             f"[{100 * min(r.times[TORCH].confidence for r in results):.1f}% CI] of {repeats} interleaved "
             f"runs after {warmup} warm-up, {torch.get_num_threads()} thread(s)")
    console.print(results_table(results, title))
    return report
