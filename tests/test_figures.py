"""Tests of the pictures: bench/tsne.py's t-SNE maps (colours, aspect, files, the side-by-side layout, column
titles, its command line) and bench/curves.py's convergence curves and tables."""

import colorsys
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import curves  # noqa: E402  (bench/curves.py)
import tsne  # noqa: E402  (bench/tsne.py)

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
    coarse = tsne.class_colours(targets, 0, 3)
    fine = tsne.class_colours(targets, 1, 6)
    assert len({tuple(colour.tolist()) for colour in coarse}) == 3
    assert len({tuple(colour.tolist()) for colour in fine}) == 6
    for fine_class in range(6):
        distance = abs(hue(fine[fine_class]) - hue(coarse[fine_class // 2]))
        assert min(distance, 1 - distance) < 1 / 6
    assert tsne.class_colours(targets[targets[:, 1] != 5], 1, 6)[5].tolist() == [128, 128, 128]


def test_plot_embeddings_writes_each_map_and_the_side_by_side_figure(tmp_path):
    """A map per (title, level) and tsne.png with a row per level and a column per title, all readable PNGs."""
    targets, features = tiny_embeddings()
    embeddings = {"supcon": features, "mlcl": features.flip(1)}
    written = tsne.plot_embeddings(embeddings, targets, TINY, str(tmp_path), max_points=40)
    names = [os.path.basename(path) for path in written]
    assert names == ["tsne-supcon-category.png", "tsne-supcon-class.png", "tsne-mlcl-category.png",
                     "tsne-mlcl-class.png", "tsne.png"]
    single = Image.open(written[0])
    assert single.format == "PNG" and single.mode == "RGB" and single.width == tsne.PANEL
    assert single.convert("L").getextrema()[0] < 200  # something is drawn on the white
    figure = Image.open(tmp_path / "tsne.png")
    assert figure.width == 120 + 2 * (tsne.PANEL + 8)  # the level names' margin and two columns
    assert figure.height > 36 + 2 * (tsne.PANEL + 8)  # the titles, two rows and the legend


def test_plot_embeddings_rejects_bad_input(tmp_path):
    targets, features = tiny_embeddings()
    multilabel = data.DatasetInfo("tags", "image", ["labels"], [4], True, [list("abcd")])
    with pytest.raises(ValueError, match="multi-label"):
        tsne.plot_embeddings({"a": features}, targets, multilabel, str(tmp_path))
    with pytest.raises(ValueError, match="59 features but 60 targets"):
        tsne.plot_embeddings({"a": features[1:]}, targets, TINY, str(tmp_path))
    with pytest.raises(ValueError, match="no embeddings"):
        tsne.plot_embeddings({}, targets, TINY, str(tmp_path))


def test_scatter_panel_keeps_the_aspect_and_centres_the_narrow_range():
    """Points twice as wide as tall: the x range fills the panel, the y range half of it, in the middle."""
    coordinates = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 0.5], [0.0, 1.0], [2.0, 0.0]])
    panel = tsne.scatter_panel(coordinates, torch.zeros(5, 3, dtype=torch.uint8), size=200, radius=3)
    left, top, right, bottom = Image.eval(panel.convert("L"), lambda value: 255 - value).getbbox()
    assert left <= 2 and 200 - right <= 2  # the panel's width, less a margin of the radius and 2 pixels
    assert abs(top - (200 - bottom)) <= 1 and 95 <= bottom - top <= 105  # half its height (95 + a dot), centred


def test_column_titles_name_the_papers_methods():
    """hmlc_gmm without masks is HMCE; a title two columns share gets the run folder; --titles wins."""
    def run(method, mask=None):
        return {"method": method}, SimpleNamespace(mask=mask), None

    runs = [run("hmlc_gmm", "none"), run("hmlc_gmm", "gmm"), run("hmlc_attention"), run("supcon"), run("mlcl")]
    paths = [f"runs/{name}/checkpoint.pt" for name in "abcde"]
    assert tsne.column_titles(paths, runs) == ["HMCE", "G-HMLC", "A-HMLC", "SupCon", "MLCL"]
    assert tsne.column_titles(paths[:2], [run("supcon")] * 2) == ["SupCon (a)", "SupCon (b)"]
    assert tsne.column_titles(paths[:2], runs[:2], ["one", "two"]) == ["one", "two"]


def untrained_checkpoints(folder, runs=("run-a", "run-b"), **changes):
    """Untrained hdigits supcon checkpoints, one per run folder, with `changes` set in each; their paths."""
    import supcon

    paths = []
    for run in runs:
        args = supcon.parse_args(["--out", str(folder / run)])
        model = supcon.build_model(args, data.load("hdigits", split="test").info)
        os.makedirs(folder / run)
        state = {"method": "supcon", "method_file": "supcon.py", "config": vars(args), "model": model.state_dict()}
        torch.save({**state, **changes}, folder / run / "checkpoint.pt")
        paths.append(str(folder / run / "checkpoint.pt"))
    return paths


def test_tsne_command_line_on_two_checkpoints(tmp_path):
    """Two untrained hdigits checkpoints of one method: the columns are told apart by their run folders, or
    titled by --titles, and no probe runs (no results.json)."""
    checkpoints = untrained_checkpoints(tmp_path)
    written = tsne.main([*checkpoints, "--out", str(tmp_path / "figures"), "--max-points", "150", "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "figures")) == sorted(os.path.basename(path) for path in written)
    assert "tsne-SupCon_run-a-class.png" in os.listdir(tmp_path / "figures")
    assert not (tmp_path / "run-a" / "results.json").exists()
    written = tsne.main([*checkpoints, "--titles", "early", "late", "--out", str(tmp_path / "titled"),
                         "--max-points", "150", "--device", "cpu"])
    assert [os.path.basename(path) for path in written] == ["tsne-early-category.png", "tsne-early-class.png",
                                                            "tsne-late-category.png", "tsne-late-class.png", "tsne.png"]


def test_tsne_command_line_refuses_in_one_line(tmp_path, capsys):
    """A title count that is not the checkpoint count, and a method file that is not here: one line each."""
    checkpoints = untrained_checkpoints(tmp_path, ["run"], method_file="no_such_method.py")
    with pytest.raises(SystemExit):
        tsne.main([*checkpoints, "--titles", "a", "b", "--out", str(tmp_path / "figures")])
    assert "--titles needs one title per checkpoint: 1 checkpoints, 2 titles" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="names the method file 'no_such_method.py', which is not a script here"):
        tsne.main([*checkpoints, "--out", str(tmp_path / "figures"), "--device", "cpu"])
    assert not (tmp_path / "figures").exists()


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
