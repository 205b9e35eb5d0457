"""Tests of data.py: loaders on fixtures in the real file formats, the hdigits composition,
limited-data subsets, per-sample batched augmentation and epoch batching."""

import gzip
import inspect
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import data

# --------------------------------------------------------------------------------------------------
# CIFAR-100: the python pickles
# --------------------------------------------------------------------------------------------------


def write_cifar100(root, sizes=None, seed=0, corrupt_coarse=False):
    """Write root/cifar-100-python/{train,test,meta} like the real archive (byte-string keys, uint8 rows)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (sizes or {"train": 12, "test": 6}).items():
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(f) for f in rng.integers(0, 100, size=n)]
        coarse = [data.FINE_TO_COARSE[f] for f in fine]
        if corrupt_coarse:
            coarse[1] = (coarse[1] + 1) % 20
        entry = {b"data": rows, b"fine_labels": fine, b"coarse_labels": coarse,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": f"{split} batch".encode()}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        written[split] = (rows, fine, coarse)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def test_cifar100_table_has_five_classes_per_superclass():
    """FINE_TO_COARSE maps the 100 classes onto 20 superclasses of exactly 5 classes each (as in CIFAR-100),
    with a few well-known entries: apple (0) -> fruit and vegetables (4), aquarium fish (1) -> fish (1)."""
    table = torch.tensor(data.FINE_TO_COARSE)
    assert table.shape == (100,)
    assert torch.equal(torch.bincount(table, minlength=20), torch.full((20,), 5))
    assert data.FINE_TO_COARSE[0] == 4 and data.FINE_TO_COARSE[1] == 1 and data.FINE_TO_COARSE[99] == 13


def test_cifar100_loads_pickles(tmp_path):
    """Images [N,3,32,32] uint8 with image[c,h,w] == row[c*1024 + h*32 + w]; targets (coarse, fine); info."""
    written = write_cifar100(tmp_path)
    for split in ("train", "test"):
        ds = data.load("cifar100", str(tmp_path), split)
        rows, fine, coarse = written[split]
        n = len(rows)
        assert len(ds) == n
        assert ds.inputs.shape == (n, 3, 32, 32) and ds.inputs.dtype == torch.uint8
        for index, (c, h, w) in [(0, (0, 0, 0)), (1, (1, 5, 7)), (n - 1, (2, 31, 30)), (2, (0, 31, 0))]:
            assert ds.inputs[index, c, h, w].item() == rows[index, c * 1024 + h * 32 + w]
        # the whole tensor, by the same formula
        c, h, w = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
        assert np.array_equal(ds.inputs.numpy(), rows[:, c * 1024 + h * 32 + w])
        assert ds.targets.shape == (n, 2) and ds.targets.dtype == torch.long
        assert ds.targets[:, 0].tolist() == coarse and ds.targets[:, 1].tolist() == fine
        x, y = ds[1]
        assert torch.equal(x, ds.inputs[1]) and y.tolist() == [coarse[1], fine[1]]
    info = ds.info
    assert info.modality == "image" and info.multilabel is False and info.channels == 3
    assert len(info.level_names) == 2 and info.num_classes == [20, 100]
    assert info.label_names[0][3] == "coarse3" and info.label_names[1][42] == "fine42"
    assert len(info.mean) == len(info.std) == 3


def test_cifar100_rejects_inconsistent_coarse_labels(tmp_path):
    """A pickle whose coarse labels disagree with FINE_TO_COARSE raises ValueError."""
    write_cifar100(tmp_path, corrupt_coarse=True)
    with pytest.raises(ValueError, match="coarse"):
        data.load("cifar100", str(tmp_path), "train")


def test_cifar100_missing_names_path_and_flag(tmp_path):
    """Without the files and with downloading off: a DataError naming each missing file and --no-download."""
    root = tmp_path / "nothing-here"
    with pytest.raises(data.DataError) as error:
        data.load("cifar100", str(root), "train")
    message = str(error.value)
    assert os.path.join(str(root), "cifar-100-python", "train") in message
    assert os.path.join(str(root), "cifar-100-python", "meta") in message
    assert "--no-download" in message and "\n" not in message
    write_cifar100(tmp_path)
    os.remove(tmp_path / "cifar-100-python" / "meta")
    with pytest.raises(data.DataError, match="meta not found") as error:
        data.load("cifar100", str(tmp_path), "train")
    assert "/train" not in str(error.value)  # only the file that is missing


def test_cifar100_is_downloaded_when_missing(tmp_path, monkeypatch, capsys):
    """download=True fetches the archive (md5-checked by torchvision) into the root, after one line that
    says what, from where, how big and where to; then the pickles are read."""
    import torchvision.datasets.utils

    calls = []

    def fake_download(url, root, md5):
        calls.append((url, root, md5))
        write_cifar100(tmp_path / "data")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fake_download)
    ds = data.load("cifar100", str(tmp_path / "data"), "train", download=True)
    assert len(ds) == 12 and calls == [(data.CIFAR100_URL, str(tmp_path / "data"), data.CIFAR100_MD5)]
    announcement = capsys.readouterr().err
    assert "CIFAR-100" in announcement and data.CIFAR100_URL in announcement and "161 MiB" in announcement
    assert str(tmp_path / "data") in announcement
    data.load("cifar100", str(tmp_path / "data"), "test", download=True)
    assert len(calls) == 1  # present files are not fetched again


@pytest.mark.parametrize("failure", [URLError("[Errno -3] Temporary failure in name resolution"),
                                     RuntimeError("File not found or corrupted.")])
def test_cifar100_failed_download_is_one_line(tmp_path, monkeypatch, failure):
    """No network (URLError) or a checksum mismatch (torchvision's RuntimeError): one DataError line that says
    what was tried and where to put the files by hand."""
    import torchvision.datasets.utils

    def fail(url, root, md5):
        raise failure

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", fail)
    with pytest.raises(data.DataError) as error:
        data.load("cifar100", str(tmp_path), "train", download=True)
    message = str(error.value)
    assert data.CIFAR100_URL in message and str(failure.args[0]) in message and "\n" not in message
    assert "cifar-100-python.tar.gz" in message and data.CIFAR100_MD5 in message and str(tmp_path) in message


def drop_key(key):
    def damage(path):
        with open(path, "rb") as f:
            entry = pickle.load(f)
        del entry[key]
        with open(path, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return damage


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("file, damage, match", [
    ("train", drop_key(b"coarse_labels"), "without coarse_labels"),
    ("train", truncate, "truncated or corrupt"),
    ("train", empty, "truncated or corrupt"),
    ("meta", drop_key(b"fine_label_names"), "without fine_label_names"),
])
def test_cifar100_damaged_pickles_name_the_file(tmp_path, file, damage, match):
    write_cifar100(tmp_path)
    path = tmp_path / "cifar-100-python" / file
    damage(path)
    with pytest.raises(data.DataError, match=match) as error:
        data.load("cifar100", str(tmp_path), "train")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------
# MNIST IDX files and hierarchical MNIST
# --------------------------------------------------------------------------------------------------


def write_idx(path, array, magic_type=0x08, compress=False):
    """IDX: 2 zero bytes, type byte (0x08 = ubyte), ndim byte, big-endian uint32 dims, then the data."""
    array = np.asarray(array, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    opener = gzip.open if compress else open
    with opener(str(path) + (".gz" if compress else ""), "wb") as f:
        f.write(payload)


def mnist_arrays(n, seed):
    """n fake 28x28 digits. Digit i (label d) is the constant 20 + 20 d, except row 0, which carries an
    index-specific pattern (so every image is unique); labels cover all 10 digits."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = np.empty((n, 28, 28), dtype=np.uint8)
    images[:] = (20 + 20 * labels)[:, None, None]
    images[:, 0, :] = (np.arange(n)[:, None] * 7 + np.arange(28)[None, :] * 3) % 200 + 30
    return images, labels


@pytest.fixture
def mnist_root(tmp_path):
    """tmp_path/MNIST/raw with train (40 digits) and t10k (20 digits) IDX files."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, (images_name, labels_name), n in (("train", data.MNIST_FILES["train"], 40),
                                                 ("test", data.MNIST_FILES["test"], 20)):
        images, labels = mnist_arrays(n, seed=n)
        write_idx(raw / images_name, images)
        write_idx(raw / labels_name, labels)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_idx_magic_numbers_of_fixture(tmp_path):
    """The fixture writer produces MNIST's real magic numbers (0x00000803 images, 0x00000801 labels)."""
    write_idx(tmp_path / "img", np.zeros((2, 28, 28)))
    write_idx(tmp_path / "lab", np.zeros(2))
    assert (tmp_path / "img").read_bytes()[:16] == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")
    assert (tmp_path / "lab").read_bytes()[:8] == bytes.fromhex("00000801" "00000002")


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    """read_idx returns exactly what was written, for 1-D and 3-D files, plain and gzipped."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=9, dtype=np.uint8)
    write_idx(tmp_path / "images-idx3-ubyte", images, compress=compress)
    write_idx(tmp_path / "labels-idx1-ubyte", labels, compress=compress)
    suffix = ".gz" if compress else ""
    got_images = data.read_idx(str(tmp_path / "images-idx3-ubyte") + suffix)
    got_labels = data.read_idx(str(tmp_path / "labels-idx1-ubyte") + suffix)
    assert got_images.dtype == torch.uint8 and got_images.shape == (5, 7, 3)
    assert np.array_equal(got_images.numpy(), images) and np.array_equal(got_labels.numpy(), labels)


def test_read_idx_rejects_wrong_magic(tmp_path):
    """A non-ubyte type code (0x0D = float) or nonzero leading bytes is not an MNIST file: ValueError."""
    write_idx(tmp_path / "float", np.zeros((2, 3)), magic_type=0x0D)
    with pytest.raises(ValueError):
        data.read_idx(str(tmp_path / "float"))
    path = tmp_path / "junk"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError):
        data.read_idx(str(path))


def test_read_idx_rejects_truncated_payload(tmp_path):
    """A file whose header promises more bytes than it holds raises ValueError naming the shape."""
    write_idx(tmp_path / "full", np.ones((4, 5, 5)))
    (tmp_path / "cut").write_bytes((tmp_path / "full").read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"\(4, 5, 5\)"):
        data.read_idx(str(tmp_path / "cut"))


@pytest.mark.parametrize("keep", [0, 6])
def test_read_idx_rejects_truncated_header(tmp_path, keep):
    """A file cut inside its header (an interrupted download) is a corrupt IDX file: ValueError, like the
    other corruptions, not a bare struct.error."""
    write_idx(tmp_path / "full", np.ones((4, 5, 5)))
    (tmp_path / "cut").write_bytes((tmp_path / "full").read_bytes()[:keep])
    try:
        data.read_idx(str(tmp_path / "cut"))
    except ValueError:
        return
    except Exception as error:  # noqa: BLE001 - the point of the test is which type escapes
        pytest.fail(f"BUG data.read_idx: an IDX file truncated to {keep} header bytes raises "
                    f"{type(error).__module__}.{type(error).__name__} ({error}) instead of ValueError")
    pytest.fail(f"data.read_idx accepted an IDX file truncated to {keep} bytes")


def hmnist_checks(ds, images, labels, size=48):
    """Per-item checks of an hmnist dataset built from fake MNIST arrays (see mnist_arrays)."""
    ring = size // 6  # 8 at 48 px
    lo, hi = ring, size - ring
    for index in range(len(ds)):
        x, y = ds[index]
        assert x.dtype == torch.uint8 and x.shape == (1, size, size)
        canvas = x[0].int()
        # centre box: the MNIST digit of this index padded to 32 (at 48 px the box is 32 wide: no rescaling),
        # and nothing else: the ring digit never reaches into it
        expected_centre = F.pad(torch.from_numpy(images[index]).int(), (2, 2, 2, 2))
        assert (canvas[lo:hi, lo:hi] - expected_centre).abs().max() <= 1, index
        # ring: one ring x ring patch outside the box (the fake digits are constant, so all its pixels are > 0)
        outside = canvas.clone()
        outside[lo:hi, lo:hi] = 0
        rows, cols = outside.nonzero(as_tuple=True)
        top, left = rows.min().item(), cols.min().item()
        assert rows.max().item() - top == ring - 1 and cols.max().item() - left == ring - 1, index
        assert len(rows) == ring * ring
        clear = top + ring <= lo or top >= hi or left + ring <= lo or left >= hi
        assert clear, (index, top, left)
        # the small digit's label, read from its (constant) intensity 20 + 20 * label
        category = round(outside[rows, cols].float().median().item() / 20) - 1
        digit = int(labels[index])
        assert y.tolist() == [category, 10 * category + digit], index
        assert ds.targets[index].tolist() == y.tolist()


def test_hmnist_composes_from_idx(mnist_root):
    """hmnist at 48 px: uint8 [1,48,48]; centre = this index's MNIST digit, ring = one small digit outside the
    centre box; targets (category, 10*category + digit) with category = the small digit's MNIST label."""
    root, arrays = mnist_root
    for split in ("train", "test"):
        ds = data.load("hmnist", str(root), split, image_size=48)
        images, labels = arrays[split]
        assert len(ds) == len(labels)
        hmnist_checks(ds, images, labels)
        assert ds.info.num_classes == [10, 100] and ds.info.modality == "image" and ds.info.multilabel is False
        assert ds.info.augment == "canvas"
        categories = ds.targets[:, 0]
        assert len(categories.unique()) > 1  # small digits are drawn, not all the same


def test_hmnist_gzipped_files(mnist_root, tmp_path_factory):
    """The .gz variant of the IDX files gives the same dataset."""
    root, arrays = mnist_root
    gz_root = tmp_path_factory.mktemp("gz")
    raw = gz_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "test"):
        images_name, labels_name = data.MNIST_FILES[split]
        write_idx(raw / images_name, arrays[split][0], compress=True)
        write_idx(raw / labels_name, arrays[split][1], compress=True)
    assert not (raw / data.MNIST_FILES["train"][0]).exists()
    plain = data.load("hmnist", str(root), "train", image_size=48)
    packed = data.load("hmnist", str(gz_root), "train", image_size=48)
    for index in range(len(plain)):
        assert torch.equal(plain[index][0], packed[index][0]) and torch.equal(plain[index][1], packed[index][1])


def test_hmnist_is_deterministic(mnist_root):
    """Item i is the same image every time it is asked for, from the same or a fresh dataset object."""
    root, _ = mnist_root
    ds = data.load("hmnist", str(root), "train", image_size=48)
    again = data.load("hmnist", str(root), "train", image_size=48)
    for index in (0, 7, 39):
        first = ds[index][0]
        assert torch.equal(first, ds[index][0])
        assert torch.equal(first, again[index][0])
    assert torch.equal(ds.targets, again.targets)
    other_seed = data.load("hmnist", str(root), "train", image_size=48, seed=5)
    assert not all(torch.equal(ds[i][0], other_seed[i][0]) for i in range(len(ds)))


def test_hmnist_test_composites_do_not_follow_the_run_seed(mnist_root):
    """The training composites follow --seed; the test composites do not, so a spread over seeds is the
    models' alone, not the test set's."""
    root, _ = mnist_root
    a = data.load("hmnist", str(root), "test", image_size=48, seed=0)
    b = data.load("hmnist", str(root), "test", image_size=48, seed=5)
    assert torch.equal(a.targets, b.targets)
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))


def test_hmnist_fraction_subset(mnist_root):
    """fraction on the lazily composed hmnist: a class-stratified subset whose items and targets are the full
    dataset's items at the kept indices."""
    root, _ = mnist_root
    full = data.load("hmnist", str(root), "train", image_size=48, seed=1)
    try:
        part = data.load("hmnist", str(root), "train", image_size=48, fraction=0.5, seed=1)
    except AttributeError as error:
        pytest.fail(f"BUG data.load('hmnist', fraction<1): {error}; load() calls dataset.subset(...) but "
                    f"HierarchicalMNIST defines no subset()")
    assert 0 < len(part) < len(full)
    kept = part.indices
    assert len(kept.unique()) == len(kept)
    assert torch.equal(part.targets, full.targets[kept]) and part.info == full.info
    for position in (0, len(part) - 1):
        x, y = part[position]
        assert torch.equal(x, full[int(kept[position])][0]) and torch.equal(y, full.targets[kept[position]])
    for fine in full.targets[:, 1].unique():
        n = int((full.targets[:, 1] == fine).sum())
        assert abs(int((part.targets[:, 1] == fine).sum()) - max(1, round(0.5 * n))) <= 1


def test_hmnist_is_composed_once_onto_the_device(mnist_root):
    """to_device turns hmnist (and a fraction of it) into a resident image tensor holding exactly the lazily
    composed items, so training slices batches in place; data larger than max_bytes stays lazy."""
    root, arrays = mnist_root
    full = data.load("hmnist", str(root), "train", image_size=48, seed=1)
    resident = data.to_device(full, torch.device("cpu"))
    assert isinstance(resident, data.ResidentDataset) and resident.inputs.shape == (40, 1, 48, 48)
    hmnist_checks(resident, *arrays["train"])
    assert torch.equal(resident.inputs, torch.stack([full[i][0] for i in range(len(full))]))
    part = data.load("hmnist", str(root), "train", image_size=48, fraction=0.5, seed=1)
    resident_part = data.to_device(part, torch.device("cpu"))
    assert torch.equal(resident_part.inputs, resident.inputs[part.indices])
    assert torch.equal(resident_part.targets, part.targets) and resident_part.info == part.info
    assert data.to_device(full, torch.device("cpu"), max_bytes=48 * 48 * 39) is full


def test_hmnist_missing_files(mnist_root):
    """With downloading off, a missing MNIST file is a DataError naming that file (not the set) and the flag."""
    root, _ = mnist_root
    missing = root / "MNIST" / "raw" / data.MNIST_FILES["train"][1]
    missing.unlink()
    with pytest.raises(data.DataError) as error:
        data.load("hmnist", str(root), "train", image_size=48)
    message = str(error.value)
    assert str(missing) in message and "--no-download" in message
    assert os.path.join("raw", data.MNIST_FILES["train"][0]) + "(" not in message


def test_hmnist_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    """torchvision tries every MNIST mirror and reports them on several lines: we make it one, with where
    to put the four files by hand."""
    import torchvision.datasets.mnist

    def fail(url, **kwargs):
        raise URLError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)
    with pytest.raises(data.DataError) as error:
        data.load("hmnist", str(tmp_path), "train", image_size=48, download=True)
    message = str(error.value)
    assert "Network is unreachable" in message and "\n" not in message
    assert os.path.join(str(tmp_path), "MNIST", "raw") in message and "t10k-labels-idx1-ubyte" in message
    assert "downloading MNIST" in capsys.readouterr().err


def test_hmnist_corrupt_file(mnist_root):
    """A truncated image file under MNIST/raw makes loading fail with ValueError."""
    root, _ = mnist_root
    path = root / "MNIST" / "raw" / data.MNIST_FILES["train"][0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="header says"):
        data.load("hmnist", str(root), "train", image_size=48)


def test_hmnist_truncated_gzip(mnist_root):
    """A .gz cut short (an interrupted copy) is a DataError naming the file, not gzip's EOFError."""
    root, _ = mnist_root
    path = root / "MNIST" / "raw" / data.MNIST_FILES["train"][0]
    with gzip.open(str(path) + ".gz", "wb") as f:
        f.write(path.read_bytes())
    path.unlink()
    gz = root / "MNIST" / "raw" / (data.MNIST_FILES["train"][0] + ".gz")
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(data.DataError, match="unreadable") as error:
        data.load("hmnist", str(root), "train", image_size=48)
    assert str(gz) in str(error.value)


# --------------------------------------------------------------------------------------------------
# hdigits: the embedded default
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hdigits():
    return {split: data.load("hdigits", split=split) for split in ("train", "test")}


@pytest.fixture(scope="module")
def sources():
    """scikit-learn's 8x8 digits, as float [0,1] and quantised to uint8 like a canvas pixel."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64) / 16.0
    quantised = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, quantised, torch.tensor(digits.target)


RING_CORNERS = torch.tensor([(r, c) for r in range(25) for c in range(25)
                             if r + 8 <= 8 or r >= 24 or c + 8 <= 8 or c >= 24])  # 8x8 windows outside [8,24)^2


def identify_ring_sources(canvas, quantised):
    """For each 32x32 canvas [N,32,32] uint8: the index of the source digit found, pixel for pixel, in an 8x8
    window of the ring, such that the window holds all of the ring's ink (-1 if there is none)."""
    n = len(canvas)
    ring = canvas.clone()
    ring[:, 8:24, 8:24] = 0
    windows = ring.unfold(1, 8, 1).unfold(2, 8, 1)[:, RING_CORNERS[:, 0], RING_CORNERS[:, 1]]  # [N, K, 8, 8]
    weights = torch.randint(1, 2**20, (64,), generator=torch.Generator().manual_seed(0)).double()
    window_hash = windows.reshape(n, len(RING_CORNERS), 64).double() @ weights  # exact in float64
    source_hash = quantised.reshape(len(quantised), 64).double() @ weights
    assert len(source_hash.unique()) == len(quantised)
    where = {h: i for i, h in enumerate(source_hash.tolist())}
    ink = ring.reshape(n, -1).sum(1, dtype=torch.long)
    found = torch.full((n,), -1)
    for sample, corner in torch.isin(window_hash, source_hash).nonzero().tolist():
        source = where[window_hash[sample, corner].item()]
        window = windows[sample, corner]
        if torch.equal(window, quantised[source]) and window.sum(dtype=torch.long) == ink[sample]:
            found[sample] = source
    return found


UPSCALINGS = [dict(mode="bilinear", align_corners=False), dict(mode="bilinear", align_corners=True),
              dict(mode="nearest"), dict(mode="bicubic", align_corners=False)]


def identify_central_sources(canvas, images):
    """For each canvas [N,32,32] uint8: the index of the source digit whose x2 upscaling (by any usual
    interpolation), quantised to uint8, equals the centre box [8,24)^2 pixel for pixel (-1 if none)."""
    n = len(canvas)
    box = canvas[:, 8:24, 8:24].reshape(n, 256)
    weights = torch.randint(1, 2**20, (256,), generator=torch.Generator().manual_seed(0)).double()
    box_hash = box.double() @ weights  # exact in float64 (< 2**36)
    found = torch.full((n,), -1)
    for options in UPSCALINGS:
        up = F.interpolate(images[:, None].float(), scale_factor=2, **options)[:, 0]
        table = (up.clamp(0, 1) * 255).round().to(torch.uint8).reshape(len(images), 256)
        table_hash = table.double() @ weights
        where = {h: i for i, h in enumerate(table_hash.tolist())}
        for sample in torch.isin(box_hash, table_hash).nonzero().flatten().tolist():
            source = where[box_hash[sample].item()]
            if found[sample] < 0 and torch.equal(box[sample], table[source]):
                found[sample] = source
    return found


@pytest.fixture(scope="module")
def hdigits_sources(hdigits, sources):
    images, quantised, _ = sources
    found = {}
    for split, ds in hdigits.items():
        canvas = ds.inputs[:, 0]
        found[split] = (identify_central_sources(canvas, images), identify_ring_sources(canvas, quantised))
    return found


def test_hdigits_sizes_and_info(hdigits):
    """5000 train / 1000 test uint8 [1,32,32] composites; info says image, category -> class, [10, 100]."""
    assert len(hdigits["train"]) == 5000 and len(hdigits["test"]) == 1000
    for ds in hdigits.values():
        assert ds.inputs.shape[1:] == (1, 32, 32) and ds.inputs.dtype == torch.uint8
        info = ds.info
        assert info.modality == "image" and info.num_classes == [10, 100] and info.multilabel is False
        assert len(info.level_names) == 2 and [len(names) for names in info.label_names] == [10, 100]
        assert info.channels == 1 and info.augment == "canvas"


def test_hdigits_size_option():
    """`size=` sets the number of composites of either split."""
    assert len(data.load("hdigits", split="train", size=300)) == 300
    assert len(data.load("hdigits", split="test", size=120)) == 120


def test_hdigits_targets(hdigits):
    """Targets [N,2] long (category, fine) with fine // 10 == category; all 100 fine classes in train, balanced."""
    for split, ds in hdigits.items():
        t = ds.targets
        assert t.shape == (len(ds), 2) and t.dtype == torch.long
        assert torch.equal(t[:, 1] // 10, t[:, 0])
        assert t.min() >= 0 and t[:, 1].max() <= 99
    counts = torch.bincount(hdigits["train"].targets[:, 1], minlength=100)
    assert (counts > 0).all() and counts.max() - counts.min() <= 1


def test_hdigits_is_deterministic(hdigits):
    """Loading again gives the same composites (the data do not depend on anything but the split)."""
    again = data.load("hdigits", split="test")
    assert torch.equal(again.inputs, hdigits["test"].inputs) and torch.equal(again.targets, hdigits["test"].targets)


def test_hdigits_layout(hdigits, hdigits_sources, sources):
    """Centre box [8,24)^2 holds, pixel for pixel, a source digit of the class label scaled x2 to 16x16 and
    nothing else (the ring digit never enters it); an 8x8 window of the ring holds, pixel for pixel, a source
    digit of the category's label, and the ring has no other ink."""
    _, _, source_labels = sources
    for split, ds in hdigits.items():
        central, ring = hdigits_sources[split]
        assert (ring >= 0).all(), f"{split}: {(ring < 0).sum().item()} composites without an intact ring digit"
        assert (central >= 0).all(), f"{split}: {(central < 0).sum().item()} centre boxes are not a x2 source digit"
        assert torch.equal(source_labels[ring], ds.targets[:, 0]), split
        assert torch.equal(source_labels[central], ds.targets[:, 1] % 10), split
        # the 16x16 digit really spans the box: ink in each half of it, none beyond it except the ring digit
        box = ds.inputs[:, 0, 8:24, 8:24].float()
        assert box.sum() > 0.3 * ds.inputs.float().sum()
        assert (box[:, :8].sum((1, 2)) > 0).float().mean() > 0.9 and (box[:, 8:].sum((1, 2)) > 0).float().mean() > 0.9


def test_hdigits_train_test_sources_disjoint(hdigits_sources):
    """Train and test composites are built from disjoint sets of source digits (central and ring digits)."""
    used = {}
    for split, (central, ring) in hdigits_sources.items():
        used[split] = set(central.tolist()) | set(ring.tolist())
    assert len(used["train"]) > 500 and len(used["test"]) > 300
    shared = used["train"] & used["test"]
    assert not shared, f"{len(shared)} source digits appear in both train and test"


def test_hdigits_multilabel(hdigits):
    """hdigits-multilabel: the same images; multi-hot float [N,10] with ones at the category and class digits."""
    for split, ds in hdigits.items():
        ml = data.load("hdigits-multilabel", split=split)
        assert torch.equal(ml.inputs, ds.inputs)
        y = ml.targets
        assert y.shape == (len(ds), 10) and y.dtype.is_floating_point
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        ones = y.sum(1)
        assert ((ones == 1) | (ones == 2)).all()
        category, digit = ds.targets[:, 0], ds.targets[:, 1] % 10
        expected = torch.zeros(len(ds), 10)
        expected[torch.arange(len(ds)), category] = 1
        expected[torch.arange(len(ds)), digit] = 1
        assert torch.equal(y, expected)
        assert torch.equal(ones == 1, category == digit)
        info = ml.info
        assert info.multilabel is True and info.num_classes == [10] and len(info.level_names) == 1
        x, target = ml[3]
        assert torch.equal(x, ds.inputs[3]) and torch.equal(target, expected[3])


# --------------------------------------------------------------------------------------------------
# The entry point: validation and limited-data subsets
# --------------------------------------------------------------------------------------------------


def test_a_mistyped_option_is_an_error():
    """No loader swallows options (no **kwargs): load() reads each one's options off its signature, so that a
    mistyped option ends in a DataError naming the ones the dataset takes."""
    for name, loader in data.LOADERS.items():
        kinds = {parameter.kind for parameter in inspect.signature(loader).parameters.values()}
        assert not kinds & {inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL}, name
    with pytest.raises(data.DataError, match=r"^hdigits takes no option sise \(--sise\); its options: size$"):
        data.load("hdigits", split="test", sise=10)
    with pytest.raises(data.DataError, match=r"^shapes takes no option point \(--point\); its options: size, points$"):
        data.load("shapes", split="test", point=16)


def test_unknown_dataset_lists_choices():
    """An unknown name raises ValueError listing every available dataset."""
    with pytest.raises(ValueError) as error:
        data.load("imagenet-1k", split="train")
    assert "imagenet-1k" in str(error.value)
    for name in data.DATASETS:
        assert name in str(error.value)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, 2])
def test_fraction_out_of_range(fraction):
    """fraction must lie in (0, 1]."""
    with pytest.raises(ValueError, match="fraction"):
        data.load("hdigits", split="train", fraction=fraction, size=200)


def image_keys(images):
    """One integer key per image (exact: a float64 dot product with small integer weights)."""
    weights = torch.randint(1, 2**20, (images[0].numel(),), generator=torch.Generator().manual_seed(1)).double()
    return (images.reshape(len(images), -1).double() @ weights).tolist()


def test_fraction_is_class_stratified_and_seeded(hdigits):
    """fraction=0.25 keeps 0.25 of the samples exactly and round(0.25 * count) +-1 of every fine class, a subset
    of the full train set; the same seed gives the same subset, another seed a different one."""
    full = hdigits["train"]
    full_counts = torch.bincount(full.targets[:, 1], minlength=100)
    a = data.load("hdigits", split="train", fraction=0.25, seed=3)
    b = data.load("hdigits", split="train", fraction=0.25, seed=3)
    c = data.load("hdigits", split="train", fraction=0.25, seed=4)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    full_pairs = {(key, tuple(t)) for key, t in zip(image_keys(full.inputs), full.targets.tolist())}
    for ds in (a, c):
        assert len(ds) == round(0.25 * len(full))
        counts = torch.bincount(ds.targets[:, 1], minlength=100)
        expected = torch.tensor([round(0.25 * n) for n in full_counts.tolist()])
        assert (counts - expected).abs().max() <= 1, (counts, expected)
        pairs = list(zip(image_keys(ds.inputs), map(tuple, ds.targets.tolist())))
        assert set(pairs) <= full_pairs  # every kept (image, target) is one of the training set's
        assert len(set(pairs)) == len(pairs)  # and none is kept twice
        assert ds.info.num_classes == full.info.num_classes


def test_fraction_multilabel_strata_are_label_sets():
    """For multi-label data the strata are the label sets: each set keeps about the fraction."""
    full = data.load("hdigits-multilabel", split="train", size=1000)
    part = data.load("hdigits-multilabel", split="train", size=1000, fraction=0.5, seed=0)
    assert len(part) == 500
    def set_counts(y):
        keys = (y > 0.5).long() @ (2 ** torch.arange(10))
        return {k: int((keys == k).sum()) for k in keys.unique().tolist()}
    full_counts, part_counts = set_counts(full.targets), set_counts(part.targets)
    for key, n in full_counts.items():
        assert abs(part_counts.get(key, 0) - 0.5 * n) < 1


def test_fraction_is_exact_on_long_tailed_multilabel_data():
    """Long-tailed multi-hot targets (three common label sets, many seen once or twice, as in rcv1): every
    fraction keeps round(f * N) samples in all, each label set of n samples floor(f * n) or one more, and the
    same seed the same subset. Rounding each set on its own (at least one each) kept 320 of 1000 at f = 0.1."""
    sizes = [400, 200, 100] + [2] * 50 + [1] * 200
    label_set = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    targets = (((label_set + 1)[:, None] >> torch.arange(12)) & 1).float()  # set k: the bits of k + 1
    for fraction in (0.01, 0.1, 0.25, 0.5, 0.9):
        kept = data.stratified_indices(targets, fraction, seed=3)
        assert len(kept) == round(fraction * len(targets)) and len(kept.unique()) == len(kept)
        counts = torch.bincount(label_set[kept], minlength=len(sizes))
        floors = (fraction * torch.tensor(sizes, dtype=torch.float64)).floor().long()
        assert ((counts == floors) | (counts == floors + 1)).all()
        assert torch.equal(kept, data.stratified_indices(targets, fraction, seed=3))
    assert not torch.equal(data.stratified_indices(targets, 0.1, seed=3), data.stratified_indices(targets, 0.1, seed=4))



def test_fraction_strata_beyond_64_labels():
    """Label sets that differ only in label 70 (past what a 64-bit key can hold) are separate strata."""
    targets = torch.zeros(40, 100)
    targets[:, 0] = 1
    targets[:10, 70] = 1  # 10 samples hold {0, 70}, 30 hold {0}
    kept = data.stratified_indices(targets, 0.5, seed=0)
    assert int((kept < 10).sum()) == 5 and int((kept >= 10).sum()) == 15

# --------------------------------------------------------------------------------------------------
# Batched augmentation with per-sample parameters
# --------------------------------------------------------------------------------------------------


def colour_info(**changes):
    fields = dict(name="fake", modality="image", level_names=["class"], num_classes=[2], multilabel=False,
                  label_names=[["a", "b"]], channels=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), augment="crop")
    fields.update(changes)
    return data.DatasetInfo(**fields)


@pytest.fixture(scope="module")
def colour_image():
    """A structured 3-channel uint8 image: gradients and a bright square, so every crop/flip changes it."""
    h = torch.arange(32).view(32, 1).expand(32, 32)
    w = torch.arange(32).view(1, 32).expand(32, 32)
    image = torch.stack([h * 8, w * 8, (h * w) % 256]).to(torch.uint8)
    image[:, 4:12, 20:28] = 255
    return image


def repeat(image, batch):
    return image[None].expand(batch, *image.shape).contiguous()


def distinct(views):
    return len({tuple(v.flatten().tolist()) for v in views})


@pytest.mark.parametrize("path", ["canvas", "crop"])
def test_two_views_per_sample_parameters(path, hdigits, colour_image):
    """[2,B,C,H,W] float; B copies of one image get B different augmentations, and the two views differ."""
    if path == "canvas":
        info, image = hdigits["train"].info, hdigits["train"].inputs[0]
    else:
        info, image = colour_info(), colour_image
    batch = 16
    views = data.two_views(repeat(image, batch), info, torch.Generator().manual_seed(0))
    assert views.shape == (2, batch, *image.shape) and views.dtype == torch.float32
    assert torch.isfinite(views).all()
    assert distinct(views[0]) == batch and distinct(views[1]) == batch
    assert not torch.equal(views[0], views[1])


@pytest.mark.parametrize("path", ["canvas", "crop"])
def test_two_views_reproducible_from_generator(path, hdigits, colour_image):
    """The same generator seed gives identical views; another seed different ones."""
    if path == "canvas":
        info, x = hdigits["train"].info, hdigits["train"].inputs[:8]
    else:
        info, x = colour_info(), repeat(colour_image, 8)
    a = data.two_views(x, info, torch.Generator().manual_seed(7))
    b = data.two_views(x, info, torch.Generator().manual_seed(7))
    c = data.two_views(x, info, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("path", ["canvas", "crop"])
def test_two_views_standardised_with_info(path, hdigits, colour_image):
    """Views are (x - info.mean) / info.std of [0,1] images: within the bounds this implies, and undoing the
    standardisation gives the same images whatever mean/std the info holds."""
    if path == "canvas":
        base, x = hdigits["train"].info, hdigits["train"].inputs[:8]
        other = data.DatasetInfo(**{**base.__dict__, "mean": (0.3,), "std": (0.5,)})
    else:
        base, x = colour_info(), repeat(colour_image, 8)
        other = colour_info(mean=(0.1, 0.2, 0.9), std=(1.0, 0.5, 0.1))
    results = []
    for info in (base, other):
        views = data.two_views(x, info, torch.Generator().manual_seed(3))
        mean = torch.tensor(info.mean).view(1, 1, -1, 1, 1)
        std = torch.tensor(info.std).view(1, 1, -1, 1, 1)
        unit = views * std + mean
        assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
        results.append(unit)
    assert torch.allclose(results[0], results[1], atol=1e-5)
    assert torch.allclose(data.normalize(x, base) * torch.tensor(base.std).view(1, -1, 1, 1)
                          + torch.tensor(base.mean).view(1, -1, 1, 1), x.float() / 255, atol=1e-6)


def test_canvas_augmentation_keeps_the_canvas(hdigits):
    """Canvas augmentation (digits) only shifts and scales a little: each view keeps its total intensity within
    25% of the original (no crop cuts the ring digit away) and is closer to the original than to its mirror
    image (no flips)."""
    ds = hdigits["train"]
    x = ds.inputs[:64]
    views = data.two_views(x, ds.info, torch.Generator().manual_seed(1))
    std, mean = ds.info.std[0], ds.info.mean[0]
    unit = views * std + mean  # [2, B, 1, 32, 32] in [0, 1]
    original = x.float() / 255
    ratio = unit.sum((2, 3, 4)) / original.sum((1, 2, 3))
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio
    to_original = (unit - original).pow(2).sum((2, 3, 4))
    to_mirror = (unit - original.flip(-1)).pow(2).sum((2, 3, 4))
    assert (to_original < to_mirror).float().mean() > 0.95


def test_crop_augmentation_crops_and_flips(colour_image):
    """The natural-image path really changes scale: some views are zoomed-in crops (less of the bright square
    visible or a larger one), and horizontal flips occur."""
    info = colour_info(channels=1, mean=(0.5,), std=(0.5,))
    image = colour_image[:1]  # one channel: crop + flip only, no colour jitter
    views = data.two_views(repeat(image, 64), info, torch.Generator().manual_seed(2)) * 0.5 + 0.5
    original = image.float() / 255
    error = (views - original).abs().mean((2, 3, 4))
    flipped = (views - original.flip(-1)).abs().mean((2, 3, 4))
    assert (flipped < error).any()  # some views are (mostly) mirrored
    assert (error > 0.05).float().mean() > 0.5  # most views are visibly cropped


def crop_statistics(views, height, width):
    """(area share, aspect ratio, centre x, centre y) [N] of the crops behind views [N, 2, H, W] of `ramp`.

    Output column k of a crop (left, width w) samples x = left + (k + 0.5) w / W (reversed when flipped), so two
    columns symmetric about the middle give w from their difference and the centre from their mean; rows alike."""
    c1, c2, r1, r2 = width // 4, width - 1 - width // 4, height // 4, height - 1 - height // 4
    x1, x2 = views[:, 0, height // 2, c1].double(), views[:, 0, height // 2, c2].double()
    y1, y2 = views[:, 1, r1, width // 2].double(), views[:, 1, r2, width // 2].double()
    w, h = (x2 - x1).abs() * width / (c2 - c1), (y2 - y1).abs() * height / (r2 - r1)
    return torch.stack([w, h, x1 + x2, y1 + y2])  # pixels; the last two are twice the centre


def ramp(height, width):
    """A 2-channel image whose pixels hold their own centre's coordinates: x in channel 0, y in channel 1."""
    rows, cols = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([cols, rows])


@pytest.mark.parametrize("height, width", [(32, 32), (16, 48)])  # (16, 48): many retries and central fallbacks
def test_crops_are_drawn_like_torchvision(height, width):
    """The crop boxes of crop_and_flip have the distribution of torchvision's RandomResizedCrop.get_params on the
    same image size: area share, aspect ratio and centre, two-sample Kolmogorov-Smirnov over 20,000 draws each.
    Clamping an over-wide box to the image instead of drawing again piles crops up at full width or height."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    n, chunk, generator = 20_000, 5_000, torch.Generator().manual_seed(0)
    image = ramp(height, width)[None].expand(chunk, 2, height, width)
    w, h, centre_x2, centre_y2 = torch.cat([crop_statistics(data.crop_and_flip(image, generator), height, width)
                                            for _ in range(n // chunk)], dim=1)
    for pixels in (w, h, centre_x2, centre_y2):  # whole pixels, as torchvision's boxes
        off_grid = (pixels - pixels.round()).abs().max().item()
        assert off_grid < 1e-3, f"boxes off the pixel grid by up to {off_grid:.3f} px"
    ours = [w.round() * h.round() / (height * width), w.round() / h.round(),
            centre_x2.round() / (2 * width), centre_y2.round() / (2 * height)]
    torch.manual_seed(0)
    boxes = [RandomResizedCrop.get_params(torch.empty(1, height, width), (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(n)]
    top, left, box_h, box_w = torch.tensor(boxes, dtype=torch.float64).T
    theirs = [box_w * box_h / (height * width), box_w / box_h, (2 * left + box_w) / (2 * width),
              (2 * top + box_h) / (2 * height)]
    for name, a, b in zip(("area share", "aspect ratio", "centre x", "centre y"), ours, theirs):
        p = ks_2samp(a.numpy(), b.numpy()).pvalue
        assert p > 1e-3, f"{name}: Kolmogorov-Smirnov p = {p:.3g}"


# --------------------------------------------------------------------------------------------------
# Epoch batching
# --------------------------------------------------------------------------------------------------


class LazyIds(Dataset):
    """A lazily composed dataset stand-in: item i is (a tiny image holding nothing, i)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.zeros(1, 2, 2, dtype=torch.uint8), torch.tensor(index)


def resident_ids(n):
    info = colour_info(channels=1, mean=(0.5,), std=(0.5,))
    return data.ResidentDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), info)


def epoch_ids(dataset, batch_size, seed, rank=0, world_size=1):
    out = []
    for x, y in data.batches(dataset, batch_size, torch.Generator().manual_seed(seed), torch.device("cpu"),
                             rank, world_size):
        assert len(x) == len(y)
        out.append(y.tolist())
    return out


@pytest.mark.parametrize("make", [resident_ids, LazyIds], ids=["resident", "lazy"])
def test_batches_one_epoch(make):
    """Equal-size batches, each sample at most once per epoch, as many steps as rank_shape says,
    seeded order (same seed = same order, another seed = another order)."""
    dataset = make(50)
    batches = epoch_ids(dataset, 8, seed=0)
    assert len(batches) == data.rank_shape(len(dataset), 8, 1)[2] == 6
    assert all(len(b) == 8 for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(50))
    assert batches == epoch_ids(dataset, 8, seed=0)
    assert batches != epoch_ids(dataset, 8, seed=1)
    assert flat != sorted(flat)  # shuffled


@pytest.mark.parametrize("make", [resident_ids, LazyIds], ids=["resident", "lazy"])
def test_batches_shards_are_disjoint(make):
    """With world_size=2 the global batch of 8 is split 4 + 4: both ranks take the same number of
    equal batches from disjoint shards."""
    dataset = make(50)
    shards = [epoch_ids(dataset, 8, seed=4, rank=rank, world_size=2) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == data.rank_shape(len(dataset), 8, 2)[2] == 6
    assert all(len(b) == 4 for shard in shards for b in shard)
    ids = [set(i for b in shard for i in b) for shard in shards]
    assert len(ids[0]) == len(ids[1]) == 24
    assert not ids[0] & ids[1]


def test_batches_batch_larger_than_dataset():
    """A batch size above the shard size gives one batch of the whole shard."""
    batches = epoch_ids(resident_ids(10), 64, seed=0)
    assert len(batches) == 1 and sorted(batches[0]) == list(range(10))
