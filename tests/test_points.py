"""Tests of the point-cloud path: ModelNet40 in both real formats (resampled text files and
Princeton's OFF meshes) on fixtures, the .npy cache, area-weighted surface sampling, the procedural
`shapes`, batched point augmentation, the raw-input floor, PointNet, and every method script on shapes."""

import importlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import linear_eval
from conftest import METHOD_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# ModelNet40 fixtures in the real formats
# --------------------------------------------------------------------------------------------------

# (class, number) of the samples written for each split; "night_stand" checks ids with an underscore.
RESAMPLED_SAMPLES = {"train": [("airplane", 1), ("airplane", 2), ("chair", 1), ("night_stand", 3), ("xbox", 7)],
                     "test": [("chair", 9), ("night_stand", 4), ("vase", 2)]}


def write_resampled(root, rows=1100, seed=0):
    """root/modelnet40_normal_resampled/ as in the PointNet++ zip: class folders of "x,y,z,nx,ny,nz" text
    files (more rows than the 1024 kept), shape names and split lists. Returns {split: [(class, xyz)]}."""
    folder = root / "modelnet40_normal_resampled"
    folder.mkdir(parents=True)
    (folder / "modelnet40_shape_names.txt").write_text("\n".join(data.MODELNET40_CLASSES) + "\n")
    rng = np.random.default_rng(seed)
    written = {}
    for split, samples in RESAMPLED_SAMPLES.items():
        ids, written[split] = [], []
        for name, number in samples:
            sample = f"{name}_{number:04d}"
            xyz = rng.normal(size=(rows, 3)) * rng.uniform(0.5, 3.0, size=3) + rng.uniform(-2, 2, size=3)
            normals = rng.normal(size=(rows, 3))
            (folder / name).mkdir(exist_ok=True)
            np.savetxt(folder / name / f"{sample}.txt", np.hstack([xyz, normals]), fmt="%.6f", delimiter=",")
            ids.append(sample)
            written[split].append((name, np.loadtxt(folder / name / f"{sample}.txt", delimiter=",")[:, :3]))
        (folder / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
    return written


CUBE_VERTICES = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
CUBE_QUADS = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]


def cube_off(glued=True):
    """The cube [-1, 1]^3 as an OFF file with six quads; Princeton-style glued header "OFF8 6 0"."""
    header = "OFF8 6 0\n" if glued else "OFF\n8 6 0\n"
    vertices = "".join(f"{x} {y} {z}\n" for x, y, z in CUBE_VERTICES)
    return header + vertices + "".join("4 " + " ".join(map(str, quad)) + "\n" for quad in CUBE_QUADS)


def tetrahedron_off():
    """A triangle-only mesh with the plain header (the fast path of read_off), and a comment line."""
    return ("OFF\n# a comment\n4 4 0\n0 0 0\n3 0 0\n0 2 0\n0 0 1\n"
            "3 0 2 1\n3 0 1 3\n3 0 3 2\n3 1 2 3\n")


def write_meshes(root):
    """root/ModelNet40/<class>/{train,test}/*.off like Princeton's ModelNet40.zip (a few classes)."""
    layout = {("bathtub", "train"): [cube_off(glued=True), tetrahedron_off()],
              ("sofa", "train"): [cube_off(glued=False)],
              ("sofa", "test"): [tetrahedron_off(), cube_off(glued=True)]}
    for (name, split), files in layout.items():
        folder = root / "ModelNet40" / name / split
        folder.mkdir(parents=True)
        for i, text in enumerate(files):
            (folder / f"{name}_{i + 1:04d}.off").write_text(text)
    return layout


def expected_cloud(xyz, points=1024):
    """The first `points` rows, centred at their mean and divided by their largest norm."""
    xyz = xyz[:points] - xyz[:points].mean(0)
    return xyz / np.linalg.norm(xyz, axis=1).max()


def assert_unit_sphere(points):
    norms = points.double().norm(dim=-1)
    assert torch.allclose(norms.max(dim=-1).values, torch.ones(len(points), dtype=torch.float64), atol=1e-5)
    assert points.double().mean(dim=1).abs().max() < 1e-5


def assert_levels_consistent(ds):
    """Coarse ids are the group of the fine class under the dataset's grouping."""
    coarse, fine = ds.targets[:, 0], ds.targets[:, 1]
    group_names, class_names = ds.info.label_names
    for c, f in zip(coarse.tolist(), fine.tolist()):
        assert group_names[c] == data.MODELNET40_GROUPS[class_names[f]]


def test_default_grouping_covers_all_40_classes():
    """Our 8 coarse groups cover exactly the 40 ModelNet40 classes, each group non-empty."""
    assert len(data.MODELNET40_CLASSES) == len(set(data.MODELNET40_CLASSES)) == 40
    assert data.MODELNET40_CLASSES == sorted(data.MODELNET40_CLASSES)
    assert set(data.MODELNET40_GROUPS) == set(data.MODELNET40_CLASSES)
    assert len(set(data.MODELNET40_GROUPS.values())) == 8


def test_modelnet40_resampled_text_files(tmp_path):
    """First 1024 xyz rows of each listed file, unit-sphere normalised; fine ids in shape_names order."""
    written = write_resampled(tmp_path)
    for split, samples in written.items():
        ds = data.load("modelnet40", str(tmp_path), split)
        assert isinstance(ds, data.ResidentDataset) and ds.inputs.dtype == torch.float32
        assert ds.inputs.shape == (len(samples), 1024, 3) and ds.targets.shape == (len(samples), 2)
        assert ds.targets.dtype == torch.long
        for i, (name, xyz) in enumerate(samples):
            assert ds.targets[i, 1].item() == data.MODELNET40_CLASSES.index(name)
            assert np.allclose(ds.inputs[i].numpy(), expected_cloud(xyz), atol=1e-5)
        assert_unit_sphere(ds.inputs)
        assert_levels_consistent(ds)
        info = ds.info
        assert info.modality == "points" and not info.multilabel
        assert info.level_names == ["group", "class"] and info.num_classes == [8, 40]
        assert info.label_names[1] == data.MODELNET40_CLASSES and len(info.label_names[0]) == 8
        x, y = ds[0]
        assert x.shape == (1024, 3) and torch.equal(y, ds.targets[0])


def cache_files(folder, split, points=1024):
    """The point caches of a split, keyed by the content of what defines it (labels files excluded)."""
    return sorted(path for path in folder.glob(f"modelnet40_{split}_{points}_*.npy") if "_labels" not in path.name)


def test_modelnet40_cache_is_written_and_reused(tmp_path):
    """The parsed split is cached to .npy beside the data and read instead of the text files next time."""
    write_resampled(tmp_path)
    folder = tmp_path / "modelnet40_normal_resampled"
    first = data.load("modelnet40", str(tmp_path), "train")
    [cache] = cache_files(folder, "train")
    assert cache.with_name(cache.stem + "_labels.npy").exists()
    assert np.array_equal(np.load(cache), first.inputs.numpy())
    # Alter every point file: a re-parse would change the points.
    for name, number in RESAMPLED_SAMPLES["train"]:
        (folder / name / f"{name}_{number:04d}.txt").write_text("9,9,9,0,0,1\n" * 1100)
    again = data.load("modelnet40", str(tmp_path), "train")
    assert torch.equal(again.inputs, first.inputs) and torch.equal(again.targets, first.targets)
    # Without the cache the altered files are parsed again (so the test above could fail).
    cache.unlink()
    reparsed = data.load("modelnet40", str(tmp_path), "train")
    assert not torch.equal(reparsed.inputs, first.inputs)


def test_modelnet40_cache_follows_the_list_files(tmp_path):
    """A partial unzip (a shorter split list) followed by the full one parses the full set again: the
    cache is keyed on the list files' content, not only on the split and point count."""
    write_resampled(tmp_path)
    folder = tmp_path / "modelnet40_normal_resampled"
    full_list = (folder / "modelnet40_train.txt").read_text()
    (folder / "modelnet40_train.txt").write_text("\n".join(full_list.split()[:2]) + "\n")
    assert len(data.load("modelnet40", str(tmp_path), "train")) == 2
    (folder / "modelnet40_train.txt").write_text(full_list)
    assert len(data.load("modelnet40", str(tmp_path), "train")) == len(RESAMPLED_SAMPLES["train"])
    assert len(cache_files(folder, "train")) == 2


def test_modelnet40_mesh_cache_follows_the_files(tmp_path):
    """OFF meshes have no list file: the cache is keyed on the meshes' names and sizes, so a mesh added
    (the rest of an unzip) or grown (a file that was cut short) is parsed, not hidden by the old cache."""
    write_meshes(tmp_path)
    folder = tmp_path / "ModelNet40"
    assert len(data.load("modelnet40", str(tmp_path), "train")) == 3
    (folder / "sofa" / "train" / "sofa_0002.off").write_text(tetrahedron_off())
    assert len(data.load("modelnet40", str(tmp_path), "train")) == 4
    (folder / "sofa" / "train" / "sofa_0002.off").write_text(cube_off())
    grown = data.load("modelnet40", str(tmp_path), "train")
    assert len(cache_files(folder, "train")) == 3
    (folder / "sofa" / "train" / "sofa_0002.off").write_text(tetrahedron_off())
    assert not torch.equal(data.load("modelnet40", str(tmp_path), "train").inputs, grown.inputs)


def test_modelnet40_points_option_and_short_files(tmp_path):
    """`points` keeps that many rows (its own cache file); a file with fewer rows is a clear error."""
    write_resampled(tmp_path, rows=1100)
    ds = data.load("modelnet40", str(tmp_path), "test", points=512)
    assert ds.inputs.shape == (3, 512, 3)
    assert len(cache_files(tmp_path / "modelnet40_normal_resampled", "test", points=512)) == 1
    with pytest.raises(data.DataError, match="fewer than the 2048"):
        data.load("modelnet40", str(tmp_path), "test", points=2048)


def test_modelnet40_groups_option(tmp_path):
    """The grouping is a constructor argument; a grouping that misses a class is rejected."""
    write_resampled(tmp_path)
    groups = {name: ("a" if name < "m" else "z") for name in data.MODELNET40_CLASSES}
    ds = data.load("modelnet40", str(tmp_path), "train", groups=groups)
    assert ds.info.num_classes == [2, 40] and ds.info.label_names[0] == ["a", "z"]
    names = ds.info.label_names[1]
    assert [groups[names[f]] for f in ds.targets[:, 1].tolist()] == ["az"[c] for c in ds.targets[:, 0].tolist()]
    del groups["xbox"]
    with pytest.raises(ValueError, match="xbox"):
        data.load("modelnet40", str(tmp_path), "train", groups=groups)


def test_modelnet40_off_fallback(tmp_path):
    """Without the resampled folder: OFF meshes (glued and plain headers, quads and triangles), sampled
    to 1024 points, normalised, cached, and the same points again after the cache is deleted (seeded)."""
    layout = write_meshes(tmp_path)
    train = data.load("modelnet40", str(tmp_path), "train")
    assert train.inputs.shape == (3, 1024, 3)
    bathtub, sofa = data.MODELNET40_CLASSES.index("bathtub"), data.MODELNET40_CLASSES.index("sofa")
    assert train.targets[:, 1].tolist() == [bathtub, bathtub, sofa]
    assert train.info.num_classes == [8, 40]
    assert_unit_sphere(train.inputs)
    assert_levels_consistent(train)
    # The first bathtub is the cube: after normalisation its points still lie on an axis-aligned cube,
    # i.e. every point's largest |coordinate| (about the cube's centre) is the same.
    cube = train.inputs[0].double()
    centre = (cube.max(0).values + cube.min(0).values) / 2
    extent = (cube - centre).abs().max(dim=1).values
    assert extent.max() - extent.min() < 1e-5
    [cache] = cache_files(tmp_path / "ModelNet40", "train")
    cache.unlink()
    again = data.load("modelnet40", str(tmp_path), "train")
    assert torch.equal(again.inputs, train.inputs)
    test = data.load("modelnet40", str(tmp_path), "test")
    assert test.targets[:, 1].tolist() == [sofa] * len(layout[("sofa", "test")])


def test_modelnet40_prefers_resampled_folder(tmp_path):
    """With both layouts present the resampled text files are read."""
    write_resampled(tmp_path)
    write_meshes(tmp_path)
    assert len(data.load("modelnet40", str(tmp_path), "train")) == len(RESAMPLED_SAMPLES["train"])


def test_modelnet40_missing_files(tmp_path):
    """No data: a DataError naming both layouts it looks for and where to get them, since there is no
    checksummed source to download from; nothing is written."""
    for download in (False, True):
        with pytest.raises(data.DataError) as error:
            data.load("modelnet40", str(tmp_path), "train", download=download)
        message = str(error.value)
        assert os.path.join(str(tmp_path), "modelnet40_normal_resampled") in message
        assert os.path.join(str(tmp_path), "ModelNet40") in message and "modelnet40_train.txt" in message
        assert "modelnet40_normal_resampled.zip" in message and "ModelNet40.zip" in message
    assert not os.listdir(tmp_path)


def break_shape_names(folder):
    (folder / "modelnet40_shape_names.txt").unlink()


def break_list(folder):
    with open(folder / "modelnet40_train.txt", "a") as f:
        f.write("chair_0999\n")


def empty_list(folder):
    (folder / "modelnet40_train.txt").write_text("\n")


def space_separated(folder):
    path = folder / "chair" / "chair_0001.txt"
    path.write_text(path.read_text().replace(",", " "))


def empty_points_file(folder):
    (folder / "airplane" / "airplane_0002.txt").write_text("")


@pytest.mark.parametrize("damage, culprit, match", [
    (break_shape_names, "modelnet40_shape_names.txt", "not found"),
    (break_list, "modelnet40_train.txt", "names chair_0999, but .*chair_0999.txt is not there"),
    (empty_list, "modelnet40_train.txt", "is empty"),
    (space_separated, "chair_0001.txt", "comma-separated"),
    (empty_points_file, "airplane_0002.txt", "has 0 points"),
])
def test_modelnet40_damaged_files_name_the_file(tmp_path, damage, culprit, match):
    """Each of these is the user's to fix: one DataError naming the file and what is wrong."""
    write_resampled(tmp_path)
    damage(tmp_path / "modelnet40_normal_resampled")
    with pytest.raises(data.DataError, match=match) as error:
        data.load("modelnet40", str(tmp_path), "train")
    assert culprit in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# OFF parsing and area-weighted surface sampling
# --------------------------------------------------------------------------------------------------


def test_read_off_glued_header_and_quads(tmp_path):
    """'OFF8 6 0' is read as 8 vertices and 6 faces; each quad becomes two triangles of the same corners."""
    path = tmp_path / "cube.off"
    path.write_text(cube_off(glued=True))
    vertices, faces = data.read_off(str(path))
    assert vertices.shape == (8, 3) and np.array_equal(vertices, np.array(CUBE_VERTICES, dtype=float))
    assert faces.shape == (12, 3)
    for k, quad in enumerate(CUBE_QUADS):
        assert set(faces[2 * k]) | set(faces[2 * k + 1]) == set(quad)
    path.write_text(tetrahedron_off())
    vertices, faces = data.read_off(str(path))
    assert vertices.shape == (4, 3) and faces.tolist() == [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]]


@pytest.mark.parametrize("text, match", [("PLY\n", "not an OFF"), ("OFF\n4 1 0\n0 0 0\n1 0 0\n0 1 0\n", "announces"),
                                         ("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n", r"\[0, 3\)")])
def test_read_off_rejects_malformed(tmp_path, text, match):
    path = tmp_path / "bad.off"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        data.read_off(str(path))


def test_sample_surface_points_lie_on_the_mesh(tmp_path):
    """Samples of the cube mesh lie on its surface (largest |coordinate| is 1), about a sixth on each face."""
    path = tmp_path / "cube.off"
    path.write_text(cube_off())
    vertices, faces = data.read_off(str(path))
    points = data.sample_surface(vertices[faces][None], 60_000, np.random.default_rng(0))[0]
    assert points.shape == (60_000, 3)
    assert np.allclose(np.abs(points).max(axis=1), 1.0, atol=1e-12)
    face = np.abs(points).argmax(axis=1) * 2 + (points[np.arange(len(points)), np.abs(points).argmax(axis=1)] > 0)
    counts = np.bincount(face, minlength=6)
    assert np.all(np.abs(counts - 10_000) < 5 * np.sqrt(10_000 * 5 / 6))


def test_sample_surface_is_area_weighted():
    """One big (area 1) and one tiny (area 0.01) triangle: points split 100 : 1, each inside its triangle."""
    big = [[0, 0, 0], [2, 0, 0], [0, 1, 0]]
    tiny = [[0, 0, 5], [0.2, 0, 5], [0, 0.1, 5]]
    triangles = np.array([[big, tiny]], dtype=np.float64)
    count = 200_000
    points = data.sample_surface(triangles, count, np.random.default_rng(1))[0]
    on_tiny = np.abs(points[:, 2] - 5) < 1e-9
    assert np.all(on_tiny | (points[:, 2] == 0))
    expected = count * 0.01 / 1.01
    assert abs(on_tiny.sum() - expected) < 5 * np.sqrt(expected)
    scale = np.where(on_tiny, 0.1, 1.0)  # both triangles are {x/2 + y <= s, x >= 0, y >= 0} at scale s
    x, y = points[:, 0], points[:, 1]
    assert np.all((x >= 0) & (y >= 0) & (x / 2 + y <= scale + 1e-12))
    # Uniform inside the big triangle: its half with x > 1 holds a quarter of its area.
    assert abs(np.mean(x[~on_tiny] > 1) - 0.25) < 0.01


def test_sample_surface_batched_and_seeded():
    """Several meshes at once: each mesh's points lie on that mesh; the same seed gives the same points."""
    rng = np.random.default_rng(2)
    triangles = rng.normal(size=(3, 7, 3, 3))
    a = data.sample_surface(triangles, 500, np.random.default_rng(5))
    b = data.sample_surface(triangles, 500, np.random.default_rng(5))
    assert a.shape == (3, 500, 3) and np.array_equal(a, b)
    # Each mesh's points lie in that mesh's triangles' planes: distance to the nearest plane ~ 0.
    for mesh in range(3):
        p0, p1, p2 = triangles[mesh, :, 0], triangles[mesh, :, 1], triangles[mesh, :, 2]
        normal = np.cross(p1 - p0, p2 - p0)
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        distance = np.abs(np.einsum("fk,pfk->pf", normal, a[mesh][:, None, :] - p0[None])).min(axis=1)
        assert distance.max() < 1e-9
    with pytest.raises(ValueError, match="zero area"):
        data.sample_surface(np.zeros((1, 2, 3, 3)), 10, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------
# Procedural shapes
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_small():
    return {split: data.load("shapes", split=split, size=160, points=256) for split in ("train", "test")}


def test_shapes_info_and_defaults():
    """Default sizes 2000 / 800, surface (curved / polyhedral) -> shape (8)."""
    info = data.load("shapes", split="test", size=8, points=16).info
    assert info.modality == "points" and info.level_names == ["surface", "shape"] and info.num_classes == [2, 8]
    assert info.label_names == [["curved", "polyhedral"], data.SHAPES]
    assert data.LOADERS["shapes"]("", "test", False, 0).inputs.shape[0] == 800


def test_shapes_deterministic_balanced_and_normalised(shapes_small):
    train, test = shapes_small["train"], shapes_small["test"]
    again = data.load("shapes", split="train", size=160, points=256)
    assert torch.equal(again.inputs, train.inputs) and torch.equal(again.targets, train.targets)
    assert not torch.equal(train.inputs[:10], test.inputs[:10])
    for ds in (train, test):
        assert ds.inputs.shape == (160, 256, 3) and ds.inputs.dtype == torch.float32
        assert torch.equal(torch.bincount(ds.targets[:, 1], minlength=8), torch.full((8,), 20))
        assert torch.equal(ds.targets[:, 0], (ds.targets[:, 1] >= 5).long())  # curved: the first five
        assert_unit_sphere(ds.inputs)


def test_shapes_geometry(shapes_small):
    """Rotated and normalised: spheres are still spheres (a least-squares sphere fits every point to 1%),
    ellipsoids are not (and are flattened: some points come much closer to the centre than others)."""
    ds = shapes_small["train"]
    fine = ds.targets[:, 1]

    def sphere_fit_error(p):  # |p - c|^2 = r^2 is linear in (c, r^2 - |c|^2)
        solution = torch.linalg.lstsq(torch.cat([2 * p, torch.ones(len(p), 1, dtype=p.dtype)], 1), (p * p).sum(1)).solution
        centre = solution[:3]
        radius = (solution[3] + centre @ centre).sqrt()
        return ((p - centre).norm(dim=1) / radius - 1).abs().max()

    spheres = ds.inputs[fine == data.SHAPES.index("sphere")].double()
    assert max(sphere_fit_error(p) for p in spheres) < 0.01
    ellipsoids = ds.inputs[fine == data.SHAPES.index("ellipsoid")].double()
    assert min(sphere_fit_error(p) for p in ellipsoids) > 0.1
    assert ellipsoids.norm(dim=-1).min(dim=1).values.max() < 0.8


def test_shape_meshes_before_rotation():
    """The meshes themselves: a cube's samples lie on its faces, a box has three different sides, a
    pyramid has a square base and an apex, a torus's samples lie at the tube radius from its ring."""
    rng = np.random.default_rng(0)
    cube = data.sample_surface(data.shape_meshes("cube", 2, rng), 2000, rng)
    assert np.allclose(np.abs(cube).max(axis=-1), 0.5 ** 0.5, atol=1e-9)
    box = data.shape_meshes("box", 3, rng).reshape(3, -1, 3)
    sides = box.max(axis=1) - box.min(axis=1)
    assert np.allclose(sides[:, 0], 2 ** 0.5) and np.all(sides[:, 1:] < 0.8 * sides[:, :1])
    pyramid = np.unique(data.shape_meshes("pyramid", 1, rng).reshape(-1, 3).round(9) + 0.0, axis=0)
    assert len(pyramid) == 6  # four base corners, the base centre (a degenerate ring) and the apex
    base = pyramid[pyramid[:, 2] == 0]
    corners = base[np.abs(base).sum(1) > 0]
    assert (pyramid[:, 2] > 0).sum() == 1 and len(corners) == 4 and np.allclose(np.abs(corners[:, :2]), 0.5 ** 0.5)
    torus = data.shape_meshes("torus", 1, rng)
    tube = np.abs(torus[..., 2]).max()  # the tube radius is the torus's half height
    points = data.sample_surface(torus, 2000, rng)[0]
    ring = np.hypot(points[:, 0], points[:, 1]) - 1
    distance = np.hypot(ring, points[:, 2])
    assert np.all(np.abs(distance - tube) < 0.02 * tube + 0.005)  # exact up to the tessellation
    rotations = data.random_rotations(50, rng)
    assert np.allclose(rotations @ rotations.transpose(0, 2, 1), np.eye(3)) and np.allclose(np.linalg.det(rotations), 1)


def test_shapes_fraction_is_stratified():
    ds = data.load("shapes", split="train", size=160, points=16, fraction=0.5)
    assert len(ds) == 80 and torch.equal(torch.bincount(ds.targets[:, 1]), torch.full((8,), 10))
    assert isinstance(ds, data.ResidentDataset)


# --------------------------------------------------------------------------------------------------
# Batching, augmentation, normalisation and the raw floor
# --------------------------------------------------------------------------------------------------


def test_batches_and_to_device_with_points(shapes_small):
    """Resident point clouds are batched like images: shuffled, each sample once, inputs matching targets."""
    points = shapes_small["train"].inputs
    ds = data.to_device(data.ResidentDataset(points, torch.arange(160), shapes_small["train"].info), torch.device("cpu"))
    assert isinstance(ds, data.ResidentDataset)
    seen = []
    for x, ids in data.batches(ds, 32, torch.Generator().manual_seed(0), torch.device("cpu")):
        assert x.shape == (32, 256, 3) and torch.equal(x, points[ids])
        seen += ids.tolist()
    assert sorted(seen) == list(range(160)) and seen != sorted(seen)
    assert isinstance(ds.subset([3, 1]), data.ResidentDataset) and torch.equal(ds.subset([3, 1]).inputs, points[[3, 1]])


def test_normalize_points_is_the_float_cloud(shapes_small):
    ds = shapes_small["test"]
    x = ds.inputs[:4]
    assert torch.equal(data.normalize(x, ds.info), x) and data.normalize(x.double(), ds.info).dtype == torch.float32


def test_point_augmentation_shapes_and_seeding(shapes_small):
    ds = shapes_small["train"]
    x = ds.inputs[:8]
    views = data.two_views(x, ds.info, torch.Generator().manual_seed(3))
    assert views.shape == (2, 8, 256, 3) and views.dtype == torch.float32
    same = data.two_views(x, ds.info, torch.Generator().manual_seed(3))
    other = data.two_views(x, ds.info, torch.Generator().manual_seed(4))
    assert torch.equal(views, same) and not torch.allclose(views, other)
    assert not torch.allclose(views[0], views[1])


def test_point_augmentation_per_sample_parameters(shapes_small):
    """Copies of one cloud get their own scale per axis (2/3..3/2) and shift (within 0.2) each."""
    cloud = shapes_small["train"].inputs[0]
    x = cloud.expand(64, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    # Without subset and jitter the view is an exact per-axis affine map of the cloud: recover it.
    out = data.augment_points(x, g, keep=(1.0, 1.0), sigma=0.0)
    extent_in = cloud.max(0).values - cloud.min(0).values
    scale = (out.max(1).values - out.min(1).values) / extent_in  # [64, 3]
    shift = out.max(1).values - scale * cloud.max(0).values
    assert scale.min() >= 2 / 3 - 1e-4 and scale.max() <= 3 / 2 + 1e-4
    assert shift.abs().max() <= 0.2 + 1e-4
    assert scale.std(0).min() > 0.1 and shift.std(0).min() > 0.05  # different across samples ...
    assert (scale[:, 0] - scale[:, 1]).abs().mean() > 0.1  # ... and across axes (anisotropic)


@pytest.mark.parametrize("augment", ["points", "points-isotropic"])
def test_point_views_rescale_axes_only_where_allowed(augment, shapes_small):
    """ModelNet-style views ("points") stretch each axis on its own; the shapes views ("points-isotropic")
    keep every cloud's proportions, which tell a sphere from an ellipsoid and a cube from a box."""
    assert shapes_small["train"].info.augment == "points-isotropic"
    info = data.DatasetInfo(**{**shapes_small["train"].info.__dict__, "augment": augment})
    cloud = shapes_small["train"].inputs[2]
    views = data.augment(cloud.expand(32, -1, -1).contiguous(), info, torch.Generator().manual_seed(5))
    # Each view's extent along x, y and z relative to the cloud's: equal on all three axes (up to the
    # point subset and the jitter) unless the axes were scaled apart.
    extent = (views.max(1).values - views.min(1).values) / (cloud.max(0).values - cloud.min(0).values)
    spread = extent.max(1).values / extent.min(1).values
    if augment == "points":
        assert (spread > 1.2).float().mean() > 0.5
    else:
        assert (spread < 1.1).all(), spread


def test_point_augmentation_random_subset(shapes_small):
    """Each cloud keeps its own random fraction (0.5..1) of its points, repeated up to the fixed size."""
    cloud = shapes_small["train"].inputs[1]
    x = cloud.expand(32, -1, -1).contiguous()
    out = data.augment_points(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), shift=0.0, sigma=0.0)
    assert out.shape == x.shape
    # Every output point is one of the cloud's points.
    match = (out[:, :, None, :] == cloud[None, None, :, :]).all(-1)  # [32, P, P]
    assert match.any(-1).all()
    distinct = match.any(1).sum(-1)  # distinct source points kept per cloud
    assert distinct.min() >= 128 and distinct.max() <= 256
    assert len(distinct.unique()) > 10


def test_point_augmentation_jitter_is_clipped(shapes_small):
    """Noise of std 1 clipped to 0.02: every point ends up within 0.02 (per coordinate) of its source."""
    x = shapes_small["train"].inputs[:4]
    common = dict(keep=(1.0, 1.0), scale=(1.0, 1.0), shift=0.0)

    def noise(sigma):  # the same draws with and without noise: their difference is the jitter
        clean = data.augment_points(x, torch.Generator().manual_seed(2), sigma=0.0, **common)
        return data.augment_points(x, torch.Generator().manual_seed(2), sigma=sigma, **common) - clean

    wide = noise(1.0)
    assert wide.abs().max() <= 0.02 + 1e-6 and (wide.abs() > 0.0199).float().mean() > 0.95
    default = noise(0.01)
    assert default.abs().max() <= 0.02 + 1e-6 and 0.008 < default.std() < 0.0101
    assert 0.02 < (default.abs() > 0.0199).float().mean() < 0.08  # P(|N(0, 1)| > 2) = 0.046


def test_raw_floor_is_an_occupancy_histogram(shapes_small):
    ds = shapes_small["test"]
    raw = linear_eval.raw_inputs(ds)
    assert raw.shape == (160, 512)
    assert torch.allclose(raw.sum(1), torch.ones(160))
    corner = data.ResidentDataset(torch.tensor([[[-1.0, -1.0, -1.0], [0.99, 0.99, 0.99]]]),
                                    torch.zeros(1, 2, dtype=torch.long), ds.info)
    cells = linear_eval.raw_inputs(corner)[0]
    assert cells[0] == 0.5 and cells[511] == 0.5


# --------------------------------------------------------------------------------------------------
# PointNet and the method scripts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_FILES)
def test_pointnet_is_permutation_invariant(name, shapes_small):
    method = importlib.import_module(name)
    assert "pointnet" in method.ENCODERS
    torch.manual_seed(0)
    encoder, dim = method.build_encoder("pointnet", shapes_small["train"].info)
    assert dim == 256
    x = shapes_small["train"].inputs[:6]
    encoder.train()
    encoder(x)  # one training step's batch statistics, so that eval mode is not the identity BN
    encoder.eval()
    with torch.no_grad():
        features = encoder(x)
        permuted = encoder(x[:, torch.randperm(x.shape[1])])
        other = encoder(x.flip(0))
    assert features.shape == (6, 256)
    assert torch.allclose(features, permuted, atol=1e-5)
    assert torch.allclose(other, features.flip(0), atol=1e-5) and not torch.allclose(features[0], features[1])


def test_pointnet_identical_in_every_method_file():
    sources = {name: inspect.getsource(importlib.import_module(name).PointNet) for name in METHOD_FILES}
    assert len(set(sources.values())) == 1
    assert data.PRESETS["shapes"]["arch"] == "pointnet" and data.PRESETS["modelnet40"]["arch"] == "pointnet"


@pytest.mark.parametrize("name", METHOD_FILES)
def test_method_script_on_shapes_beats_chance(name, tmp_path):
    """A tiny run of each method file on shapes: linear top-1 well above chance at both levels."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, f"{name}.py", "--dataset", "shapes", "--epochs", "1", "--fraction",
                             "0.2", "--batch-size", "50", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "shapes" and json.loads((out / "config.json").read_text())["arch"] == "pointnet"
    levels = results["levels"]
    assert levels["surface"]["linear_top1"] > 0.5 + 0.15  # chance 1/2
    assert levels["shape"]["linear_top1"] > 0.125 + 0.25  # chance 1/8
    assert 0.0 < levels["shape"]["raw_linear_top1"] < 1.0


def test_supcon_on_shapes_beats_an_untrained_pointnet(tmp_path):
    """Random PointNet features already separate the shapes (about 0.78 surface top-1), so beating chance
    proves little: the preset run (3 epochs) must beat the same probe on its own untrained encoder."""
    import supcon

    args = supcon.parse_args(["--dataset", "shapes", "--device", "cpu", "--seed", "0", "--out", str(tmp_path / "run")])
    trained = supcon.train(args)["levels"]
    torch.manual_seed(0)
    train_set, test_set = data.load("shapes", split="train"), data.load("shapes", split="test")
    encoder = supcon.build_model(args, train_set.info).encoder
    untrained = linear_eval.evaluate(encoder, train_set, test_set, torch.device("cpu"))["levels"]
    assert trained["surface"]["linear_top1"] > untrained["surface"]["linear_top1"] + 0.02
    assert trained["shape"]["linear_top1"] > untrained["shape"]["linear_top1"]
