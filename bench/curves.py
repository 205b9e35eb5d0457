"""Convergence curves: the probe's accuracy per level against the training step, one panel per level and
one line per run (the runs of one method share a colour), from the `probe_knn_top1` lines that the method
files append to each run's metrics.jsonl ({"epoch": E, "step": S, "probe_knn_top1": {level: top-1}}).

    python bench/curves.py runs/hdigits-supcon-0-... runs/hdigits-mlcl-0-... --out curves.png

Also prints, per level, a table of every run's accuracy at each step.
"""

import argparse
import json
import math
import os
import sys

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import tsne  # noqa: E402  (bench/tsne.py, beside this file: the figures' font and PNG writer)

METHOD_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127)]
PANEL_WIDTH, PANEL_HEIGHT = 560, 380
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 44  # room around a panel's plot area for its title and tick labels


def run_method(run_dir, config):
    """A run's method: config.json's "method" where it has one, else checkpoint.pt's, else the name the
    method files give a run folder by default (DATASET-METHOD-SEED-TIME), else the folder's name."""
    if "method" in config:
        return config["method"]
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    if os.path.isfile(checkpoint):
        return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["method"]
    name = os.path.basename(os.path.normpath(run_dir))
    prefix = f"{config.get('dataset')}-"
    return name[len(prefix):].split("-")[0] if name.startswith(prefix) else name


def read_run(run_dir):
    """{"method", "label", "curves": {level: [(step, top-1), ...] by step}} of one run folder; where a resumed
    run logged a step twice, the later line counts."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise ValueError(f"{run_dir} holds no metrics.jsonl")
    config_path = os.path.join(run_dir, "config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            config = json.load(f)
    by_level = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            for level, accuracy in record.get("probe_knn_top1", record.get("probe_knn_map", {})).items():
                by_level.setdefault(level, {})[record["step"]] = accuracy
    if not by_level:
        raise ValueError(f"{metrics_path} holds no probe_knn_top1 lines (was the run trained with the probe on?)")
    method = run_method(run_dir, config)
    label = f"{method} seed {config['seed']}" if "seed" in config else method
    curves = {level: sorted(points.items()) for level, points in by_level.items()}
    return {"method": method, "label": label, "curves": curves}


def read_runs(run_dirs):
    """read_run of each folder; runs that would share a label get their folder's name added to it."""
    runs = [read_run(run_dir) for run_dir in run_dirs]
    labels = [run["label"] for run in runs]
    for run, run_dir in zip(runs, run_dirs):
        if labels.count(run["label"]) > 1:
            run["label"] += f" ({os.path.basename(os.path.normpath(run_dir))})"
    return runs


def levels_of(runs):
    """The levels of all runs, in the order they first appear."""
    return list(dict.fromkeys(level for run in runs for level in run["curves"]))


def table(runs, level):
    """The text table of one level: a row per step, a column per run ('-' where a run has no value)."""
    steps = sorted({step for run in runs for step, _ in run["curves"].get(level, [])})
    widths = [max(8, len(run["label"])) for run in runs]
    lines = [f"{level} (probe kNN top-1)", f"{'step':>8}  " + "  ".join(
        f"{run['label']:>{width}}" for run, width in zip(runs, widths))]
    for step in steps:
        cells = [dict(run["curves"].get(level, [])).get(step) for run in runs]
        lines.append(f"{step:>8}  " + "  ".join("-".rjust(width) if value is None else f"{value:>{width}.4f}"
                                                 for value, width in zip(cells, widths)))
    return "\n".join(lines)


def nice_ticks(low, high, count=5):
    """About `count` round tick values covering [low, high]."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)]


def draw_panel(level, runs, colours):
    """One level's panel: accuracy (y) against step (x), a line with dots per run."""
    points = [point for run in runs for point in run["curves"].get(level, [])]
    max_step = max(step for step, _ in points) or 1
    low = max(0.0, math.floor(min(value for _, value in points) * 10) / 10)
    high = min(1.0, math.ceil(max(value for _, value in points) * 10) / 10)
    low, high = (low, high) if high > low else (max(0.0, high - 0.1), max(high, 0.1))
    panel = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT), "white")
    draw = ImageDraw.Draw(panel)
    width, height = PANEL_WIDTH - LEFT - RIGHT, PANEL_HEIGHT - TOP - BOTTOM

    def at(step, value):
        return LEFT + step / max_step * width, TOP + (1 - (value - low) / (high - low)) * height

    small = tsne.font(14)
    for value in nice_ticks(low, high):
        y = at(0, value)[1]
        draw.line((LEFT, y, LEFT + width, y), fill=(225, 225, 225))
        draw.text((LEFT - 6, y), f"{value:.2f}", fill="black", font=small, anchor="rm")
    for step in nice_ticks(0, max_step):
        x = at(step, low)[0]
        draw.line((x, TOP + height, x, TOP + height + 4), fill="black")
        draw.text((x, TOP + height + 6), f"{step:g}", fill="black", font=small, anchor="mt")
    draw.rectangle((LEFT, TOP, LEFT + width, TOP + height), outline="black")
    draw.text((LEFT + width // 2, TOP + height + 24), "step", fill="black", font=small, anchor="mt")
    draw.text((LEFT + width // 2, TOP // 2), f"{level}: probe kNN top-1", fill="black", font=tsne.font(18),
              anchor="mm")
    for run in runs:
        xy = [at(step, value) for step, value in run["curves"].get(level, [])]
        if len(xy) > 1:  # drawn with PIL: torchvision's draw_keypoints draws its connecting lines in white
            draw.line(xy, fill=colours[run["method"]], width=2, joint="curve")
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[run["method"]])
    return panel


def draw_curves(runs, out_path):
    """Write the panels side by side with a legend of the runs underneath; returns the path."""
    methods = list(dict.fromkeys(run["method"] for run in runs))
    colours = {method: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, method in enumerate(methods)}
    levels = levels_of(runs)
    legend_height = 12 + 24 * len(runs)
    figure = Image.new("RGB", (PANEL_WIDTH * len(levels), PANEL_HEIGHT + legend_height), "white")
    for index, level in enumerate(levels):
        figure.paste(draw_panel(level, runs, colours), (index * PANEL_WIDTH, 0))
    draw = ImageDraw.Draw(figure)
    for row, run in enumerate(runs):
        y = PANEL_HEIGHT + 8 + 24 * row
        draw.line((LEFT, y + 8, LEFT + 30, y + 8), fill=colours[run["method"]], width=3)
        draw.text((LEFT + 40, y + 8), run["label"], fill="black", font=tsne.font(16), anchor="lm")
    return tsne.write_png(figure, out_path)


def main(argv=None):
    """Draw the curves of the given run folders and print their tables."""
    p = argparse.ArgumentParser(description="Probe accuracy per level against training steps, one line per run")
    p.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl (and config.json)")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    args = p.parse_args(argv)
    runs = read_runs(args.runs)
    for level in levels_of(runs):
        print(table(runs, level) + "\n")
    print(f"wrote {draw_curves(runs, args.out)}")


if __name__ == "__main__":
    main()
