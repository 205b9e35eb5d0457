"""Compare method variants over seeds and training fractions at the same budget; write a markdown table.

Each variant is `NAME=SCRIPT [ARGS...]`; every (variant, fraction, seed) is one run of the script, all
with the same dataset, epochs and batch size. The table gives linear top-1 per level as mean ± std over
seeds, the raw-input floor, and each variant's training throughput relative to the first variant.

    python bench/compare.py --variant SupCon=supcon.py --variant MLCL=mlcl.py \\
        --fractions 0.1 0.25 1.0 --seeds 0 1 2 --markdown bench/mlcl_vs_supcon.md
"""

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(script_args, fraction, seed, out, common):
    results_path = os.path.join(out, "results.json")
    if not os.path.exists(results_path):  # finished runs are reused, so an interrupted sweep can go on
        if os.path.exists(out):
            subprocess.run(["rm", "-rf", out], check=True)
        command = [sys.executable, *script_args, "--fraction", str(fraction), "--seed", str(seed), "--out", out, *common]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(results_path) as f:
        results = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [record for record in map(json.loads, f) if "views_per_s" in record]  # not the probe lines
    results["views_per_s"] = statistics.mean(e["views_per_s"] for e in epochs)
    return results


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, help="NAME=SCRIPT.py [ARGS...]")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--common", default="", help="arguments given to every run, e.g. '--epochs 8'")
    p.add_argument("--runs", default="runs/bench", help="folder for the individual runs")
    p.add_argument("--markdown", required=True, help="file the table is written to")
    args = p.parse_args()
    variants = []
    for spec in args.variant:
        match = re.match(r"(.+)=(\S+\.py\b.*)$", spec)  # the name may hold "=", the script ends in .py
        if not match:
            p.error(f"--variant must look like NAME=SCRIPT.py [ARGS...], got {spec!r}")
        variants.append((match.group(1), shlex.split(match.group(2))))
    common = shlex.split(args.common)

    rows, started = [], time.time()
    for fraction in args.fractions:
        speed_of_first = None
        for name, script_args in variants:
            runs = []
            for seed in args.seeds:
                tag = "-".join([name, f"f{fraction}", f"s{seed}"]).replace(" ", "_").replace("/", "_")
                runs.append(run_once(script_args, fraction, seed, os.path.join(ROOT, args.runs, tag), common))
                print(f"[{time.time() - started:6.0f}s] {name} fraction {fraction} seed {seed}: "
                      + ", ".join(f"{level} {r['linear_top1']:.3f}" for level, r in runs[-1]["levels"].items()), flush=True)
            speed = statistics.mean(r["views_per_s"] for r in runs)
            speed_of_first = speed_of_first or speed
            levels = runs[0]["levels"].keys()
            rows.append([name, f"{fraction:g}"]
                        + [mean_std([r["levels"][level]["linear_top1"] for r in runs]) for level in levels]
                        + [" / ".join(f"{min(r['levels'][level]['linear_top1'] for r in runs):.3f}" for level in levels)]
                        + [mean_std([r["levels"][level]["raw_linear_top1"] for r in runs]) for level in levels]
                        + [f"{speed_of_first / speed:.2f}"])

    header = ["variant", "fraction"] + [f"{level} linear top-1" for level in levels] + ["worst seed"] \
        + [f"{level} raw-pixel floor" for level in levels] + ["step time vs first"]
    command = "python bench/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"Command: `{command}`", "",
             f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores; seeds {args.seeds}; "
             f"{time.strftime('%Y-%m-%d')}; {time.time() - started:.0f} s in all.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    with open(args.markdown, "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
