"""The GPU path in one prepared run: every code path that only a GPU takes, checked and timed in minutes.

A GPU is lent now and then for a few minutes, so this script does all of it in one call (3.5 minutes
on an H100, measured; bench/gpu.md is its report) and writes one Markdown report:

1. Training: every method file for a few hundred steps on CIFAR-100-format data that the script writes
   itself in the real pickle format (random images: this checks the path, not accuracy), in bf16 with
   channels_last and CUDA generators; `linear_eval.py --checkpoint` on one run; `--compile` once.
2. What the CPU tests check, on the device: each loss equals its CPU value (fp32 and bf16 inputs, and
   under bf16 autocast), gradients too; the GMM masks; augmentation reproducible from a CUDA generator;
   the global-batch gather over a one-rank nccl group; interrupt + `--resume` gives the weights of an
   uninterrupted run; a non-finite loss stops the run.
3. `bench/throughput.py` for ResNet-18 and ResNet-50 at batch 1024: every method's step in bf16 against
   SupCon's, our pipeline against the `--aug torchvision` reference in the same run, peak memory, MFU;
   the targets (ResNet-18 SupCon >= 20,000 views/s, >= 3x the reference; MLCL and A-HMLC steps <= 1.05x,
   G-HMLC <= 1.15x SupCon's; ResNet-50 at batch 1024 fits in 80 GB) printed as ratios, checked.

    bash bench/gpu_check.sh                        # on a CUDA machine; report also in $OUT/gpu.md
    bash bench/gpu_check.sh --device cpu --quick   # the same checks at a toy size, on a CPU, < 2 min

4. The headline preset (ResNet-50, batch 1024) on a 16 GB card: the whole step uncapped, then under a
   15 GiB cap (`torch.cuda.set_per_process_memory_fraction`, what a T4 leaves after the CUDA context)
   `supcon.py --dataset cifar100` itself with --chunks auto for an epoch, and timed steps at the chunking
   it chose against the uncapped step (target 1.4x); the fp16 path (loss scaler) timed beside it.

Exit status 1 when any check fails; every section runs regardless, so one report shows everything.
"""

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "bench")]
import data  # noqa: E402
import hmlc_attention  # noqa: E402
import hmlc_gmm  # noqa: E402
import mlcl  # noqa: E402
import supcon  # noqa: E402
import throughput  # noqa: E402
from conftest import METHOD_FILES  # noqa: E402
from test_data import write_cifar100  # noqa: E402  (the test suite's writer of the real pickle format)


class Report:
    """Markdown lines, printed as they come; checks counted as passed or failed."""

    def __init__(self, path=None):
        self.path, self.lines, self.failures = path, [], 0

    def add(self, line=""):
        """Print a line and rewrite the report file, so that a run cut off by a time limit leaves its part."""
        print(line, flush=True)
        self.lines.append(line)
        if self.path:
            with open(self.path, "w") as f:
                f.write("\n".join(self.lines) + "\n")

    def check(self, name, passed, detail):
        self.failures += not passed
        self.add(f"| {name} | {'PASS' if passed else '**FAIL**'} | {detail} |")

    def section(self, title, body):
        """Run one section; an exception in it is a failed check, not the end of the report."""
        self.add(f"\n## {title}\n")
        started = time.perf_counter()
        try:
            body(self)
        except Exception as error:  # a failing section must not hide the ones after it
            traceback.print_exc()
            self.check(f"{title} (exception)", False, f"`{type(error).__name__}: {str(error)[:300]}`")
        self.add(f"\n({time.perf_counter() - started:.0f} s)")


def relative_error(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


# --------------------------------------------------------------------------------------------------
# 1. The method files on the device, through their command lines
# --------------------------------------------------------------------------------------------------


def run_script(args, timeout):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    return result.returncode, time.perf_counter() - started, tail[0]


def training_runs(config):
    def body(report):
        report.add(f"{config.train_epochs} epochs x {config.train_steps} steps of batch {config.batch_size} "
                   f"({config.arch}, random images in the CIFAR-100 pickle format), then the checks below.\n")
        report.add("| check | result | detail |\n|---|---|---|")
        common = ["--dataset", "cifar100", "--data-dir", config.data_dir, "--arch", config.arch,
                  "--batch-size", str(config.batch_size), "--warmup-epochs", "1", "--device", config.device,
                  "--no-eval"]
        runs = [(name, [f"{name}.py", *common, "--epochs", str(config.train_epochs)]) for name in METHOD_FILES]
        runs.append(("supcon --compile", ["supcon.py", *common, "--epochs", str(config.compile_epochs), "--compile"]))
        for name, args in runs:
            out = os.path.join(config.work, "runs", name.replace(" --", "-"))
            code, seconds, last = run_script([*args, "--out", out], timeout=config.run_timeout)
            epochs = []
            if os.path.exists(os.path.join(out, "metrics.jsonl")):
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    epochs = [json.loads(line) for line in f]
            expected = int(args[args.index("--epochs") + 1])
            passed = (code == 0 and len(epochs) == expected and all(math.isfinite(e["loss"]) for e in epochs)
                      and os.path.exists(os.path.join(out, "checkpoint.pt")))
            detail = (f"{len(epochs)} epochs, final loss {epochs[-1]['loss']:.3f}, last epoch "
                      f"{epochs[-1]['views_per_s']:.0f} views/s, {seconds:.0f} s in all" if epochs else "")
            report.check(f"`{name}.py`" if " " not in name else f"`{name.replace(' ', '.py ')}`", passed,
                         detail if passed else f"exit {code}: `{last[:300]}`")

        checkpoint = os.path.join(config.work, "runs", "mlcl", "checkpoint.pt")
        code, seconds, last = run_script(["linear_eval.py", "--checkpoint", checkpoint, "--device", config.device],
                                         timeout=config.run_timeout)
        results_path = os.path.join(config.work, "runs", "mlcl", "results-checkpoint-fast.json")
        passed = code == 0 and os.path.exists(results_path)
        detail = f"exit {code}: `{last[:300]}`"
        if passed:
            with open(results_path) as f:
                levels = json.load(f)["levels"]
            detail = ", ".join(f"{level} linear {v['linear_top1']:.3f} / kNN {v['knn_top1']:.3f}"
                               for level, v in levels.items()) + f" (random images: chance), {seconds:.0f} s"
        report.check("`linear_eval.py --checkpoint` (mlcl run)", passed, detail)

    return body


# --------------------------------------------------------------------------------------------------
# 2. The CPU tests' checks, on the device
# --------------------------------------------------------------------------------------------------


def random_features(shape, generator):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def loss_cases(generator):
    """(name, loss function of features, features) for every loss of the project, on CPU tensors."""
    batch, views, dim, levels = 256, 2, 128, 2
    fine = torch.randint(0, 40, (batch,), generator=generator)
    labels = torch.stack([fine // 4, fine], dim=1)  # coarse -> fine, global ids
    return [
        ("supcon_loss (labels)", lambda f, y=fine: supcon.supcon_loss(f, labels=y.to(f.device)),
         random_features((batch, views, dim), generator)),
        ("supcon_loss (SimCLR)", lambda f: supcon.supcon_loss(f, temperature=0.5),
         random_features((batch, views, dim), generator)),
        ("mlcl_loss (2 level heads)", lambda f, y=labels: mlcl.mlcl_loss(
            f, mlcl.hierarchical_masks(y.to(f.device)), torch.tensor([0.5, 0.1], device=f.device)),
         random_features((levels, batch, views, dim), generator)),
        ("hmlc_loss HMCE, per-level features (hmlc_gmm)", lambda f, y=labels: hmlc_gmm.hmlc_loss(f, y.to(f.device)),
         random_features((levels, batch, views, dim), generator)),
        ("hmlc_loss HMC, shared features (hmlc_attention)",
         lambda f, y=labels: hmlc_attention.hmlc_loss(f, y.to(f.device), loss_type="hmc"),
         random_features((batch, views, dim), generator)),
    ]


def device_checks(config):
    device = torch.device(config.device)

    def body(report):
        report.add("| check | result | detail |\n|---|---|---|")
        generator = torch.Generator().manual_seed(0)
        # fp32 on both devices agrees to rounding; bf16 inputs are cast up inside, so the same bf16 values
        # give the same fp32 loss; under autocast the loss must still run in fp32.
        for name, loss_fn, features in loss_cases(generator):
            for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16 inputs")):
                reference_input = features.to(dtype).clone().requires_grad_()
                reference = loss_fn(reference_input)
                reference.backward()
                device_input = features.to(device, dtype).clone().requires_grad_()
                value = loss_fn(device_input)
                value.backward()
                loss_error = relative_error(value, reference)
                grad_error = relative_error(device_input.grad.float(), reference_input.grad.float())
                report.check(f"{name}, {label}", loss_error < 1e-5 and grad_error < 1e-4 and value.dtype == torch.float32,
                             f"loss {value.item():.6f} vs CPU {reference.item():.6f}: rel. error {loss_error:.1e}, "
                             f"gradient {grad_error:.1e}")
            with torch.autocast(device.type, dtype=torch.bfloat16):
                value = loss_fn(features.to(device))
            error = relative_error(value, loss_fn(features))
            report.check(f"{name}, under bf16 autocast", error < 1e-5 and value.dtype == torch.float32,
                         f"{value.dtype}, rel. error {error:.1e} against fp32 on the CPU")

        embeddings = torch.randn(512, 128, generator=generator)
        masks_here, masks_there = hmlc_gmm.gmm_masks(embeddings, 2), hmlc_gmm.gmm_masks(embeddings.to(device), 2).cpu()
        differing = (masks_here != masks_there).float().mean().item()
        report.check("gmm_masks, 512 x 128, 2 levels", differing < 1e-3,
                     f"{differing:.2%} of mask entries differ from the CPU's (rounding near a component boundary)")

        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8).to(device)
        info = throughput.synthetic_cifar(1).info
        first = data.two_views(images, info, torch.Generator(device).manual_seed(1))
        again = data.two_views(images, info, torch.Generator(device).manual_seed(1))
        other = data.two_views(images, info, torch.Generator(device).manual_seed(2))
        report.check("two_views from a device generator", torch.equal(first, again) and not torch.equal(first, other),
                     f"{tuple(first.shape)} on {first.device}: same seed same views, another seed other views")

        gather_check(report, device)
        resume_check(report, config)
        nan_check(report, config)

    return body


def gather_check(report, device):
    """The all-gather and its backward over a real process group of one rank (nccl on CUDA)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    import torch.distributed as dist

    dist.init_process_group(backend, init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
    try:
        x = torch.randn(8, 4, device=device, requires_grad=True)
        gathered = supcon.GatherAcrossRanks.apply(x)
        (gathered * torch.arange(4.0, device=device)).sum().backward()
        passed = torch.equal(gathered, x) and torch.equal(x.grad, torch.arange(4.0, device=device).expand(8, 4))
        report.check(f"global-batch gather over {backend} (1 rank)", passed,
                     "forward and backward equal the identity; several GPUs are not checked here")
    finally:
        dist.destroy_process_group()


TINY = ["--fraction", "0.05", "--batch-size", "64", "--no-eval"]


@contextlib.contextmanager
def deterministic():
    """Deterministic kernels where the device has them, so two runs can be compared bit for bit."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def resume_check(report, config):
    """2 epochs straight against 1 epoch, Ctrl-C, --resume, 1 more, as tests/test_training.py does on the CPU.
    A second straight run measures how far the device's own kernels let two runs agree."""
    work = os.path.join(config.work, "resume")
    flags = [*TINY, "--epochs", "2", "--device", config.device]
    real_batches = data.batches

    def interrupted_in_epoch_two(*args, **kwargs):  # a real Ctrl-C: the run stops after that step
        interrupted_in_epoch_two.calls += 1
        if interrupted_in_epoch_two.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        yield from real_batches(*args, **kwargs)

    interrupted_in_epoch_two.calls = 0
    with deterministic():
        for name in ("straight", "again"):
            supcon.train(supcon.parse_args([*flags, "--out", os.path.join(work, name)]))
        data.batches = interrupted_in_epoch_two
        try:
            supcon.train(supcon.parse_args([*flags, "--out", os.path.join(work, "resumed")]))
        except SystemExit as stop:
            assert "SIGINT: stopped" in str(stop), stop
        finally:
            data.batches = real_batches
        checkpoint = os.path.join(work, "resumed", "checkpoint.pt")
        supcon.train(supcon.parse_args([*flags, "--out", os.path.join(work, "resumed"), "--resume", checkpoint]))

    weights = {name: torch.load(os.path.join(work, name, "checkpoint.pt"), weights_only=False)["model"]
               for name in ("straight", "again", "resumed")}

    def largest_difference(a, b):
        return max((weights[a][k].double() - weights[b][k].double()).abs().max().item() for k in weights[a])

    resumed, noise = largest_difference("resumed", "straight"), largest_difference("again", "straight")
    report.check("interrupt + `--resume` = uninterrupted (supcon, 2 epochs)", resumed <= 10 * noise,
                 f"largest weight difference {resumed:.1e}; two uninterrupted runs differ by {noise:.1e}")


def nan_check(report, config):
    """A loss value that turns NaN on the device (its gradient stays finite, so only the loop's own check on
    the loss can see it) stops the run with the step named and writes no checkpoint."""
    out = os.path.join(config.work, "nan")
    real_loss = supcon.method_loss
    supcon.method_loss = lambda *args: real_loss(*args) + float("nan")
    try:
        supcon.train(supcon.parse_args([*TINY, "--epochs", "1", "--device", config.device, "--out", out]))
        message = "the run did not stop"
    except SystemExit as stop:
        message = str(stop)
    finally:
        supcon.method_loss = real_loss
    passed = "non-finite loss" in message and "step 1/" in message and not os.path.exists(os.path.join(out, "checkpoint.pt"))
    report.check("a NaN loss stops the run", passed, f"`{message[:160]}`")


# --------------------------------------------------------------------------------------------------
# 3. Throughput against the targets
# --------------------------------------------------------------------------------------------------


def throughput_section(config, arch):
    def body(report):
        args = throughput.parse_args(["--arch", arch, "--batch-size", str(config.bench_batch), "--dataset", "cifar100",
                                      "--data-dir", config.data_dir, "--device", config.device, *config.bench_flags])
        result = throughput.measure(args)
        report.add("```")
        for line in throughput.report(result):
            report.add(line)
        report.add("```\n")
        report.add("| check | result | detail |\n|---|---|---|")
        methods = result["methods"]
        for name, limit in (("mlcl", 1.05), ("hmlc_attention", 1.05), ("hmlc_gmm", 1.15)):
            ratio = methods[name]["vs_supcon"]
            if config.quick:  # two steps of a toy model: the ratio is noise, the code path is what ran
                report.add(f"| {name} step vs SupCon's | not checked (--quick) | {ratio:.3f}x |")
            else:
                report.check(f"{name} step <= {limit}x SupCon's", ratio <= limit, f"{ratio:.3f}x")
        if config.device.startswith("cuda"):
            if arch == "resnet18":
                rate, speedup = methods["supcon"]["views_per_s"], result["pipeline"]["speedup"]
                report.check("SupCon >= 20,000 views/s (bf16, batch 1024)", rate >= 20_000,
                             f"{rate:.0f} views/s = {rate / 20_000:.2f}x the target")
                report.check("our pipeline >= 3x the reference", speedup >= 3, f"{speedup:.2f}x")
            peak = max(m["peak_gib"] for m in methods.values())
            report.check(f"{arch} batch {config.bench_batch} fits in 80 GB", peak * 2 ** 30 < 80e9,
                         f"peak {peak:.1f} GiB allocated (largest over the methods)")

    return body


# --------------------------------------------------------------------------------------------------
# 4. The headline preset on the GPUs people have: a 16 GB card's memory, fp16 before Ampere
# --------------------------------------------------------------------------------------------------

CARD_GIB = 15.0  # what a 16 GB card (T4, V100-16GB) leaves to PyTorch after the CUDA context


def timed_training_steps(name, arch, batch, device, chunks, precision, steps):
    """(seconds per step, peak GiB, the last loss) of real training steps (module.training_step + SGD)."""
    args = argparse.Namespace(arch=arch, batch_size=batch, compile=False)
    dataset = throughput.synthetic_cifar(batch)
    views = data.two_views(dataset.inputs.to(device), dataset.info, torch.Generator(device).manual_seed(0))
    step = throughput.make_step(name, [], args, dataset.info, device, chunks=chunks, precision=precision)
    targets = dataset.targets.to(device)
    step(views, targets)  # warm-up: cuDNN autotuning, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step(views, targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - started) / steps, peak, loss.item()


def memory_section(config):
    def body(report):
        device = torch.device(config.device)
        arch, batch, steps = ("cnn", 64, 2) if config.quick else ("resnet50", 1024, 10)
        report.add(f"{arch}, batch {batch} x 2 views (without --quick: the CIFAR-100 preset, ResNet-50 at 1024), "
                   f"{steps} timed training steps each.\n")
        report.add("| check | result | detail |\n|---|---|---|")
        whole, whole_peak, _ = timed_training_steps("supcon", arch, batch, device, 1, "auto", steps)
        report.add(f"| the whole batch, uncapped | measured | {whole * 1000:.0f} ms a step, peak {whole_peak:.1f} GiB |")
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory / 2**30
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(CARD_GIB / total, device)
            try:
                out, printed = os.path.join(config.work, "runs", "capped"), io.StringIO()
                try:  # the training script itself, --chunks auto, under the cap
                    with contextlib.redirect_stdout(printed):
                        supcon.train(supcon.parse_args(["--dataset", "cifar100", "--data-dir", config.data_dir,
                                                        "--arch", arch, "--epochs", "1", "--device", config.device,
                                                        "--no-eval", "--out", out]))
                    trained, message = True, " ".join(line for line in printed.getvalue().splitlines()
                                                      if line.startswith("supcon on"))  # the start line names the chunks
                except SystemExit as stop:
                    trained, message = False, str(stop)
                sample = throughput.synthetic_cifar(batch)
                model = supcon.build_model(supcon.parse_args(["--arch", arch]), sample.info).to(device)
                model = model.to(memory_format=torch.channels_last)
                views = data.two_views(sample.inputs.to(device), sample.info, torch.Generator(device).manual_seed(0))
                _, autocast, _ = supcon.mixed_precision("auto", device)
                chunks = supcon.fewest_chunks(model, views, sample.targets.to(device), autocast)
                fits = chunks > 0
                del model, views
                torch.cuda.empty_cache()
                capped, capped_peak, loss = timed_training_steps("supcon", arch, batch, device, chunks, "auto", steps)
            finally:
                torch.cuda.set_per_process_memory_fraction(1.0, device)
            report.check(f"`supcon.py --dataset cifar100` under a {CARD_GIB:g} GiB cap", trained, f"`{message[:300]}`")
            report.check(f"batch {batch} in {CARD_GIB:g} GiB: --chunks auto", fits and capped_peak <= CARD_GIB,
                         f"chose {chunks} chunks; peak {capped_peak:.1f} GiB, {capped * 1000:.0f} ms a step = "
                         f"{capped / whole:.2f}x the uncapped step (target 1.4x), loss {loss:.3f}")
        else:
            chunked, _, loss = timed_training_steps("supcon", arch, batch, device, 2, "auto", steps)
            report.add(f"| 2 chunks (no memory cap on a CPU) | measured | {chunked * 1000:.0f} ms a step = "
                       f"{chunked / whole:.2f}x the whole batch, loss {loss:.3f} |")
        fp16, fp16_peak, loss = timed_training_steps("supcon", arch, batch, device, 1, "fp16", steps)
        report.check("--precision fp16 (loss scaler), whole batch", math.isfinite(loss),
                     f"{fp16 * 1000:.0f} ms a step = {fp16 / whole:.2f}x the auto precision's, peak {fp16_peak:.1f} GiB, "
                     f"loss {loss:.3f}")

    return body


# --------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script without a GPU")
    p.add_argument("--quick", action="store_true", help="toy sizes: small CNN, tiny batches, one throughput arch")
    p.add_argument("--report", default=None, help="Markdown report path (default $OUT/gpu.md when $OUT is set)")
    config = p.parse_args()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --quick to try the script on a CPU")
    quick = config.quick
    config.arch = "cnn" if quick else "resnet18"
    config.batch_size = 32 if quick else 512
    train_size = 256 if quick else 12_000
    config.train_steps = train_size // config.batch_size
    config.train_epochs = 2 if quick else 9
    config.compile_epochs = 1 if quick else 3
    config.run_timeout = 300
    config.bench_batch = 64 if quick else 1024
    config.bench_flags = ["--steps", "2", "--rounds", "1", "--pipeline-steps", "2", "--workers", "1"] if quick else \
        ["--rounds", "5", "--steps", "20"]  # the 1.05x targets need more than three rounds to separate
    report_path = config.report or (os.path.join(os.environ["OUT"], "gpu.md") if os.environ.get("OUT") else None)

    if report_path:
        os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    report = Report(report_path)
    device_name = torch.cuda.get_device_name() if config.device.startswith("cuda") else f"{platform.machine()} CPU"
    report.add(f"# GPU check: {device_name}\n")
    report.add(f"`bash bench/gpu_check.sh {' '.join(sys.argv[1:])}` on {datetime.date.today()}: torch "
               f"{torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
               f"{os.cpu_count()} CPU cores.")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        config.work = config.data_dir = work
        write_cifar100(pathlib.Path(work), sizes={"train": train_size, "test": 128 if quick else 2_000})
        report.section("1. Every method file on the device", training_runs(config))
        report.section("2. The CPU tests' checks, on the device", device_checks(config))
        for arch in (["cnn"] if quick else ["resnet18", "resnet50"]):
            report.section(f"3. Throughput, {arch}", throughput_section(config, arch))
        report.section("4. The headline preset on a 16 GB card", memory_section(config))
    report.add(f"\n{report.failures} failed checks; {time.perf_counter() - started:.0f} s in all.")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
