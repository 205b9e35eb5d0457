"""Training-step throughput of every method, as ratios against SupCon measured in the same run.

One step = two augmented views of a batch (data.two_views, on the training device), the method's
forward and loss (bf16 autocast on CUDA, the loss in fp32), backward and an SGD step: exactly what the
training loop does. Methods are timed in interleaved rounds and the median round is reported, so that
a slow moment of the machine does not land on one method only. Prints views/s, step time, the ratio
to SupCon, peak memory per method (CUDA), achieved FLOP/s and MFU (CUDA; peak from --peak-tflops).
Then SupCon training with its input pipeline: ours (`--aug gpu`: resident data, batched augmentation
on the device, bf16 on CUDA) against the reference (`--aug torchvision`: PIL transforms in DataLoader
workers, fp32), in the same run.

    python bench/throughput.py --arch resnet18 --batch-size 1024           # on a GPU
    python bench/throughput.py --arch cnn --batch-size 128 --dataset hdigits  # on a CPU
"""

import argparse
import importlib
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

METHODS = {"supcon": [], "mlcl": [], "hmlc_gmm": [], "hmlc_gmm --mask none": ["--mask", "none"],
           "hmlc_attention": []}


def synthetic_cifar(size):
    """Random uint8 images with CIFAR-100's shape and label structure, for machines without the dataset."""
    generator = torch.Generator().manual_seed(0)
    fine = torch.randint(0, 100, (size,), generator=generator)
    coarse = torch.tensor(data.FINE_TO_COARSE)[fine]
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    info = data.DatasetInfo("cifar100", "image", ["superclass", "class"], [20, 100], False, [[], []], channels=3,
                            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop")
    return data.ResidentDataset(images, torch.stack([coarse, fine], dim=1), info)


def reference_transform(info, size):
    """SupCon's torchvision pipeline for one PIL image, the per-image counterpart of `data.augment`."""
    if info.augment == "canvas":
        steps = [transforms.RandomAffine(degrees=0, translate=(2 / size, 2 / size), scale=(0.9, 1.1),
                                         interpolation=transforms.InterpolationMode.BILINEAR)]
    else:
        steps = [transforms.RandomResizedCrop(size, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip()]
        if info.channels == 3:
            steps += [transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                      transforms.RandomGrayscale(p=0.2)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])


class ReferenceViews(Dataset):
    """(two views [2, C, H, W], target) per image of a uint8 image dataset, through `reference_transform`."""

    def __init__(self, dataset, info):
        if info.modality != "image":
            raise ValueError(f"the torchvision pipeline is for images; {info.name} holds {info.modality}")
        self.dataset = dataset
        self.transform = reference_transform(info, dataset[0][0].shape[-1])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        image = to_pil_image(image)
        return torch.stack([self.transform(image), self.transform(image)]), target


def training_views(dataset, info, aug, batch_size, order, augment, device, rank=0, world_size=1, workers=0):
    """One epoch of (views [2, B, ...], targets) on `device`.

    aug "gpu": batches sliced from the (resident) dataset, both views made on the training device by
    `data.two_views` with per-sample parameters drawn from `augment`. aug "torchvision": the reference pipeline,
    PIL transforms one image at a time in `workers` DataLoader processes (images only; compare speeds).
    """
    if aug == "gpu":
        for x, y in data.batches(dataset, batch_size, order, device, rank, world_size, workers):
            yield data.two_views(x, info, augment), y
    elif aug == "torchvision":
        for views, y in data.batches(ReferenceViews(dataset, info), batch_size, order, device, rank, world_size,
                                     workers):
            yield views.transpose(0, 1), y
    else:
        raise ValueError(f"aug must be 'gpu' or 'torchvision', got {aug!r}")


def make_step(module_name, extra, args, info, device, reference=False, chunks=1, precision="auto"):
    """One training step on given views, as the training loop takes it (the module's training_step, in
    `chunks` chunks and the given precision). reference=True is the reference pipeline's step: fp32, NCHW
    tensors, never compiled."""
    module = importlib.import_module(module_name)
    config = module.parse_args(["--dataset", "hdigits", "--arch", args.arch, "--batch-size", str(args.batch_size), *extra])
    model = module.build_model(config, info).to(device)
    if info.modality == "image" and not reference:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile and not reference else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _, autocast, scaler = module.mixed_precision("fp32" if reference else precision, device)

    def step(views, y):
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(step_model, views, y, config, info, chunks, autocast, scaler)
        scaler.step(optimizer)
        scaler.update()
        return loss

    return step


def timed(step, x, y, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def pipeline_seconds_per_step(step, dataset, aug, args, device):
    """Seconds per training step fed by a pipeline (`training_views`), data loading included; the
    first batch (DataLoader worker start-up) is left out of the clock."""
    epoch = training_views(dataset, dataset.info, aug, args.batch_size, torch.Generator().manual_seed(0),
                           torch.Generator(device).manual_seed(0), device, workers=args.workers)
    step(*next(epoch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    for views, y in epoch:
        step(views, y)
        steps += 1
        if steps == args.pipeline_steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dataset", default="cifar100", help="cifar100 (synthetic if the files are missing) or hdigits")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count()), help="DataLoader workers of the reference")
    p.add_argument("--pipeline-steps", type=int, default=10, help="timed steps of each data pipeline")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def measure(args):
    """Time every method's step and both input pipelines; returns the figures as a dict (see `report`)."""
    device = torch.device(args.device)
    synthetic = False
    try:
        dataset = data.load(args.dataset, args.data_dir, "train")
    except data.DataError:  # no (readable) dataset files here: time synthetic ones
        synthetic, dataset = True, synthetic_cifar(args.batch_size * (args.pipeline_steps + 1))
    info = dataset.info
    x = dataset.inputs[: args.batch_size].to(device)
    y = dataset.targets[: args.batch_size].to(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = {"machine": machine, "setup": f"torch {torch.__version__}; {args.arch}, batch {args.batch_size} x 2 "
              f"views, {info.name}{' (synthetic)' if synthetic else ''}, compile={args.compile}", "methods": {}}

    augment = torch.Generator(device).manual_seed(0)
    view_steps, steps = {}, {}  # each method's step on given views, and the same from a batch of images
    for name, extra in METHODS.items():
        view_steps[name] = make_step(name.split()[0], extra, args, info, device)
        steps[name] = lambda x, y, view_step=view_steps[name]: view_step(data.two_views(x, info, augment), y)
        steps[name](x, y)  # warm-up (and compilation)
    flops = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step(x, y)
        flops[name] = counter.get_total_flops()
    memory = {}
    for name, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step(x, y)
            memory[name] = torch.cuda.max_memory_allocated(device) / 2 ** 30

    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed(step, x, y, args.steps, device))
    base = statistics.median(times["supcon"])
    for name in steps:
        seconds = statistics.median(times[name])
        achieved = flops[name] / seconds / 1e12
        result["methods"][name] = {
            "views_per_s": 2 * args.batch_size / seconds, "step_ms": seconds * 1e3, "vs_supcon": seconds / base,
            "tflops": achieved, "mfu": achieved / args.peak_tflops if device.type == "cuda" else None,
            "peak_gib": memory.get(name)}

    augmentation = timed(lambda a, b: data.two_views(a, info, augment), x, y, args.steps, device)
    result["augmentation_views_per_s"] = 2 * args.batch_size / augmentation

    # The whole input pipeline: ours (batches sliced from the resident dataset, augmented on the device,
    # bf16 and channels_last on CUDA) against the reference's (PIL transforms in DataLoader workers, fp32).
    resident = data.to_device(dataset, device)
    ours = pipeline_seconds_per_step(view_steps["supcon"], resident, "gpu", args, device)
    reference = pipeline_seconds_per_step(make_step("supcon", [], args, info, device, reference=True), dataset,
                                          "torchvision", args, device)
    result["pipeline"] = {"ours_views_per_s": 2 * args.batch_size / ours,
                          "reference_views_per_s": 2 * args.batch_size / reference,
                          "workers": args.workers, "speedup": reference / ours}
    return result


def report(result):
    """The figures of `measure` as printable lines."""
    lines = [f"machine: {result['machine']}; {result['setup']}",
             f"{'method':<22}{'views/s':>10}{'step ms':>10}{'vs supcon':>11}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}"]
    for name, m in result["methods"].items():
        mfu = "n/a" if m["mfu"] is None else f"{m['mfu']:.1%}"
        memory = "n/a" if m["peak_gib"] is None else f"{m['peak_gib']:.2f}"
        lines.append(f"{name:<22}{m['views_per_s']:>10.0f}{m['step_ms']:>10.1f}{m['vs_supcon']:>10.2f}x"
                     f"{m['tflops']:>10.3f}{mfu:>8}{memory:>10}")
    pipeline = result["pipeline"]
    lines.append(f"augmentation alone (two views, per-sample parameters): {result['augmentation_views_per_s']:.0f} views/s")
    lines.append(f"SupCon training, data loading included: ours {pipeline['ours_views_per_s']:.0f} views/s, reference "
                 f"(PIL in {pipeline['workers']} workers, fp32) {pipeline['reference_views_per_s']:.0f} views/s "
                 f"-> {pipeline['speedup']:.2f}x the reference's speed")
    return lines


def main():
    print("\n".join(report(measure(parse_args()))))


if __name__ == "__main__":
    main()
