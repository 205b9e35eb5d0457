"""Big batches in small memory (--chunks), precision (--precision) and a run that stops cleanly (SIGTERM)."""

import copy
import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import supcon
from conftest import METHOD_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--fraction", "0.05", "--batch-size", "64", "--no-eval", "--device", "cpu"]

# Every method file, and the method flags that add outputs or state to the step: MLCL's CE classifier,
# G-HMLC's per-batch masks with their running buffer, the shared (unmasked) term.
# (--mask-warmup-steps 0: the GMM masks from the first step; the default's all-ones warm-up is plain HMCE.)
VARIANTS = [("supcon", []), ("mlcl", []), ("mlcl", ["--ce-weight", "1"]), ("hmlc_gmm", ["--mask-warmup-steps", "0"]),
            ("hmlc_gmm", ["--mask", "none"]), ("hmlc_gmm", ["--mask-warmup-steps", "0", "--gmm-over", "dims"]),
            ("hmlc_gmm", ["--mask-warmup-steps", "0", "--shared-term"]), ("hmlc_attention", []),
            ("hmlc_attention", ["--shared-term"])]


def float64_setup(name, flags, batch=10):
    """(module, args, info, model in float64 training mode, views [2, B, ...], targets) on hdigits."""
    module = importlib.import_module(name)
    args = module.parse_args(["--dataset", "hdigits", *flags])
    dataset = data.load("hdigits", split="test", size=20 * batch)
    dataset = dataset.subset(torch.arange(0, 20 * batch, 20))  # several categories, some shared
    torch.manual_seed(0)
    model = module.build_model(args, dataset.info).double().train()
    views = data.two_views(dataset.inputs, dataset.info, torch.Generator().manual_seed(1)).double()
    return module, args, dataset.info, model, views, dataset.targets


def per_chunk_reference(module, args, info, model, views, targets, chunks):
    """The named reference: `chunks` copies of the model (one per DDP rank), each embedding its share of
    the batch in one autograd graph with its own BatchNorm statistics, the loss on the whole batch.
    Returns (loss, summed parameter gradients, the buffers of copy 0, which DDP keeps)."""
    replicas = [copy.deepcopy(model) for _ in range(chunks)]
    sizes = [len(part) for part in torch.arange(views.shape[1]).tensor_split(chunks)]
    parts = [module.method_forward(replica, v, t)
             for replica, v, t in zip(replicas, views.split(sizes, 1), targets.split(sizes))]
    outputs = [None if part[0] is None else torch.cat(part) for part in zip(*parts)]
    loss = module.method_loss(outputs, targets, args, info)
    loss.backward()
    grads = {name: sum(dict(replica.named_parameters())[name].grad for replica in replicas)
             for name, _ in model.named_parameters()}
    return loss.detach(), grads, {name: buffer.clone() for name, buffer in replicas[0].named_buffers()}


@pytest.mark.parametrize("name, flags", VARIANTS, ids=[" ".join([n, *f]) for n, f in VARIANTS])
@pytest.mark.parametrize("chunks", [2, 3])
def test_chunked_step_equals_per_chunk_reference(name, flags, chunks):
    """Gradient caching gives the loss and gradients of the per-chunk reference (float64, tight), and the
    buffers (BatchNorm statistics, G-HMLC's scores) of one update from chunk 0, not one per pass."""
    module, args, info, model, views, targets = float64_setup(name, flags)
    expected_loss, expected_grads, expected_buffers = per_chunk_reference(module, args, info, model, views,
                                                                          targets, chunks)
    off = torch.autocast("cpu", enabled=False)
    loss = module.training_step(model, views, targets, args, info, chunks, off, torch.amp.GradScaler("cpu", enabled=False))
    assert torch.allclose(loss, expected_loss, rtol=1e-12, atol=0)
    for key, parameter in model.named_parameters():
        assert parameter.grad is not None, key
        assert torch.allclose(parameter.grad, expected_grads[key], rtol=1e-9, atol=1e-13), key
    for key, buffer in model.named_buffers():
        assert torch.allclose(buffer, expected_buffers[key], rtol=0, atol=0, equal_nan=True), key
    tracked = [b for k, b in model.named_buffers() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 1 for b in tracked)


@pytest.mark.parametrize("name", METHOD_FILES)
def test_one_chunk_is_the_whole_batch_step(name):
    """chunks = 1 is the plain step: the loss and gradients of the whole batch in one graph."""
    module, args, info, model, views, targets = float64_setup(name, [])
    reference = copy.deepcopy(model)
    expected = module.method_loss(module.method_forward(reference, views, targets), targets, args, info)
    expected.backward()
    off = torch.autocast("cpu", enabled=False)
    loss = module.training_step(model, views, targets, args, info, 1, off, torch.amp.GradScaler("cpu", enabled=False))
    assert torch.equal(loss.detach(), expected.detach())
    for (key, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), key


def test_chunked_run_trains_and_resumes_with_other_chunks(tmp_path, monkeypatch):
    """--chunks 4 trains through the loop, and a run stopped by Ctrl-C resumes with another --chunks (it
    changes the memory, not the data or the schedule); the folder defaults to the checkpoint's."""
    out = tmp_path / "chunked"
    real_batches, calls = data.batches, []

    def batches(*args, **kwargs):  # Ctrl-C as epoch 2 starts
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        yield from real_batches(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(data, "batches", batches)
        with pytest.raises(SystemExit, match="SIGINT: stopped after step 1/3 of epoch 2"):
            supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--chunks", "4", "--out", str(out)]))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["chunks"] == "4"
    supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--chunks", "2", "--resume", str(out / "checkpoint.pt")]))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2 and state["config"]["chunks"] == "2"


@pytest.mark.parametrize("flags, message", [
    (["--chunks", "0"], "--chunks must be a positive integer"),
    (["--chunks", "two"], "--chunks must be a positive integer"),
    (["--precision", "fp8"], "invalid choice"),
])
def test_cli_rejects_bad_memory_flags(flags, message, capsys):
    with pytest.raises(SystemExit):
        supcon.parse_args(flags)
    assert message in capsys.readouterr().err


def test_impossible_chunk_settings_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--chunks 100 cannot work here: more than the 64 samples"):
        supcon.train(supcon.parse_args([*TINY, "--chunks", "100", "--out", str(tmp_path / "a")]))
    with pytest.raises(SystemExit, match="--chunks 2 cannot work here: .* or with --sync-bn"):
        supcon.train(supcon.parse_args([*TINY, "--chunks", "2", "--sync-bn", "--out", str(tmp_path / "b")]))


@pytest.mark.parametrize("fits_up_to, expected", [(10, 1), (5, 2), (4, 4), (2, 8), (1, 10), (0, 0)])
def test_fewest_chunks_finds_the_first_size_that_fits(fits_up_to, expected, monkeypatch):
    """--chunks auto: out of memory above `fits_up_to` samples (simulated on the CPU) gives the fewest of
    1, 2, 4, 8, 10 chunks of a 10-sample batch that fit, 0 when one sample does not; the BatchNorm buffers
    and the gradients are left as they were."""
    module, args, info, model, views, targets = float64_setup("supcon", [])
    real_forward, sizes = module.method_forward, []

    def forward(model, views, targets):
        sizes.append(views.shape[1])
        if views.shape[1] > fits_up_to:
            raise torch.OutOfMemoryError("simulated")
        return real_forward(model, views, targets)

    monkeypatch.setattr(module, "method_forward", forward)
    buffers = [buffer.clone() for buffer in model.buffers()]
    assert module.fewest_chunks(model, views, targets, torch.autocast("cpu", enabled=False)) == expected
    assert sizes == [10, 5, 3, 2, 1][: len(sizes)] and (expected == 0 or sizes[-1] <= fits_up_to)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert all(parameter.grad is None for parameter in model.parameters())


def test_precision_follows_the_device():
    cpu = torch.device("cpu")
    assert supcon.mixed_precision("auto", cpu)[0] == "fp32"
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        name, autocast, scaler = supcon.mixed_precision(precision, cpu)
        with autocast:
            enabled, fast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        assert (name, enabled, scaler.is_enabled()) == (precision, precision != "fp32", precision == "fp16")
        assert not enabled or fast_dtype == dtype


def test_fp16_trains_on_the_cpu(tmp_path):
    """--precision fp16 runs autocast in float16 with a loss scaler (saved in the checkpoint); the
    weights move and the losses stay finite."""
    out = tmp_path / "fp16"
    supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--precision", "fp16", "--lr", "0.01", "--out", str(out)]))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0 and state["config"]["precision"] == "fp16"
    torch.manual_seed(0)
    initial = supcon.build_model(supcon.parse_args(TINY), data.load("hdigits", split="test", size=4).info)
    moved = [not torch.equal(value, initial.state_dict()[key]) for key, value in state["model"].items()
             if key.endswith("weight")]
    assert all(moved)


def test_skipped_fp16_steps_do_not_stop_the_run(tmp_path, monkeypatch):
    """A loss scale so large that every fp16 gradient overflows: the scaler skips every step and backs off;
    the losses are unscaled and finite, so the non-finite-loss stop does not fire, and the weights stay."""
    real_scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real_scaler(*a, **{**k, "init_scale": 2.0 ** 120}))
    out = tmp_path / "skipped"
    supcon.train(supcon.parse_args([*TINY, "--epochs", "2", "--precision", "fp16", "--out", str(out)]))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["scaler"]["scale"] == 2.0 ** (120 - 6)  # 6 steps, each skipped and halving the scale
    torch.manual_seed(0)
    initial = supcon.build_model(supcon.parse_args(TINY), data.load("hdigits", split="test", size=4).info)
    weights = {key: value for key, value in state["model"].items() if key.endswith("weight")}
    assert all(torch.equal(value, initial.state_dict()[key]) for key, value in weights.items())


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    """SIGTERM (preemption, a time limit) finishes the step, saves a checkpoint like Ctrl-C and exits with a
    line saying how to continue (resuming is the Ctrl-C path, tested in test_training.py)."""
    out = tmp_path / "preempted"
    command = [sys.executable, "supcon.py", *TINY, "--epochs", "200", "--out", str(out)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)  # the first epoch's line: training has started
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stdout + stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("SIGTERM: stopped after step") and "--resume" in last, stderr
    assert "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 1 <= state["epoch"] < 200 and len(state["losses"]) == state["step"]
