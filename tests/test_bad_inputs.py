"""Bad input ends in one line (issue 23): every case is a command a user could type, run through the real
script, and must end with a non-zero exit whose last non-empty output line names the problem, with no
traceback anywhere, and with every good file that was in the run folder before (checkpoint.pt,
metrics.jsonl, config.json, a file given as --out) byte-identical afterwards.

Importing torch and the scripts' libraries costs seconds per process, so the cases are not one process
each: two driver processes (`drive`, started with `python -c`) run them one after another, each through
runpy.run_path("<script>.py", run_name="__main__"), so that the scripts' own `if __name__ == "__main__":`
wrappers run, with sys.argv, the working folder, stdout/stderr and the signal handlers set per case. A
SystemExit is turned into the exit status and message Python would give, anything else into its
traceback. A few cases also run as real `python <script>.py ...` processes, to show that the driver's
verdict is the command line's. Driver "a" first makes the good runs (1 epoch, --no-eval) whose checkpoints
the --resume, linear_eval.py and bench/tsne.py cases use; driver "b" writes the data files, in their real
formats, with the fixture writers of test_data.py, test_points.py and test_text.py.
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
MARK = "BAD-INPUT-RECORD "  # the driver's result lines on its stdout

# Shared flags; a flag given again later on a command line wins (argparse keeps the last), so a case
# can override any of them. Every method-script case also gets its own --out, {runs}/<case id>.
WITH_EVAL = ["--device", "cpu", "--no-download", "--epochs", "1", "--data-dir", "{data}"]
FAST = [*WITH_EVAL, "--no-eval"]
HDIGITS = [*FAST, "--dataset", "hdigits", "--fraction", "0.05"]
SHAPES = [*FAST, "--dataset", "shapes", "--fraction", "0.05"]
SKDOCS = [*FAST, "--dataset", "skdocs", "--fraction", "0.05", "--batch-size", "16"]

# The good runs driver "a" makes first; copies of their folders ({A}, {B}) are what the cases touch.
GOOD_RUNS = {
    "supcon": ("supcon.py", [*HDIGITS, "--out", "{good}/supcon"]),
    "mlcl": ("mlcl.py", [*HDIGITS, "--out", "{good}/mlcl"]),
    "shapes": ("supcon.py", [*SHAPES, "--out", "{good}/shapes"]),
}


def case(name, script, args, expect, group="b", guard=(), copies=None, edit=None, pre=None, out=True, real=False,
         absent=None):
    """One row: `python script *args` must fail with `expect` (lower-cased, placeholders filled) in its last
    line and leave the files under `guard` as they were. copies: {"A": good run} copied to {A} before the
    case; edit: keys set in {A}/checkpoint.pt (dicts merged); pre: Python run in the driver first; real: also
    run as a separate process; absent: "cuda" or "mps", a device the case needs this machine to lack."""
    args = list(args) if script == "linear_eval.py" or not out else ["--out", "{runs}/" + name, *args]
    return dict(id=name, script=script, args=args, expect=expect, group=group, guard=list(guard),
                copies=copies or {}, edit=edit, pre=pre, real=real,
                absent=absent)


# For 20newsgroups: the archive put where the message says, its checksum made the one scikit-learn expects
# (the fixture's archive is not the real one), so that the loader takes it as the real file.
# `pre` code runs in the driver with `paths`; an `undo()` it defines runs after the case.
PATCH_NEWS_CHECKSUM = """
import hashlib, sklearn.datasets._twenty_newsgroups as news
original = news.ARCHIVE
path = paths["data"] + "/news-placed/20news_home/" + original.filename
news.ARCHIVE = original._replace(checksum=hashlib.sha256(open(path, "rb").read()).hexdigest())

def undo():
    news.ARCHIVE = original
"""

CASES = [
    # 1. --device
    case("device-cuda", "supcon.py", [*HDIGITS, "--device", "cuda"], "--device cuda: this machine has no cuda device",
         absent="cuda"),
    case("device-mps", "hmlc_gmm.py", [*HDIGITS, "--device", "mps"], "--device mps: this machine has no mps device",
         absent="mps"),
    case("device-nonsense", "mlcl.py", [*HDIGITS, "--device", "nonsense"],
         "--device 'nonsense' is not a device torch knows", real=True),
    case("eval-device-nonsense", "linear_eval.py", ["--checkpoint", "{A}/checkpoint.pt", "--device", "nonsense"],
         "--device 'nonsense' is not a device torch knows", group="a", copies={"A": "supcon"}, guard=["{A}"]),
    case("eval-device-cuda", "linear_eval.py", ["--checkpoint", "{A}/checkpoint.pt", "--device", "cuda"],
         "--device cuda: this machine has no cuda device", group="a", copies={"A": "supcon"}, guard=["{A}"],
         absent="cuda"),
    # 2. --out (bench/tsne.py's too)
    case("out-read-only", "supcon.py", [*HDIGITS, "--out", "{tmp}/read-only/run"], "permission denied"),
    case("out-is-a-file", "hmlc_attention.py", [*HDIGITS, "--out", "{tmp}/a-file"], "file exists: '{tmp}/a-file'",
         guard=["{tmp}/a-file"]),
    case("out-under-a-file", "supcon.py", [*HDIGITS, "--out", "{tmp}/a-file/sub"],
         "not a directory: '{tmp}/a-file/sub'", guard=["{tmp}/a-file"]),
    case("out-empty", "mlcl.py", [*HDIGITS, "--out", ""], "--out and --resume must name a path"),
    case("tsne-under-a-file", "bench/tsne.py", ["{A}/checkpoint.pt", "--out", "{tmp}/a-file/plots", "--device", "cpu"],
         "not a directory: '{tmp}/a-file/plots'", group="a", copies={"A": "supcon"}, guard=["{A}", "{tmp}/a-file"],
         out=False),
    # 3. --arch that does not read the data
    case("arch-resnet18-skdocs", "supcon.py", [*SKDOCS, "--arch", "resnet18"],
         "--arch resnet18 reads image input; skdocs has words input"),
    case("arch-pointnet-hdigits", "mlcl.py", [*HDIGITS, "--arch", "pointnet"],
         "--arch pointnet reads points input; hdigits has image input"),
    case("arch-fasttext-hdigits", "hmlc_gmm.py", [*HDIGITS, "--arch", "fasttext"],
         "--arch fasttext reads words input; hdigits has image input"),
    case("arch-cnn-shapes", "hmlc_attention.py", [*SHAPES, "--arch", "cnn"],
         "--arch cnn reads image input; shapes has points input"),
    # 4. too little data for the options
    case("probe-share-leaves-none", "supcon.py",
         [*HDIGITS, "--fraction", "0.0004", "--probe-share", "0.99", "--eval-every", "1"],
         "holding out 0.99 of 2 samples leaves none to train on"),
    case("fraction-keeps-one-sample", "mlcl.py", [*HDIGITS, "--fraction", "0.0001"],
         "--batch-size 128 is more than the 1 training samples"),
    case("batch-size-1", "hmlc_gmm.py", [*HDIGITS, "--batch-size", "1"], "--batch-size must be at least 2, got 1"),
    case("batch-size-above-train-set", "hmlc_attention.py", [*HDIGITS, "--fraction", "0.01", "--batch-size", "64"],
         "--batch-size 64 is more than the 50 training samples"),
    # 5. numbers out of range
    case("lr-nan", "supcon.py", [*HDIGITS, "--lr", "nan"], "--lr must be positive, got nan"),
    case("temperature-nan", "hmlc_attention.py", [*HDIGITS, "--temperature", "nan"],
         "--temperature must be positive, got nan"),
    case("lr-0", "mlcl.py", [*HDIGITS, "--lr", "0"], "--lr must be positive, got 0.0"),
    case("epochs-0", "hmlc_gmm.py", [*HDIGITS, "--epochs", "0"], "--epochs must be at least 1, got 0"),
    case("lambda-0-without-ce", "mlcl.py", [*HDIGITS, "--lambda", "0"],
         "--lambda 0 without a ce term (--ce-weight) leaves no loss to train"),
    case("chunks-0", "supcon.py", [*HDIGITS, "--chunks", "0"], "--chunks must be a positive integer or auto, got '0'"),
    case("chunks-x", "hmlc_gmm.py", [*HDIGITS, "--chunks", "x"], "--chunks must be a positive integer or auto, got 'x'"),
    # 6. --resume, and a fresh run into a folder that holds a run
    case("resume-other-heads", "mlcl.py", [*HDIGITS, "--resume", "{A}/checkpoint.pt", "--heads", "levels+global"],
         "was trained with --heads 'levels', this run has 'levels+global'", group="a", copies={"A": "mlcl"},
         guard=["{A}"], out=False),
    case("resume-other-lr", "supcon.py", [*HDIGITS, "--resume", "{A}/checkpoint.pt", "--lr", "0.1"],
         "was trained with --lr 0.2, this run has 0.1", group="a", copies={"A": "supcon"}, guard=["{A}"], out=False),
    case("resume-into-another-out", "supcon.py", [*HDIGITS, "--resume", "{A}/checkpoint.pt", "--out", "{B}"],
         "--resume continues in its checkpoint's folder", group="a", copies={"A": "supcon", "B": "mlcl"},
         guard=["{A}", "{B}"], out=False),
    case("resume-garbage", "supcon.py", [*HDIGITS, "--resume", "{tmp}/garbage.pt"],
         "cannot read checkpoint {tmp}/garbage.pt", guard=["{tmp}/garbage.pt"], out=False, real=True),
    case("resume-other-method", "hmlc_gmm.py", [*HDIGITS, "--resume", "{A}/checkpoint.pt"],
         "{A}/checkpoint.pt is not a hmlc_gmm checkpoint", group="a", copies={"A": "supcon"}, guard=["{A}"],
         out=False),
    case("fresh-run-into-a-run", "supcon.py", [*HDIGITS, "--out", "{A}"],
         "{A} holds another run; pass --resume {A}/checkpoint.pt", group="a", copies={"A": "supcon"}, guard=["{A}"]),
    # 7. linear_eval.py --checkpoint, bench/tsne.py
    case("tsne-two-datasets", "bench/tsne.py",
         ["{A}/checkpoint.pt", "{B}/checkpoint.pt", "--out", "{tmp}/plots", "--device", "cpu"],
         "a figure holds one dataset; the checkpoints hold hdigits, shapes", group="a",
         copies={"A": "supcon", "B": "shapes"}, guard=["{A}", "{B}"], out=False),
    case("eval-method-file-unknown", "linear_eval.py", ["--checkpoint", "{A}/checkpoint.pt", "--device", "cpu"],
         "names the method file 'no_such_method.py', which is not a script here", group="a",
         copies={"A": "supcon"}, edit={"method_file": "no_such_method.py"}, guard=["{A}"]),
    case("eval-checkpoint-missing", "linear_eval.py", ["--checkpoint", "{tmp}/no-such-run/checkpoint.pt"],
         "no checkpoint at {tmp}/no-such-run/checkpoint.pt"),
    # 8. a loader option the dataset does not take
    case("image-size-on-hdigits", "supcon.py", [*HDIGITS, "--image-size", "64"], "hdigits takes no option image_size"),
    case("wos-release-on-hdigits", "mlcl.py", [*HDIGITS, "--wos-release", "11967"], "hdigits takes no option release (--wos-release)"),
    # 9. MNIST idx files (hmnist)
    case("mnist-label-count", "supcon.py", [*FAST, "--dataset", "hmnist", "--image-size", "32",
                                            "--data-dir", "{data}/mnist-label-count"],
         "train-images-idx3-ubyte holds 40 images but {data}/mnist-label-count/mnist/raw/train-labels-idx1-ubyte 39",
         guard=["{data}/mnist-label-count"]),
    case("mnist-one-dimension", "mlcl.py", [*FAST, "--dataset", "hmnist", "--image-size", "32",
                                            "--data-dir", "{data}/mnist-one-dimension"],
         "train-images-idx3-ubyte must hold images [n, h, w]", guard=["{data}/mnist-one-dimension"]),
    case("mnist-label-12", "hmlc_gmm.py", [*FAST, "--dataset", "hmnist", "--image-size", "32",
                                           "--data-dir", "{data}/mnist-label-12"],
         "train-labels-idx1-ubyte: mnist labels are digits 0..9, found 12", guard=["{data}/mnist-label-12"]),
    case("mnist-file-missing", "hmlc_attention.py", [*FAST, "--dataset", "hmnist", "--image-size", "32",
                                                     "--data-dir", "{data}/mnist-file-missing"],
         "mnist file {data}/mnist-file-missing/mnist/raw/train-labels-idx1-ubyte(.gz) not found and downloading is off"),
    # 10. CIFAR-100 pickles and tarball
    case("cifar-batch-without-images", "supcon.py", [*FAST, "--dataset", "cifar100",
                                                      "--data-dir", "{data}/cifar-empty"],
         "cifar-100-python/train: a cifar-100 batch without images", guard=["{data}/cifar-empty"]),
    case("cifar-truncated-tarball", "mlcl.py", [*FAST, "--download", "--dataset", "cifar100",
                                                "--data-dir", "{data}/cifar-tarball"],
         "{data}/cifar-tarball/cifar-100-python.tar.gz fails its md5 check", guard=["{data}/cifar-tarball"], real=True),
    # 11. ModelNet40 OFF meshes
    case("off-zero-area", "supcon.py", [*FAST, "--dataset", "modelnet40", "--data-dir", "{data}/off-zero-area"],
         "bathtub_0003.off: cannot sample the surface of a mesh with zero area", guard=["{data}/off-zero-area"]),
    case("off-no-faces", "hmlc_gmm.py", [*FAST, "--dataset", "modelnet40", "--data-dir", "{data}/off-no-faces"],
         "bathtub_0003.off: a mesh without faces", guard=["{data}/off-no-faces"]),
    case("off-bad-header", "hmlc_attention.py", [*FAST, "--dataset", "modelnet40",
                                                 "--data-dir", "{data}/off-bad-header"],
         "bathtub_0003.off: malformed off file", guard=["{data}/off-bad-header"]),
    # 12. WOS text files
    case("wos-test-split-empty", "supcon.py", [*WITH_EVAL, "--dataset", "wos", "--data-dir", "{data}/wos-tiny",
                                                    "--batch-size", "4"],
         "6 documents leave the test split empty", guard=["{data}/wos-tiny"]),
    case("wos-label-lines", "mlcl.py", [*FAST, "--dataset", "wos", "--data-dir", "{data}/wos-short-labels"],
         "yl1.txt has 59 lines but {data}/wos-short-labels/webofscience/wos46985/x.txt has 60",
         guard=["{data}/wos-short-labels"]),
    # 13. scikit-learn's text datasets, offline
    case("newsgroups-no-files", "supcon.py", [*FAST, "--dataset", "20newsgroups", "--data-dir", "{data}/news-none"],
         "put 20news-bydate.tar.gz from https://ndownloader.figshare.com/files/5975967 into "
         "{data}/news-none/20news_home and run again"),
    case("newsgroups-advice-followed", "supcon.py", [*FAST, "--dataset", "20newsgroups",
                                                     "--data-dir", "{data}/news-placed"],
         "--batch-size 256 is more than the 30 training samples", pre=PATCH_NEWS_CHECKSUM),
    case("newsgroups-wrong-archive", "supcon.py", [*FAST, "--dataset", "20newsgroups",
                                                   "--data-dir", "{data}/news-wrong"],
         "20news-bydate.tar.gz is not the file scikit-learn expects", guard=["{data}/news-wrong"]),
    case("rcv1-no-files", "mlcl.py", [*FAST, "--dataset", "rcv1", "--data-dir", "{data}/rcv1-none"],
         "put the six rcv1 files"),
    # Past the list: what else a new user types
    case("workers-negative", "supcon.py", [*HDIGITS, "--workers", "-1"],
         "--workers must be at least 0, got -1"),
    case("save-every-0", "mlcl.py", [*HDIGITS, "--save-every", "0"], "--save-every must be at least 1, got 0"),
    case("fraction-1.5", "hmlc_gmm.py", [*HDIGITS, "--fraction", "1.5"], "--fraction must lie in (0, 1]"),
    case("dataset-typo", "hmlc_attention.py", [*HDIGITS, "--dataset", "hdigit"], "invalid choice: 'hdigit'"),
    case("epochs-not-an-integer", "supcon.py", [*HDIGITS, "--epochs", "1.5"], "invalid int value: '1.5'"),
    case("data-dir-a-file-wos", "supcon.py", [*FAST, "--dataset", "wos", "--data-dir", "{tmp}/a-file"],
         "{tmp}/a-file/webofscience/wos46985/x.txt", guard=["{tmp}/a-file"]),
    case("data-dir-a-file-cifar-download", "hmlc_gmm.py",
         [*FAST, "--download", "--dataset", "cifar100", "--data-dir", "{tmp}/a-file"], "{tmp}/a-file",
         guard=["{tmp}/a-file"]),
    case("resume-a-folder", "supcon.py", [*HDIGITS, "--resume", "{tmp}/a-folder"],
         "cannot read checkpoint {tmp}/a-folder", out=False),
    case("resume-missing", "mlcl.py", [*HDIGITS, "--resume", "{tmp}/no-such-run/checkpoint.pt"],
         "cannot read checkpoint {tmp}/no-such-run/checkpoint.pt", out=False),
    case("chunks-above-batch", "hmlc_attention.py", [*HDIGITS, "--batch-size", "4", "--chunks", "8"],
         "--chunks 8 cannot work here"),
    case("mlcl-temperatures-count", "mlcl.py", [*HDIGITS, "--temperatures", "0.1"], "--temperatures needs 2 values"),
    case("hmlc-multilabel-data", "hmlc_gmm.py", [*HDIGITS, "--dataset", "hdigits-multilabel"],
         "hmlc_gmm needs hierarchical labels; hdigits-multilabel is multi-label"),
    case("gmm-iters-0", "hmlc_gmm.py", [*HDIGITS, "--gmm-iters", "0"], "--gmm-iters must be at least 1"),
    case("image-size-too-small", "supcon.py", [*FAST, "--dataset", "hmnist", "--image-size", "8",
                                               "--data-dir", "{data}/mnist-label-count"],
         "--image-size must be at least 12 for hmnist"),
    case("cifar-tarball-without-download", "supcon.py", [*FAST, "--dataset", "cifar100",
                                                          "--data-dir", "{data}/cifar-tarball"],
         "unpack cifar-100-python.tar.gz into {data}/cifar-tarball", guard=["{data}/cifar-tarball"]),
    case("eval-garbage-checkpoint", "linear_eval.py", ["--checkpoint", "{tmp}/garbage.pt", "--device", "cpu"],
         "cannot read checkpoint {tmp}/garbage.pt", guard=["{tmp}/garbage.pt"]),
    case("tsne-multilabel", "bench/tsne.py", ["{A}/checkpoint.pt", "--out", "{tmp}/plots-multilabel", "--device", "cpu"],
         "the maps are coloured by hierarchical labels; hdigits-multilabel is multi-label", group="a",
         copies={"A": "supcon"}, edit={"config": {"dataset": "hdigits-multilabel"}}, guard=["{A}"], out=False),
    case("tsne-onto-a-file", "bench/tsne.py", ["{A}/checkpoint.pt", "--out", "{tmp}/a-file", "--device", "cpu"],
         "file exists: '{tmp}/a-file'", group="a", copies={"A": "supcon"}, guard=["{A}", "{tmp}/a-file"], out=False),
    case("lr-inf", "supcon.py", [*HDIGITS, "--fraction", "0.2", "--lr", "inf"], "--lr must be positive, got inf"),
    case("resume-a-state-dict", "supcon.py", [*HDIGITS, "--resume", "{tmp}/state-dict.pt"],
         "{tmp}/state-dict.pt is not a supcon checkpoint", guard=["{tmp}/state-dict.pt"], out=False),
    # Past the list, and failing when written: a traceback (--seed outside numpy's 0..2**32-1, a torch file
    # with "method" but no "config"), a NaN that slips past the check written for it (min() of a list that
    # holds a number never returns NaN), or an empty --resume taken for none (--out "" is refused).
    case("seed-negative", "supcon.py", [*HDIGITS, "--seed", "-1"], "--seed"),
    case("resume-checkpoint-without-config", "mlcl.py", [*HDIGITS, "--resume", "{tmp}/no-config.pt"],
         "{tmp}/no-config.pt", guard=["{tmp}/no-config.pt"], out=False),
    case("weight-decay-nan", "hmlc_attention.py", [*HDIGITS, "--weight-decay", "nan"], "--weight-decay"),
    case("mlcl-temperatures-nan", "mlcl.py", [*HDIGITS, "--temperatures", "0.1", "nan"], "--temperatures"),
    case("mlcl-weights-nan", "mlcl.py", [*HDIGITS, "--weights", "1", "nan"], "--weights"),
    case("gmm-mask-floor-2", "hmlc_gmm.py", [*HDIGITS, "--mask-floor", "2"], "--mask-floor must lie in [0, 1], got 2.0"),
    case("resume-empty", "hmlc_gmm.py", [*HDIGITS, "--resume", ""], "--resume"),
    case("tsne-max-points-1", "bench/tsne.py", ["{A}/checkpoint.pt", "--out", "{tmp}/plots-1", "--max-points", "1"],
         "--max-points must be at least 2", group="a", copies={"A": "supcon"}, guard=["{A}"], out=False),
]
IDS = [c["id"] for c in CASES]
assert len(set(IDS)) == len(IDS)


# --------------------------------------------------------------------------------------------------
# The driver: runs in a subprocess of its own, `python -c "... drive(spec)"`
# --------------------------------------------------------------------------------------------------

def fill(value, paths):
    """Placeholders {tmp}, {data}, {runs}, {good}, {A}, {B}, ... filled in (in strings, lists and dicts)."""
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list):
        return [fill(v, paths) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, paths) for k, v in value.items()}
    return value


def snapshot(paths):
    """{file: sha256} of every file at or under `paths`."""
    found = {}
    for path in paths:
        files = [path] if os.path.isfile(path) else [os.path.join(folder, name) for folder, _, names
                                                     in os.walk(path) for name in names]
        for file in files:
            with open(file, "rb") as f:
                found[file] = hashlib.sha256(f.read()).hexdigest()
    return found


def case_paths(spec_paths, case):
    paths = dict(spec_paths)
    paths.update({key: os.path.join(spec_paths["tmp"], "copies", f"{case['id']}-{key}") for key in case["copies"]})
    return paths


def run_script(script, argv, cwd):
    """(exit status, stdout and stderr as one text) of `python script *argv` run in this process."""
    import contextlib
    import io
    import runpy
    import signal
    import traceback

    saved_argv, saved_cwd, saved_main = sys.argv, os.getcwd(), sys.modules.get("__main__")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    output = io.StringIO()
    sys.argv = [script, *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                runpy.run_path(script, run_name="__main__")
                status = 0
            except SystemExit as exit_:  # as the interpreter reports it
                if exit_.code is None or isinstance(exit_.code, int):
                    status = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
                    status = 1
            except BaseException:
                output.write(traceback.format_exc())
                status = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return status, output.getvalue()


def write_data_fixtures(paths):
    """Every data folder of driver "b"'s cases, in the real formats, by the other test files' writers."""
    import pathlib

    import data
    from test_data import mnist_arrays, write_cifar100, write_idx
    from test_points import write_meshes
    from test_text import write_newsgroups, write_wos

    root = pathlib.Path(paths["data"])

    def mnist(name, damage):
        raw = root / name / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split, n in (("train", 40), ("test", 20)):
            files = dict(zip(data.MNIST_FILES[split], mnist_arrays(n, seed=n)))  # {file name: array}
            if split == "train":
                damage(files)
            for file, array in files.items():
                write_idx(raw / file, array)

    images, labels = data.MNIST_FILES["train"]

    def label_12(files):
        files[labels][3] = 12

    mnist("mnist-label-count", lambda files: files.update({labels: files[labels][:39]}))  # 40 images, 39 labels
    mnist("mnist-one-dimension", lambda files: files.update({images: files[images].reshape(-1)}))
    mnist("mnist-label-12", label_12)
    mnist("mnist-file-missing", lambda files: files.pop(labels))

    write_cifar100(root / "cifar-empty", sizes={"train": 0, "test": 6})

    for name, text in (("off-zero-area", "OFF\n3 1 0\n0 0 0\n1 0 0\n2 0 0\n3 0 1 2\n"),  # collinear corners
                       ("off-no-faces", "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n"),
                       ("off-bad-header", "OFF\nthree one 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")):
        write_meshes(root / name)
        (root / name / "ModelNet40" / "bathtub" / "train" / "bathtub_0003.off").write_text(text)

    write_wos(root / "wos-tiny", per_area=1)  # 6 documents, one per area: 20 % of one rounds to none
    write_wos(root / "wos-short-labels")
    yl1 = root / "wos-short-labels" / "WebOfScience" / "WOS46985" / "YL1.txt"
    yl1.write_text("".join(yl1.read_text().splitlines(keepends=True)[:-1]))  # 59 labels for 60 texts

    import torch

    torch.save(torch.nn.Linear(2, 2).state_dict(), os.path.join(paths["tmp"], "state-dict.pt"))  # weights alone
    torch.save({"method": "mlcl", "epoch": 1}, os.path.join(paths["tmp"], "no-config.pt"))  # made by other code

    (root / "news-none").mkdir()
    (root / "rcv1-none").mkdir()
    scratch = root.parent / "news-source"
    write_newsgroups(str(scratch / "unused-cache"), scratch)  # the bydate folders under scratch/src
    home = root / "news-placed" / "20news_home"
    home.mkdir(parents=True)
    with tarfile.open(home / "20news-bydate.tar.gz", "w:gz") as archive:
        for split in ("train", "test"):
            archive.add(scratch / "src" / f"20news-bydate-{split}", arcname=f"20news-bydate-{split}")


def drive(spec_file):
    """Run a spec: the fixture writers, the good runs, then each case; print one record per case."""
    with open(spec_file) as f:
        spec = json.load(f)
    for path in (TESTS, ROOT):
        if path not in sys.path:
            sys.path.insert(0, path)
    if spec["write_data"]:
        write_data_fixtures(spec["paths"])
    for name, (script, args) in spec["good_runs"].items():  # the runs the cases resume and evaluate
        status, output = run_script(os.path.join(ROOT, script), fill(args, spec["paths"]), spec["paths"]["cwd"])
        if status != 0:
            raise SystemExit(f"the good run {name} failed ({status}):\n{output[-3000:]}")
    for case in spec["cases"]:
        if case["absent"]:
            import torch

            if {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}[case["absent"]]():
                sys.stdout.write(MARK + json.dumps(dict(id=case["id"], skip=f"this machine has {case['absent']}")) + "\n")
                continue
        paths = case_paths(spec["paths"], case)
        for key, source in case["copies"].items():
            shutil.copytree(os.path.join(paths["good"], source), paths[key])
        if case["edit"]:
            import torch

            checkpoint = os.path.join(paths["A"], "checkpoint.pt")
            state = torch.load(checkpoint, weights_only=False)
            for key, value in case["edit"].items():  # a dict value is merged into the checkpoint's dict
                state[key] = {**state[key], **value} if isinstance(value, dict) else value
            torch.save(state, checkpoint)
        namespace = {"paths": paths}
        exec(case["pre"] or "", namespace)
        guard = fill(case["guard"], paths)
        before = snapshot(guard)
        started = time.perf_counter()
        status, output = run_script(os.path.join(ROOT, case["script"]), fill(case["args"], paths), paths["cwd"])
        seconds = time.perf_counter() - started
        namespace.get("undo", lambda: None)()
        record = dict(id=case["id"], status=status, output=output, before=before, after=snapshot(guard),
                      seconds=round(seconds, 3), argv=fill(case["args"], paths))
        shutil.rmtree(os.path.join(paths["runs"], case["id"]), ignore_errors=True)  # the case's own --out (wos: 257 MB)
        sys.stdout.write(MARK + json.dumps(record) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------

def read_only_folder_stops_us(folder):
    """Make `folder` read-only; True when that stops this process writing into it (not so for root)."""
    os.makedirs(folder)
    os.chmod(folder, 0o555)
    try:
        with open(os.path.join(folder, "probe"), "w"):
            pass
    except PermissionError:
        return True
    os.remove(os.path.join(folder, "probe"))
    return False


def write_plain_fixtures(tmp):
    """The files that need no torch (the real-process cases use them while driver "b" starts)."""
    os.makedirs(os.path.join(tmp, "a-folder"))
    with open(os.path.join(tmp, "a-file"), "w") as f:
        f.write("a file the user had here\n")
    with open(os.path.join(tmp, "garbage.pt"), "wb") as f:
        f.write(bytes(range(256)) * 8)
    # A CIFAR-100 tarball cut off halfway through: a real .tar.gz, truncated.
    folder = os.path.join(tmp, "data", "cifar-tarball")
    os.makedirs(folder)
    member = os.path.join(tmp, "meta")
    with open(member, "wb") as f:
        f.write(os.urandom(64 << 10))
    tarball = os.path.join(folder, "cifar-100-python.tar.gz")
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(member, arcname="cifar-100-python/meta")
    with open(tarball, "r+b") as f:
        f.truncate(os.path.getsize(tarball) // 2)
    home = os.path.join(tmp, "data", "news-wrong", "20news_home")
    os.makedirs(home)
    with open(os.path.join(home, "20news-bydate.tar.gz"), "wb") as f:
        f.write(b"\x1f\x8b" + b"not the archive" * 100)


def last_line(output):
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case id: record} from the two drivers, and {case id: (status, output)} of the real processes."""
    tmp = str(tmp_path_factory.mktemp("bad_inputs"))
    paths = {name: os.path.join(tmp, name) for name in ("data", "runs", "good", "cwd")}
    paths["tmp"] = tmp
    for name in ("data", "runs", "cwd"):
        os.makedirs(paths[name], exist_ok=True)
    write_plain_fixtures(tmp)
    read_only_works = read_only_folder_stops_us(os.path.join(tmp, "read-only"))
    cases = [c for c in CASES if read_only_works or c["id"] != "out-read-only"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    drivers = {}
    for group in ("a", "b"):
        spec = dict(paths=paths, cases=[c for c in cases if c["group"] == group], write_data=group == "b",
                    good_runs=GOOD_RUNS if group == "a" else {})
        spec_file = os.path.join(tmp, f"spec-{group}.json")
        with open(spec_file, "w") as f:
            json.dump(spec, f)
        code = f"import sys; sys.path.insert(0, {TESTS!r}); import test_bad_inputs; test_bad_inputs.drive({spec_file!r})"
        drivers[group] = subprocess.Popen([sys.executable, "-c", code], cwd=paths["cwd"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    real = {}
    for c in cases:
        if c["real"]:  # the same command line, as a process of its own
            command = [sys.executable, os.path.join(ROOT, c["script"]), *fill(c["args"], case_paths(paths, c))]
            real[c["id"]] = subprocess.Popen(command, cwd=paths["cwd"], env=env, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True)
    records, problems = {}, []
    for group, process in drivers.items():
        try:
            output, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            problems.append(f"driver {group} ran past 600 s")
        for line in output.splitlines():
            if line.startswith(MARK):
                record = json.loads(line[len(MARK):])
                records[record["id"]] = record
        if process.returncode != 0:
            problems.append(f"driver {group} ended with {process.returncode}:\n"
                            + "\n".join(line for line in output.splitlines() if not line.startswith(MARK))[-3000:])
    real_results = {}
    for name, process in real.items():
        output, _ = process.communicate(timeout=600)
        real_results[name] = (process.returncode, output)
    os.chmod(os.path.join(tmp, "read-only"), 0o755)
    return dict(records=records, real=real_results, problems=problems, read_only_works=read_only_works, paths=paths)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_ends_in_one_line(runs, case):
    if case["id"] == "out-read-only" and not runs["read_only_works"]:
        pytest.skip("this process writes into a read-only folder anyway (root)")
    record = runs["records"].get(case["id"])
    assert record is not None, "the case did not run: " + " | ".join(runs["problems"])
    if "skip" in record:
        pytest.skip(record["skip"])
    output = record["output"]
    shown = f"python {case['script']} {shlex.join(record['argv'])}\n--- output (last 2500 characters):\n{output[-2500:]}"
    traceback = "Traceback" in output  # (booleans, so that a failure shows `shown` and not pytest's diff of it)
    assert not traceback, shown
    exit_status = record["status"]
    assert exit_status != 0, shown
    expected = fill(case["expect"], case_paths(runs["paths"], case)).lower()
    names_the_problem = expected in last_line(output).lower()
    assert names_the_problem, f"the last line does not hold {expected!r}\n{shown}"
    changed = sorted({path for path, _ in set(record["before"].items()) ^ set(record["after"].items())})
    assert not changed, f"files changed, gone or added: {changed}\n{shown}"


@pytest.mark.parametrize("name", [c["id"] for c in CASES if c["real"]])
def test_the_driver_gives_the_command_lines_verdict(runs, name):
    """`python <script>.py ...` as a process of its own: the same exit status and the same last line."""
    status, output = runs["real"][name]
    record = runs["records"].get(name)
    assert record is not None and "skip" not in record, "the driver did not run the case: " + " | ".join(runs["problems"])
    traceback = "Traceback" in output
    assert not traceback, output[-2500:]
    same = (status, last_line(output)) == (record["status"], last_line(record["output"]))
    assert same, f"process: {status}, {last_line(output)!r}; driver: {record['status']}, {last_line(record['output'])!r}"
