"""Loss and mask speed, each as a ratio against its baseline measured in the same run.

- supcon_loss (one masked log-softmax over all anchors) against a per-anchor Python loop;
- MLCL's level masks from one broadcast comparison against a per-row loop, B = 1024, L = 3 (target >= 5x);
- mlcl_loss with H heads against H separate supcon_loss calls, forward and backward. No
  target: mlcl_loss is written in supcon_loss's form (masked log-softmax, mean over each anchor's
  positives) to be read beside the equation; what must hold is the training step, at most 1.05x
  SupCon's (bench/throughput.py). mlcl_loss takes the heads one after another: all heads in one [H, 2B, 2B]
  pass ran 1.39x H supcon_loss calls at H = 3, B = 1024 on the 2-core CPU, one head at a time 0.85x
  (bench/RESULTS.md).

    python bench/loss_speed.py [--device cuda]
"""

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlcl  # noqa: E402
import supcon  # noqa: E402


def seconds_per_call(functions, device, repeats, rounds=5):
    """Seconds per call of each function: the best of `rounds` averages over `repeats` calls. The
    functions take turns inside every round, so a slow spell on a shared machine hits them alike."""
    for fn in functions:
        fn()  # warm-up
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for k, fn in enumerate(functions):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], (time.perf_counter() - start) / repeats)
    return best


def supcon_per_anchor_loop(features, labels, temperature):
    """The loss anchor by anchor, the way it reads in the paper (the baseline)."""
    batch, views, _ = features.shape
    rows = features.transpose(0, 1).reshape(views * batch, -1)
    row_labels = labels.repeat(views)
    losses = []
    for i in range(len(rows)):
        others = torch.arange(len(rows), device=rows.device) != i
        logits = rows[others] @ rows[i] / temperature
        log_prob = logits - torch.logsumexp(logits, 0)
        positives = row_labels[others] == row_labels[i]
        if positives.any():
            losses.append(-log_prob[positives].mean())
    return torch.stack(losses).mean()


def masks_per_row_loop(labels):
    levels = labels.shape[1]
    masks = torch.empty(levels, len(labels), len(labels), dtype=torch.bool, device=labels.device)
    for level in range(levels):
        for i in range(len(labels)):
            masks[level, i] = labels[:, level] == labels[i, level]
    return masks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's). A CPU bmm splits its batch of H heads over the "
                             "threads, so H = 3 on 2 threads leaves one idle half the time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"machine: {machine}; torch {torch.__version__}")
    generator = torch.Generator(device).manual_seed(0)

    batch, views, dim = 128, 2, 128
    features = F.normalize(torch.randn(batch, views, dim, device=device, generator=generator), dim=-1)
    labels = torch.randint(0, 20, (batch,), device=device, generator=generator)
    vectorised, loop = seconds_per_call([lambda: supcon.supcon_loss(features, labels, temperature=0.1),
                                         lambda: supcon_per_anchor_loop(features, labels, 0.1)], device, 3)
    print(f"supcon_loss B={batch} V={views}: vectorised {vectorised * 1e3:.2f} ms, per-anchor loop "
          f"{loop * 1e3:.1f} ms -> {loop / vectorised:.0f}x faster")

    hierarchy = torch.randint(0, 1000, (1024,), device=device, generator=generator)
    level_labels = torch.stack([hierarchy // 100, hierarchy // 10, hierarchy], dim=1)
    batched, loop = seconds_per_call([lambda: mlcl.hierarchical_masks(level_labels),
                                      lambda: masks_per_row_loop(level_labels)], device, 3)
    print(f"level masks B=1024 L=3: broadcast {batched * 1e3:.2f} ms, per-row loop {loop * 1e3:.1f} ms "
          f"-> {loop / batched:.0f}x faster (target >= 5x)")

    for heads, batch in ((2, 256), (3, 256), (4, 256), (3, 1024)):
        features = F.normalize(torch.randn(heads, batch, views, dim, device=device, generator=generator), dim=-1)
        features.requires_grad_(True)
        labels = torch.stack([torch.randint(0, 10 ** (h + 1), (batch,), device=device, generator=generator)
                              for h in range(heads)], dim=1)
        masks = mlcl.hierarchical_masks(labels)
        temperatures = [0.5] * (heads - 1) + [0.1]
        # forward and backward, what a training step pays
        batched, single = seconds_per_call(
            [lambda: mlcl.mlcl_loss(features, masks, temperatures).backward(),
             lambda: sum(supcon.supcon_loss(features[h], mask=masks[h], temperature=temperatures[h])
                         for h in range(heads)).backward()], device, 10)
        print(f"mlcl_loss H={heads} B={batch} forward+backward: {batched * 1e3:.2f} ms vs {heads} supcon_loss calls "
              f"{single * 1e3:.2f} ms -> {batched / single:.2f}x")



if __name__ == "__main__":
    main()
