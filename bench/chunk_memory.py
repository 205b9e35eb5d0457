"""Memory and time of one training step computed whole and in chunks (--chunks, gradient caching).

Each configuration runs in a fresh process: a SupCon training step (the method files' training_step and
an SGD step) on a batch of random CIFAR-sized images, two views each, fp32 on the CPU or the precision
`auto` picks on a GPU. It prints the peak memory the step adds (host: ru_maxrss over the resident size
before the first step; GPU: torch.cuda.max_memory_allocated) and the median time of the timed steps,
with every time as a ratio to the whole-batch step of the same run.

    python bench/chunk_memory.py --arch resnet50 --batch-size 128 --chunks 1 2 4      # a CPU
    python bench/chunk_memory.py --arch resnet50 --batch-size 1024 --chunks 1 2 4 8   # a GPU
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import data  # noqa: E402
import supcon  # noqa: E402
import throughput  # noqa: E402


def resident_gib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def one_configuration(arch, batch, chunks, steps, device):
    dataset = throughput.synthetic_cifar(batch)
    views = data.two_views(dataset.inputs.to(device), dataset.info, torch.Generator(device).manual_seed(0))
    step = throughput.make_step("supcon", [], argparse.Namespace(arch=arch, batch_size=batch, compile=False),
                                dataset.info, device, chunks=chunks)
    targets = dataset.targets.to(device)
    before = resident_gib()
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step(views, targets)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before
    return {"chunks": chunks, "peak_gib": peak, "seconds": statistics.median(times[1:])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process: one configuration
    args = p.parse_args()
    device = torch.device(args.device)
    if args.one is not None:
        print(json.dumps(one_configuration(args.arch, args.batch_size, args.one, args.steps, device)))
        return
    rows = []
    for chunks in args.chunks:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", str(chunks)], capture_output=True,
                               text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    whole = rows[0]["seconds"]
    memory = "GPU memory allocated" if device.type == "cuda" else "host memory added"
    print(f"`python bench/chunk_memory.py {' '.join(sys.argv[1:])}`: {args.arch}, batch {args.batch_size} x 2 views, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine() + ' CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| --chunks | peak {memory} | step | vs --chunks {rows[0]['chunks']} |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['chunks']} | {row['peak_gib']:.2f} GiB | {row['seconds']:.2f} s | {row['seconds'] / whole:.2f}x |")


if __name__ == "__main__":
    main()
