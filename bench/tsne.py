"""t-SNE maps of checkpoints' test embeddings, the papers' pictures (MLCL's Fig. 3/5, Ott et al.'s Fig. 4).

One command per figure; the checkpoints are of one dataset, a column each. tsne.png holds a row per level
and a column per checkpoint, tsne-TITLE-LEVEL.png each map on its own; the fine level is coloured in shades
of its coarse class's hue. No probe runs.

    python bench/tsne.py runs/claims/hdigits-HMCE-f1-s0/checkpoint.pt runs/claims/hdigits-G-HMLC-f1-s0/checkpoint.pt \\
        runs/claims/hdigits-A-HMLC-f1-s0/checkpoint.pt --out bench/figures/tsne-hmce-ghmlc-ahmlc

A column's title is the method's name in the papers (hmlc_gmm with --mask none is their HMCE), with the
run folder added where two columns share one; --titles sets them.
"""

import argparse
import colorsys
import os
import re
import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import linear_eval  # noqa: E402  (needs the repository root on the path)

PANEL = 420  # pixels per side of one map
METHOD_TITLES = {"supcon": "SupCon", "mlcl": "MLCL", "hmlc_gmm": "G-HMLC", "hmlc_attention": "A-HMLC"}


def font(size):
    """Pillow's bundled scalable font at `size` pixels (no font file needed)."""
    return ImageFont.load_default(size)


def class_colours(targets, level, num_classes):
    """RGB colours [num_classes, 3] for one level's classes: each coarsest class has its own hue, and the
    classes below it take lighter and darker shades of that hue, so a picture coloured by fine class still
    shows the coarse groups. Classes absent from `targets` [N, L] are grey."""
    roots = linear_eval.class_paths(targets, level, num_classes)[:, 0]
    root_ids = roots[roots >= 0].unique().tolist()
    colours = torch.full((num_classes, 3), 128, dtype=torch.uint8)
    for hue_index, root in enumerate(root_ids):
        members = (roots == root).nonzero().flatten().tolist()
        for rank, member in enumerate(members):
            shade = rank / max(1, len(members) - 1)  # 0 .. 1 across the siblings
            hue = (hue_index + 0.4 * (shade - 0.5)) / len(root_ids)
            red, green, blue = colorsys.hsv_to_rgb(hue % 1.0, 1.0 - 0.3 * shade, 1.0 - 0.5 * shade)
            colours[member] = torch.tensor([round(255 * red), round(255 * green), round(255 * blue)])
    return colours


def tsne_map(features, seed=0):
    """2-D t-SNE coordinates [N, 2] of L2-normalised `features` [N, D] (fixed seed)."""
    features = F.normalize(features.double(), dim=1).numpy()
    perplexity = min(30.0, (len(features) - 1) / 3)
    # torch's OpenMP threads keep spinning beside scikit-learn's own OpenMP pool, which then runs t-SNE
    # many times slower than on one thread.
    with threadpool_limits(1, user_api="openmp"):
        layout = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    return torch.from_numpy(layout)


def scatter_panel(coordinates, colours, size=PANEL, radius=3):
    """A white size x size image of the points at `coordinates` [N, 2] in `colours` [N, 3], drawn in the
    given order. One scale for both axes, so that distances read alike across and down the map: the larger
    range fills the panel, the smaller one is centred."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    low, high = coordinates.min(0).values, coordinates.max(0).values
    scale = (size - 2 * radius - 4) / (high - low).max().clamp(min=1e-12)
    pixels = size / 2 + (coordinates - (low + high) / 2) * scale
    for (x, y), colour in zip(pixels.tolist(), colours.tolist()):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=tuple(colour))
    return image


def plot_embeddings(embeddings, targets, info, out_dir, max_points=2000, seed=0):
    """Write t-SNE maps of test embeddings into `out_dir`; returns the paths written.

    `embeddings`: {column title: test features [N, D]}, all of the same test set with hierarchical
    `targets` [N, L] and `info`. At most `max_points` samples (drawn with `seed`, the same for every
    column) are mapped. Writes tsne-TITLE-LEVEL.png per column and level, and tsne.png with one row per
    level and one column per title (the papers' layout); colours follow class_colours.
    """
    if info.multilabel:
        raise ValueError(f"the maps are coloured by hierarchical labels; {info.name} is multi-label")
    if not embeddings:
        raise ValueError("no embeddings to plot")
    for title, features in embeddings.items():
        if len(features) != len(targets):
            raise ValueError(f"{title}: {len(features)} features but {len(targets)} targets")
    keep = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))[:max_points]
    targets = targets.cpu()  # colours come from all of them, so that a class's shade does not depend on the draw
    colours = [class_colours(targets, level, k)[targets[keep, level]] for level, k in enumerate(info.num_classes)]
    os.makedirs(out_dir, exist_ok=True)
    written, panels = [], {}
    for title, features in embeddings.items():
        coordinates = tsne_map(features[keep].cpu(), seed)
        for level, name in enumerate(info.level_names):
            panel = scatter_panel(coordinates, colours[level])
            panels[title, name] = panel
            single = Image.new("RGB", (PANEL, PANEL + 30), "white")
            single.paste(panel, (0, 30))
            caption = f"{title}: {info.name}, coloured by {name}"
            ImageDraw.Draw(single).text((8, 4), caption, fill="black", font=font(18))
            written.append(write_png(single, os.path.join(out_dir, f"tsne-{file_part(title)}-{file_part(name)}.png")))
    figure = figure_grid(panels, list(embeddings), info, targets)
    written.append(write_png(figure, os.path.join(out_dir, "tsne.png")))
    return written


def figure_grid(panels, titles, info, targets, gap=8, header=36, margin=120):
    """The side-by-side figure: a column per title, a row per level, names on the top and on the left, and
    the coarsest level's colours as a legend underneath."""
    legend = legend_strip(f"{info.level_names[0]}:", class_colours(targets, 0, info.num_classes[0]),
                          info.label_names[0], targets[:, 0].unique().tolist(), margin + len(titles) * (PANEL + gap))
    height = header + len(info.level_names) * (PANEL + gap) + legend.height
    figure = Image.new("RGB", (margin + len(titles) * (PANEL + gap), height), "white")
    draw = ImageDraw.Draw(figure)
    for column, title in enumerate(titles):
        draw.text((margin + column * (PANEL + gap) + PANEL // 2, header // 2), title, fill="black", font=font(22),
                  anchor="mm")
    for row, name in enumerate(info.level_names):
        top = header + row * (PANEL + gap)
        draw.text((margin - 10, top + PANEL // 2), name, fill="black", font=font(22), anchor="rm")
        for column, title in enumerate(titles):
            left = margin + column * (PANEL + gap)
            figure.paste(panels[title, name], (left, top))
            draw.rectangle((left, top, left + PANEL - 1, top + PANEL - 1), outline=(200, 200, 200))
    figure.paste(legend, (0, height - legend.height))
    return figure


def legend_strip(heading, colours, names, present, width, size=16):
    """`heading`, then swatches and names of the classes in `present`, wrapped into lines of `width` pixels."""
    entries = [(colours[index], str(names[index])[:20]) for index in present]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    indent = 16 + int(measure.textlength(heading, font=font(size)))
    lines, line, used = [], [], indent
    for colour, name in entries:
        entry_width = size + 6 + int(measure.textlength(name, font=font(size))) + 16
        if line and used + entry_width > width:
            lines.append(line)
            line, used = [], indent
        line.append((colour, name, used))
        used += entry_width
    lines.append(line)
    strip = Image.new("RGB", (width, 10 + len(lines) * (size + 8)), "white")
    draw = ImageDraw.Draw(strip)
    draw.text((8, 4 + size // 2), heading, fill="black", font=font(size), anchor="lm")
    for row, line in enumerate(lines):
        top = 4 + row * (size + 8)
        for colour, name, left in line:
            draw.rectangle((left, top, left + size, top + size), fill=tuple(colour.tolist()))
            draw.text((left + size + 6, top + size // 2), name, fill="black", font=font(size), anchor="lm")
    return strip


def file_part(text):
    """`text` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def write_png(image, path):
    """Write a PIL image as a PNG (with Pillow: torchvision 0.29 deprecates its image encoders); returns the path."""
    image.save(path, format="PNG")
    return path


def method_title(method, config):
    """A method file's name for its method in the papers; hmlc_gmm without masks is their HMCE baseline."""
    if method == "hmlc_gmm" and getattr(config, "mask", None) == "none":
        return "HMCE"
    return METHOD_TITLES.get(method, method)


def column_titles(paths, runs, titles=None):
    """Each checkpoint's column title: `titles` if given, else method_title; the run folder is added to a
    title that two columns share."""
    titles = titles or [method_title(state["method"], config) for state, config, _ in runs]
    return [f"{title} ({os.path.basename(os.path.dirname(os.path.abspath(path)))})" if titles.count(title) > 1
            else title for title, path in zip(titles, paths)]


def plot_checkpoints(paths, out_dir, device, titles=None, data_dir=None, max_points=2000):
    """plot_embeddings for the test embeddings of checkpoints of one dataset, a column each, titled by
    column_titles; returns the paths written."""
    runs = [linear_eval.read_checkpoint(path) for path in paths]
    datasets = sorted({config.dataset for _, config, _ in runs})
    if len(datasets) > 1:
        raise ValueError(f"a figure holds one dataset; the checkpoints hold {', '.join(datasets)}")
    titles = column_titles(paths, runs, titles)
    if len(set(titles)) < len(titles):  # two checkpoints of one run folder
        raise ValueError(f"two columns would share a title in {', '.join(titles)}; give --titles")
    embeddings = {}
    for title, (state, config, method) in zip(titles, runs):
        test_set = linear_eval.load_split(config, data_dir, "test")
        model = method.build_model(config, test_set.info)
        model.load_state_dict(state["model"])
        embeddings[title] = linear_eval.extract_features(model.encoder.to(device), test_set, device)
    return plot_embeddings(embeddings, test_set.targets.cpu(), test_set.info, out_dir, max_points)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint.pt files of one dataset")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for tsne.png and the single maps")
    p.add_argument("--titles", nargs="+", metavar="TITLE",
                   help="a column title per checkpoint (default: the method's name in the papers)")
    p.add_argument("--max-points", type=int, default=2000, help="at most this many test samples per map (default 2000)")
    p.add_argument("--data-dir", default=None, help="override the dataset folder stored in the checkpoints")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.max_points < 2:
        p.error(f"--max-points must be at least 2, got {args.max_points}")
    if args.titles and len(args.titles) != len(args.checkpoints):
        p.error(f"--titles needs one title per checkpoint: {len(args.checkpoints)} checkpoints, "
                f"{len(args.titles)} titles")
    device = linear_eval.checked_device(p, args.checkpoints, args.device)
    written = plot_checkpoints(args.checkpoints, args.out, device, args.titles, args.data_dir, args.max_points)
    print("wrote " + " ".join(written))
    return written


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None
    except (OSError, ValueError) as error:  # an output folder that cannot be written, checkpoints of two datasets
        raise SystemExit(f"error: {error}") from None
