"""Every reading of the feature masks (G-HMLC, A-HMLC) against HMCE at the same budget, and a diagnosis.

Each variant is one method file with flags; every (variant, fraction, seed) is one full training run
with the dataset's preset (hdigits: small CNN, 25 epochs, batch 128), then the fast linear probe and
kNN per level. For seed 0 on the full training set the run also keeps a checkpoint every
--curve-every epochs (linear/kNN accuracy over training) and its final model is diagnosed on 512 test
images, two augmented views each, per level:
- masks: share of dimensions each level's mask keeps (hard masks) or its mean gate value and spread
  (soft gates); for masks on e, the share of the masked entries that are positive; overlap (weighted
  Jaccard, sum min / sum max) between the masks of the two views of one image, of two images of the
  same fine class and of two images of different classes;
- cosine similarities of the level features for positive and negative pairs of that level;
- the norm of the gradient that the level's own SupCon term sends into the encoder output f(x).

    python bench/feature_masks.py --jobs 6 --tables runs/feature_masks/tables.md        # a GPU, minutes
    python bench/feature_masks.py --seeds 0 --fractions 0.25 --common "--epochs 1"     # a smoke run
"""

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
import data  # noqa: E402
import linear_eval  # noqa: E402
from compare import mean_std  # noqa: E402
from supcon import supcon_loss  # noqa: E402

VARIANTS = {
    "HMCE": ("hmlc_gmm", ["--mask", "none"]),
    "G-HMLC: per-sample GMM on e": ("hmlc_gmm", ["--mask-warmup-steps", "0"]),
    "G-HMLC: per-sample GMM, 50 all-ones warm-up steps (default)": ("hmlc_gmm", []),
    "G-HMLC: per-sample GMM + shared HMCE": ("hmlc_gmm", ["--mask-warmup-steps", "0", "--shared-term"]),
    "G-HMLC: GMM over dims (label variance)": ("hmlc_gmm", ["--mask-warmup-steps", "0", "--gmm-over", "dims"]),
    "G-HMLC: per-sample GMM on f(x), shared head": ("hmlc_gmm", ["--mask-warmup-steps", "0", "--mask-on", "encoder"]),
    "A-HMLC: gates from f(x) on e": ("hmlc_attention", []),
    "A-HMLC: gates from e": ("hmlc_attention", ["--gate-input", "projection"]),
    "A-HMLC: residual gates e(1+M)": ("hmlc_attention", ["--gate", "residual"]),
    "A-HMLC: gates + shared HMCE": ("hmlc_attention", ["--shared-term"]),
    "A-HMLC: gates on f(x), shared head": ("hmlc_attention", ["--mask-on", "encoder"]),
}


def weighted_jaccard(a, b):
    """sum min / sum max of two mask sets [N, D] -> [N] (plain Jaccard for 0/1 masks)."""
    return torch.minimum(a, b).sum(-1) / torch.maximum(a, b).sum(-1).clamp(min=1e-12)


def level_masks(model, h, labels):
    """The masks the model multiplies in, [L, N, D], and the features they multiply."""
    if hasattr(model, "attention"):  # A-HMLC
        e = model.head(h)
        target = h if model.mask_on == "encoder" else e
        return model.gates(h if model.gate_input == "encoder" else e), target
    target = h if model.mask_on == "encoder" else model.head(h)
    return model.level_masks(target.detach(), labels).expand(-1, len(h), -1), target


def diagnose(model, dataset, device, temperature, count=512):
    """Mask statistics, cosine similarities and per-level encoder gradients on `count` test images."""
    model.eval()
    info = dataset.info
    x, y = dataset.inputs[:count].to(device), dataset.targets[:count].to(device)
    views = data.two_views(x, info, torch.Generator(device).manual_seed(0)).flatten(0, 1)  # view-major
    labels = y.repeat(2, 1)
    h = model.encoder(views).float().detach().requires_grad_()
    levels, _ = model.embed(h, labels)
    report = {}
    for level, name in enumerate(info.level_names):
        z = levels[min(level, len(levels) - 1)]  # HMCE: one shared embedding for every level
        loss = supcon_loss(z.view(2, count, -1).transpose(0, 1), labels=y[:, level], temperature=temperature)
        gradient = torch.autograd.grad(loss, h, retain_graph=True)[0]
        with torch.no_grad():
            similarity = z[:count] @ z[:count].T
            same = y[:, level, None] == y[None, :, level]
            off_diagonal = ~torch.eye(count, dtype=torch.bool, device=device)
            positive, negative = similarity[same & off_diagonal], similarity[~same]
            record = {"loss": loss.item(), "encoder_gradient_norm": gradient.norm().item(),
                      "positive_cosine_mean": positive.mean().item(), "negative_cosine_mean": negative.mean().item(),
                      "negative_cosine_below_zero": (negative < 0).float().mean().item()}
        report[name] = record
    if getattr(model, "mask", "gmm") == "none":
        return report
    with torch.no_grad():
        masks, target = level_masks(model, h.detach(), labels)
        fine = y[:, -1]
        same_class = (fine[:, None] == fine[None, :]) & ~torch.eye(count, dtype=torch.bool, device=device)
        for level, name in enumerate(info.level_names):
            mask = masks[level].float()
            first, second = mask[:count], mask[count:]
            pairwise = torch.stack([weighted_jaccard(first[i], first) for i in range(count)])  # [count, count]
            report[name].update({
                "mask_mean": mask.mean().item(), "mask_std_over_samples": mask.std(0).mean().item(),
                "positive_share_of_masked_entries": ((target > 0).float() * mask).sum().item() / mask.sum().clamp(min=1e-12).item(),
                "overlap_two_views": weighted_jaccard(first, second).mean().item(),
                "overlap_same_class": pairwise[same_class].mean().item(),
                "overlap_other_class": pairwise[fine[:, None] != fine[None, :]].mean().item()})
    return report


def train_one(job):
    """One training run (in a worker process); returns its record for the tables."""
    name, fraction, seed, out, common, curve_every, device = job
    module_name, flags = VARIANTS[name]
    module = importlib.import_module(module_name)
    argv = [*flags, "--fraction", str(fraction), "--seed", str(seed), "--out", out, "--device", device, *common]
    snapshots = []
    if curve_every:
        argv += ["--save-every", str(curve_every)]
        save = module.save_checkpoint

        def save_and_keep(path, state):  # every saved checkpoint is also kept, for the accuracy curve
            save(path, state)
            snapshots.append(path.replace("checkpoint.pt", f"checkpoint-{state['epoch']}.pt"))
            shutil.copy(path, snapshots[-1])

        module.save_checkpoint = save_and_keep
    shutil.rmtree(out, ignore_errors=True)
    args = module.parse_args(argv)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        results = module.train(args)
    record = {"variant": name, "fraction": fraction, "seed": seed, "levels": results["levels"],
              "seconds": time.perf_counter() - started}
    if curve_every:
        torch_device = torch.device(device)
        train_set = data.load(args.dataset, args.data_dir, "train", fraction=fraction, seed=seed)
        test_set = data.load(args.dataset, args.data_dir, "test", seed=seed)
        curve = []
        for path in snapshots:
            state = torch.load(path, map_location="cpu", weights_only=False)
            model = module.build_model(args, train_set.info).to(torch_device)
            model.load_state_dict(state["model"])
            levels = linear_eval.evaluate(model.encoder, train_set, test_set, torch_device)["levels"]
            curve.append({"epoch": state["epoch"], **{level: [v["linear_top1"], v["knn_top1"]] for level, v in levels.items()}})
        record["curve"] = curve
        record["diagnosis"] = diagnose(model, test_set, torch_device, args.temperature)
    return record


def tables(records, fractions):
    """Markdown: accuracy per variant and fraction against HMCE; the diagnosis; the accuracy curves."""
    level_names = list(records[0]["levels"])
    lines = ["| variant | fraction | " + " | ".join(f"{n} linear" for n in level_names) + " | "
             + " | ".join(f"{n} kNN" for n in level_names) + " | linear vs HMCE (mean difference) |",
             "|---|---|" + "---|" * (2 * len(level_names) + 1)]
    for fraction in fractions:
        baseline = {n: statistics.mean(r["levels"][n]["linear_top1"] for r in records
                                       if r["variant"] == "HMCE" and r["fraction"] == fraction) for n in level_names} \
            if any(r["variant"] == "HMCE" and r["fraction"] == fraction for r in records) else None
        for name in VARIANTS:
            runs = [r for r in records if r["variant"] == name and r["fraction"] == fraction]
            if not runs:
                continue
            linear = {n: [r["levels"][n]["linear_top1"] for r in runs] for n in level_names}
            knn = {n: [r["levels"][n]["knn_top1"] for r in runs] for n in level_names}
            difference = " / ".join(f"{statistics.mean(linear[n]) - baseline[n]:+.3f}" for n in level_names) \
                if baseline else "n/a"
            lines.append(f"| {name} | {fraction:g} | " + " | ".join(mean_std(linear[n]) for n in level_names) + " | "
                         + " | ".join(mean_std(knn[n]) for n in level_names) + f" | {difference} ({len(runs)} seeds) |")
    diagnosed = [r for r in records if "diagnosis" in r]
    if diagnosed:
        keys = ["loss", "encoder_gradient_norm", "positive_cosine_mean", "negative_cosine_mean",
                "negative_cosine_below_zero", "mask_mean", "mask_std_over_samples", "positive_share_of_masked_entries",
                "overlap_two_views", "overlap_same_class", "overlap_other_class"]
        lines += ["", "Diagnosis of the seed-0, full-data models (512 test images, two views each), per level:", "",
                  "| variant | level | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for r in diagnosed:
            for level, values in r["diagnosis"].items():
                lines.append(f"| {r['variant']} | {level} | "
                             + " | ".join(f"{values[k]:.3f}" if k in values else "" for k in keys) + " |")
        lines += ["", "Linear / kNN top-1 over training (seed 0, full data), " + " ; ".join(level_names) + ":", "",
                  "| variant | " + " | ".join(f"epoch {c['epoch']}" for c in diagnosed[0]["curve"]) + " |",
                  "|---|" + "---|" * len(diagnosed[0]["curve"])]
        for r in diagnosed:
            cells = [" ; ".join(f"{c[n][0]:.2f}/{c[n][1]:.2f}" for n in level_names) for c in r["curve"]]
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--common", default="", help="arguments given to every run, e.g. '--epochs 8'")
    p.add_argument("--curve-every", type=int, default=5, help="epochs between the accuracy-curve checkpoints")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (worker processes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", default="runs/feature_masks", help="folder for the individual runs")
    p.add_argument("--records", default=None, help="JSON-lines file of finished runs (default RUNS/records.jsonl)")
    p.add_argument("--tables", default=None, help="Markdown file for the tables (default RUNS/tables.md)")
    args = p.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    os.makedirs(args.runs, exist_ok=True)
    records_path = args.records or os.path.join(args.runs, "records.jsonl")
    tables_path = args.tables or os.path.join(args.runs, "tables.md")
    common = shlex.split(args.common)
    jobs = [(name, fraction, seed, os.path.join(args.runs, f"{VARIANTS[name][0]}-{i}-f{fraction}-s{seed}"), common,
             args.curve_every if (seed == args.seeds[0] and fraction == max(args.fractions)) else 0, args.device)
            for seed in args.seeds for fraction in sorted(args.fractions, reverse=True)
            for i, name in enumerate(VARIANTS) if name in args.variants]
    started, records = time.time(), []
    with open(records_path, "w") as log, multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for record in pool.imap_unordered(train_one, jobs):
            records.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"[{time.time() - started:5.0f} s] {record['variant']}, f = {record['fraction']:g}, seed "
                  f"{record['seed']}: " + ", ".join(f"{n} {v['linear_top1']:.3f}" for n, v in record["levels"].items()),
                  flush=True)
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    lines = [f"Command: `python bench/feature_masks.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`", "",
             f"Machine: {machine}, torch {torch.__version__}; seeds {args.seeds}; {time.strftime('%Y-%m-%d')}; "
             f"{time.time() - started:.0f} s in all.", "", *tables(records, args.fractions)]
    with open(tables_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
