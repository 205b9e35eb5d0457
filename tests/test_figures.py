"""Tests of the pictures: linear_eval's t-SNE maps (colours, files, the side-by-side layout, the --plot
command line) and bench/curves.py's convergence curves and tables."""

import colorsys
import importlib.util
import json
import os

import pytest
import torch
from PIL import Image

import data
import linear_eval
from conftest import ROOT

spec = importlib.util.spec_from_file_location("curves", os.path.join(ROOT, "bench", "curves.py"))
curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curves)

TINY = data.DatasetInfo("tiny", "image", ["category", "class"], [3, 6], False, [list("abc"), list("uvwxyz")])


def tiny_embeddings(n=60, seed=0):
    """Targets of 6 fine classes under 3 categories and features clustered by fine class."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.arange(n) % 6
    targets = torch.stack([fine // 2, fine], dim=1)
    return targets, 4 * torch.randn(6, 8, generator=g)[fine] + torch.randn(n, 8, generator=g)


def hue(colour):
    return colorsys.rgb_to_hsv(*(channel / 255 for channel in colour.tolist()))[0]


def test_class_colours_give_siblings_shades_of_their_parent_hue():
    """Coarse classes get distinct hues; each fine class's hue lies within its parent's band (1/3 of the
    wheel for 3 categories, so within 1/6 of the parent's hue) and siblings differ; absent classes are grey."""
    targets, _ = tiny_embeddings()
    coarse = linear_eval.class_colours(targets, 0, 3)
    fine = linear_eval.class_colours(targets, 1, 6)
    assert len({tuple(colour.tolist()) for colour in coarse}) == 3
    assert len({tuple(colour.tolist()) for colour in fine}) == 6
    for fine_class in range(6):
        distance = abs(hue(fine[fine_class]) - hue(coarse[fine_class // 2]))
        assert min(distance, 1 - distance) < 1 / 6
    assert linear_eval.class_colours(targets[targets[:, 1] != 5], 1, 6)[5].tolist() == [128, 128, 128]


def test_plot_embeddings_writes_each_map_and_the_side_by_side_figure(tmp_path):
    """A map per (title, level) and tsne.png with a row per level and a column per title, all readable PNGs."""
    targets, features = tiny_embeddings()
    embeddings = {"supcon": features, "mlcl": features.flip(1)}
    written = linear_eval.plot_embeddings(embeddings, targets, TINY, str(tmp_path), max_points=40)
    names = [os.path.basename(path) for path in written]
    assert names == ["tsne-supcon-category.png", "tsne-supcon-class.png", "tsne-mlcl-category.png",
                     "tsne-mlcl-class.png", "tsne.png"]
    single = Image.open(written[0])
    assert single.format == "PNG" and single.mode == "RGB" and single.width == linear_eval.PANEL
    assert single.convert("L").getextrema()[0] < 200  # something is drawn on the white
    figure = Image.open(tmp_path / "tsne.png")
    assert figure.width == 120 + 2 * (linear_eval.PANEL + 8)  # the level names' margin and two columns
    assert figure.height > 36 + 2 * (linear_eval.PANEL + 8)  # the titles, two rows and the legend


def test_plot_embeddings_rejects_bad_input(tmp_path):
    targets, features = tiny_embeddings()
    multilabel = data.DatasetInfo("tags", "image", ["labels"], [4], True, [list("abcd")])
    with pytest.raises(ValueError, match="multi-label"):
        linear_eval.plot_embeddings({"a": features}, targets, multilabel, str(tmp_path))
    with pytest.raises(ValueError, match="59 features but 60 targets"):
        linear_eval.plot_embeddings({"a": features[1:]}, targets, TINY, str(tmp_path))
    with pytest.raises(ValueError, match="no embeddings"):
        linear_eval.plot_embeddings({}, targets, TINY, str(tmp_path))


def test_plot_command_line_on_two_checkpoints(tmp_path):
    """--plot on two untrained hdigits checkpoints of one method: the columns are told apart by their run
    folders, and no probe runs (no results.json)."""
    import supcon

    checkpoints = []
    for run in ("run-a", "run-b"):
        args = supcon.parse_args(["--out", str(tmp_path / run)])
        model = supcon.build_model(args, data.load("hdigits", split="test").info)
        os.makedirs(tmp_path / run)
        torch.save({"method": "supcon", "method_file": "supcon.py", "config": vars(args), "model": model.state_dict()},
                   tmp_path / run / "checkpoint.pt")
        checkpoints.append(str(tmp_path / run / "checkpoint.pt"))
    written = linear_eval.main(["--checkpoint", *checkpoints, "--plot", str(tmp_path / "figures"), "--max-points",
                                "150", "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "figures")) == sorted(os.path.basename(path) for path in written)
    assert "tsne-supcon_run-a-class.png" in os.listdir(tmp_path / "figures")
    assert not (tmp_path / "run-a" / "results.json").exists()


def fabricate_run(folder, config, probes):
    """A run folder with config.json and metrics.jsonl: an epoch line, then a probe line per (step, scores)."""
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    for epoch, (step, scores) in enumerate(probes, start=1):
        lines.append({"epoch": epoch, "loss": 4.0 / epoch, "lr": 0.1})
        lines.append({"epoch": epoch, "step": step, "probe_knn_top1": scores})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder)


def test_curves_table_and_png(tmp_path, capsys):
    """Two fabricated runs: the method comes from the default folder name or from config.json, the table
    holds each run's accuracy at each step ('-' where a run has none), and the PNG is written."""
    supcon_run = fabricate_run(tmp_path / "hdigits-supcon-0-20250101-120000", {"dataset": "hdigits", "seed": 0},
                               [(39, {"category": 0.5, "class": 0.25}), (78, {"category": 0.75, "class": 0.5})])
    mlcl_run = fabricate_run(tmp_path / "my-run", {"dataset": "hdigits", "seed": 1, "method": "mlcl"},
                             [(39, {"category": 0.625, "class": 0.375}), (117, {"category": 0.875, "class": 0.625})])
    out = tmp_path / "curves.png"
    curves.main([supcon_run, mlcl_run, "--out", str(out)])
    tables = {}
    for block in capsys.readouterr().out.split("\n\n")[:-1]:
        title, header, *rows = block.strip("\n").splitlines()
        assert header.split() == ["step", "supcon", "seed", "0", "mlcl", "seed", "1"]
        tables[title.split()[0]] = {int(row.split()[0]): row.split()[1:] for row in rows}
    assert tables == {"category": {39: ["0.5000", "0.6250"], 78: ["0.7500", "-"], 117: ["-", "0.8750"]},
                      "class": {39: ["0.2500", "0.3750"], 78: ["0.5000", "-"], 117: ["-", "0.6250"]}}
    image = Image.open(out)
    assert image.format == "PNG" and image.width == 2 * curves.PANEL_WIDTH  # a panel per level


def test_curves_reject_a_run_without_probe_lines(tmp_path):
    run = fabricate_run(tmp_path / "run", {"dataset": "hdigits"}, [])
    with pytest.raises(ValueError, match="no probe_knn_top1"):
        curves.read_run(run)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        curves.read_run(str(tmp_path))
