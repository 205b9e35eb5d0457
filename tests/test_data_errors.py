"""The user's own command on missing or damaged data: a download by default, and every data problem ends
in one line (exit status 1) instead of a traceback. Nothing here touches the network: the downloaders
are replaced by ones that fail as an offline machine does."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import data
import linear_eval
from conftest import METHOD_FILES
from test_text import write_wos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs a script (argv[1:]) with torchvision's downloader failing like a machine without network.
OFFLINE = """
import runpy, sys, urllib.error
import torchvision.datasets.utils

def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno 101] Network is unreachable")

torchvision.datasets.utils.download_and_extract_archive = offline
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(*args, offline=False):
    command = [sys.executable, *(["-c", OFFLINE] if offline else []), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_error_line(result):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    return errors[0]


@pytest.mark.parametrize("name", METHOD_FILES)
def test_user_command_without_network_tries_the_download_and_ends_in_one_line(tmp_path, name):
    """`python <method>.py --dataset cifar100 --data-dir EMPTY --epochs 1` on an offline machine."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(f"{name}.py", "--dataset", "cifar100", "--data-dir", str(empty), "--epochs", "1",
                 "--out", str(tmp_path / "run"), offline=True)
    error = assert_one_error_line(result)
    assert f"downloading CIFAR-100 (161 MiB, md5-checked) from {data.CIFAR100_URL} into {empty}" in result.stderr
    assert "could not download CIFAR-100" in error and "Network is unreachable" in error
    assert "cifar-100-python.tar.gz" in error and str(empty) in error
    assert not (tmp_path / "run").exists() and not os.listdir(empty)


def test_no_download_forbids_it_and_download_is_a_no_op_alias(tmp_path):
    result = run("mlcl.py", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--no-download", "--epochs", "1",
                 "--out", str(tmp_path / "run"))
    error = assert_one_error_line(result)
    assert "downloading is off" in error and "downloading CIFAR-100" not in result.stderr
    for name in METHOD_FILES:
        parse_args = importlib.import_module(name).parse_args
        assert parse_args([]).download and parse_args(["--download"]).download
        assert not parse_args(["--no-download"]).download


def test_a_damaged_file_ends_the_run_in_one_line_naming_it(tmp_path):
    write_wos(tmp_path)
    label_file = tmp_path / "WebOfScience" / "WOS46985" / "YL2.txt"
    label_file.write_text(label_file.read_text().replace("\n", " ", 1))
    result = run("supcon.py", "--dataset", "wos", "--data-dir", str(tmp_path), "--epochs", "1", "--no-eval",
                 "--out", str(tmp_path / "run"))
    assert str(label_file) in assert_one_error_line(result)


def test_linear_eval_ends_in_one_line_when_the_data_is_gone(tmp_path):
    """linear_eval.py reads the dataset named in the checkpoint: gone, it says so in one line."""
    config = dict(dataset="cifar100", data_dir=str(tmp_path / "gone"), seed=0, image_size=None, fraction=1.0)
    torch.save({"method": "supcon", "method_file": "supcon.py", "config": config, "model": {}}, tmp_path / "c.pt")
    with pytest.raises(SystemExit) as exit_:
        linear_eval.main(["--checkpoint", str(tmp_path / "c.pt"), "--device", "cpu"])
    assert str(exit_.value).startswith("error: CIFAR-100:") and "\n" not in str(exit_.value)


def test_load_or_exit_turns_only_data_errors_into_an_exit():
    with pytest.raises(SystemExit, match="^error: .*hmnist"):
        data.load_or_exit("hmnist", "unused", "train", image_size=8)
    with pytest.raises(ValueError, match="unknown dataset"):  # a caller's bug keeps its traceback
        data.load_or_exit("no-such-dataset", "unused", "train")
