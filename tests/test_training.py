"""End-to-end tests of the training loop shared by the method files: runs, resume, checkpoints, DDP."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data
import hmlc_attention
import hmlc_gmm
import mlcl
import supcon
from conftest import METHOD_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--fraction", "0.05", "--batch-size", "64", "--no-eval", "--device", "cpu"]


def run_script(*args, timeout=600):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_supcon_script_beats_chance(tmp_path):
    """A short hdigits run writes every run file and its features beat chance at both levels by a margin."""
    out = tmp_path / "run"
    run_script("supcon.py", "--epochs", "3", "--fraction", "0.3", "--batch-size", "128", "--device", "cpu",
               "--out", str(out))
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "results.json"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "supcon" and results["dataset"] == "hdigits"
    levels = results["levels"]
    assert levels["category"]["linear_top1"] > 0.1 + 0.1  # chance 1/10
    assert levels["class"]["linear_top1"] > 0.01 + 0.05  # chance 1/100
    assert set(levels["class"]) == {"linear_top1", "knn_top1", "raw_linear_top1"}
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(e["loss"] > 0 for e in epochs)

    # The checkpoint can be evaluated again on its own, and gives the same linear accuracy, in a file of
    # its own: the run's results.json stays as training wrote it.
    written = (out / "results.json").read_bytes()
    run_script("linear_eval.py", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu")
    again = json.loads((out / "results-checkpoint-fast.json").read_text())
    assert (out / "results.json").read_bytes() == written
    for level in ("category", "class"):
        assert again["levels"][level]["linear_top1"] == pytest.approx(levels[level]["linear_top1"], abs=1e-6)

    # The reference protocol: linear layers trained on augmented images, final epoch reported.
    run_script("linear_eval.py", "--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu",
               "--protocol", "supcon", "--linear-epochs", "10")
    reference = json.loads((out / "results-checkpoint-supcon.json").read_text())
    assert reference["protocol"] == "supcon"
    # SGD at the reference's lr 0.1 learns slowly on this small CNN's features (norm about 4): after 10
    # epochs on a 3-epoch encoder it is only just above chance, far from the fast probe.
    assert reference["levels"]["category"]["linear_top1"] > 0.1
    assert 0.0 <= reference["levels"]["class"]["linear_top1"] <= 1.0
    assert reference["levels"]["category"]["linear_top1"] != levels["category"]["linear_top1"]


def interrupt_on_epoch(monkeypatch, epoch_to_interrupt):
    """Press Ctrl-C (a real SIGINT) when epoch `epoch_to_interrupt` (0-based) starts: the run stops after
    that epoch's first step."""
    real_batches, calls = data.batches, []

    def batches(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch_to_interrupt + 1:
            os.kill(os.getpid(), signal.SIGINT)
        yield from real_batches(*args, **kwargs)

    monkeypatch.setattr(data, "batches", batches)


def test_resume_reproduces_uninterrupted_training(tmp_path, monkeypatch):
    """2 epochs straight == 1 epoch, Ctrl-C, --resume, 1 more epoch: identical weights on CPU."""
    straight = tmp_path / "straight"
    supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--out", str(straight)]))

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        interrupt_on_epoch(patch, 1)
        with pytest.raises(SystemExit, match="SIGINT: stopped after step 1/"):
            supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--out", str(interrupted)]))
    state = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--out", str(interrupted),
                                     "--resume", str(interrupted / "checkpoint.pt")]))

    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def fail_at_step(monkeypatch, module, step, error):
    """In the run's `step`-th training step (1-based, counted over the whole run), in its loss: a signal
    number is that signal sent to the run (SIGINT is a Ctrl-C), which finishes the step; an exception is
    raised there, a run killed outright (no checkpoint)."""
    real_loss, calls = module.method_loss, []

    def method_loss(*args):
        calls.append(1)
        if len(calls) == step:
            if isinstance(error, Exception):
                raise error
            os.kill(os.getpid(), error)
        return real_loss(*args)

    monkeypatch.setattr(module, "method_loss", method_loss)


def record_learning_rates(monkeypatch):
    """The learning rate of every optimizer step, in order."""
    rates, real_step = [], torch.optim.SGD.step

    def step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return rates


def metrics(out):
    """metrics.jsonl without the wall-clock fields: (epoch, loss, lr) per epoch, (epoch, step, probe) per probe."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line["epoch"], line["step"], line["probe_knn_top1"]) if "step" in line else
            (line["epoch"], line["loss"], line["lr"]) for line in lines]


def assert_same_weights(a, b):
    a, b = torch.load(a / "checkpoint.pt", weights_only=False), torch.load(b / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_mid_epoch_takes_the_uninterrupted_steps(tmp_path, monkeypatch):
    """Ctrl-C in the middle of epoch 2 (3 steps an epoch), then --resume: the run takes the same 9 optimizer
    steps at the same learning rates as an uninterrupted one, ends with bitwise the same weights and
    BatchNorm statistics on CPU, and logs every epoch once with the same loss and lr, and every kNN probe
    (--eval-every 2) once. The stop waits for the step it interrupts, so no forward pass is half counted."""
    flags = [*TINY, "--epochs", "3", "--eval-every", "2"]
    rates = record_learning_rates(monkeypatch)
    straight = tmp_path / "straight"
    supcon.train(supcon.parse_args([*flags, "--out", str(straight)]))
    straight_rates = rates.copy()
    rates.clear()

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        fail_at_step(patch, supcon, 5, signal.SIGINT)
        with pytest.raises(SystemExit, match="SIGINT: stopped after step 2/3 of epoch 2"):
            supcon.train(supcon.parse_args([*flags, "--out", str(interrupted)]))
    state = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"], len(state["losses"])) == (1, 2, 2)
    supcon.train(supcon.parse_args([*flags, "--out", str(interrupted), "--resume", str(interrupted / "checkpoint.pt")]))

    assert len(straight_rates) == 9 and rates == straight_rates
    assert_same_weights(straight, interrupted)
    assert metrics(interrupted) == metrics(straight)
    assert [line[1] for line in metrics(straight) if isinstance(line[2], dict)] == [2, 4, 6, 8]
    assert json.loads((straight / "config.json").read_text())["train_samples"] == 225  # 250 less the probe's 25


def test_killed_run_resumed_logs_every_epoch_once(tmp_path, monkeypatch):
    """A run killed in epoch 4 (no Ctrl-C checkpoint), whose last checkpoint is from epoch 2 (--save-every 2)
    but which had logged epoch 3 too, resumed from that checkpoint: metrics.jsonl holds epochs 1-4 once each,
    equal to an uninterrupted run's, and so are the weights and the kNN probes (--eval-every 2)."""
    flags = [*TINY, "--epochs", "4", "--save-every", "2", "--eval-every", "2"]
    straight = tmp_path / "straight"
    supcon.train(supcon.parse_args([*flags, "--out", str(straight)]))

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        fail_at_step(patch, supcon, 10, RuntimeError("killed"))
        with pytest.raises(RuntimeError, match="killed"):
            supcon.train(supcon.parse_args([*flags, "--out", str(killed)]))
    assert [line[:2] for line in metrics(killed) if isinstance(line[2], dict)] == [(1, 2), (2, 4), (2, 6), (3, 8)]
    assert [epoch for epoch, _, lr in metrics(killed) if not isinstance(lr, dict)] == [1, 2, 3]
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] == 2
    supcon.train(supcon.parse_args([*flags, "--out", str(killed), "--resume", str(killed / "checkpoint.pt")]))

    assert metrics(killed) == metrics(straight)
    assert_same_weights(straight, killed)


def test_reference_pipeline_trains():
    """The reference pipeline that bench/throughput.py times against ours (PIL transforms in a DataLoader
    worker, fp32, the training step of the loop) takes real steps with finite losses."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import throughput

    dataset = data.load("hdigits", split="test", size=96)
    args = throughput.parse_args(["--arch", "cnn", "--batch-size", "32", "--device", "cpu", "--workers", "1",
                                  "--pipeline-steps", "2"])
    losses = []
    step = throughput.make_step("supcon", [], args, dataset.info, torch.device("cpu"), reference=True)
    seconds = throughput.pipeline_seconds_per_step(lambda v, y: losses.append(step(v, y)), dataset, "torchvision",
                                                   args, torch.device("cpu"))
    assert seconds > 0 and len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """--compile (inductor) changes the speed, not the math: one epoch gives the eager run's loss."""
    losses = []
    for flags in ([], ["--compile"]):
        out = tmp_path / ("compiled" if flags else "eager")
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(out), *flags]))
        losses.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_bad_checkpoints_are_refused_and_kept(tmp_path):
    """A corrupt or mismatched checkpoint stops the run with a clear message and is not overwritten."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(tmp_path / "a"), "--resume", str(corrupt)]))
    assert corrupt.read_bytes() == b"not a checkpoint"

    good = tmp_path / "good"
    supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(good)]))
    before = (good / "checkpoint.pt").read_bytes()
    for flags, name in ((["--batch-size", "32"], "--batch-size 64"), (["--epochs", "2"], "--epochs 1"),
                        (["--eval-every", "3"], "--eval-every 0"), (["--temperature", "0.2"], "--temperature 0.1")):
        with pytest.raises(SystemExit, match=f"trained with {name}, this run has"):
            supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(good), *flags,
                                            "--resume", str(good / "checkpoint.pt")]))
    with pytest.raises(SystemExit, match="holds another run"):
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(good)]))
    assert (good / "checkpoint.pt").read_bytes() == before
    # A folder holding only another run's metrics (killed before its first checkpoint) is refused too,
    # rather than appended to.
    (good / "checkpoint.pt").unlink()
    metrics_before = (good / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds another run"):
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(good)]))
    assert (good / "metrics.jsonl").read_text() == metrics_before


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    """A NaN loss stops training with a message naming the step, and no checkpoint is written after it."""
    monkeypatch.setattr(supcon, "method_loss", lambda *args: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match=r"non-finite loss .* epoch 1, step 1/"):
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--out", str(tmp_path / "nan")]))
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


class NaNs(torch.nn.Module):
    def forward(self, x):
        return x * float("nan")


@pytest.mark.parametrize("name", METHOD_FILES)
def test_diverged_features_stop_the_run(name, tmp_path, monkeypatch):
    """NaN features stop training with a message naming the step, no traceback: the training step skips the
    loss's own per-step check (a host sync), NaN features make the loss NaN, and the loop's check on the
    loss every ten steps stops the run."""
    module = importlib.import_module(name)
    real_encoder = module.build_encoder

    def diverged_encoder(arch, info):
        encoder, feature_dim = real_encoder(arch, info)
        return torch.nn.Sequential(encoder, NaNs()), feature_dim

    monkeypatch.setattr(module, "build_encoder", diverged_encoder)
    with pytest.raises(SystemExit, match=r"non-finite loss nan at epoch 1, step 1/\d+"):
        module.train(module.parse_args([*TINY, "--epochs", "1", "--out", str(tmp_path / "nan")]))
    assert not (tmp_path / "nan" / "checkpoint.pt").exists()


def method_losses():
    """Each method file's loss as f(features [B, V, D], labels [B, 2], **keywords)."""
    return {"supcon": lambda f, y, **k: supcon.supcon_loss(f, y[:, -1], **k),
            "mlcl": lambda f, y, **k: mlcl.mlcl_loss(f[None], mlcl.hierarchical_masks(y)[-1:], [0.1], **k),
            "hmlc_gmm": lambda f, y, **k: hmlc_gmm.hmlc_loss(f, y, **k),
            "hmlc_attention": lambda f, y, **k: hmlc_attention.hmlc_loss(f, y, **k)}


@pytest.mark.parametrize("name", METHOD_FILES)
def test_losses_called_directly_reject_nan_features(name):
    """Called directly, every loss raises a clear error on NaN features; with check_finite=False (the
    training step) it returns NaN instead, which the loop's check on the loss catches."""
    features = torch.nn.functional.normalize(torch.randn(6, 2, 8), dim=-1)
    features[2, 1, 3] = float("nan")
    labels = torch.tensor([[0, 0], [0, 1], [1, 2], [1, 2], [0, 0], [1, 3]])
    loss = method_losses()[name]
    with pytest.raises(ValueError, match="NaN or Inf"):
        loss(features, labels)
    assert loss(features, labels, check_finite=False).isnan()


@pytest.mark.parametrize("flag, value", [("--fraction", "0"), ("--fraction", "1.5"), ("--epochs", "0"),
                                         ("--batch-size", "-1"), ("--temperature", "0"), ("--dataset", "nope")])
def test_cli_rejects_bad_values(flag, value, capsys):
    """Every CLI value is validated before anything runs."""
    with pytest.raises(SystemExit):
        supcon.parse_args([flag, value])
    assert "error" in capsys.readouterr().err


def gather_worker(rank, world_size, port, features, labels, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    local_batch = len(features) // world_size
    local = features[rank * local_batch : (rank + 1) * local_batch].clone().requires_grad_(True)
    global_features = supcon.gather_across_ranks(local)
    global_labels = supcon.gather_across_ranks(labels[rank * local_batch : (rank + 1) * local_batch])
    loss = supcon.supcon_loss(global_features, global_labels, temperature=0.2)
    loss.backward()
    results[rank] = (loss.detach(), local.grad)
    dist.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gather_matches_single_process():
    """Under gloo with 2 ranks, every rank's loss on the gathered batch equals the single-process loss,
    and each rank's gradient is world_size x the single-process gradient of its rows (DDP averages it back)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(8, 2, 16, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    reference = features.clone().requires_grad_(True)
    expected = supcon.supcon_loss(reference, labels, temperature=0.2)
    expected.backward()

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(gather_worker, args=(2, free_port(), features, labels, results), nprocs=2, join=True)
    for rank in range(2):
        loss, grad = results[rank]
        assert torch.allclose(loss, expected.detach(), rtol=1e-12)
        assert torch.allclose(grad / 2, reference.grad[rank * 4 : (rank + 1) * 4], rtol=1e-10, atol=1e-14)


def method_loss_worker(rank, world_size, port, name, views, targets, results):
    """One rank's method_loss on its half of the batch, with the weights every rank shares."""
    import importlib

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    module = importlib.import_module(name)
    args = module.parse_args(["--dataset", "hdigits"])
    torch.manual_seed(0)
    info = data.load("hdigits", split="test", size=8).info
    model = module.build_model(args, info).eval()
    local = views.shape[1] // world_size
    part = slice(rank * local, (rank + 1) * local)
    outputs = module.method_forward(model, views[:, part], targets[part])
    results[rank] = module.method_loss(outputs, targets[part], args, info).detach()
    dist.destroy_process_group()


@pytest.mark.parametrize("name", METHOD_FILES)
def test_every_method_contrasts_the_global_batch(name):
    """Under gloo with 2 ranks each holding half the batch, every method's loss equals the single-process
    loss on the whole batch: features and labels are gathered before the loss (BatchNorm in eval mode,
    so that per-rank batch statistics do not differ)."""
    import importlib

    module = importlib.import_module(name)
    dataset = data.load("hdigits", split="test", size=16)
    views = data.two_views(dataset.inputs, dataset.info, torch.Generator().manual_seed(0))
    args = module.parse_args(["--dataset", "hdigits"])
    torch.manual_seed(0)
    model = module.build_model(args, dataset.info).eval()
    expected = module.method_loss(module.method_forward(model, views, dataset.targets), dataset.targets, args,
                                  dataset.info).detach()

    results = mp.Manager().dict()
    mp.spawn(method_loss_worker, args=(2, free_port(), name, views, dataset.targets, results), nprocs=2, join=True)
    for rank in range(2):
        assert torch.allclose(results[rank], expected, rtol=1e-5), (rank, results[rank], expected)


@pytest.mark.parametrize("name", METHOD_FILES)
def test_torchrun_two_processes_on_cpu(name, tmp_path):
    """`torchrun --nproc_per_node=2 <method>.py` trains with gloo on CPU and writes one run folder."""
    out = tmp_path / "ddp"
    run_script("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
               f"{name}.py", *TINY, "--epochs", "1", "--out", str(out))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1 and state["method_file"] == f"{name}.py"
    assert not any(key.startswith("module.") for key in state["model"])
