"""The `polytrain` command line: a thin front end over the library."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from polytrain.aggregators import AGGREGATORS
from polytrain.comm import CommError
from polytrain.comm.algorithms import ALLREDUCE_ALGORITHMS
from polytrain.comm.mesh import MeshShape
from polytrain.comm.sparse import SPARSE_ALLREDUCE_ALGORITHMS
from polytrain.compress import COMPRESSORS
from polytrain.config import Experiment, apply_overrides, load_toml, parse_assignments, parse_named
from polytrain.data import DATASETS
from polytrain.faults import parse_fault
from polytrain.launch import WorkerFailed
from polytrain.launch.cluster import DEFAULT_RUN_TIMEOUT_S, ClusterError, EmulatedCluster, HostFailed
from polytrain.launch.script import add_run_parser, command_run
from polytrain.models import MODELS
from polytrain.ops.conv import CONV_ALGORITHMS
from polytrain.plugins import load_plugins
from polytrain.schedules import STEP_SCHEDULES
from polytrain.strategies import STRATEGIES
from polytrain.tasks import TASKS
from polytrain.train import TrainingDiverged, stored_experiment, train
from polytrain.train.loop import at_another_world_size
from polytrain.train.optim import OPTIMIZERS, SCHEDULES
from polytrain.train.progress import console_reporter

# How much of each other host's output `polytrain cluster` shows when a host fails.
HOST_OUTPUT_LINES = 30

# Flags that map one-to-one onto Experiment fields.
_FIELD_FLAGS = {"model": str, "dataset": str, "workers": int, "epochs": int, "batch_size": int, "lr": float,
                "optimizer": str, "schedule": str, "microbatches": int, "seed": int, "target": float,
                "precision": str, "out": str, "step_schedule": str, "device": str, "amp": str, "task": str,
                "loader_workers": int}

REGISTRIES = {"models": MODELS, "datasets": DATASETS, "tasks": TASKS, "optimizers": OPTIMIZERS, "schedules": SCHEDULES,
              "step schedules": STEP_SCHEDULES, "strategies": STRATEGIES, "allreduce algorithms": ALLREDUCE_ALGORITHMS,
              "sparse allreduce algorithms": SPARSE_ALLREDUCE_ALGORITHMS, "compressors": COMPRESSORS,
              "convolution algorithms": CONV_ALGORITHMS, "aggregators": AGGREGATORS}


def _add_train_flags(parser: argparse.ArgumentParser, axes: bool = False) -> None:
    """The settings of one run; with `axes` (polytrain compare) without those the matrix varies (workers,
    strategy, mesh, compressor) and those of one run's directory (out, resume, plan)."""
    for name, kind in _FIELD_FLAGS.items():
        if axes and name in ("workers", "out"):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, dest=name)
    # The stable name for classification runs; --target is the same setting for any task's metric.
    parser.add_argument("--target-accuracy", type=float, default=None, dest="target",
                        help="test accuracy for time-to-target (same as --target)")
    if axes:
        parser.add_argument("--strategy", action="append", default=None, dest="strategies", metavar="NAME[:k=v,...]",
                            help="an update policy of the matrix (repeatable)")
        parser.add_argument("--mesh", action="append", default=None, dest="meshes", metavar="AXIS=SIZE,...",
                            help="a mesh of the matrix (repeatable)")
        parser.add_argument("--compressor", action="append", default=None, dest="compressors",
                            metavar="NAME[:k=v,...]", help="a compressor of the matrix, or none (repeatable)")
    else:
        parser.add_argument("--strategy", default=None, help="update policy NAME[:k=v,...]")
        parser.add_argument("--mesh", default=None,
                            help="mesh axes AXIS=SIZE,... (dp, pp, tp); --workers is their product")
        parser.add_argument("--compressor", default=None, help="NAME[+NAME][:k=v,...] (gradient compression)")
    parser.add_argument("--straggler", default=None,
                        help="slow one rank down: rank=R,slowdown=S (e.g. rank=1,slowdown=3)")
    parser.add_argument("--aggregator", default=None,
                        help="combine the replicas' whole gradients: NAME[:f=F,k=v,...] (mean, median, trimmed_mean, "
                             "krum, multikrum, bulyan, geometric_median, centered_clipping)")
    parser.add_argument("--fault", action="append", default=None, metavar="KIND:k=v,...",
                        help="inject a fault (repeatable): kill:rank=R,step=S, hang:rank=R,step=S, slow:rank=R,factor=F, "
                             "corrupt-checkpoint, byzantine:ranks=R[+R],attack=signflip|scaled|gaussian|alie|ipm|labelflip")
    parser.add_argument("--max-restarts", type=int, default=None, dest="max_restarts",
                        help="restart a run whose rank died or hung from its newest intact checkpoint, up to R times")
    parser.add_argument("--elastic", action="store_true", default=None,
                        help="restart with the surviving workers (synchronous data parallelism)")
    parser.add_argument("--keep-checkpoints", type=int, default=None, dest="keep_checkpoints",
                        help="checkpoints kept (the newest as checkpoint.pt; default 1)")
    parser.add_argument("--log", action="append", default=None, metavar="NAME[:k=v,...]",
                        help="log to tensorboard[:dir=D] or mlflow[:uri=U,experiment=E] (repeatable; optional extras)")
    parser.add_argument("--data-path", default=None, help="directory of a user dataset (mnist, cifar10, ...)")
    parser.add_argument("--config", default=None, help="TOML file of settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting (repeatable); KEY.SUB=VALUE sets one entry of a table")
    if not axes:
        parser.add_argument("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
        parser.add_argument("--retune", action="store_true", help="with --resume: take new lr, weight_decay and "
                                                                  "optimizer_args (population-based training)")
        parser.add_argument("--plan", default=None, metavar="FILE",
                            help="run a plan written by polytrain plan (its settings come before the flags)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polytrain", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_flags(commands.add_parser("train", help="train a model"))
    commands.add_parser("list", help="list every registry (models, datasets, ...)")
    demo = commands.add_parser("demo", help="one strategy of each family against one worker on real MNIST digits: "
                                            "a results table and an HTML report")
    demo.add_argument("--epochs", type=int, default=None, help="epochs per run (default 8)")
    demo.add_argument("--out", default=None, help="the demo's directory (default ./polytrain-demo; a second call "
                                                  "resumes it)")
    _add_bench_parsers(commands.add_parser("bench", help="benchmarks (ops: convolutions; collectives: allreduce)"))
    _add_cost_flags(commands.add_parser("cost", help="parameters, arithmetic, memory, work and depth of a model"))
    _add_cluster_flags(commands.add_parser("cluster", help="run a command on emulated hosts with limited "
                                                           "bandwidth (network namespaces; root)"))
    ensemble = commands.add_parser("ensemble", help="train K models in parallel, one per group of workers, judge "
                                                    "them together and distill them into one")
    _add_train_flags(ensemble)
    ensemble.add_argument("--members", type=int, required=True, help="models, each on workers / K of the workers")
    ensemble.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (default 2)")
    ensemble.add_argument("--soft-weight", type=float, default=0.5,
                          help="weight of the soft targets' term in the student's loss (default 0.5)")
    ensemble.add_argument("--student-model", default=None, help="the student's model (default: the members')")
    ensemble.add_argument("--no-distill", action="store_true", help="train and judge the members only")
    _add_perf_parsers(commands)
    _add_compare_parser(commands)
    add_run_parser(commands)
    return parser


def _add_compare_parser(commands) -> None:
    compare = commands.add_parser("compare", help="run a matrix of strategies x workers x seeds beside a "
                                                  "single-worker baseline and summarise it honestly")
    _add_train_flags(compare, axes=True)
    compare.add_argument("--workers", default=None, help="worker counts of the matrix, e.g. 2,4")
    compare.add_argument("--bandwidth", default=None, dest="bandwidths",
                         help="links of the matrix: none and/or emulated-cluster rates, e.g. none,1gbit (root)")
    compare.add_argument("--seeds", default=None, help="seeds per cell: a count (default 3) or a list 0,1,2")
    compare.add_argument("--vary", action="append", default=None, metavar="KEY=[V1, V2]",
                         help="a setting the matrix varies (repeatable), e.g. lr=[0.05, 0.1]")
    compare.add_argument("--order-seed", type=int, default=None, help="seed of the runs' random order (default 0)")
    compare.add_argument("--ci-within", type=float, default=None, metavar="PERCENT",
                         help="add seeds until each cell's 95 %% CI lies within PERCENT of its median")
    compare.add_argument("--max-seeds", type=int, default=None, help="the most seeds --ci-within may reach")
    compare.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before one run is stopped")
    compare.add_argument("--out", required=True, help="the comparison's directory (a second call resumes it)")
    tune = commands.add_parser("tune", help="hyper-parameter search whose trials are polytrain runs (a study in "
                                            "SQLite or any SQLAlchemy database, resumable)")
    tune.add_argument("--config", required=True, help="TOML: base settings, [tune] (sampler, trials, objective, "
                                                      "seed, parallel, confirm_seeds) and [tune.space]")
    tune.add_argument("--out", required=True, help="the study's directory (trials/, confirm/, study.db, tune.json)")
    tune.add_argument("--storage", default=None, help="SQLAlchemy URL of the study's database (default "
                                                      "sqlite:///OUT/study.db)")
    tune.add_argument("--study", default="study", help="the study's name in the database (default study)")
    for name in ("trials", "parallel", "confirm_seeds"):
        tune.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"[tune] {name}")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base setting")
    tune.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before one trial is stopped")
    report = commands.add_parser("report", help="a comparison's plots and tables as a web page and markdown")
    report.add_argument("directory", help="the directory polytrain compare --out wrote")


def _add_perf_parsers(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="measure this machine for the performance model (compute, "
                                                      "collectives, overlap) and store its profile")
    calibrate.add_argument("--ranks", default="1,2,4", help="ranks sharing the machine to calibrate (default 1,2,4)")
    calibrate.add_argument("--models", default="lenet5,mlp,resnet20", help="models whose modules are timed")
    calibrate.add_argument("--batches", default="16,64,256", help="batches per rank the modules are timed at")
    calibrate.add_argument("--bandwidths", default="none",
                           help="none and/or emulated-cluster rates (1gbit,100mbit; needs root) for the collectives")
    calibrate.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (default 5)")
    calibrate.add_argument("--quick", action="store_true", help="ranks 1,2, models lenet5,mlp, 2 batches, 3 repeats")
    calibrate.add_argument("--profile", default=None, help="where to store it (default $POLYTRAIN_PROFILE or "
                                                           "~/.cache/polytrain/profile.json)")
    for name, text in (("predict", "predict a run's step time (compute, exposed communication, bubble, overhead), "
                                   "bytes and memory per rank"),
                       ("plan", "rank the ways to run a model on a cluster by predicted step time")):
        parser = commands.add_parser(name, help=text)
        _add_train_flags(parser)
        parser.add_argument("--cluster", default="local", help="local[:BANDWIDTH] (calibrated), a published profile "
                                                               "(--cluster list), FILE.json/.toml or key=value,...")
        parser.add_argument("--profile", default=None, help="calibration profile (default: polytrain calibrate's)")
        parser.add_argument("--json", action="store_true", help="print JSON")
    predict = commands.choices["predict"]
    predict.add_argument("--noise", type=float, default=0.0,
                         help="simulate every rank's compute with lognormal noise of this sigma")
    predict.add_argument("--steps", type=int, default=20, help="steps simulated when ranks are not alike")
    plan = commands.choices["plan"]
    plan.add_argument("--memory-per-rank", default=None, help="memory limit per rank, e.g. 2GB or 512MB")
    plan.add_argument("--top", type=int, default=5, help="candidates shown (default 5)")
    plan.add_argument("--approximate", action="store_true",
                      help="also candidates that change the optimisation (compression, local SGD, async, gossip)")
    plan.add_argument("--write", default=None, metavar="FILE.toml", help="write the first choice as a plan file")


def _add_bench_parsers(bench: argparse.ArgumentParser) -> None:
    """`polytrain bench KIND ...`: one sub-subcommand per benchmark, each with an entry in BENCH_COMMANDS."""
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    ops = kinds.add_parser("ops", help="time every convolution algorithm on each convolution of a model")
    ops.add_argument("model")
    ops.add_argument("--input-shape", default="3,32,32", help="C,H,W of one sample (default 3,32,32)")
    ops.add_argument("--num-classes", type=int, default=10)
    ops.add_argument("--batch-size", type=int, default=1)
    ops.add_argument("--repeats", type=int, default=11, help="timed runs per algorithm and layer")
    ops.add_argument("--warmup", type=int, default=2, help="untimed runs per algorithm and layer first")
    ops.add_argument("--forward-only", action="store_true", help="time the forward pass alone")
    ops.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ops.add_argument("--json", action="store_true", help="print JSON instead of a table")
    collectives = kinds.add_parser("collectives", help="time every allreduce algorithm per message size, fit "
                                                       "alpha and beta, find crossovers")
    collectives.add_argument("--workers", type=int, default=None,
                             help="local ranks to spawn (default 2; under torchrun: its WORLD_SIZE)")
    collectives.add_argument("--algorithms", default="all", help="a,b,... or all (default)")
    collectives.add_argument("--sizes", default="4^5..4^12",
                             help="message sizes: 1KB,64KB,1MB,16MB (K = 1024) and/or B^a..B^b, every power of B "
                                  "(default 4^5..4^12: 1 KiB to 16 MiB)")
    collectives.add_argument("--repeats", type=int, default=11, help="timed repetitions (default 11)")
    collectives.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    collectives.add_argument("--dtype", default="float32", help="element type (default float32)")
    collectives.add_argument("--threads", type=int, default=None,
                             help="torch threads per rank (default: cores / workers, at least 1)")
    collectives.add_argument("--json", action="store_true", help="print JSON instead of tables")
    collectives.add_argument("--plot", default=None, metavar="FILE.png", help="also plot time and bus bandwidth")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from --config, then the flags given, then --set (later ones win)."""
    overrides: dict[str, Any] = load_toml(args.config) if args.config else {}
    if getattr(args, "plan", None):
        overrides.update(load_toml(args.plan))
    overrides.update({name: getattr(args, name) for name in _FIELD_FLAGS if getattr(args, name, None) is not None})
    if getattr(args, "strategy", None) is not None:
        overrides["strategy"], overrides["strategy_args"] = parse_named(args.strategy, "--strategy")
    if getattr(args, "compressor", None) is not None:
        overrides["compressor"], overrides["compressor_args"] = parse_named(args.compressor, "--compressor")
    if args.aggregator is not None:
        overrides["aggregator"], overrides["aggregator_args"] = parse_named(args.aggregator, "--aggregator")
    if args.log is not None:
        overrides["log"] = list(args.log)
    if args.fault is not None:
        overrides["faults"] = [parse_fault(spec) for spec in args.fault]
    for name in ("max_restarts", "elastic", "keep_checkpoints"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.straggler is not None:
        overrides["straggler"] = parse_assignments([part for part in args.straggler.split(",") if part], "--straggler")
    if getattr(args, "mesh", None) is not None:
        overrides["mesh"] = MeshShape.parse(args.mesh).sizes()
    if args.data_path is not None:
        overrides["dataset_args.path"] = args.data_path
    overrides.update(parse_assignments(args.set))
    return overrides


def command_train(args: argparse.Namespace) -> int:
    if args.retune and not args.resume:
        raise ValueError("--retune gives a resumed run new hyper-parameters; it needs --resume DIR")
    overrides = overrides_from_args(args)
    if args.resume:
        base = stored_experiment(args.resume)
        overrides.setdefault("out", args.resume)
        if overrides.get("workers", base.workers) != base.workers:
            base = at_another_world_size(base, overrides["workers"])
    else:
        base = Experiment()
    exp = apply_overrides(base, overrides)
    result = train(exp, resume=args.resume, reporter=console_reporter(sys.stdout), retune=args.retune)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 speaks for the run
    if result.final_test_accuracy is not None:
        judged = (f"final test accuracy {100 * result.final_test_accuracy:.2f}% "
                  f"(best {100 * result.best_test_accuracy:.2f}%)")
    else:
        judged = f"final test {result.metric} {result.final_test_metric:.4g} (best {result.best_test_metric:.4g})"
    print(f"{judged}, {result.wall_s:.1f} s, {result.samples_per_s:.0f} samples/s"
          + (f"; results in {exp.out}" if exp.out else ""))
    return 0


def command_ensemble(args: argparse.Namespace) -> int:
    from polytrain.train.ensemble import train_ensemble

    if args.resume:
        raise ValueError("an ensemble cannot be resumed; each member's run can (polytrain train --resume DIR)")
    exp = apply_overrides(Experiment(), overrides_from_args(args))
    result = train_ensemble(exp, members=args.members, distill=not args.no_distill, temperature=args.temperature,
                            soft_weight=args.soft_weight, student_model=args.student_model)
    for i, accuracy in enumerate(result.member_accuracy):
        print(f"member {i} (seed {result.members[i].config['seed']}): test accuracy {100 * accuracy:.2f}%")
    print(f"ensemble of {len(result.members)}: test accuracy {100 * result.ensemble_accuracy:.2f}%")
    if result.student is not None:
        print(f"student ({result.student.config['model']}, distilled at T={args.temperature:g}): "
              f"test accuracy {100 * result.student.final_test_metric:.2f}%")
    if exp.out:
        print(f"results in {exp.out}/ensemble.json")
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from polytrain.bench.compare import build_matrix, compare, print_summary
    from polytrain.config import flatten_toml, load_toml_tables

    tables = load_toml_tables(args.config) if args.config else {}
    axes = tables.pop("compare", {})
    if not isinstance(axes, dict):
        raise ValueError(f"{args.config}: [compare] must be a table of axes (strategies, workers, seeds, ...)")
    workers, args.config, args.workers = args.workers, None, None  # the axis, not one run's setting
    base = {**flatten_toml(tables), **overrides_from_args(args)}
    base.pop("out", None)  # --out is the comparison's directory; each run has its own
    apply_overrides(Experiment(), base)  # a wrong setting fails before the matrix is built

    def numbers(text: str, what: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--{what} takes whole numbers separated by commas; got {text!r}") from None

    for name in ("strategies", "meshes", "compressors"):
        if getattr(args, name) is not None:
            axes[name] = getattr(args, name)
    if workers is not None:
        axes["workers"] = numbers(workers, "workers")
    if args.bandwidths is not None:
        axes["bandwidths"] = [b.strip() for b in args.bandwidths.split(",") if b.strip()]
    if args.seeds is not None:
        seeds = numbers(args.seeds, "seeds")
        axes["seeds"] = seeds[0] if "," not in args.seeds and len(seeds) == 1 else seeds
    if args.vary is not None:
        axes["vary"] = {**axes.get("vary", {}), **parse_assignments(args.vary, "--vary")}
    if args.order_seed is not None:
        axes["order_seed"] = args.order_seed
    if (args.ci_within is None) != (args.max_seeds is None):
        raise ValueError("--ci-within and --max-seeds go together: the stopping rule needs a most seeds")
    if args.ci_within is not None and not 0 < args.ci_within < 100:
        raise ValueError(f"--ci-within is a percentage in (0, 100); got {args.ci_within}")
    matrix = build_matrix(base, axes)
    runs = len(matrix.cells) * len(matrix.seeds)
    print(f"polytrain compare: {len(matrix.cells)} cells (baselines included) x {len(matrix.seeds)} seeds = {runs} "
          f"runs in {args.out}")
    summary = compare(matrix, args.out, ci_within=args.ci_within / 100 if args.ci_within else None,
                      max_seeds=args.max_seeds, run_timeout_s=args.run_timeout)
    print_summary(summary)
    print(f"summary in {args.out}/summary.md, .csv and .json; the report: polytrain report {args.out}")
    return 0


def command_tune(args: argparse.Namespace) -> int:
    from polytrain.config import flatten_toml, load_toml_tables
    from polytrain.tune.run import TuneSpec, print_tune_summary, tune

    tables = load_toml_tables(args.config)
    table = tables.pop("tune", None)
    if not isinstance(table, dict):
        raise ValueError(f"{args.config} has no [tune] table (sampler, trials, objective, ...) with its [tune.space]")
    for name in ("trials", "parallel", "confirm_seeds"):
        if getattr(args, name) is not None:
            table[name] = getattr(args, name)
    base = {**flatten_toml(tables), **parse_assignments(args.set)}
    base.pop("out", None)  # each trial has its own directory
    spec = TuneSpec.parse(base, table)
    summary = tune(spec, args.out, storage=args.storage, name=args.study, run_timeout_s=args.run_timeout)
    print_tune_summary(summary)
    print(f"trials in {args.out}/trials, the summary in {args.out}/tune.json")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from polytrain.bench.report import write_report

    html_path, md_path = write_report(args.directory)
    print(f"report written to {html_path} and {md_path}")
    return 0


def command_list(args: argparse.Namespace) -> int:
    for title, registry in REGISTRIES.items():
        print(f"{title}: {', '.join(registry.names())}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from polytrain.bench.demo import run_demo

    run_demo(epochs=args.epochs, out=Path(args.out) if args.out else None)
    return 0


def command_bench_ops(args: argparse.Namespace) -> int:
    from polytrain.bench.ops import parse_input_shape, run_bench_ops

    run_bench_ops(args.model, parse_input_shape(args.input_shape), args.num_classes, args.batch_size,
                  args.repeats, args.warmup, forward_only=args.forward_only, threads=args.threads,
                  as_json=args.json)
    return 0


def command_bench_collectives(args: argparse.Namespace) -> int:
    from polytrain.bench.collectives import run_bench_collectives

    run_bench_collectives(args.workers, args.algorithms, args.sizes, args.repeats, args.warmup, args.dtype,
                          threads=args.threads, as_json=args.json, plot=args.plot)
    return 0


BENCH_COMMANDS = {"ops": command_bench_ops, "collectives": command_bench_collectives}


def command_bench(args: argparse.Namespace) -> int:
    return BENCH_COMMANDS[args.bench_command](args)


def _add_cost_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model")
    parser.add_argument("--input-shape", default=None, metavar="C,H,W", help="one sample (default: the model's own)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1, help="for activation bytes, memory, work and depth")
    parser.add_argument("--optimizer", default="momentum", help="whose state to count (default momentum)")
    parser.add_argument("--dtype", default="float32", help="float32, float16, bfloat16 or float64")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model metaparameter")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def command_cost(args: argparse.Namespace) -> int:
    from polytrain.cost.report import run_cost

    run_cost(args.model, args.input_shape, args.num_classes, args.batch_size, parse_assignments(args.set),
             args.optimizer, args.dtype, as_json=args.json, out=sys.stdout)
    return 0


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.usage = "polytrain cluster --hosts H [--bandwidth RATE] [--timeout S] -- COMMAND [ARG ...]"
    parser.add_argument("--hosts", type=int, required=True, help="emulated hosts, one rank each")
    parser.add_argument("--bandwidth", default="1gbit", help="each host's link, each way, in tc's units "
                                                             "(100mbit, 1gbit) or none (default 1gbit)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_RUN_TIMEOUT_S,
                        help=f"seconds before every host is stopped (default {DEFAULT_RUN_TIMEOUT_S:g})")
    parser.add_argument("run_command", nargs="+", metavar="COMMAND",
                        help="after --: what every host runs, with torchrun's variables set (a command "
                             "starting with polytrain runs this installation)")


def command_cluster(args: argparse.Namespace) -> int:
    try:
        with EmulatedCluster(args.hosts, args.bandwidth) as cluster:
            cluster.run(args.run_command, timeout_s=args.timeout)
    except ClusterError as error:
        outputs = error.outputs if isinstance(error, HostFailed) else {}
        for host, output in outputs.items():
            if output.strip():
                tail = "\n".join(output.splitlines()[-HOST_OUTPUT_LINES:])
                print(f"--- host {host}, last lines of its output ---\n{tail}", file=sys.stderr)
        print(f"polytrain: error: {error}", file=sys.stderr)
        return 1
    return 0


def command_calibrate(args: argparse.Namespace) -> int:
    from polytrain.perf.calibrate import QUICK, calibrate

    def numbers(text: str, what: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--{what} takes whole numbers separated by commas; got {text!r}") from None
        if not values or min(values) < 1:
            raise ValueError(f"--{what} takes whole numbers >= 1; got {text!r}")
        return values

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1; got {args.repeats}")
    settings = {"ranks": numbers(args.ranks, "ranks"), "models": [m for m in args.models.split(",") if m],
                "batches": numbers(args.batches, "batches"), "repeats": args.repeats}
    for model in settings["models"]:
        MODELS.get(model)
    if args.quick:
        settings.update(QUICK)
    bandwidths = [b for b in args.bandwidths.split(",") if b]
    profile = calibrate(bandwidths=bandwidths, path=args.profile, **settings)
    data = profile.data
    print(f"profile written to {profile.path} in {data['calibration_s']:.0f} s: compute at "
          f"{', '.join(data['compute']['fits'])} rank(s), links at {', '.join(data['links'])}, "
          f"overlap {data['overlap']['none']:.2f}, in-step communication x{data['comm_scale']['none']['native']:.2f} "
          f"(native), x{data['comm_scale']['none']['p2p']:.2f} (point to point)")
    return 0


def _predict_setup(args: argparse.Namespace):
    from polytrain.perf.cluster import describe_clusters, parse_cluster
    from polytrain.perf.predict import _servers
    from polytrain.train.defaults import resolve

    if args.cluster == "list":
        print("\n".join(describe_clusters()))
        return None
    exp = resolve(apply_overrides(Experiment(), overrides_from_args(args)))
    return exp, parse_cluster(args.cluster, args.profile, ranks=exp.workers + _servers(exp))


def command_predict(args: argparse.Namespace) -> int:
    import json

    from polytrain.perf.simulate import simulate

    setup = _predict_setup(args)
    if setup is None:
        return 0
    exp, cluster = setup
    if args.steps < 1 or args.noise < 0:
        raise ValueError(f"--steps must be >= 1 and --noise >= 0; got {args.steps} and {args.noise}")
    simulated = simulate(exp, cluster, steps=args.steps, noise=args.noise)
    p = simulated.prediction
    if args.json:
        print(json.dumps(simulated.to_dict(), indent=1))
        return 0
    print(f"{exp.model} on {cluster.name}, {exp.strategy} over mesh {p.mesh}, batch {exp.batch_size}:")
    print(f"  step {1e3 * simulated.step_s:.3f} ms" + (f" (simulated over {simulated.ranks} ranks; the ranks "
                                                         f"alike: {1e3 * p.step_s:.3f} ms)" if simulated.groups > 1 else ""))
    print(f"  = {p.split}")
    print(f"  bytes sent per rank and step {p.bytes_sent_per_rank:,.0f}; memory per rank "
          f"{p.memory_per_rank_bytes / 2**20:.1f} MiB; compute from {p.compute_source}")
    for note in p.notes:
        print(f"  {note}")
    return 0


def command_plan(args: argparse.Namespace) -> int:
    import json

    from polytrain.perf.plan import rank_candidates, write_plan

    setup = _predict_setup(args)
    if setup is None:
        return 0
    exp, cluster = setup
    if args.top < 1:
        raise ValueError(f"--top must be >= 1; got {args.top}")
    limit = parse_memory(args.memory_per_rank) if args.memory_per_rank else None
    ranked, dropped = rank_candidates(exp, cluster, exp.workers, limit, args.approximate)
    if not ranked:
        raise ValueError(f"no candidate fits: {'; '.join(f'{c.label}: {why}' for c, why in dropped[:3])}")
    if args.json:
        print(json.dumps([{"label": r.candidate.label, "settings": r.candidate.settings, "exact": r.candidate.exact,
                           "prediction": r.prediction.to_dict()} for r in ranked[:args.top]], indent=1))
    else:
        print(f"{exp.model} on {cluster.name}, {exp.workers} ranks, batch {exp.batch_size}: {len(ranked)} candidates "
              f"fit, {len(dropped)} dropped" + (f" (memory limit {args.memory_per_rank})" if limit else ""))
        for i, r in enumerate(ranked[:args.top], 1):
            p = r.prediction
            mark = "" if r.candidate.exact else "  [changes the optimisation]"
            print(f"{i}. {r.candidate.label}: {1e3 * p.step_s:.3f} ms ({p.split}); "
                  f"{p.memory_per_rank_bytes / 2**20:.1f} MiB per rank{mark}")
    if args.write:
        print(f"plan written to {write_plan(args.write, exp, ranked[0], cluster)}; run it with "
              f"polytrain train --plan {args.write}")
    return 0


MEMORY_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory(text: str) -> float:
    """`2GB`, `512MiB`, `1e9` -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in MEMORY_UNITS and unit:
        raise ValueError(f"--memory-per-rank {text!r}: expected a size like 2GB, 512MiB or 1e9")
    try:
        value = float(match.group(1)) * MEMORY_UNITS.get(unit, 1)
    except ValueError:
        raise ValueError(f"--memory-per-rank {text!r}: expected a size like 2GB, 512MiB or 1e9") from None
    if value <= 0:
        raise ValueError(f"--memory-per-rank must be positive; got {text!r}")
    return value


COMMANDS = {"train": command_train, "list": command_list, "demo": command_demo, "bench": command_bench,
            "cost": command_cost, "cluster": command_cluster, "run": command_run, "ensemble": command_ensemble,
            "calibrate": command_calibrate, "predict": command_predict, "plan": command_plan,
            "compare": command_compare, "report": command_report, "tune": command_tune}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `polytrain` console script; returns the exit status."""
    import contextlib
    import io

    usage_error = io.StringIO()  # argparse prints the usage and then its error; a mistake gets one line
    try:
        with contextlib.redirect_stderr(usage_error):
            args = build_parser().parse_args(argv)
    except SystemExit as done:
        lines = usage_error.getvalue().strip().splitlines()
        if done.code == 0 or not lines or ": error: " not in lines[-1]:
            sys.stderr.write(usage_error.getvalue())
            raise
        prog, _, message = lines[-1].partition(": error: ")
        print(f"polytrain: error: {message} (see {prog} --help)", file=sys.stderr)
        return 2
    try:
        load_plugins()  # third-party models, datasets, ... by name
        return COMMANDS[args.command](args)
    except ValueError as error:
        if args.debug:
            raise
        print(f"polytrain: error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WorkerFailed, CommError, OSError) as error:
        if args.debug:
            print(getattr(error, "worker_traceback", ""), file=sys.stderr)
            raise
        print(f"polytrain: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("polytrain: interrupted; a run with --out can be continued with --resume DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
