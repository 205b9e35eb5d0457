"""Your own data: `--dataset folder` (a folder tree is a label hierarchy) and `--dataset csv` (labels.csv lists
multi-label images), on trees of small PNG files written here with Pillow. The trees carry what genuine ones
carry (.DS_Store, Thumbs.db, notes.txt), every bad tree ends in one DataError line naming the file at fault,
and each method file, and linear_eval.py on a checkpoint, runs end to end on them."""

import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folder names per level, not in sorted order, so that the ids (sorted names) differ from the order written.
NAMES = [["zeta", "alpha", "mu"], ["small", "big", "mid"], ["light", "dark"]]


def colour(ids):
    """The RGB colour of a class path (a tuple of per-level indices into NAMES): every class its own."""
    ids = tuple(ids) + (0,) * (3 - len(ids))
    return np.array([30 + 95 * ids[0], 40 + 70 * ids[1], 50 + 150 * ids[2]])


def write_png(path, rgb, size=(16, 16), seed=0, mode="RGB"):
    """A `size` (width, height) image of colour `rgb` with a little seeded noise, so no two are alike."""
    noise = np.random.default_rng(seed).integers(-10, 11, (size[1], size[0], 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).convert(mode).save(path)


def write_tree(root, shape=(3, 2, 2), per_class=(8, 4), splits=("train", "test"), size=(16, 16)):
    """root/<split>/<level 0>/<level 1>/.../<k>.png for every class path of `shape` (one folder level per entry),
    splits=(None,): one tree directly under root; with the quirks of real trees beside the images."""
    seed = itertools.count()
    for split, count in zip(splits, per_class):
        base = root / split if split else root
        for ids in itertools.product(*map(range, shape)):
            folder = base.joinpath(*(NAMES[level][i] for level, i in enumerate(ids)))
            for k in range(count):
                write_png(folder / f"{k}.png", colour(ids), size, next(seed))
        (base / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\x00")
        (base / NAMES[0][0] / "notes.txt").write_text("taken in May\n")
        (base / NAMES[0][1] / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
        (base / ".thumbnails").mkdir()
        (base / ".thumbnails" / "0.png").write_bytes(b"not even an image")
    return root


def class_of(image):
    """The class path (indices into NAMES) whose colour is nearest to an image [3, H, W]'s mean colour."""
    mean = image.double().mean((1, 2)).numpy()
    return min(itertools.product(range(3), range(3), range(2)), key=lambda ids: np.abs(colour(ids) - mean).sum())


def check_hierarchy(ds):
    """Targets [N, L] long with global ids per level; every class has one parent, whose name its own extends."""
    info, targets = ds.info, ds.targets
    assert targets.dtype == torch.long and targets.shape == (len(ds), len(info.level_names))
    for level, names in enumerate(info.label_names):
        assert len(names) == info.num_classes[level] and names == sorted(names)
        assert 0 <= targets[:, level].min() and targets[:, level].max() < len(names)
        if level:
            for fine in targets[:, level].unique().tolist():
                parents = targets[targets[:, level] == fine, level - 1].unique().tolist()
                assert len(parents) == 1, (level, fine, parents)
                assert names[fine].startswith(info.label_names[level - 1][parents[0]] + "/")


def test_three_level_tree(tmp_path):
    """train/ and test/ of 3 x 2 x 2 classes: levels level0..level2 named by the folders ("a", "a/b",
    "a/b/c"), ids in sorted name order and global per level, each image resized to image_size and of its
    class's colour; .DS_Store, Thumbs.db, notes.txt and the hidden folder are skipped without a word."""
    write_tree(tmp_path)
    train = data.load("folder", str(tmp_path), "train", image_size=16)
    info = train.info
    assert len(train) == 96 and train.inputs.shape == (96, 3, 16, 16) and train.inputs.dtype == torch.uint8
    assert info.level_names == ["level0", "level1", "level2"] and info.num_classes == [3, 6, 12]
    assert info.label_names[0] == ["alpha", "mu", "zeta"]
    assert info.label_names[1][:3] == ["alpha/big", "alpha/small", "mu/big"]
    assert info.label_names[2][0] == "alpha/big/dark" and info.label_names[2][-1] == "zeta/small/light"
    assert info.modality == "image" and not info.multilabel and info.channels == 3 and info.image_size == 16
    assert info.augment == "crop" and len(info.mean) == len(info.std) == 3
    assert "96 train images" in info.extra["summary"] and "3 levels: 3 > 6 > 12 classes" in info.extra["summary"]
    check_hierarchy(train)
    for image, target in zip(train.inputs, train.targets):
        ids = class_of(image)
        path = "/".join(NAMES[level][i] for level, i in enumerate(ids))
        assert info.label_names[2][target[2]] == path
    test = data.load("folder", str(tmp_path), "test", image_size=16)
    assert len(test) == 48 and test.info.label_names == info.label_names
    check_hierarchy(test)
    assert torch.equal(torch.bincount(test.targets[:, 2], minlength=12), torch.full((12,), 4))


def test_two_level_tree_and_the_resize(tmp_path):
    """Two levels; images of any size and mode (grey, RGBA, a .JPG) are converted to RGB and resized once,
    whole, to image_size (default 32), keeping their colour."""
    write_tree(tmp_path, shape=(2, 3), per_class=(5, 2), size=(20, 12))
    write_png(tmp_path / "train" / "zeta" / "small" / "grey.png", np.array([90, 90, 90]), mode="L")
    write_png(tmp_path / "train" / "zeta" / "small" / "alpha.png", colour((0, 0)), mode="RGBA")
    write_png(tmp_path / "train" / "zeta" / "big" / "photo.JPG", colour((0, 1)), size=(40, 30))
    ds = data.load("folder", str(tmp_path), "train")
    assert ds.inputs.shape == (33, 3, 32, 32) and ds.info.image_size == 32
    assert ds.info.level_names == ["level0", "level1"] and ds.info.num_classes == [2, 6]
    check_hierarchy(ds)
    small = data.load("folder", str(tmp_path), "train", image_size=8)
    assert small.inputs.shape == (33, 3, 8, 8) and torch.equal(small.targets, ds.targets)
    for image in (ds.inputs[0], small.inputs[0]):  # alpha/big/0.png: colour (1, 1)
        assert np.abs(image.double().mean((1, 2)).numpy() - colour((1, 1))).max() < 4
    grey = ds.inputs[ds.info.label_names[1].index("zeta/small") == ds.targets[:, 1]]
    assert any((image[0] == image[1]).all() and (image[1] == image[2]).all() for image in grey)  # L -> RGB


def test_one_tree_is_split_by_a_fixed_stratified_draw(tmp_path):
    """Without train/ and test/, the tree is split 80/20 per finest class, the same way every time, and the
    two splits share no image; the summary says so."""
    write_tree(tmp_path, shape=(2, 2), per_class=(10,), splits=(None,))
    train, test = (data.load("folder", str(tmp_path), split, image_size=16) for split in ("train", "test"))
    assert len(train) == 32 and len(test) == 8 and train.info.label_names == test.info.label_names
    for ds, per_class in ((train, 8), (test, 2)):
        assert torch.equal(torch.bincount(ds.targets[:, 1], minlength=4), torch.full((4,), per_class))
        check_hierarchy(ds)
    keys = lambda ds: {image.numpy().tobytes() for image in ds.inputs}  # noqa: E731
    assert len(keys(train) | keys(test)) == 40 and not keys(train) & keys(test)
    assert torch.equal(data.load("folder", str(tmp_path), "test", image_size=16).inputs, test.inputs)
    assert "80/20" in train.info.extra["summary"] and "no train/ and test/" in train.info.extra["summary"]


LABELS = ["cat", "dog", "sky"]
ROWS = [({"cat"}, "train"), ({"dog", "sky"}, "train"), (set(), "test"), ({"cat", "dog", "sky"}, "train"),
        ({"sky"}, "test"), ({"cat", "sky"}, "train"), ({"dog"}, "train"), ({"cat"}, "test")] * 2


def write_csv(root, layout, split_column=True, rows=ROWS):
    """root/images/<k>.png (colour by label set) and root/labels.csv in one of the two layouts."""
    header = ["path", *(["split"] if split_column else []), *(LABELS if layout == "multi-hot" else ["labels"])]
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for k, (labels, split) in enumerate(rows):
            path = root / "images" / f"{k}.png"
            write_png(path, colour([int(name in labels) for name in LABELS]), seed=k)
            cells = [int(name in labels) for name in LABELS] if layout == "multi-hot" else [";".join(sorted(labels))]
            writer.writerow([f"images/{k}.png", *([split] if split_column else []), *cells])
    return root


@pytest.mark.parametrize("layout", ["multi-hot", "labels"])
def test_csv_layouts(tmp_path, layout):
    """A 0/1 column per label or one `labels` column of ;-separated names: the same multi-hot targets, label
    names from the header (or the names used), the rows of each split in file order."""
    write_csv(tmp_path, layout)
    for split in ("train", "test"):
        ds = data.load("csv", str(tmp_path), split, image_size=16)
        rows = [labels for labels, row_split in ROWS if row_split == split]
        expected = torch.tensor([[float(name in labels) for name in LABELS] for labels in rows])
        assert torch.equal(ds.targets, expected) and ds.inputs.shape == (len(rows), 3, 16, 16)
        info = ds.info
        assert info.multilabel and info.level_names == ["labels"] and info.label_names == [LABELS]
        assert info.num_classes == [3] and info.channels == 3 and info.augment == "crop"
        assert f"{len(rows)} {split} images" in info.extra["summary"]
        for image, target in zip(ds.inputs, ds.targets):
            assert np.abs(image.double().mean((1, 2)).numpy() - colour(target.long().tolist())).max() < 4


def test_csv_without_a_split_column(tmp_path):
    """No split column: a fixed seeded 80/20 draw of the rows, disjoint, the same every time."""
    write_csv(tmp_path, "multi-hot", split_column=False)
    train, test = (data.load("csv", str(tmp_path), split, image_size=16) for split in ("train", "test"))
    assert len(train) == 13 and len(test) == 3 and "80/20" in train.info.extra["summary"]
    keys = lambda ds: {image.numpy().tobytes() for image in ds.inputs}  # noqa: E731
    assert len(keys(train) | keys(test)) == 16 and not keys(train) & keys(test)
    assert torch.equal(data.load("csv", str(tmp_path), "test", image_size=16).inputs, test.inputs)


# Bad trees: (dataset, how to damage a good tree, what the message says, the path it names relative to the root)
def remove_images(root):
    for path in (root / "train").rglob("*.png"):
        path.unlink()


def rewrite_csv(root, edit):
    path = root / "labels.csv"
    rows = list(csv.reader(path.open()))
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


BAD = {
    "empty-split": ("folder", remove_images, "no images under", "train"),
    "empty-class-folder": ("folder", lambda root: (root / "train" / "alpha" / "big" / "grey").mkdir(),
                           "holds no images", "train/alpha/big/grey"),
    "class-folder-of-notes": ("folder", lambda root: (root / "train" / "alpha" / "mid").mkdir() or
                              (root / "train" / "alpha" / "mid" / "README.txt").write_text("to do"),
                              "holds no images", "train/alpha/mid"),
    "unreadable-image": ("folder", lambda root: (root / "train" / "alpha" / "big" / "dark" / "cut.png").write_bytes(
        b"\x89PNG\r\n\x1a\n broken"), "not an image Pillow can read", "train/alpha/big/dark/cut.png"),
    "test-class-not-in-train": ("folder", lambda root: write_png(root / "test" / "omega" / "big" / "dark" / "0.png",
                                                                 colour((0, 0))), "lacks", "test/omega/big/dark"),
    "mixed-depths": ("folder", lambda root: write_png(root / "train" / "alpha" / "stray.png", colour((0, 0))),
                     "mixes depths", "train/alpha/stray.png"),
    "train-without-test": ("folder", lambda root: os.rename(root / "test", root / "tests"), "no test", ""),
    "missing-dir": ("folder", lambda root: os.rename(root, str(root) + "-gone"), "is not a folder", ""),
    "missing-labels-csv": ("csv", lambda root: (root / "labels.csv").unlink(), "not found", "labels.csv"),
    "csv-path-missing": ("csv", lambda root: (root / "images" / "5.png").unlink(), "does not exist",
                         "images/5.png"),
    "csv-without-path": ("csv", lambda root: rewrite_csv(root, lambda rows: [["file", *rows[0][1:]], *rows[1:]]),
                         "no path column", "labels.csv"),
    "csv-not-0-or-1": ("csv", lambda root: rewrite_csv(root, lambda rows: [*rows[:3], rows[3][:2] + ["yes"]
                                                                          + rows[3][3:], *rows[4:]]),
                       "row 4: cat is 'yes', not 0 or 1", "labels.csv"),
    "csv-bad-split": ("csv", lambda root: rewrite_csv(root, lambda rows: [*rows[:2], rows[2][:1] + ["val"]
                                                                         + rows[2][2:], *rows[3:]]),
                      "row 3: split is 'val'", "labels.csv"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_trees_end_in_one_line(tmp_path, case):
    dataset, damage, expected, culprit = BAD[case]
    root = tmp_path / "tree"
    root.mkdir()
    write_tree(root, shape=(2, 2, 2), per_class=(2, 1)) if dataset == "folder" else write_csv(root, "multi-hot")
    damage(root)
    with pytest.raises(data.DataError) as error:
        data.load(dataset, str(root), "test" if case == "test-class-not-in-train" else "train", image_size=16)
    message = str(error.value)
    assert expected in message and os.path.join(str(root), culprit).rstrip(os.sep) in message, message
    assert "\n" not in message
    if case == "mixed-depths":  # a file at each depth
        assert os.path.join(str(root), "train", "alpha", "big", "dark", "0.png (3 deep)") in message


def test_images_need_class_folders_and_a_sane_size(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / "flat" / split / "0.png", colour((0, 0)))
    with pytest.raises(data.DataError, match="lies directly in"):
        data.load("folder", str(tmp_path / "flat"), "train")
    write_tree(tmp_path / "tree", shape=(2,), per_class=(2, 1))
    with pytest.raises(data.DataError, match="--image-size must be at least 8 for folder, got 4"):
        data.load("folder", str(tmp_path / "tree"), "train", image_size=4)
    with pytest.raises(data.DataError, match="folder takes no option release"):  # (the scripts pass None)
        data.load("folder", str(tmp_path / "tree"), "train", release="5736")
    assert len(data.load("folder", str(tmp_path / "tree"), "train", release=None)) == 4


def test_presets_and_choices():
    assert {"folder", "csv"} <= set(data.DATASETS)
    for name in ("folder", "csv"):
        assert data.PRESETS[name] == dict(arch="cnn", batch_size=128, lr=0.2, epochs=100, warmup_epochs=5)


# End to end, each command as `python <script> ...` would run it, all in one process (runpy, run as
# __main__), since importing torch and the method files costs seconds per process.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
outcomes = []
for argv in json.loads(sys.argv[1]):
    sys.argv, output = argv, io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            runpy.run_path(argv[0], run_name="__main__")
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) or exit_.code is None else print(exit_.code) or 1
        except BaseException:
            traceback.print_exc()
            status = 1
    outcomes.append((status or 0, output.getvalue()))
print(json.dumps(outcomes))
"""
METHODS = ("supcon", "mlcl", "hmlc_gmm", "hmlc_attention")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("own-data")
    (base / "table").mkdir()
    tree, table = write_tree(base / "tree"), write_csv(base / "table", "multi-hot")
    common = ["--epochs", "2", "--batch-size", "32", "--image-size", "16", "--device", "cpu"]
    commands = {name: [f"{name}.py", "--dataset", "folder", "--data-dir", str(tree), *common, "--out",
                       str(base / name)] for name in METHODS}
    commands["mlcl-csv"] = ["mlcl.py", "--dataset", "csv", "--data-dir", str(table), *common, "--batch-size", "8",
                            "--out", str(base / "mlcl-csv")]
    commands["linear-eval"] = ["linear_eval.py", "--checkpoint", str(base / "supcon" / "checkpoint.pt"),
                               "--device", "cpu"]
    commands["hmlc-gmm-csv"] = ["hmlc_gmm.py", "--dataset", "csv", "--data-dir", str(table), *common,
                                "--batch-size", "8", "--out", str(base / "hmlc-gmm-csv")]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(commands.values()))], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return base, dict(zip(commands, json.loads(result.stdout.splitlines()[-1])))


@pytest.mark.parametrize("name", METHODS)
def test_method_files_on_a_three_level_tree(runs, name):
    """Each method file trains on the tree and reports one entry per level, its features well above chance."""
    base, outcomes = runs
    status, output = outcomes[name]
    assert status == 0, output[-3000:]
    assert f"{name} on folder (96 train samples" in output
    results = json.loads((base / name / "results.json").read_text())
    assert results["dataset"] == "folder" and set(results["levels"]) == {"level0", "level1", "level2"}
    assert results["levels"]["level0"]["linear_top1"] > 1 / 3 + 0.2


def test_linear_eval_on_a_folder_checkpoint(runs):
    base, outcomes = runs
    status, output = outcomes["linear-eval"]
    assert status == 0, output[-3000:]
    levels = json.loads((base / "supcon" / "results-checkpoint-fast.json").read_text())["levels"]
    assert set(levels) == {"level0", "level1", "level2"}
    assert all(0.0 <= entry["linear_top1"] <= 1.0 for entry in levels.values())


def test_mlcl_on_csv_has_a_head_per_label_and_a_global_head(runs):
    base, outcomes = runs
    status, output = outcomes["mlcl-csv"]
    assert status == 0, output[-3000:]
    state = torch.load(base / "mlcl-csv" / "checkpoint.pt", weights_only=False)
    heads = {key.split(".")[1] for key in state["model"] if key.startswith("heads.")}
    assert len(heads) == len(LABELS) + 1
    assert set(json.loads((base / "mlcl-csv" / "results.json").read_text())["levels"]) == {"labels"}


def test_hmlc_gmm_refuses_multilabel_csv_in_one_line(runs):
    _, outcomes = runs
    status, output = outcomes["hmlc-gmm-csv"]
    lines = [line for line in output.splitlines() if line.strip()]
    assert status != 0 and "Traceback" not in output
    assert lines[-1] == "hmlc_gmm needs hierarchical labels; csv is multi-label"
