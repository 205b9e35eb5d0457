"""Do the papers' claims hold here? Every run the README's claims table needs, then the table.

Each claim is a comparison of two variants at the same budget (the dataset preset's epochs, batch and
augmentation; only the method differs), over seeds 0, 1, 2. A claim *holds* when the difference of the
means favours it by more than the larger of the two standard deviations, *does not hold* when it goes
the other way by as much, and is *within noise* otherwise.

The hdigits runs on the full training set hold out 10 % of it for the convergence probe (--eval-every),
every method alike; their checkpoints also make the t-SNE figures. Finished runs are reused, so an
interrupted sweep goes on where it stopped.

    python bench/claims.py --jobs 2         # about an hour on a 2-core CPU; writes bench/claims.md and
                                            # the figures in bench/figures/
"""

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from compare import run_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_EVERY = 65  # 15 probes over hdigits' 25 epochs x 35 steps

# name -> (script and flags, datasets, fractions)
VARIANTS = {
    "SupCon": (["supcon.py"], ["hdigits", "hdigits-multilabel", "shapes", "skdocs"], [1.0, 0.1]),
    "MLCL": (["mlcl.py"], ["hdigits", "hdigits-multilabel", "shapes", "skdocs"], [1.0, 0.1]),
    "MLCL cold coarse head": (["mlcl.py", "--temperatures", "0.1", "0.1"], ["hdigits"], [1.0]),
    "MLCL without CE": (["mlcl.py", "--ce-weight", "0"], ["skdocs"], [1.0]),
    "HMCE": (["hmlc_gmm.py", "--mask", "none"], ["hdigits"], [1.0]),
    "G-HMLC": (["hmlc_gmm.py"], ["hdigits"], [1.0]),
    "A-HMLC": (["hmlc_attention.py"], ["hdigits"], [1.0]),
}
FRACTIONS_ON = {"hdigits"}  # f = 0.1 runs only where the little-data claim is measured


def jobs(seeds):
    """(variant, dataset, fraction, seed) of every run."""
    for name, (_, datasets, fractions) in VARIANTS.items():
        for dataset in datasets:
            for fraction in fractions if dataset in FRACTIONS_ON else [1.0]:
                for seed in seeds:
                    yield name, dataset, fraction, seed


def run_folder(runs, name, dataset, fraction, seed):
    return os.path.join(runs, f"{dataset}-{name.replace(' ', '_')}-f{fraction:g}-s{seed}")


def run(job, runs):
    """One training run in its own process (compare.run_once: a finished run is reused); its results with the
    mean of its convergence probes."""
    name, dataset, fraction, seed = job
    out = run_folder(runs, name, dataset, fraction, seed)
    probe = ["--eval-every", str(PROBE_EVERY)] if dataset == "hdigits" and fraction == 1.0 else []
    results = run_once(VARIANTS[name][0], fraction, seed, out, ["--dataset", dataset, "--device", "cpu", *probe])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        probes = [line.get("probe_knn_top1", line.get("probe_knn_map")) for line in map(json.loads, f) if "step" in line]
    results["probe_mean"] = {level: statistics.mean(p[level] for p in probes) for level in probes[0]} if probes else {}
    return job, results


def finest_score(results):
    """The finest level's linear top-1 (mAP for multi-label data)."""
    record = list(results["levels"].values())[-1]
    return record["linear_top1"] if "linear_top1" in record else record["map"]


def coarsest(results, key):
    return list(results["levels"].values())[0][key]


def summary(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(better, worse):
    (mean_b, std_b), (mean_w, std_w) = summary(better), summary(worse)
    margin = max(std_b, std_w)
    if mean_b - mean_w > margin:
        return "holds"
    if mean_w - mean_b > margin:
        return "does not hold"
    return "within noise"


def cell(values):
    mean, std = summary(values)
    return f"{mean:.3f} ± {std:.3f}"


def claims(results):
    """[(claim, dataset, measure, favoured variant's values, other's values)]."""
    def values(name, dataset, fraction, measure):
        return [measure(r) for (n, d, f, _), r in results.items() if (n, d, f) == (name, dataset, fraction)]

    rows = []
    for dataset in ("hdigits", "shapes", "skdocs"):
        for level, index in (("coarse", 0), ("finest", -1)):
            def level_top1(r, index=index):
                return list(r["levels"].values())[index]["linear_top1"]

            rows.append(("MLCL beats SupCon", dataset, f"{level}-level linear top-1", "MLCL", "SupCon",
                         values("MLCL", dataset, 1.0, level_top1), values("SupCon", dataset, 1.0, level_top1)))
    rows.append(("MLCL beats SupCon", "hdigits-multilabel", "mAP", "MLCL", "SupCon",
                 values("MLCL", "hdigits-multilabel", 1.0, finest_score),
                 values("SupCon", "hdigits-multilabel", 1.0, finest_score)))

    def macro_f1(r):  # mAP is near 1 on hdigits-multilabel, so the thresholded F1 tells more apart
        return list(r["levels"].values())[0]["macro_f1"]

    rows.append(("MLCL beats SupCon", "hdigits-multilabel", "macro-F1", "MLCL", "SupCon",
                 values("MLCL", "hdigits-multilabel", 1.0, macro_f1), values("SupCon", "hdigits-multilabel", 1.0, macro_f1)))
    rows.append(("MLCL beats SupCon, without the CE term", "skdocs", "finest-level linear top-1", "MLCL without CE",
                 "SupCon", values("MLCL without CE", "skdocs", 1.0, finest_score),
                 values("SupCon", "skdocs", 1.0, finest_score)))
    rows.append(("... more so with little data (f = 0.1)", "hdigits", "finest-level linear top-1", "MLCL", "SupCon",
                 values("MLCL", "hdigits", 0.1, finest_score), values("SupCon", "hdigits", 0.1, finest_score)))
    rows.append(("A warmer superclass head (t = 0.5 vs 0.1) helps", "hdigits", "coarse-level linear top-1", "MLCL",
                 "MLCL cold coarse head", values("MLCL", "hdigits", 1.0, lambda r: coarsest(r, "linear_top1")),
                 values("MLCL cold coarse head", "hdigits", 1.0, lambda r: coarsest(r, "linear_top1"))))

    def probe_mean(r):
        return list(r["probe_mean"].values())[-1]

    rows.append(("MLCL converges faster", "hdigits", "mean kNN probe accuracy over training (fine level)", "MLCL",
                 "SupCon", values("MLCL", "hdigits", 1.0, probe_mean), values("SupCon", "hdigits", 1.0, probe_mean)))
    rows.append(("MLCL puts classes of one superclass together", "hdigits",
                 "share of classes whose nearest other class shares the superclass", "MLCL", "SupCon",
                 values("MLCL", "hdigits", 1.0, lambda r: list(r["embedding"]["coarse_neighbour_share"].values())[-1]),
                 values("SupCon", "hdigits", 1.0, lambda r: list(r["embedding"]["coarse_neighbour_share"].values())[-1])))
    for method in ("G-HMLC", "A-HMLC"):
        rows.append((f"{method} beats HMCE (by about 2 points)", "hdigits", "finest-level linear top-1", method, "HMCE",
                     values(method, "hdigits", 1.0, finest_score), values("HMCE", "hdigits", 1.0, finest_score)))
    rows.append(("A-HMLC >= G-HMLC", "hdigits", "finest-level linear top-1", "A-HMLC", "G-HMLC",
                 values("A-HMLC", "hdigits", 1.0, finest_score), values("G-HMLC", "hdigits", 1.0, finest_score)))
    for level in ("category", "class"):
        rows.append((f"G-HMLC separates the levels better than HMCE: {level}", "hdigits", f"silhouette ({level})",
                     "G-HMLC", "HMCE",
                     values("G-HMLC", "hdigits", 1.0, lambda r: r["embedding"]["silhouette"][level]),
                     values("HMCE", "hdigits", 1.0, lambda r: r["embedding"]["silhouette"][level])))
    rows.append(("G-HMLC has more variance in its embeddings", "hdigits", "participation ratio of the test features",
                 "G-HMLC", "HMCE", values("G-HMLC", "hdigits", 1.0, lambda r: r["embedding"]["participation_ratio"]),
                 values("HMCE", "hdigits", 1.0, lambda r: r["embedding"]["participation_ratio"])))
    return rows


def details(results):
    """One line per (variant, dataset, fraction): every number behind the claims, mean ± std over seeds."""
    groups = {}
    for (name, dataset, fraction, _), r in results.items():
        groups.setdefault((dataset, fraction, name), []).append(r)
    lines = ["| dataset | f | variant | linear top-1 per level (mAP: multi-label) | silhouette per level | "
             "coarse-neighbour share (chance) | participation ratio | consistency | mistake severity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (dataset, fraction, name), records in sorted(groups.items()):
        levels = list(records[0]["levels"])
        linear = " / ".join(cell([r["levels"][lv].get("linear_top1", r["levels"][lv].get("map")) for r in records])
                            for lv in levels)
        embedding = [r["embedding"] for r in records]
        silhouettes = " / ".join(cell([e["silhouette"][lv] for e in embedding]) for lv in embedding[0].get("silhouette", {}))
        shares = " / ".join(f"{cell([e['coarse_neighbour_share'][lv] for e in embedding])} "
                            f"({embedding[0]['coarse_neighbour_chance'][lv]:.2f})"
                            for lv in embedding[0].get("coarse_neighbour_share", {}))
        ratio = cell([e["participation_ratio"] for e in embedding])
        hierarchy = [r.get("probe_hierarchy") for r in records]
        consistency = " / ".join(cell([h["consistency"][pair] for h in hierarchy]) for pair in hierarchy[0]["consistency"]) \
            if hierarchy[0] else ""
        severity = cell([h["mistake_severity"] for h in hierarchy]) if hierarchy[0] else ""
        lines.append(f"| {dataset} | {fraction:g} | {name} | {linear} | {silhouettes} | {shares} | {ratio} | "
                     f"{consistency} | {severity} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each")
    p.add_argument("--runs", default="runs/claims", help="folder for the individual runs")
    p.add_argument("--markdown", default="bench/claims.md")
    p.add_argument("--figures", default="bench/figures", help="folder for the t-SNE maps and convergence curves")
    args = p.parse_args()
    runs = os.path.join(ROOT, args.runs)
    started, results = time.time(), {}
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per run, so that --jobs runs share the cores
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for job, record in pool.map(lambda job: run(job, runs), list(jobs(args.seeds))):
            results[job] = record
            print(f"[{time.time() - started:5.0f}s] {job[0]} {job[1]} f={job[2]:g} seed {job[3]}: "
                  f"{finest_score(record):.3f}", flush=True)
    lines = [f"Command: `python bench/claims.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, {args.jobs} runs at a time; seeds {args.seeds}; "
             f"{time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             "| claim | data | measure | favoured | other | verdict |", "|---|---|---|---|---|---|"]
    for claim, dataset, measure, favoured, other, better, worse in claims(results):
        lines.append(f"| {claim} | {dataset} | {measure} | {favoured} {cell(better)} | {other} {cell(worse)} | "
                     f"{verdict(better, worse)} |")
    lines += ["", *details(results)]
    with open(os.path.join(ROOT, args.markdown), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    figures(runs, args.seeds, args.figures)


def figures(runs, seeds, folder):
    """The papers' pictures from these runs: t-SNE maps of seed 0's test embeddings (MLCL's Fig. 3/5,
    Ott et al.'s Fig. 4) and the convergence curves of SupCon and MLCL over every seed."""
    def checkpoint(name):
        return os.path.join(run_folder(runs, name, "hdigits", 1.0, seeds[0]), "checkpoint.pt")

    for tag, names in (("supcon-mlcl", ["SupCon", "MLCL"]), ("hmce-ghmlc-ahmlc", ["HMCE", "G-HMLC", "A-HMLC"])):
        subprocess.run([sys.executable, "bench/tsne.py", *map(checkpoint, names), "--titles", *names, "--device", "cpu",
                        "--out", os.path.join(folder, f"tsne-{tag}")], cwd=ROOT, check=True)
    curves = [run_folder(runs, name, "hdigits", 1.0, seed) for name in ("SupCon", "MLCL") for seed in seeds]
    subprocess.run([sys.executable, "bench/curves.py", *curves, "--out", os.path.join(folder, "curves-supcon-mlcl.png")],
                   cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
