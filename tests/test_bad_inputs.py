"""A battery of bad inputs: each fails with a non-zero exit and one line on stderr, `polytrain: error: ...`,
naming what was wrong, with no traceback and no file written or changed.

Most cases run in this process through `polytrain.cli.main` (they fail before any worker is spawned, so each
costs milliseconds); a few run `python -m polytrain` to check the real exit path. A last test checks that a
local multi-worker run listens on loopback only.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from polytrain.cli import main
from polytrain.train.checkpoint import CHECKPOINT_NAME

# A run of milliseconds: 64 samples of 4 numbers, an MLP with 4 hidden units, one epoch of 4 steps.
TINY = ["--dataset", "synthetic", "--set", "dataset_args.num_samples=64", "--set", "dataset_args.shape=[4]",
        "--set", "model_args.hidden=[4]", "--epochs", "1", "--batch-size", "16", "--set", "threads=1"]
MAGIC = b"POLYTRAIN-CHECKPOINT-1\n"  # polytrain.train.checkpoint's file layout: magic, SHA-256 hex, newline


class _RunsCode:
    """Unpickling this runs a shell command: `touch MARKER`. No loader may ever unpickle it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_one_line_error(status: int, out: str, err: str, expected: str) -> None:
    """The contract of a bad input: non-zero exit, one stderr line naming it, no traceback anywhere."""
    assert status != 0, f"exit status 0 for a bad input; stderr: {err!r}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("polytrain: error: "), lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (or `root` itself) and its bytes (None for folders and special files)."""
    if not root.is_dir():
        return {str(root): root.read_bytes() if root.is_file() else None}
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """An in-process run sets torch's thread count; later tests in this process keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- bad files -------------------------------------------------------------------------------------------

def _idx(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + data


def _mnist(folder: Path, *, images: int = 10, labels: int = 10, magic: int = 0x803, cut: int = 0,
           test_side: int = 28, label: int = 0) -> None:
    folder.mkdir()
    for prefix, side in (("train", 28), ("t10k", test_side)):
        data = _idx(magic, (images, side, side), bytes(images * side * side))
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(data[:len(data) - cut])
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(0x801, (labels,), bytes([label] * labels)))


def _cifar(folder: Path, batch: bytes) -> None:
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(batch)


def _arrays(folder: Path, **arrays: np.ndarray) -> None:
    folder.mkdir()
    shapes = {"x_train": np.zeros((8, 4), np.float32), "y_train": np.zeros(8, np.int64),
              "x_test": np.zeros((4, 4), np.float32), "y_test": np.zeros(4, np.int64)}
    for name, array in {**shapes, **arrays}.items():
        np.save(folder / f"{name}.npy", array, allow_pickle=True)


def _write_bad_files(root: Path) -> None:
    toml = root / "toml"
    toml.mkdir()
    for name, text in {"syntax": "lr = = 3\n", "unknown": "epochz = 3\n", "string_for_int": 'epochs = "ten"\n',
                       "table_for_number": "[lr]\nvalue = 0.1\n", "inline_table": "batch_size = {a = 1}\n",
                       "float_for_int": "epochs = 1.5\n", "bool_for_number": "lr = true\n",
                       "unknown_in_section": "[train]\nepochs = 1\nbogus_key = 2\n",
                       "number_for_table": "model_args = 3\n"}.items():
        (toml / f"{name}.toml").write_text(text)
    (toml / "binary.toml").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    (toml / "folder.toml").mkdir()
    (root / "a_file").write_text("not a folder\n")

    _mnist(root / "mnist_truncated", cut=100)
    _mnist(root / "mnist_magic", magic=0x1234)
    _mnist(root / "mnist_counts", labels=7)
    _mnist(root / "mnist_label", label=12)
    _mnist(root / "mnist_sides", test_side=14)
    _mnist(root / "mnist_gzip")
    (root / "mnist_gzip" / "train-images-idx3-ubyte").unlink()
    (root / "mnist_gzip" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"x" * 100)[:20])
    (root / "empty").mkdir()

    _cifar(root / "cifar_garbage", bytes(range(256)) * 2)
    _cifar(root / "cifar_runs_code", pickle.dumps(_RunsCode(root / "PWNED")))
    _cifar(root / "cifar_shape", pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    _cifar(root / "cifar_no_labels", pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))

    (root / "images_corrupt" / "cat").mkdir(parents=True)
    (root / "images_corrupt" / "cat" / "a.png").write_bytes(b"not a png")
    (root / "images_no_image" / "cat").mkdir(parents=True)

    _arrays(root / "arrays_missing")
    (root / "arrays_missing" / "y_test.npy").unlink()
    _arrays(root / "arrays_garbage")
    (root / "arrays_garbage" / "x_train.npy").write_bytes(bytes(range(256)))
    _arrays(root / "arrays_truncated")
    whole = (root / "arrays_truncated" / "x_train.npy").read_bytes()
    (root / "arrays_truncated" / "x_train.npy").write_bytes(whole[:-40])
    _arrays(root / "arrays_objects", x_train=np.array([{"a": 1}] * 8, dtype=object))
    _arrays(root / "arrays_lengths", y_train=np.zeros(6, np.int64))
    _arrays(root / "arrays_features", x_test=np.zeros((4, 5), np.float32))
    _arrays(root / "arrays_label_rows", y_train=np.zeros((8, 3), np.int64))
    _arrays(root / "arrays_negative", y_train=np.array([0, 1, -1, 0, 1, 0, 1, 0]))
    _arrays(root / "arrays_test_labels", y_train=np.array([0, 1] * 4), y_test=np.array([0, 1, 1, 7]))
    _arrays(root / "arrays_float_labels", y_train=np.zeros(8, np.float32), y_test=np.zeros(4, np.float32))
    _arrays(root / "arrays_scalar", y_train=np.int64(3))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_bad_files(root)
    return root


# -- the in-process battery ------------------------------------------------------------------------------

def case(name: str, argv: str | list[str], message: str):
    return pytest.param(argv.split() if isinstance(argv, str) else argv, message, id=name)


FLAG_CASES = [
    case("int-flag-not-a-number", "train --workers abc", "argument --workers: invalid int value: 'abc'"),
    case("int-flag-fraction", "train --epochs 1.5", "argument --epochs: invalid int value: '1.5'"),
    case("float-flag-word", "train --lr fast", "argument --lr: invalid float value: 'fast'"),
    case("flag-without-value", "train --batch-size", "argument --batch-size: expected one argument"),
    case("unknown-flag", "train --no-such-flag", "unrecognized arguments: --no-such-flag"),
    case("unknown-command", "trian", "invalid choice: 'trian'"),
    case("no-command", [], "the following arguments are required: command"),
    case("unknown-model", "train --model nosuchnet", "unknown model 'nosuchnet'; available: "),
    case("unknown-dataset", "train --dataset nosuchdata", "unknown dataset 'nosuchdata'; available: "),
    case("unknown-optimizer", "train --optimizer sgdd", "unknown optimizer 'sgdd'; available: "),
    case("unknown-schedule", "train --schedule zigzag", "unknown schedule 'zigzag'; available: "),
    case("unknown-task", "train --task nosuchtask", "unknown task 'nosuchtask'; available: "),
    case("unknown-step-schedule", "train --step-schedule nosuch", "unknown step schedule 'nosuch'; available: "),
    case("unknown-device", "train --device tpu", "unknown device 'tpu'; expected auto, cpu, cuda"),
    case("unknown-amp", "train --amp fp8", "unknown amp 'fp8'; expected none, bf16, fp16"),
    case("unknown-precision", "train --precision fp7", "unknown number format 'fp7'; expected fp32"),
    case("zero-workers", "train --workers 0", "workers must be at least 1, got 0"),
    case("negative-workers", "train --workers -2", "workers must be at least 1, got -2"),
    case("zero-epochs", "train --epochs 0", "epochs must be at least 1, got 0"),
    case("zero-batch", "train --batch-size 0", "batch size must be at least 1, got 0"),
    case("negative-batch", "train --batch-size -8", "batch size must be at least 1, got -8"),
    case("negative-lr", "train --lr -0.1", "learning rate must be positive, got -0.1"),
    case("zero-lr", "train --lr 0", "learning rate must be positive, got 0.0"),
    case("zero-microbatches", "train --microbatches 0", "0 microbatches cannot split a per-worker batch"),
    case("too-many-microbatches", "train --microbatches 1000 --batch-size 64",
         "1000 microbatches cannot split a per-worker batch of 64 (global batch 64 / 1 workers); expected 1..64"),
    case("batch-not-divisible", "train --workers 3 --batch-size 64", "global batch 64 is not divisible by 3 workers"),
    case("workers-vs-mesh", "train --workers 3 --mesh dp=2", "mesh dp 2 = 2 ranks, but --workers is 3"),
    case("target-above-one", "train --target-accuracy 1.5", "target accuracy must be a fraction in (0, 1], got 1.5"),
    case("target-nan", "train --target nan", "got nan"),
    case("negative-loader-workers", "train --loader-workers -1", "loader workers must be >= 0, got -1"),
    case("serial-strategy-on-two", "train --strategy local --workers 2", "--workers 2 needs a parallel strategy"),
    case("parallel-strategy-on-one", "train --strategy allreduce --workers 1",
         "strategy allreduce needs at least 2 data-parallel replicas"),
    case("compressor-on-one", "train --compressor topk", "--compressor needs a strategy that sums gradients"),
    case("dataset-without-path", "train --dataset cifar100", "dataset cifar100 needs path=DIR"),
    case("straggler-rank", "train --straggler rank=5,slowdown=2 --workers 2",
         "straggler rank must be a rank in 0..1, got 5"),
    case("straggler-syntax", "train --straggler garbage", "--straggler 'garbage': expected key=value"),
    case("fault-kind", "train --workers 2 --fault explode:rank=1", "unknown fault 'explode'"),
    case("fault-rank", "train --workers 2 --fault kill:rank=5,step=1", "worker rank in 0..1; got 5"),
    case("fault-syntax", "train --workers 2 --fault kill:rank", "--fault 'rank': expected key=value"),
    case("fault-attack", "train --workers 5 --batch-size 60 --fault byzantine:ranks=1,attack=lie",
         "unknown byzantine attack 'lie'"),
    case("aggregator-name", "train --workers 4 --aggregator mode", "unknown aggregator 'mode'"),
    case("aggregator-resilience", "train --workers 4 --aggregator krum", "krum needs n > 2f + 2 = 4 for f = 1"),
    case("aggregator-argument", "train --workers 4 --aggregator median:beta=0.1", "aggregator median takes no argument"),
    case("restarts-negative", "train --workers 2 --max-restarts -1", "max restarts must be a whole number >= 0"),
    case("elastic-without-restarts", "train --workers 2 --elastic", "give --max-restarts"),
    case("keep-checkpoints-zero", "train --keep-checkpoints 0", "keep checkpoints must be a whole number >= 1"),
]

SPEC_CASES = [
    case("unknown-strategy", "train --strategy nosuch --workers 2", "unknown strategy 'nosuch'; available: "),
    case("unknown-strategy-arg", "train --strategy allreduce:bogus=1 --workers 2",
         "strategy allreduce takes no argument 'bogus'; valid: "),
    case("strategy-arg-negative", "train --strategy local_sgd:period=-1 --workers 2",
         "period must be a whole number >= 1, got -1"),
    case("strategy-arg-word", "train --strategy local_sgd:period=abc --workers 2",
         "period must be a whole number >= 1, got 'abc'"),
    case("strategy-without-name", "train --strategy :x=1", "--strategy ':x=1': expected NAME[:k=v,...]"),
    case("strategy-arg-without-value", "train --strategy allreduce:noequals --workers 2",
         "--strategy 'noequals': expected key=value"),
    case("unknown-compressor", "train --compressor nosuch --workers 2", "unknown compressor 'nosuch'; available: "),
    case("compressor-arg-range", "train --compressor topk:ratio=2 --workers 2",
         "topk ratio must be a number in (0, 1]; got 2"),
    case("unknown-compressor-arg", "train --compressor topk:bogus=1 --workers 2",
         "compressor topk takes no argument 'bogus'; valid: "),
    case("compressor-trailing-plus", "train --compressor topk+ --workers 2",
         "compressor 'topk+': expected NAME or FIRST+SECOND"),
    case("compressor-leading-plus", "train --compressor +topk --workers 2",
         "compressor '+topk': expected NAME or FIRST+SECOND"),
    case("mesh-size-word", "train --mesh dp=abc", "--mesh 'dp=abc': expected AXIS=SIZE,... with axes dp, pp, tp"),
    case("mesh-unknown-axis", "train --mesh xx=2", "unknown mesh axis 'xx'; available: dp, pp, tp"),
    case("mesh-zero", "train --mesh dp=0", "mesh axis dp=0: expected a whole number of ranks >= 1"),
    case("mesh-without-size", "train --mesh dp", "--mesh 'dp': expected AXIS=SIZE"),
    case("mesh-negative", "train --mesh dp=-1", "--mesh 'dp=-1': expected AXIS=SIZE"),
    case("mesh-vs-step-schedule", "train --mesh pp=2", "splits the model over pp, but step schedule accumulate"),
]

SET_CASES = [
    case("set-unknown-key", "train --set nosuch=1", "unknown setting 'nosuch'; valid: "),
    case("set-without-equals", "train --set epochs", "--set 'epochs': expected key=value"),
    case("set-without-key", "train --set =5", "--set '=5': expected key=value"),
    case("set-word-for-int", "train --set epochs=ten", "epochs='ten': expected an integer"),
    case("set-entry-of-scalar", "train --set lr.x=1", "setting 'lr' has no entries; 'lr.x' is not valid"),
    case("set-bool-for-int", "train --set workers=true", "workers=True: expected an integer"),
    case("set-list-for-int", "train --set batch_size=[1,2]", "batch_size=[1, 2]: expected an integer"),
    case("set-none-for-required", "train --set seed=none", "seed may not be none"),
    case("set-test-fraction-range", "train --set test_fraction=1.5", "test fraction must be in (0, 1), got 1.5"),
    case("set-zero-timeout", "train --set timeout_s=0", "timeout must be positive seconds, got 0.0"),
    case("set-zero-threads", "train --set threads=0", "threads must be at least 1, got 0"),
    case("set-warmup-too-long", "train --set warmup_epochs=5 --epochs 2",
         "warm-up of 5.0 epochs must be >= 0 and shorter than the 2 epochs"),
    case("set-dataset-arg-negative", "train --dataset synthetic --set dataset_args.num_samples=-3",
         "dataset synthetic num_samples=-3 is not a positive integer"),
    case("set-dataset-arg-malformed", "train --dataset synthetic --set dataset_args.shape=a,b",
         "dataset synthetic shape='a,b' is not positive ints"),
    case("data-path-for-generated-data", "train --dataset synthetic --data-path /tmp",
         "dataset synthetic takes no argument 'path'; valid: "),
]

TOML_CASES = [
    case("toml-missing-file", "train --config {F}/toml/missing.toml",
         "cannot read config file {F}/toml/missing.toml: No such file or directory"),
    case("toml-is-a-folder", "train --config {F}/toml/folder.toml", "cannot read config file {F}/toml/folder.toml: Is a"),
    case("toml-syntax", "train --config {F}/toml/syntax.toml", "invalid TOML in {F}/toml/syntax.toml: "),
    case("toml-not-utf8", "train --config {F}/toml/binary.toml", "config file {F}/toml/binary.toml is not UTF-8 text"),
    case("toml-unknown-key", "train --config {F}/toml/unknown.toml", "unknown setting 'epochz'; valid: "),
    case("toml-unknown-key-in-section", "train --config {F}/toml/unknown_in_section.toml",
         "unknown setting 'bogus_key'; valid: "),
    case("toml-string-for-int", "train --config {F}/toml/string_for_int.toml", "epochs='ten': expected an integer"),
    case("toml-table-for-number", "train --config {F}/toml/table_for_number.toml",
         "lr={'value': 0.1}: expected a number"),
    case("toml-inline-table-for-int", "train --config {F}/toml/inline_table.toml",
         "batch_size={'a': 1}: expected an integer"),
    case("toml-float-for-int", "train --config {F}/toml/float_for_int.toml", "epochs=1.5: expected an integer"),
    case("toml-bool-for-number", "train --config {F}/toml/bool_for_number.toml", "lr=True: expected a number"),
    case("toml-number-for-table", "train --config {F}/toml/number_for_table.toml",
         "model_args=3: expected a table of key=value"),
]

DATA_CASES = [
    case("mnist-path-missing", "train --dataset mnist --data-path {F}/nowhere",
         "dataset mnist path {F}/nowhere does not exist"),
    case("mnist-path-a-file", "train --dataset mnist --data-path {F}/a_file", "dataset mnist path {F}/a_file is not a folder"),
    case("mnist-no-files", "train --dataset mnist --data-path {F}/empty",
         "missing MNIST file {F}/empty/train-images-idx3-ubyte(.gz): expected the IDX files"),
    case("mnist-truncated", "train --dataset mnist --data-path {F}/mnist_truncated",
         "corrupt IDX file {F}/mnist_truncated/train-images-idx3-ubyte: truncated: expected 7856 bytes, got 7756"),
    case("mnist-bad-magic", "train --dataset mnist --data-path {F}/mnist_magic", "magic 0x00001234 is not 0x00000803"),
    case("mnist-corrupt-gzip", "train --dataset mnist --data-path {F}/mnist_gzip",
         "corrupt gzip file {F}/mnist_gzip/train-images-idx3-ubyte.gz"),
    case("mnist-label-count", "train --dataset mnist --data-path {F}/mnist_counts", "has 7 labels but"),
    case("mnist-label-not-a-digit", "train --dataset mnist --data-path {F}/mnist_label", "label 12 is not a digit 0-9"),
    case("mnist-image-sizes-disagree", "train --dataset mnist --data-path {F}/mnist_sides",
         "train images are (28, 28) pixels, test images (14, 14)"),
    case("cifar-garbage", "train --dataset cifar10 --data-path {F}/cifar_garbage",
         "corrupt CIFAR file {F}/cifar_garbage/data_batch_1: UnpicklingError"),
    case("cifar-pickle-runs-code", "train --dataset cifar10 --data-path {F}/cifar_runs_code",
         "refused CIFAR file {F}/cifar_runs_code/data_batch_1: it references the global posix.system"),
    case("cifar-wrong-shape", "train --dataset cifar10 --data-path {F}/cifar_shape",
         "'data' should be a uint8 array (N, 3072), got uint8 array (4, 100)"),
    case("cifar-missing-key", "train --dataset cifar10 --data-path {F}/cifar_no_labels", "missing key 'labels'"),
    case("imagefolder-empty", "train --dataset imagefolder --data-path {F}/empty",
         "empty image folder {F}/empty: expected one sub-folder per class"),
    case("imagefolder-class-without-images", "train --dataset imagefolder --data-path {F}/images_no_image",
         "empty class folder {F}/images_no_image/cat: expected images"),
    case("imagefolder-corrupt-image", "train --dataset imagefolder --data-path {F}/images_corrupt",
         "corrupt image file {F}/images_corrupt/cat/a.png"),
    case("arrays-missing-file", "train --dataset arrays --data-path {F}/arrays_missing",
         "missing arrays file {F}/arrays_missing/y_test.npy: expected x_train.npy, y_train.npy"),
    case("arrays-garbage", "train --dataset arrays --data-path {F}/arrays_garbage",
         "corrupt .npy file {F}/arrays_garbage/x_train.npy: no .npy header"),
    case("arrays-truncated", "train --dataset arrays --data-path {F}/arrays_truncated",
         "corrupt .npy file {F}/arrays_truncated/x_train.npy"),
    case("arrays-python-objects", "train --dataset arrays --data-path {F}/arrays_objects",
         "corrupt .npy file {F}/arrays_objects/x_train.npy: Array can't be memory-mapped"),
    case("arrays-lengths-differ", "train --dataset arrays --data-path {F}/arrays_lengths",
         "holds 8 samples but {F}/arrays_lengths/y_train.npy 6 targets"),
    case("arrays-features-differ", "train --dataset arrays --data-path {F}/arrays_features",
         "{F}/arrays_features/x_test.npy rows are (5,) but those of {F}/arrays_features/x_train.npy (4,)"),
    case("arrays-label-rows", "train --dataset arrays --data-path {F}/arrays_label_rows",
         "rows are () but those of {F}/arrays_label_rows/y_train.npy (3,)"),
    case("arrays-negative-label", "train --dataset arrays --data-path {F}/arrays_negative", "holds labels -1..1"),
    case("arrays-test-label-out-of-range", "train --dataset arrays --data-path {F}/arrays_test_labels",
         "{F}/arrays_test_labels/y_test.npy holds labels 0..7; expected 0..1 for 2 classes"),
    case("arrays-float-labels", "train --dataset arrays --data-path {F}/arrays_float_labels",
         "classification expects one integer label per sample"),
    case("arrays-single-value", "train --dataset arrays --data-path {F}/arrays_scalar",
         "{F}/arrays_scalar/y_train.npy holds a single value"),
]

OUT_CASES = [
    case("out-is-a-file", "train --out {F}/a_file", "--out {F}/a_file is an existing file; expected a directory"),
    case("out-below-a-file", "train --out {F}/a_file/sub/run",
         "--out {F}/a_file/sub/run is below {F}/a_file, an existing file; expected a directory"),
    case("out-is-a-device", "train --out /dev/null", "--out /dev/null is an existing file; expected a directory"),
]


@pytest.mark.parametrize("argv, message", FLAG_CASES + SPEC_CASES + SET_CASES + TOML_CASES + DATA_CASES + OUT_CASES)
def test_a_bad_input_fails_in_one_line_and_writes_nothing(argv, message, bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [arg.replace("{F}", str(bad)) for arg in argv]
    if argv[:1] == ["train"] and not {"--dataset", "--config"} & set(argv):
        argv = ["train", *TINY, *argv[1:]]  # the case's own flags come later and win; a miss trains for ms
    if argv[:1] == ["train"] and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]  # a run directory that must not appear
    files_before = snapshot(bad)
    status = main(argv)
    captured = capsys.readouterr()
    assert_one_line_error(status, captured.out, captured.err, message.replace("{F}", str(bad)))
    assert list(tmp_path.iterdir()) == [], "a failed run left files behind"
    assert snapshot(bad) == files_before, "a failed run changed its input files"
    assert not (bad / "PWNED").exists(), "unpickling a data file ran code"


# -- checkpoints -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny finished run with --out, made once; the checkpoint cases copy it and spoil the copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", *TINY, "--out", str(out)]) == 0
    torch.set_num_threads(threads)
    assert (out / CHECKPOINT_NAME).is_file()
    return out


def _signed(payload: bytes) -> bytes:
    """A checkpoint file around `payload` with a correct checksum: what someone who can write files makes."""
    return MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _flip(data: bytes, at: int) -> bytes:
    flipped = bytearray(data)
    flipped[at] ^= 0x01
    return bytes(flipped)


def _rewrite(make):
    """A spoiler that rewrites checkpoint.pt as make(its bytes, marker path)."""
    def spoil(run: Path, marker: Path) -> Path:
        path = run / CHECKPOINT_NAME
        path.write_bytes(make(path.read_bytes(), marker))
        return run
    return spoil


def _checkpoint_a_folder(run: Path, marker: Path) -> Path:
    (run / CHECKPOINT_NAME).unlink()
    (run / CHECKPOINT_NAME).mkdir()
    return run


def _no_checkpoint(run: Path, marker: Path) -> Path:
    (run / CHECKPOINT_NAME).unlink()
    return run


def _a_file(run: Path, marker: Path) -> Path:
    (run.parent / "a_file").write_text("not a run\n")
    return run.parent / "a_file"


def _unchanged(run: Path, marker: Path) -> Path:
    return run


def checkpoint_case(name, spoil, message, extra=(), marks=()):
    return pytest.param(spoil, list(extra), message, id=name, marks=marks)


CHECKPOINT_CASES = [
    checkpoint_case("truncated", _rewrite(lambda data, _: data[:len(data) // 2]),
                    "checkpoint.pt: checksum mismatch (truncated or modified); not loaded"),
    checkpoint_case("one-flipped-payload-byte", _rewrite(lambda data, _: _flip(data, len(data) - 100)),
                    "checkpoint.pt: checksum mismatch (truncated or modified); not loaded"),
    checkpoint_case("one-flipped-header-byte", _rewrite(lambda data, _: _flip(data, 3)),
                    "checkpoint.pt is not a polytrain checkpoint (bad header"),
    checkpoint_case("one-flipped-checksum-digit", _rewrite(lambda data, _: _flip(data, len(MAGIC) + 10)),
                    "checkpoint.pt: checksum mismatch"),
    checkpoint_case("empty-file", _rewrite(lambda data, _: b""), "checkpoint.pt is not a polytrain checkpoint"),
    checkpoint_case("garbage-bytes", _rewrite(lambda data, _: bytes(range(256)) * 20),
                    "checkpoint.pt is not a polytrain checkpoint"),
    checkpoint_case("pickle-that-runs-code", _rewrite(lambda _, marker: _signed(_saved({"config": _RunsCode(marker)}))),
                    "refused by weights-only loading (Trying to load unsupported GLOBAL posix.system"),
    checkpoint_case("raw-pickle-that-runs-code", _rewrite(lambda _, marker: _signed(pickle.dumps(_RunsCode(marker)))),
                    "refused by weights-only loading"),
    checkpoint_case("signed-garbage", _rewrite(lambda data, _: _signed(bytes(range(256)) * 20)),
                    "checkpoint.pt: it holds more than tensors, numbers, strings, lists and dicts"),
    checkpoint_case("a-list-not-a-dict", _rewrite(lambda data, _: _signed(_saved([1, 2, 3]))),
                    "checkpoint.pt: it holds a list; expected the dict of a run's state"),
    checkpoint_case("checkpoint-a-folder", _checkpoint_a_folder, "checkpoint.pt: Is a directory; expected a file"),
    checkpoint_case("no-checkpoint", _no_checkpoint, "checkpoint.pt: expected a file written by polytrain train --out"),
    checkpoint_case("resume-a-file", _a_file, "a_file/checkpoint.pt: expected a file written by polytrain train --out"),
    checkpoint_case("changed-lr", _unchanged, "with lr=0.5: the checkpoint was trained with lr=0.01", ["--lr", "0.5"]),
    checkpoint_case("changed-model", _unchanged, "with model='lenet5': the checkpoint was trained with model='mlp'",
                    ["--model", "lenet5"]),
    checkpoint_case("zero-more-epochs", _unchanged, "epochs must be at least 1, got 0", ["--epochs", "0"]),
    checkpoint_case("dict-without-config", _rewrite(lambda data, _: _signed(_saved({"model": {}}))),
                    "holds no run settings (config)"),
    checkpoint_case("config-with-unknown-key", _rewrite(lambda data, _: _signed(_saved({"config": {"bogus": 1}}))),
                    "settings this polytrain does not know (bogus)"),
]


@pytest.mark.parametrize("spoil, extra, message", CHECKPOINT_CASES)
def test_a_bad_checkpoint_is_refused_and_its_run_left_as_it_was(spoil, extra, message, finished_run, tmp_path,
                                                                 capsys):
    marker = tmp_path / "PWNED"
    resume = spoil(shutil.copytree(finished_run, tmp_path / "run"), marker)
    before = snapshot(tmp_path)
    status = main(["train", "--resume", str(resume), *extra])
    captured = capsys.readouterr()
    assert_one_line_error(status, captured.out, captured.err, message)
    assert not marker.exists(), "loading a checkpoint ran code"
    assert snapshot(tmp_path) == before, "a refused resume changed the run directory"


def test_an_out_holding_a_run_is_not_overwritten(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = snapshot(tmp_path)
    status = main(["train", *TINY, "--out", str(run)])
    captured = capsys.readouterr()
    assert_one_line_error(status, captured.out, captured.err, f"{run} already holds a run (checkpoint.pt); "
                                                              f"continue it with --resume {run}")
    assert snapshot(tmp_path) == before


# -- the real exit path ----------------------------------------------------------------------------------

def test_bad_inputs_through_the_console_entry_point(bad, finished_run, tmp_path):
    """A handful of the cases above as separate processes, started together (each is mostly its imports)."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    path = run / CHECKPOINT_NAME
    path.write_bytes(_flip(path.read_bytes(), path.stat().st_size - 1))
    work = tmp_path / "work"
    work.mkdir()
    cases = {
        ("train", "--workers", "abc"): "argument --workers: invalid int value: 'abc' (see polytrain train --help)",
        ("train", "--config", f"{bad}/toml/syntax.toml"): f"invalid TOML in {bad}/toml/syntax.toml",
        ("train", "--resume", str(run)): "checkpoint.pt: checksum mismatch",
        ("train", "--dataset", "cifar10", "--data-path", f"{bad}/cifar_runs_code", "--out", str(work / "out")):
            "it references the global posix.system",
    }
    before, files_before = snapshot(run), snapshot(bad)
    processes = {argv: subprocess.Popen([sys.executable, "-m", "polytrain", *argv], cwd=work, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in cases}
    for argv, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 2, (argv, err)
        assert_one_line_error(process.returncode, out, err, cases[argv])
    assert snapshot(run) == before and snapshot(bad) == files_before and list(work.iterdir()) == []
    assert not (bad / "PWNED").exists()


# -- loopback only ---------------------------------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """The children of `pid`, from /proc/PID/task/TID/children (empty once it has exited)."""
    children = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                children.update(int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return children


def _process_tree(root: int) -> set[int]:
    """`root` and every process descended from it."""
    tree, frontier = {root}, [root]
    while frontier:
        new = _children(frontier.pop()) - tree
        tree |= new
        frontier.extend(new)
    return tree


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
    except OSError:
        pass  # exited meanwhile
    return inodes


def _listening() -> dict[str, str]:
    """Inode -> 'address:port' of every TCP socket in state LISTEN (0A), IPv4 and IPv6."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":
                    continue
                address, port = fields[1].split(":")
                # The kernel prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(struct.pack("<I", int(address[i:i + 8], 16)) for i in range(0, len(address), 8))
                found[fields[9]] = f"{socket.inet_ntop(family, raw)}:{int(port, 16)}"
    return found


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def test_a_local_multi_worker_run_listens_on_loopback_only(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "polytrain", "train", *TINY, "--workers", "2"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[str, tuple[int, str]] = {}
    deadline = time.monotonic() + 120
    try:
        while process.poll() is None and time.monotonic() < deadline:
            listening = _listening()
            for pid in _process_tree(process.pid):
                for inode in _socket_inodes(pid) & listening.keys():
                    seen[inode] = (pid, listening[inode])
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert seen, "found no listening socket of the run (the rendezvous store listens while the ranks run)"
    beyond = {address: pid for pid, address in seen.values() if address.rsplit(":", 1)[0] not in LOOPBACK}
    assert not beyond, f"listening beyond loopback (address: pid): {beyond}; all: {sorted(seen.values())}"
