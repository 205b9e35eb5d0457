"""Datasets, label conventions and batched two-view augmentation shared by every method file.

    ds = data.load("hdigits", "./data", "train")        # a torch Dataset of (x, y) with ds.info
    views = data.two_views(x, ds.info, generator)        # [2, B, C, H, W], per-sample random parameters

    name                loader             levels, coarse -> fine (classes)      source
    hdigits             hdigits_split      category (10) -> class (10 x 10)      scikit-learn's 8x8 digits, composed
    hdigits-multilabel  hdigits_split      digits (10), multi-hot                the same images: which digits appear
    hmnist              HierarchicalMNIST  category (10) -> class (10 x 10)      MNIST idx files, downloaded (md5)
    cifar100            cifar100_split     superclass (20) -> class (100)        the python pickles, downloaded (md5)
    modelnet40          modelnet40_split   group (8, ours) -> class (40)         ModelNet40 .txt or .off files, by hand
    shapes              shapes_split       surface (2) -> shape (8)              procedural meshes, made at load time
    wos                 wos_split          domain (7) -> area (133)              WOS-46985 (or 11967, 5736), by hand
    20newsgroups        newsgroups_split   top (7) -> group (20)                 downloaded by scikit-learn (sha256)
    rcv1                rcv1_split         topics (103), multi-hot, in 4 roots   downloaded by scikit-learn (sha256)
    skdocs              skdocs_split       module (~30) -> estimator (~190)      scikit-learn's own docstrings, offline
    skdocs-multilabel   skdocs_split       estimator types (4), multi-hot        the same documents
    folder              folder_split       level0 -> level1 -> ... (folders)     your images: DIR/train/a/b/x.png, ...
    csv                 csv_split          labels (K), multi-hot                 your images, listed in DIR/labels.csv

"By hand": no checksummed source, so the error names the files and layout to put under the data folder.
Labels: hierarchical targets are a LongTensor [L], coarse -> fine, with global ids at every level (a fine id
implies its ancestors); multi-label targets are a multi-hot FloatTensor [K]. Inputs stay resident (the
training loop moves them to the device once and slices batches there): uint8 images [N, C, H, W], float32
point clouds [N, P, 3], hashed word ids [N, TEXT_LENGTH]; hmnist is composed lazily, rcv1's TF-IDF kept sparse.
"""

import copy
import csv
import functools
import gzip
import hashlib
import inspect
import itertools
import math
import os
import pathlib
import pickle
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


# Errors and downloads ------------------------------------------------------------------------------------
class DataError(ValueError):
    """A problem with a dataset's files that the user can fix (not a bug of ours), said in one line."""


def load_or_exit(*args, **kwargs):
    """`load` for the scripts: a DataError ends the run with its one line (exit status 1), not a traceback."""
    try:
        return load(*args, **kwargs)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


def require(condition, message):
    """A check on the user's files: DataError(message) unless `condition`."""
    if not condition:
        raise DataError(message)


DOWNLOAD_OFF = "downloading is off (--no-download, or data.load's default download=False)"


def download_or_explain(download, what, source, size, target, by_hand):
    """download() after a line saying what comes from where; a failure is one DataError line with `by_hand`."""
    print(f"downloading {what} ({size}) from {source} into {target}", file=sys.stderr, flush=True)
    try:
        return download()
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError, torchvision's failed md5 a RuntimeError
        reason = " ".join(str(error).split())  # torchvision lists every mirror it tried on lines of their own
        raise DataError(f"could not download {what} from {source} ({reason}); {by_hand}") from error


def sklearn_fetch(fetch, download, what, source, size, target, by_hand, archives=(), caches=()):
    """A scikit-learn fetcher's result: from its cache, else from `archives` [(path, sha256)] put there by hand
    (scikit-learn >= 1.6 reads them without downloading; checked here first), else downloaded if allowed."""
    for path, checksum in archives:
        if os.path.exists(path) and hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() != checksum:
            raise DataError(f"{path} is not the file scikit-learn expects (sha256 differs from {checksum[:16]}..., "
                            f"a partial download?); delete it, then {by_hand}")
    try:
        return fetch(download_if_missing=False)
    except Exception as error:  # scikit-learn's "not found" is an OSError; a corrupt cache raises anything
        broken = [path for path in caches if os.path.exists(path)]
        if broken:
            raise DataError(f"{' and '.join(broken)}: scikit-learn's cache of {what} cannot be read ({error!r}); "
                            f"delete it and run again") from None
        if not isinstance(error, OSError):
            raise
    placed = bool(archives) and all(os.path.exists(path) for path, _ in archives)
    if not download and not placed:
        raise DataError(f"{what} not found in {target} and {DOWNLOAD_OFF}; {by_hand}")
    return download_or_explain(lambda: fetch(download_if_missing=True), what,
                               "the files put there" if placed else source, size, target, by_hand)


# Dataset containers --------------------------------------------------------------------------------------
@dataclass
class DatasetInfo:
    """What a method script needs to know about a dataset."""

    name: str
    modality: str  # "image", "points" or "text"
    level_names: list  # coarse -> fine; for multi-label data a single entry
    num_classes: list  # one per level (multi-label: [K])
    multilabel: bool
    label_names: list  # one list of names per level
    channels: int = 1
    image_size: int = 32
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    # "crop": random resized crop + flip + colour (natural images); "canvas": small shifts and scales only, so
    # the ring digit is never cut away; "points": point-cloud views with per-axis scaling; "points-isotropic".
    augment: str = "crop"
    extra: dict = field(default_factory=dict)


class ResidentDataset(Dataset):
    """Inputs [N, ...] and targets as tensors, small enough to keep whole on the training device."""

    def __init__(self, inputs, targets, info):
        if inputs.shape[0] != len(targets):
            raise ValueError(f"{inputs.shape[0]} inputs but {len(targets)} targets")
        self.inputs, self.targets, self.info = inputs, targets, info

    def __len__(self):
        return self.inputs.shape[0]

    def __getitem__(self, index):
        return self.inputs[index], self.targets[index]

    def subset(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return type(self)(self.inputs[indices.numpy()], self.targets[indices], self.info)


class TfidfDataset(ResidentDataset):
    """TF-IDF rows as a scipy sparse matrix [N, D]: too large to densify whole (rcv1: 47,236 columns), so they
    stay sparse (`batches` and `to_device` leave them as they are) and a DataLoader densifies one batch at a time."""

    matrix = property(lambda self: self.inputs)

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def __getitems__(self, indices):
        return list(zip(torch.from_numpy(self.inputs[np.asarray(indices)].toarray()), self.targets[indices]))


# hdigits and hmnist: a big central digit (the class), a small one in the ring around it (the category) ----
DIGIT_NAMES = [str(d) for d in range(10)]
COMPOSITE_NAMES = [f"{k}/{c}" for k in range(10) for c in range(10)]  # "category/class"


def ring_positions(canvas, centre_start, centre_end, patch):
    """Top-left corners [K, 2], row-major, where a patch x patch digit lies in the canvas but not the centre box."""
    start = torch.arange(canvas - patch + 1)
    clear = (start + patch <= centre_start) | (start >= centre_end)
    return torch.cartesian_prod(start, start)[(clear[:, None] | clear[None, :]).flatten()]


def compose_digits(central, small, corners):
    """Paste big central digits [N, S, S] and small ring digits [N, p, p] on a canvas at the given corners."""
    offsets = torch.arange(small.shape[-1])
    where = (torch.arange(len(central))[:, None, None], (corners[:, 0, None] + offsets)[:, :, None],
             (corners[:, 1, None] + offsets)[:, None, :])
    canvas = central.clone()
    canvas[where] = torch.maximum(canvas[where], small)
    return canvas[:, None]


def hdigits_split(split, size, multilabel):
    """`size` 32x32 composites of scikit-learn's 8x8 digits; train and test use disjoint source digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    # Fixed seeds (not the run's), so every method sees the same data.
    source_order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    pool = source_order[: len(labels) * 2 // 3] if split == "train" else source_order[len(labels) * 2 // 3 :]
    by_digit = [pool[labels[pool] == d] for d in range(10)]
    generator = torch.Generator().manual_seed({"train": 1, "test": 2}[split])
    fine = (torch.arange(size) % 100)[torch.randperm(size, generator=generator)]  # every pair equally often
    category, digit_class = fine // 10, fine % 10

    def draw(digit_ids):  # a source image of each digit id
        picks = torch.empty(len(digit_ids), dtype=torch.long)
        for d in range(10):
            where = (digit_ids == d).nonzero().flatten()
            picks[where] = by_digit[d][torch.randint(len(by_digit[d]), (len(where),), generator=generator)]
        return images[picks]

    central = F.interpolate(draw(digit_class)[:, None], scale_factor=2, mode="bilinear", align_corners=False)
    central = F.pad(central[:, 0], (8, 8, 8, 8))  # the 16x16 digit fills the centre box [8, 24)^2
    corners = ring_positions(32, 8, 24, 8)
    corners = corners[torch.randint(len(corners), (size,), generator=generator)]
    canvas = (compose_digits(central, draw(category), corners).clamp(0, 1) * 255).round().to(torch.uint8)
    if multilabel:
        targets = (F.one_hot(category, 10) | F.one_hot(digit_class, 10)).float()
        info = DatasetInfo("hdigits-multilabel", "image", ["digits"], [10], True, [DIGIT_NAMES])
    else:
        targets = torch.stack([category, fine], dim=1)
        info = DatasetInfo("hdigits", "image", ["category", "class"], [10, 100], False, [DIGIT_NAMES, COMPOSITE_NAMES])
    info.mean, info.std, info.augment = (0.1,), (0.25,), "canvas"
    return ResidentDataset(canvas, targets, info)


MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path):
    """An IDX file (MNIST's format), plain or gzipped, as a tensor."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            header = f.read(4)
            zero, dtype_code, ndim = struct.unpack(">HBB", header) if len(header) == 4 else (None, None, 0)
            require(zero == 0 and dtype_code == 0x08, f"{path} is not an unsigned-byte IDX file (empty or truncated?)")
            dims = f.read(4 * ndim)
            require(len(dims) == 4 * ndim, f"{path}: truncated IDX header")
            shape, array = struct.unpack(f">{ndim}I", dims), np.frombuffer(f.read(), dtype=np.uint8)
    except (EOFError, OSError) as error:  # a truncated or corrupt .gz
        raise DataError(f"{path}: unreadable ({error})") from error
    require(array.size == math.prod(shape), f"{path}: header says {shape} but holds {array.size} bytes")
    return torch.from_numpy(array.reshape(shape).copy())


def find_mnist_file(root, name, download):
    raw = os.path.join(root, "MNIST", "raw")
    for candidate in (os.path.join(raw, name), os.path.join(raw, name + ".gz")):
        if os.path.exists(candidate):
            return candidate
    files = ", ".join(name for pair in MNIST_FILES.values() for name in pair)
    by_hand = f"put the four MNIST files ({files}; plain or .gz) into {raw}"
    if not download:
        raise DataError(f"MNIST file {os.path.join(raw, name)}(.gz) not found and {DOWNLOAD_OFF}; {by_hand}")
    from torchvision.datasets import MNIST

    download_or_explain(lambda: MNIST(root, download=True), "MNIST", " or ".join(MNIST.mirrors),
                        "4 files, 11 MiB, md5-checked", raw, by_hand)
    return find_mnist_file(root, name, download=False)


class HierarchicalMNIST(Dataset):
    """Hierarchical MNIST (Ott et al.), composed on demand: 60,000 canvases of 192 px would take 2.2 GB.

    Item i is source digit `indices[i]` padded to 32 and scaled to the centre box, with a second MNIST digit
    scaled to the ring's width (a sixth of the canvas) at a position drawn from (seed, split, source), so an
    item is the same image every time. Test composites use a fixed seed: a spread over seeds is the models'.
    """

    def __init__(self, root, split, download=False, image_size=192, seed=0):
        require(image_size >= 12, f"--image-size must be at least 12 for hmnist, got {image_size}")
        image_path, label_path = (find_mnist_file(root, name, download) for name in MNIST_FILES[split])
        self.digits, labels = read_idx(image_path), read_idx(label_path).long()
        require(self.digits.dim() == 3 and labels.dim() == 1, f"{image_path} must hold images [N, H, W] and "
                f"{label_path} labels [N]; they hold {tuple(self.digits.shape)} and {tuple(labels.shape)}")
        require(len(self.digits) == len(labels) > 0,
                f"{image_path} holds {len(self.digits)} images but {label_path} {len(labels)} labels")
        require(labels.max() <= 9, f"{label_path}: MNIST labels are digits 0..9, found {int(labels.max())}")
        self.image_size, self.ring = image_size, max(1, round(image_size / 6))
        self.corners = ring_positions(image_size, self.ring, image_size - self.ring, self.ring)
        rng = torch.Generator().manual_seed(seed if split == "train" else 1_000_003)
        self.small_index = torch.randint(len(self.digits), (len(self.digits),), generator=rng)
        self.corner_index = torch.randint(len(self.corners), (len(self.digits),), generator=rng)
        self.indices = torch.arange(len(self.digits))
        category = labels[self.small_index]
        self.targets = torch.stack([category, 10 * category + labels], dim=1)
        self.info = DatasetInfo("hmnist", "image", ["category", "class"], [10, 100], False,
                                [DIGIT_NAMES, COMPOSITE_NAMES], image_size=image_size, mean=(0.05,), std=(0.2,),
                                augment="canvas")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.compose(self.indices[index].view(1))[0], self.targets[index]

    def subset(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        part = copy.copy(self)  # shares the source digits
        part.indices, part.targets = self.indices[indices], self.targets[indices]
        return part

    def compose(self, sources):
        """The composites of source digits `sources` [n] as uint8 images [n, 1, S, S], in one batched pass."""
        centre = self.image_size - 2 * self.ring
        big = F.pad(self.digits[sources].float()[:, None], (2, 2, 2, 2))
        big = F.interpolate(big, size=(centre, centre), mode="bilinear", align_corners=False)[:, 0]
        small = self.digits[self.small_index[sources]].float()[:, None]
        small = F.interpolate(small, size=(self.ring, self.ring), mode="bilinear", align_corners=False)[:, 0]
        canvas = compose_digits(F.pad(big, (self.ring,) * 4), small, self.corners[self.corner_index[sources]])
        return canvas.clamp(0, 255).round().to(torch.uint8)


# cifar100: the python pickles (torchvision's CIFAR100 drops the coarse labels) ----------------------------
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FINE_TO_COARSE = [  # the superclass of each class, in the order of the pickles' fine label ids
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1,
    10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3, 2, 12,
    12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0,
    17, 8, 14, 13,
]


def cifar100_split(root, split, download):
    folder = os.path.join(root, "cifar-100-python")
    path, meta_path = os.path.join(folder, split), os.path.join(folder, "meta")
    missing = [name for name in (path, meta_path) if not os.path.exists(name)]
    unpack = f"unpack cifar-100-python.tar.gz into {root} so that {folder} holds train, test and meta"
    require(download or not missing, f"CIFAR-100: {' and '.join(missing)} not found and {DOWNLOAD_OFF}; {unpack}")
    tarball = os.path.join(root, "cifar-100-python.tar.gz")
    if missing and os.path.exists(tarball):  # put there by hand, or left by a download that broke off
        from torchvision.datasets.utils import check_integrity, extract_archive

        require(check_integrity(tarball, CIFAR100_MD5), f"{tarball} fails its md5 check (not {CIFAR100_MD5}: a "
                f"partial download?); delete it and run again, or {unpack}")
        extract_archive(tarball, root)
        missing = [name for name in (path, meta_path) if not os.path.exists(name)]
    if missing:
        from torchvision.datasets.utils import download_and_extract_archive

        by_hand = f"put cifar-100-python.tar.gz (md5 {CIFAR100_MD5}) into {root} and run again, or {unpack}"
        download_or_explain(lambda: download_and_extract_archive(CIFAR100_URL, root, md5=CIFAR100_MD5),
                            "CIFAR-100", CIFAR100_URL, "161 MiB, md5-checked", root, by_hand)
    entry = read_pickle(path, (b"data", b"fine_labels", b"coarse_labels"))
    meta = read_pickle(meta_path, (b"coarse_label_names", b"fine_label_names"))
    try:
        images = torch.from_numpy(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        fine, coarse = (torch.tensor(entry[key], dtype=torch.long) for key in (b"fine_labels", b"coarse_labels"))
    except (ValueError, TypeError) as error:
        raise DataError(f"{path}: not a CIFAR-100 batch of 3x32x32 images with integer labels ({error})") from error
    require(len(images) > 0, f"{path}: a CIFAR-100 batch without images")
    require(len(images) == len(fine) == len(coarse),
            f"{path}: {len(images)} images, {len(fine)} fine and {len(coarse)} coarse labels")
    require(0 <= fine.min() <= fine.max() < 100, f"{path}: fine labels outside 0..99")
    require(torch.equal(coarse, torch.tensor(FINE_TO_COARSE)[fine]),
            f"{path}: coarse labels disagree with the CIFAR-100 superclass table")
    names = [[n.decode() for n in meta[key]] for key in (b"coarse_label_names", b"fine_label_names")]
    info = DatasetInfo("cifar100", "image", ["superclass", "class"], [20, 100], False, names, channels=3,
                       mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop")
    return ResidentDataset(images, torch.stack([coarse, fine], dim=1), info)


def read_pickle(path, keys):
    """A CIFAR python pickle: a dict with bytes keys, checked to hold `keys`."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as error:  # a truncated or foreign pickle raises any of a dozen types
        raise DataError(f"{path}: not a readable CIFAR-100 pickle, truncated or corrupt? ({error!r})") from error
    missing = [key.decode() for key in keys if not isinstance(entry, dict) or key not in entry]
    require(not missing, f"{path}: a CIFAR-100 pickle without {', '.join(missing)}")
    return entry


# modelnet40 and shapes: point clouds sampled from surfaces, unit-sphere normalised ------------------------
def unit_sphere(points):
    """Centre each cloud [..., P, 3] at its mean and divide by its largest point norm (max norm 1)."""
    points = points - points.mean(axis=-2, keepdims=True)
    return points / np.maximum(np.linalg.norm(points, axis=-1).max(axis=-1)[..., None, None], 1e-12)


def sample_surface(triangles, count, rng):
    """`count` points uniformly distributed on each triangle mesh's surface: [B, F, 3, 3] -> [B, count, 3].

    Faces are drawn in proportion to their area (one searchsorted over every mesh's cumulative areas, mesh b
    shifted to [b, b + 1]), then (1 - sqrt(r1)) a + sqrt(r1) (1 - r2) b + sqrt(r1) r2 c, r1, r2 ~ U(0, 1).
    """
    a, b, c = triangles[:, :, 0], triangles[:, :, 1], triangles[:, :, 2]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=-1).astype(np.float64)  # [B, F]
    if not (area.sum(axis=1) > 0).all():
        raise ValueError("cannot sample the surface of a mesh with zero area")
    meshes, faces = area.shape
    offset = np.arange(meshes)[:, None]
    cdf = np.cumsum(area, axis=1)
    cdf = cdf / cdf[:, -1:] + offset  # row b ends exactly at b + 1
    face = np.searchsorted(cdf.ravel(), (rng.random((meshes, count)) + offset).ravel(), side="right")
    face = np.minimum(face.reshape(meshes, count) - offset * faces, faces - 1)
    s, r2 = np.sqrt(rng.random((meshes, count, 1))), rng.random((meshes, count, 1))
    return (1 - s) * a[offset, face] + s * (1 - r2) * b[offset, face] + s * r2 * c[offset, face]


MODELNET40_CLASSES = (
    "airplane bathtub bed bench bookshelf bottle bowl car chair cone cup curtain desk door dresser flower_pot "
    "glass_box guitar keyboard lamp laptop mantel monitor night_stand person piano plant radio range_hood sink "
    "sofa stairs stool table tent toilet tv_stand vase wardrobe xbox").split()
# Our grouping into 8 coarse groups by what the object is for (ModelNet40 has no hierarchy); `groups=` replaces it.
MODELNET40_GROUPS = {name: group for group, names in [
    ("seating", "bed bench chair sofa stool"),
    ("tables_storage", "bookshelf desk dresser night_stand table tv_stand wardrobe"),
    ("vehicles", "airplane car"),
    ("containers", "bottle bowl cup flower_pot glass_box vase"),
    ("electronics", "keyboard lamp laptop monitor radio xbox"),
    ("fixtures", "bathtub range_hood sink toilet"),
    ("structures", "cone curtain door mantel stairs tent"),
    ("people_plants_music", "guitar person piano plant")] for name in names.split()}
MODELNET40_SOURCES = ("modelnet40_normal_resampled.zip (the PointNet++ release, once at "
                      "https://shapenet.cs.stanford.edu/media/; copies circulate under that file name) or Princeton's "
                      "ModelNet40.zip (https://modelnet.cs.princeton.edu/)")


def modelnet40_split(root, split, groups=None, points=1024):
    """ModelNet40 point clouds [N, points, 3] with (group, class) targets, class ids in shape-names order.

    From ROOT/modelnet40_normal_resampled/ (text files of "x,y,z,nx,ny,nz" rows, the first `points` kept, as
    PointNet++ does) or else ROOT/ModelNet40/<class>/<split>/*.off (`points` surface samples, seeded by the
    file's position). Parsed once, cached beside the data under a hash of what defines the split (list files,
    or meshes' names and sizes), so that a full unzip after a partial one is parsed again.
    """
    resampled, meshes = os.path.join(root, "modelnet40_normal_resampled"), os.path.join(root, "ModelNet40")
    require(os.path.isdir(resampled) or os.path.isdir(meshes), f"ModelNet40 not found: expected {resampled}/ "
            f"(modelnet40_shape_names.txt, modelnet40_train.txt, modelnet40_test.txt, <class>/<class>_0001.txt) or "
            f"OFF meshes {meshes}/<class>/<train|test>/*.off; it has no stable checksummed source to download "
            f"from: get {MODELNET40_SOURCES} and unzip it into {root}")
    if os.path.isdir(resampled):
        folder, list_file = resampled, os.path.join(resampled, f"modelnet40_{split}.txt")
        names, samples = read_list(os.path.join(resampled, "modelnet40_shape_names.txt")), read_list(list_file)
        listing, files = names + samples, []
        for sample in samples:
            name = sample.rsplit("_", 1)[0]  # "night_stand_0001" -> "night_stand"
            path = os.path.join(folder, name, sample + ".txt")
            require(name in names and os.path.exists(path), f"{list_file} names {sample}, but {path} is not there"
                    + ("" if name in names else f" ({name!r} is not in modelnet40_shape_names.txt)"))
            files.append((names.index(name), path))
    else:
        folder, names = meshes, MODELNET40_CLASSES
        files = [(i, os.path.join(folder, name, split, file)) for i, name in enumerate(names)
                 if os.path.isdir(os.path.join(folder, name, split))
                 for file in sorted(os.listdir(os.path.join(folder, name, split))) if file.endswith(".off")]
        require(files, f"no OFF meshes under {os.path.join(folder, '<class>', split)}")
        listing = [f"{os.path.relpath(path, folder)} {os.path.getsize(path)}" for _, path in files]
    groups = MODELNET40_GROUPS if groups is None else groups
    missing = [name for name in names if name not in groups]
    require(not missing, f"ModelNet40 classes {missing} (from {folder}) have no coarse group; "
            f"data.load('modelnet40', ..., groups={{class: group}}) must name one for each")
    group_names = sorted({groups[name] for name in names})
    key = hashlib.sha1("\n".join(listing).encode()).hexdigest()[:12]
    cache = os.path.join(folder, f"modelnet40_{split}_{points}_{key}")
    if os.path.exists(cache + ".npy") and os.path.exists(cache + "_labels.npy"):
        clouds, fine = np.load(cache + ".npy"), np.load(cache + "_labels.npy")
    else:
        clouds = np.empty((len(files), points, 3), dtype=np.float32)
        for k, (_, path) in enumerate(tqdm(files, desc=f"reading ModelNet40 {split} (once)", leave=False)):
            clouds[k] = read_cloud(path, points, seed=[{"train": 0, "test": 1}[split], k])
        clouds, fine = unit_sphere(clouds).astype(np.float32), np.array([c for c, _ in files], dtype=np.int64)
        for path, array in ((cache + ".npy", clouds), (cache + "_labels.npy", fine)):
            with open(path + ".tmp", "wb") as f:  # atomic: an interrupted parse leaves no half cache
                np.save(f, array)
            os.replace(path + ".tmp", path)
    fine = torch.from_numpy(fine).long()
    coarse = torch.tensor([group_names.index(groups[name]) for name in names])[fine]
    info = DatasetInfo("modelnet40", "points", ["group", "class"], [len(group_names), len(names)], False,
                       [group_names, list(names)], augment="points")
    return ResidentDataset(torch.from_numpy(clouds), torch.stack([coarse, fine], dim=1), info)


def read_list(path):
    """The non-empty lines of a ModelNet40 list file (class names, or the samples of a split)."""
    require(os.path.exists(path), f"{path} not found (ModelNet40's list files are modelnet40_shape_names.txt, "
            f"modelnet40_train.txt and modelnet40_test.txt)")
    lines = [line.strip() for line in read_lines(path) if line.strip()]
    require(lines, f"{path} is empty")
    return lines


def read_cloud(path, points, seed):
    """`points` xyz points of a ModelNet40 file: a resampled text file's first rows, or samples of an OFF mesh's
    surface drawn from `seed`."""
    if path.endswith(".off"):
        vertices, faces = read_off(path)
        try:
            return sample_surface(vertices[faces][None], points, np.random.default_rng(seed))[0]
        except ValueError as error:  # every face degenerate
            raise DataError(f"{path}: {error}") from None
    with open(path, errors="replace") as f:
        rows = list(itertools.islice(f, points))
    require(len(rows) == points, f"{path} has {len(rows)} points, fewer than the {points} asked for")
    try:
        return np.loadtxt(rows, delimiter=",", usecols=(0, 1, 2), ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: expected comma-separated rows x,y,z,nx,ny,nz ({error})") from error


def read_off(path):
    """(vertices [V, 3], triangles [F, 3]) of an OFF mesh, polygons as fans; Princeton's files sometimes glue
    the counts to the magic word: "OFF490 518 0"."""
    with open(path, errors="replace") as f:  # a binary file is then "not an OFF file", not a UnicodeDecodeError
        lines = [line for line in (line.split("#")[0].strip() for line in f) if line]
    require(lines and lines[0].startswith("OFF"), f"{path} is not an OFF file (it starts with {lines[:1]})")
    try:
        counts, start = (lines[0][3:].split(), 1) if lines[0][3:].strip() else (lines[1].split(), 2)
        num_vertices, num_faces = int(counts[0]), int(counts[1])
        vertex_lines = lines[start : start + num_vertices]
        face_lines = lines[start + num_vertices : start + num_vertices + num_faces]
        if len(vertex_lines) != num_vertices or len(face_lines) != num_faces:
            raise ValueError(f"the header announces {num_vertices} vertices and {num_faces} faces")
        vertices = np.array([line.split()[:3] for line in vertex_lines], dtype=np.float64).reshape(num_vertices, 3)
        tokens = " ".join(face_lines).split()
        if len(tokens) == 4 * num_faces and all(count == "3" for count in tokens[0::4]):  # triangles only: fast
            faces = np.array(tokens, dtype=np.int64).reshape(num_faces, 4)[:, 1:]
        else:
            faces = []
            for line in face_lines:
                corners = [int(t) for t in line.split()]
                polygon = corners[1 : 1 + corners[0]]
                faces += [(polygon[0], polygon[k], polygon[k + 1]) for k in range(1, len(polygon) - 1)]
            faces = np.array(faces, dtype=np.int64).reshape(-1, 3)
    except (ValueError, IndexError) as error:
        raise DataError(f"{path}: malformed OFF file ({error})") from error
    require(len(faces) > 0, f"{path}: a mesh without faces has no surface to sample points from")
    require(faces.min() >= 0 and faces.max() < num_vertices, f"{path}: face indices must lie in [0, {num_vertices})")
    return vertices, faces


SHAPES = ["sphere", "ellipsoid", "torus", "cylinder", "cone", "cube", "box", "pyramid"]  # 5 curved, 3 flat


def revolve(profile, segments):
    """Triangles [B, 2 K segments, 3, 3] swept by profiles [B, K + 1, 2] of (radius, height) turning around z in
    `segments` steps from 45 degrees, so that four steps make an axis-aligned square (a pyramid from a cone)."""
    angle = np.pi / 4 + 2 * np.pi * np.arange(segments + 1) / segments
    radius, height = profile[..., 0, None], profile[..., 1, None]
    grid = np.stack([radius * np.cos(angle), radius * np.sin(angle),
                     np.broadcast_to(height, radius.shape[:-1] + angle.shape)], axis=-1)
    p00, p01, p10, p11 = grid[:, :-1, :-1], grid[:, :-1, 1:], grid[:, 1:, :-1], grid[:, 1:, 1:]
    quads = np.concatenate([np.stack([p00, p01, p11], axis=-2), np.stack([p00, p11, p10], axis=-2)], axis=1)
    return quads.reshape(len(profile), -1, 3, 3)


def shape_meshes(shape, n, rng):
    """Triangle meshes [n, F, 3, 3] of one procedural shape with random proportions (before rotation)."""
    uniform = functools.partial(rng.uniform, size=n)

    def profile(*corners):  # (radius, height) pairs, each a number or an [n] array -> [n, K, 2]
        return np.stack([np.broadcast_to(value, n) for corner in corners for value in corner], -1).reshape(n, -1, 2)

    arc, axes = np.linspace(0, np.pi, 25), np.ones((n, 3))
    if shape in ("sphere", "ellipsoid"):
        triangles = revolve(np.broadcast_to(np.stack([np.sin(arc), np.cos(arc)], -1), (n, 25, 2)), 48)
        if shape == "ellipsoid":
            axes[:, 1], axes[:, 2] = uniform(0.35, 0.75), uniform(0.35, 0.75)
    elif shape == "torus":
        tube, loop = uniform(0.2, 0.5)[:, None], np.linspace(0, 2 * np.pi, 25)
        triangles = revolve(np.stack([1 + tube * np.cos(loop), tube * np.sin(loop)], -1), 48)
    elif shape in ("cylinder", "cube", "box"):
        half = uniform(0.4, 1.25) if shape == "cylinder" else np.full(n, np.sqrt(0.5))  # cube: side = height
        triangles = revolve(profile((0, -half), (1, -half), (1, half), (0, half)), 48 if shape == "cylinder" else 4)
        if shape == "box":
            axes[:, 1], axes[:, 2] = uniform(0.35, 0.75), uniform(0.35, 0.75)
    elif shape in ("cone", "pyramid"):
        triangles = revolve(profile((0, 0), (1, 0), (0, uniform(1.0, 2.5))), 48 if shape == "cone" else 4)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return triangles * axes[:, None, None, :]


def random_rotations(n, rng):
    """n uniformly random rotation matrices [n, 3, 3] (from normalised Gaussian quaternions)."""
    quaternion = rng.normal(size=(n, 4))
    w, x, y, z = (quaternion / np.linalg.norm(quaternion, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], axis=1)


def shapes_split(split, size, points=256):
    """`size` clouds balanced over SHAPES (curved / polyhedral -> shape), randomly rotated, from fixed seeds.

    256 points (ModelNet40 has 1024) suffice for these surfaces and make the CPU demo four times faster."""
    rng = np.random.default_rng({"train": 1, "test": 2}[split])
    fine = rng.permutation(np.arange(size) % len(SHAPES))
    clouds = np.empty((size, points, 3), dtype=np.float32)
    for k, shape in enumerate(SHAPES):
        where = np.flatnonzero(fine == k)
        surface = sample_surface(shape_meshes(shape, len(where), rng), points, rng)
        clouds[where] = unit_sphere(np.einsum("npj,nij->npi", surface, random_rotations(len(where), rng)))
    fine = torch.from_numpy(fine).long()
    coarse = (fine >= SHAPES.index("cube")).long()
    # Proportions tell a sphere from an ellipsoid and a cube from a box, so the views must not rescale the axes:
    # with per-axis scaling, SupCon's features fell below an untrained PointNet's.
    info = DatasetInfo("shapes", "points", ["surface", "shape"], [2, len(SHAPES)], False,
                       [["curved", "polyhedral"], list(SHAPES)], augment="points-isotropic")
    return ResidentDataset(torch.from_numpy(clouds), torch.stack([coarse, fine], dim=1), info)


# Text: wos, 20newsgroups, rcv1 and skdocs; all but rcv1 (TF-IDF) as hashed word ids ----------------------
# A document is its first TEXT_LENGTH words, hashed (no vocabulary to build or store, the same ids on every
# machine) and 0-padded; bigrams are hashed per batch (`ngram_ids`), after the views have moved words.
TEXT_LENGTH = 256
TEXT_BUCKETS = 2 ** 18
MASK = "[MASK]"  # stands for a masked word (skdocs masks the estimator's own name); one token
TOKEN = re.compile(r"\[mask\]|[a-z0-9]+")


def tokenize(text):
    """Lower-cased words and numbers; punctuation and underscores split words."""
    return TOKEN.findall(text.lower())


def hash_token(token, buckets=TEXT_BUCKETS):
    """A word's id in 1..buckets (CRC-32 of its UTF-8 bytes, stable across processes, unlike hash())."""
    return zlib.crc32(token.encode("utf-8")) % buckets + 1


def encode_texts(texts, length=TEXT_LENGTH, buckets=TEXT_BUCKETS):
    """Documents -> LongTensor [N, length] of hashed word ids: the first `length` words, 0-padded."""
    ids, known = np.zeros((len(texts), length), dtype=np.int64), {}
    for row, text in enumerate(texts):
        words = tokenize(text)[:length]
        ids[row, : len(words)] = [known[w] if w in known else known.setdefault(w, hash_token(w, buckets))
                                  for w in words]
    return torch.from_numpy(ids)


def text_info(name, level_names, label_names, multilabel=False, **extra):
    """DatasetInfo of a text dataset; word-id inputs record their bucket count and length in `extra`."""
    if extra.get("input") != "tfidf":
        extra = {"input": "words", "buckets": TEXT_BUCKETS, "length": TEXT_LENGTH, **extra}
    return DatasetInfo(name, "text", level_names, [len(names) for names in label_names], multilabel,
                       label_names, channels=0, image_size=0, mean=(), std=(), augment="text", extra=extra)


WOS_URL = ("https://data.mendeley.com/public-files/datasets/9rw3vkcfy4/files/"
           "c9ea673d-5542-44c0-ab7b-f1311f7d61df/file_downloaded")  # WebOfScience.zip, Mendeley Data v6
WOS_RELEASES = ("46985", "11967", "5736")


def wos_split(root, split, release="46985"):
    """Web of Science (Kowsari et al. 2017, HDLTex): WOS-<release>/{X,YL1,YL2}.txt, a document per line.

    An area is a (YL1 domain, YL2) pair, so every area lies in one domain; Y.txt is not read: three of its ids
    occur under two domains in WOS-46985. A fixed stratified 80/20 split of the areas. Not downloaded: Mendeley
    Data publishes no checksum."""
    require(release in WOS_RELEASES, f"unknown WOS release {release!r}; choose from {', '.join(WOS_RELEASES)}")
    folder = os.path.join(root, "WebOfScience", f"WOS{release}")
    paths = {name: os.path.join(folder, f"{name}.txt") for name in ("X", "YL1", "YL2")}
    missing = [path for path in paths.values() if not os.path.exists(path)]
    require(not missing, f"WOS-{release}: {', '.join(missing)} not found; get WebOfScience.zip from Mendeley Data "
            f"(doi:10.17632/9rw3vkcfy4.6, {WOS_URL}; no published checksum, so it is not downloaded) and unzip it "
            f"so that {folder} holds X.txt, YL1.txt and YL2.txt")
    texts = read_lines(paths["X"])
    require(texts, f"{paths['X']} is empty")
    labels = []
    for path in (paths["YL1"], paths["YL2"]):  # one non-negative integer per line, as many lines as texts
        lines = read_lines(path)
        require(len(lines) == len(texts), f"{path} has {len(lines)} lines but {paths['X']} has {len(texts)}")
        for number, line in enumerate(lines, 1):
            require(re.fullmatch(r"\s*[0-9]+\s*", line),
                    f"{path}, line {number}: {line!r} is not a label id (a non-negative integer)")
        labels.append(torch.tensor([int(line) for line in lines], dtype=torch.long))
    pairs, area = torch.stack(labels, dim=1).unique(dim=0, return_inverse=True)
    domains = pairs[:, 0].unique()
    domain = torch.searchsorted(domains, labels[0])  # numbered 0.. even if the files skip one
    keep = split_indices(area, split)
    require(len(keep) > 0, f"{paths['X']}: {len(texts)} documents leave the {split} split empty (20 % of each "
            "area goes to test); is the release complete?")
    info = text_info("wos", ["domain", "area"], [[f"domain {k}" for k in domains.tolist()],
                                                 [f"domain {k}, area {j}" for k, j in pairs.tolist()]])
    targets = torch.stack([domain, area], dim=1)[keep]
    return ResidentDataset(encode_texts([texts[i] for i in keep.tolist()]), targets, info)


def read_lines(path):
    """The lines of a text file split on "\n" only (a trailing "\r" dropped): str.splitlines also splits on
    "\x85", "\u2028" and others, which can occur inside an abstract and would shift texts against labels."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        lines = f.read().split("\n")
    return [line.removesuffix("\r") for line in (lines[:-1] if lines[-1] == "" else lines)]


def newsgroups_split(root, split, download):
    """20 Newsgroups (bydate), headers, footers and quotes removed: "rec" -> "rec.autos"."""
    from sklearn.datasets import _twenty_newsgroups, fetch_20newsgroups

    archive, home = _twenty_newsgroups.ARCHIVE, os.path.join(root, "20news_home")
    by_hand = f"put {archive.filename} from {archive.url} into {home} and run again"
    cache = os.path.join(root, os.path.splitext(_twenty_newsgroups.CACHE_NAME)[0] + "_py3.pkz")
    bunch = sklearn_fetch(functools.partial(fetch_20newsgroups, data_home=root, subset=split,
                                            remove=("headers", "footers", "quotes")),
                          download, "20 Newsgroups", archive.url, "14 MB, sha256-checked", root, by_hand,
                          [(os.path.join(home, archive.filename), archive.checksum)], [cache])
    groups = list(bunch.target_names)
    tops = sorted({group.split(".")[0] for group in groups})
    fine = torch.as_tensor(np.asarray(bunch.target), dtype=torch.long)
    coarse = torch.tensor([tops.index(group.split(".")[0]) for group in groups], dtype=torch.long)[fine]
    info = text_info("20newsgroups", ["top", "group"], [tops, groups])
    return ResidentDataset(encode_texts(bunch.data), torch.stack([coarse, fine], dim=1), info)


RCV1_ROOTS = ("CCAT", "ECAT", "GCAT", "MCAT")


def rcv1_split(root, split, download, test_size=20_000):
    """RCV1-v2's LYRL2004 split: log TF-IDF vectors [N, 47236] kept sparse, 103 topics multi-hot, grouped by
    root (the topic's first letter: C15 -> CCAT) for mlcl.py's group heads. A fixed draw of `test_size` of
    the 781,265 test documents is kept (None: all), since evaluation densifies the test set (3.8 GB at 20,000)."""
    import scipy.sparse
    from sklearn.datasets import _rcv1, fetch_rcv1

    folder = os.path.join(root, "RCV1")
    files = [*_rcv1.XY_METADATA, _rcv1.TOPICS_METADATA]
    by_hand = f"put the six RCV1 files ({', '.join(f'{f.filename} from {f.url}' for f in files)}) into {folder}"
    caches = [os.path.join(folder, f"{name}_py3.pkl")
              for name in ("samples", "sample_id", "sample_topics", "topics_names")]
    bunch = sklearn_fetch(functools.partial(fetch_rcv1, data_home=root, subset=split), download, "RCV1",
                          "https://ndownloader.figshare.com (6 files)", "656 MB, sha256-checked", folder, by_hand,
                          [(os.path.join(folder, f.filename), f.checksum) for f in files], caches)
    topics = [str(name) for name in bunch.target_names]
    groups = [(group, [k for k, topic in enumerate(topics) if topic[0] == group[0]]) for group in RCV1_ROOTS]
    if sum(len(members) for _, members in groups) != len(topics):
        raise ValueError(f"RCV1 topics outside the four roots {RCV1_ROOTS}: {topics}")
    inputs = scipy.sparse.csr_matrix(bunch.data, dtype=np.float32)
    targets = torch.from_numpy(np.asarray(bunch.target.toarray(), dtype=np.float32))
    if split == "test" and test_size is not None and test_size < len(targets):
        keep = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))[:test_size].sort().values
        inputs, targets = inputs[keep.numpy()], targets[keep]
    info = text_info("rcv1", ["topics"], [topics], multilabel=True, input="tfidf", input_dim=inputs.shape[1],
                     label_groups=groups)
    return TfidfDataset(inputs, targets, info)


ESTIMATOR_TYPES = ("classifier", "regressor", "transformer", "clusterer")


def docstring_documents(doc):
    """A numpydoc docstring's documents: the summary (before the first section) and one per Parameters entry
    ("name : type" line and its indented description)."""
    # A section starts at a non-blank line underlined by three or more dashes.
    parts = re.split(r"^[^\S\n]*(\S[^\n]*?)[^\S\n]*\n[^\S\n]*-{3,}[^\S\n]*$", inspect.cleandoc(doc or ""), flags=re.M)
    sections = {"summary": parts[0].splitlines(),
                **{name: text.splitlines() for name, text in zip(parts[1::2], parts[2::2])}}
    documents = ["\n".join(sections["summary"]).strip()]
    for line in sections.get("Parameters", []):
        if line.strip() and not line[0].isspace():
            documents.append(line)
        elif len(documents) > 1:
            documents[-1] += "\n" + line
    return [document.strip() for document in documents if tokenize(document)]


def camel_pieces(word):
    """"MLPClassifier" -> ["MLP", "Classifier"]; "NuSVC" -> ["Nu", "SVC"]."""
    return re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+", word)


def mask_name(text, name):
    """MASK for an estimator's name and its CamelCase pieces of two or more letters, in any case, also inside
    other CamelCase words ("LogisticRegression" in LogisticRegressionCV's text)."""
    masked = {name.lower()} | {piece.lower() for piece in camel_pieces(name) if len(piece) > 1}

    def replace(match):
        word, parts = match.group(0), camel_pieces(match.group(0))
        if word.lower() in masked:
            return MASK
        if any(part.lower() in masked for part in parts):
            return " ".join(MASK if part.lower() in masked else part for part in parts)
        return word

    return re.sub(r"[A-Za-z0-9]+", replace, text)


@functools.lru_cache(maxsize=1)
def skdocs_corpus(min_documents=4):
    """(texts, sub-module id, estimator id, type multi-hot, sub-module names, estimator names) of the installed
    scikit-learn's estimators with >= min_documents documents; types are subclasses of its four mixins."""
    import warnings

    from sklearn.base import ClassifierMixin, ClusterMixin, RegressorMixin, TransformerMixin
    from sklearn.utils import all_estimators

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimators = all_estimators()
    kept = [(name, cls.__module__.split(".")[1], cls, documents) for name, cls in estimators
            if len(documents := docstring_documents(cls.__doc__)) >= min_documents]
    modules = sorted({module for _, module, _, _ in kept})
    counts = torch.tensor([len(documents) for *_, documents in kept])
    mixins = (ClassifierMixin, RegressorMixin, TransformerMixin, ClusterMixin)
    kinds = torch.tensor([[float(issubclass(cls, mixin)) for mixin in mixins] for _, _, cls, _ in kept])
    return ([mask_name(document, name) for name, _, _, documents in kept for document in documents],
            torch.tensor([modules.index(module) for _, module, _, _ in kept]).repeat_interleave(counts),
            torch.arange(len(kept)).repeat_interleave(counts), kinds.repeat_interleave(counts, dim=0),
            modules, [name for name, *_ in kept])


def skdocs_split(split, multilabel):
    """Estimator docstrings as documents (summary, one per parameter), the estimator's own name masked: module
    -> estimator, or (multi-label) its types, typeless documents dropped; a fixed stratified 80/20 split."""
    texts, coarse, fine, kinds, modules, names = skdocs_corpus()
    keep = split_indices(fine, split)
    if multilabel:
        keep = keep[kinds[keep].sum(1) > 0]
        info = text_info("skdocs-multilabel", ["types"], [list(ESTIMATOR_TYPES)], multilabel=True)
        targets = kinds[keep]
    else:
        info = text_info("skdocs", ["module", "estimator"], [modules, names])
        targets = torch.stack([coarse, fine], dim=1)[keep]
    return ResidentDataset(encode_texts([texts[i] for i in keep.tolist()]), targets, info)


# folder and csv: your own images, resized once and kept resident as uint8 ----------------------------------
IMAGE_MEAN, IMAGE_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's: fixed, so train and test agree


def read_images(folder, files, size, name):
    """uint8 images [N, 3, size, size] of `--dataset name`: each file converted to RGB and resized whole, once."""
    from PIL import Image

    require(size >= 8, f"--image-size must be at least 8 for {name}, got {size}")
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for k, file in enumerate(tqdm(files, desc=f"reading {len(files)} images under {folder}", leave=False)):
        try:
            with Image.open(os.path.join(folder, file)) as image:
                images[k] = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise DataError(f"{os.path.join(folder, file)}: not an image Pillow can read ({error})") from None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def label_tree(folder):
    """(files, label paths) of the images under `folder`, sorted: the folders between it and a file are its label
    path. Hidden files and files whose extension Pillow does not register are skipped without a word: genuine
    trees hold .DS_Store, Thumbs.db, README.txt."""
    from PIL import Image

    known, files, folders = Image.registered_extensions(), [], set()
    for parent, children, names in os.walk(folder):
        children[:] = sorted(name for name in children if not name.startswith("."))
        folders |= {os.path.relpath(os.path.join(parent, name), folder) for name in children}
        files += [os.path.relpath(os.path.join(parent, name), folder) for name in names
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in known]
    files = sorted(files)
    require(files, f"no images under {folder}")
    depths = {}
    for file in files:
        depths.setdefault(file.count(os.sep), os.path.join(folder, file))
    require(len(depths) == 1, f"{folder} mixes depths, every image must lie as many folders deep as the hierarchy "
            "has levels: " + ", ".join(f"{path} ({depth} deep)" for depth, path in sorted(depths.items())))
    require(0 not in depths, f"{depths.get(0)} lies directly in {folder}: images go into class folders")
    paths = [file.split(os.sep)[:-1] for file in files]
    for empty in sorted(folders - {os.path.join(*parts[:k]) for parts in paths for k in range(1, len(parts) + 1)}):
        raise DataError(f"the class folder {os.path.join(folder, empty)} holds no images")
    return files, paths


def folder_split(root, split, image_size):
    """Your images as a hierarchy: the folders between DIR/train (DIR/test) and a file are its label path,
    coarse -> fine, as deep as you like (all files equally deep); DIR/train/animal/cat/1.png is (animal,
    animal/cat). Without train/ and test/, DIR is one tree split 80/20 by a fixed draw stratified by class."""
    require(os.path.isdir(root), f"--dataset folder: {root} (--data-dir) is not a folder")
    halves = [os.path.isdir(os.path.join(root, half)) for half in ("train", "test")]
    require(halves[0] == halves[1], f"{root} holds a {'train' if halves[0] else 'test'} folder but no "
            f"{'test' if halves[0] else 'train'} one: give both, or neither (then {root} is one tree, split 80/20)")
    tree = os.path.join(root, "train") if halves[0] else root
    files, paths = label_tree(tree)
    names = [sorted({"/".join(parts[: k + 1]) for parts in paths}) for k in range(len(paths[0]))]
    ids = [{name: i for i, name in enumerate(level)} for level in names]
    if halves[0] and split == "test":
        tree = os.path.join(root, "test")
        files, paths = label_tree(tree)
        for parts in paths:
            if "/".join(parts) not in ids[-1]:
                raise DataError(f"{os.path.join(tree, *parts)}: a test class that {os.path.join(root, 'train')} lacks")
    targets = torch.tensor([[ids[k]["/".join(parts[: k + 1])] for k in range(len(names))] for parts in paths])
    how = f"under {tree}"
    if not halves[0]:  # the same fixed draw for every method and seed
        keep = split_indices(targets[:, -1], split)
        files, targets = [files[i] for i in keep.tolist()], targets[keep]
        how = f"of {len(paths)} under {root} (no train/ and test/ folders: a fixed 80/20 draw, stratified by class)"
    summary = f"{len(files)} {split} images {how}, {len(names)} levels: {' > '.join(map(str, map(len, names)))} classes"
    info = DatasetInfo("folder", "image", [f"level{k}" for k in range(len(names))], [len(level) for level in names],
                       False, names, channels=3, image_size=image_size, mean=IMAGE_MEAN, std=IMAGE_STD,
                       augment="crop", extra={"summary": summary})
    return ResidentDataset(read_images(tree, files, image_size, "folder"), targets, info)


def csv_split(root, split, image_size):
    """Your images with multi-hot labels, listed in DIR/labels.csv: a `path` column (relative to DIR), and either
    one 0/1 column per label (its name in the header) or a `labels` column of ;-separated names; the split from
    a `split` column of train/test values, else a fixed 80/20 draw (seed 0)."""
    table = os.path.join(root, "labels.csv")
    require(os.path.isfile(table), f"--dataset csv: {table} not found (--data-dir names the folder of labels.csv)")
    with open(table, newline="", encoding="utf-8-sig") as f:  # (utf-8-sig: a spreadsheet's byte-order mark)
        header, *rows = list(csv.reader(f)) or [[]]
    column = {name.strip(): k for k, name in enumerate(header)}
    require("path" in column, f"{table} has no path column (its header: {', '.join(header) or 'none'})")
    rows = [(line, row) for line, row in enumerate(rows, 2) if any(cell.strip() for cell in row)]
    require(rows, f"{table} lists no images")

    def cell(row, name):
        return row[column[name]].strip()

    for line, row in rows:
        require(len(row) == len(header), f"{table}, row {line}: {len(row)} cells, but the header names {len(header)}")
        path = os.path.join(root, cell(row, "path"))
        require(os.path.isfile(path), f"{table}, row {line}: {path} does not exist")
        if "split" in column and cell(row, "split").lower() not in ("train", "test"):
            raise DataError(f"{table}, row {line}: split is {cell(row, 'split')!r}, neither train nor test")
    if "labels" in column:
        sets = [{name.strip() for name in cell(row, "labels").split(";")} - {""} for _, row in rows]
        names = sorted(set().union(*sets))
        targets = torch.tensor([[float(name in labels) for name in names] for labels in sets])
    else:
        names = [name for name in column if name not in ("path", "split")]
        require(names, f"{table} has neither a labels column nor label columns next to path")
        for (line, row), name in itertools.product(rows, names):
            require(cell(row, name) in ("0", "1"), f"{table}, row {line}: {name} is {cell(row, name)!r}, not 0 or 1")
        targets = torch.tensor([[float(cell(row, name)) for name in names] for _, row in rows])
    if "split" in column:
        keep, how = [k for k, (_, row) in enumerate(rows) if cell(row, "split").lower() == split], "its split column"
    else:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        cut = round(0.2 * len(rows))  # as split_indices rounds each class's share
        keep, how = sorted(order[:cut] if split == "test" else order[cut:]), "no split column: a fixed 80/20 draw"
    require(keep, f"{table}: no {split} images ({how})")
    info = DatasetInfo("csv", "image", ["labels"], [len(names)], True, [names], channels=3, image_size=image_size,
                       mean=IMAGE_MEAN, std=IMAGE_STD, augment="crop",
                       extra={"summary": f"{len(keep)} {split} images from {table} ({how}), {len(names)} labels"})
    files = [cell(rows[k][1], "path") for k in keep]
    return ResidentDataset(read_images(root, files, image_size, "csv"), targets[keep], info)


# The entry point: load, with its class-stratified splits and subsets --------------------------------------
# Each loader: (root, split, download, seed, its options) -> Dataset with .info, .targets and .subset(indices).
# No **kwargs: `load` reads the options off the signature, so that a mistyped one is an error.
LOADERS = {
    "hdigits": lambda root, split, download, seed, size=None: hdigits_split(
        split, size or (5000 if split == "train" else 1000), multilabel=False),
    "hdigits-multilabel": lambda root, split, download, seed, size=None: hdigits_split(
        split, size or (5000 if split == "train" else 1000), multilabel=True),
    "cifar100": lambda root, split, download, seed: cifar100_split(root, split, download),
    "hmnist": lambda root, split, download, seed, image_size=None: HierarchicalMNIST(
        root, split, download, image_size=image_size or 192, seed=seed),
    "modelnet40": lambda root, split, download, seed, groups=None, points=None: modelnet40_split(
        root, split, groups, points or 1024),
    "shapes": lambda root, split, download, seed, size=None, points=None: shapes_split(
        split, size or (2000 if split == "train" else 800), points or 256),
    "wos": lambda root, split, download, seed, release=None: wos_split(root, split, release or "46985"),
    "20newsgroups": lambda root, split, download, seed: newsgroups_split(root, split, download),
    "rcv1": lambda root, split, download, seed, test_size=20_000: rcv1_split(root, split, download, test_size),
    "skdocs": lambda root, split, download, seed: skdocs_split(split, multilabel=False),
    "skdocs-multilabel": lambda root, split, download, seed: skdocs_split(split, multilabel=True),
    "folder": lambda root, split, download, seed, image_size=None: folder_split(root, split, image_size or 32),
    "csv": lambda root, split, download, seed, image_size=None: csv_split(root, split, image_size or 32),
}
DATASETS = tuple(LOADERS)
# The method files' defaults per dataset (--arch, --batch-size, --lr, --epochs, --warmup-epochs): the SupCon
# reference recipe for CIFAR-100; only the hdigits, shapes and skdocs ones were tuned. folder and csv: the small
# CNN with hdigits' batch and rate, for 100 epochs (a few thousand images of your own, on one GPU or a CPU).
PRESETS = {
    "hdigits": dict(arch="cnn", batch_size=128, lr=0.2, epochs=25, warmup_epochs=1),
    "hdigits-multilabel": dict(arch="cnn", batch_size=128, lr=0.2, epochs=25, warmup_epochs=1),
    "hmnist": dict(arch="resnet18", batch_size=256, lr=0.2, epochs=100, warmup_epochs=5),
    "cifar100": dict(arch="resnet50", batch_size=1024, lr=0.5, epochs=1000, warmup_epochs=10),
    "shapes": dict(arch="pointnet", batch_size=64, lr=0.1, epochs=3, warmup_epochs=1),
    "modelnet40": dict(arch="pointnet", batch_size=256, lr=0.2, epochs=200, warmup_epochs=10),
    "skdocs": dict(arch="fasttext", batch_size=128, lr=0.1, epochs=20, warmup_epochs=1),
    "skdocs-multilabel": dict(arch="fasttext", batch_size=128, lr=0.1, epochs=20, warmup_epochs=1),
    "20newsgroups": dict(arch="fasttext", batch_size=256, lr=0.1, epochs=30, warmup_epochs=2),
    "wos": dict(arch="fasttext", batch_size=512, lr=0.1, epochs=30, warmup_epochs=2),
    "rcv1": dict(arch="tfidf-linear", batch_size=512, lr=0.1, epochs=30, warmup_epochs=2),
    "folder": dict(arch="cnn", batch_size=128, lr=0.2, epochs=100, warmup_epochs=5),
    "csv": dict(arch="cnn", batch_size=128, lr=0.2, epochs=100, warmup_epochs=5),
}


def load(name, root="./data", split="train", download=False, fraction=1.0, seed=0, **options):
    """A Dataset of (x, y) with `.info`; problems with the files raise DataError.

    `download` fetches a missing dataset with a checksummed source into `root` (off here; the scripts turn it
    on). `fraction` keeps round(fraction * N) training samples, class-stratified, drawn from `seed` (the same
    subset for every method). `options` are the loader's (LOADERS; None takes the default), e.g. `size`
    (hdigits, shapes), `image_size` (hmnist, folder, csv), `points` and `groups` (modelnet40), `test_size`
    (rcv1), `release` (wos); one the dataset does not take is a DataError.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    options = {key: value for key, value in options.items() if value is not None}
    accepted = list(inspect.signature(LOADERS[name]).parameters)[4:]
    unknown = [key for key in options if key not in accepted]
    if unknown:
        flag = {"release": "wos-release"}.get(unknown[0], unknown[0]).replace("_", "-")  # the scripts' flag name
        raise DataError(f"{name} takes no option {unknown[0]} (--{flag}); its options: "
                        f"{', '.join(accepted) or 'none'}")
    dataset = LOADERS[name](root, split, download, seed, **options)
    if split == "train" and fraction < 1.0:
        dataset = dataset.subset(stratified_indices(dataset.targets, fraction, seed))
    return dataset


def stratified_indices(targets, fraction, seed):
    """Indices of round(fraction * N) of the N samples (at least one), stratified by finest class (multi-hot:
    by label set) by largest remainder: a class of n keeps floor(fraction * n), and the samples still missing
    go one each to the classes with the largest remainders (ties drawn from `seed`); rounding each class on
    its own would keep far more than asked of data with many small classes."""
    if targets.dtype.is_floating_point:  # label sets numbered in the order of sum_k 2^k over their labels
        keys = torch.unique((targets > 0.5).flip(1).long(), dim=0, return_inverse=True)[1]
    else:
        keys = targets[:, -1]
    classes = list(shuffled_classes(keys, seed))
    quotas = fraction * torch.tensor([len(members) for members in classes], dtype=torch.float64)
    counts = quotas.floor().long()
    missing = max(1, round(fraction * len(keys))) - int(counts.sum())
    shuffled = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
    by_remainder = shuffled[(quotas - counts)[shuffled].argsort(descending=True, stable=True)]
    counts[by_remainder[:missing]] += 1
    return torch.cat([members[:count] for members, count in zip(classes, counts.tolist())]).sort().values


def split_indices(keys, split, test_fraction=0.2, seed=0):
    """A fixed class-stratified train/test split: round(test_fraction * n) of each class's n go to test."""
    chosen = []
    for members in shuffled_classes(keys, seed):
        cut = round(test_fraction * len(members))
        chosen.append(members[:cut] if split == "test" else members[cut:])
    return torch.cat(chosen).sort().values


def shuffled_classes(keys, seed):
    """Each class's sample indices (classes in sorted order), shuffled by one generator seeded with `seed`."""
    keys, generator = torch.as_tensor(keys), torch.Generator().manual_seed(seed)
    for key in keys.unique():
        members = (keys == key).nonzero().flatten()
        yield members[torch.randperm(len(members), generator=generator)]


# Batches and devices --------------------------------------------------------------------------------------
def batches(dataset, batch_size, generator, device, rank=0, world_size=1, workers=0):
    """One epoch of shuffled batches (x, y) on `device`, each rank an equal shard of a global `batch_size`.

    Resident data is sliced in place (after `to_device`), lazy data goes through a DataLoader; incomplete
    batches are dropped so that all ranks take the same number of steps."""
    order = torch.randperm(len(dataset), generator=generator)
    per_rank, batch_size, steps = rank_shape(len(dataset), batch_size, world_size)
    shard = order[rank * per_rank : rank * per_rank + steps * batch_size]
    if type(dataset) is ResidentDataset:  # (not TfidfDataset: sparse rows are densified batch by batch)
        shard = shard.to(dataset.inputs.device)  # one transfer per epoch; batches are sliced on the device
        for step in range(steps):
            index = shard[step * batch_size : (step + 1) * batch_size]
            yield (dataset.inputs[index].to(device, non_blocking=True),
                   dataset.targets[index].to(device, non_blocking=True))
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=shard.tolist(), num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def rank_shape(num_samples, batch_size, world_size):
    """(samples per rank, batch per rank, steps per epoch) for a global batch split over the ranks."""
    per_rank = num_samples // world_size
    rank_batch = max(1, min(batch_size // world_size, per_rank))
    return per_rank, rank_batch, per_rank // rank_batch


def device_problem(name):
    """Why `--device name` cannot run here, or None: for the scripts' command lines."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device torch knows (cpu, cuda, cuda:1, mps)"
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        return f"--device {name}: this machine has no {device.type} device that torch can use"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices"
    return None


def to_device(dataset, device, max_bytes=8 << 30):
    """The training data on the training device when it fits, so that no batch crosses the bus and no DataLoader
    sits in the hot path; lazy hmnist (or a subset) is composed once, in chunks. Else the data as it is."""
    if type(dataset) is ResidentDataset and dataset.inputs.nbytes <= max_bytes:
        return ResidentDataset(dataset.inputs.to(device), dataset.targets.to(device), dataset.info)
    if isinstance(dataset, HierarchicalMNIST) and len(dataset) * dataset.image_size ** 2 <= max_bytes:
        chunks = tqdm(dataset.indices.split(4096), desc=f"composing {len(dataset)} hmnist images", leave=False)
        images = torch.cat([dataset.compose(chunk).to(device) for chunk in chunks])
        return ResidentDataset(images, dataset.targets.to(device), dataset.info)
    return dataset


# Network inputs and batched augmentation with per-sample random parameters --------------------------------
def normalize(x, info):
    """The un-augmented network input of a batch: standardised images, float points, n-gram ids or TF-IDF."""
    if info.modality == "points":
        return x.float()
    if info.modality == "text":
        return x.float() if info.extra["input"] == "tfidf" else ngram_ids(x, info.extra["buckets"])
    return standardize(x.float() / 255.0, info)


def standardize(x, info):
    """[0, 1] float images [B, C, H, W] -> standardised with the dataset's channel statistics."""
    mean, std = (torch.tensor(values, device=x.device).view(1, -1, 1, 1) for values in (info.mean, info.std))
    return (x - mean) / std


def ngram_ids(words, buckets=TEXT_BUCKETS):
    """Word ids [B, T] -> the words and one hashed id per adjacent pair, [B, 2T - 1]: ((a * 0x9E3779B1 +
    b * 0x7FEB352D) mod buckets) + 1, or 0 where either word is padding; words and bigrams share the buckets."""
    first, second = words[:, :-1], words[:, 1:]
    bigrams = (first * 0x9E3779B1 + second * 0x7FEB352D) % buckets + 1
    return torch.cat([words, torch.where((first > 0) & (second > 0), bigrams, torch.zeros_like(bigrams))], dim=1)


def uniform(low, high, n, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def random_affine(x, scale_x, scale_y, shift_x, shift_y):
    """Resample each image of x with its own axis-aligned affine map (scales and shifts in [-1, 1] units)."""
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale_x, scale_y, shift_x, shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_boxes(n, height, width, generator, device, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """(top, left, height, width) [n] of crops in pixels, each drawn as torchvision's RandomResizedCrop.get_params
    draws one: the first of `attempts` (area, log-uniform aspect ratio) draws whose rounded box fits, else the
    central crop, as wide or as tall as the image allows within `ratio`. All attempts are drawn at once."""
    area = height * width * uniform(*scale, (attempts, n), generator, device)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1]), (attempts, n), generator, device))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (0 < w) & (w <= width) & (0 < h) & (h <= height)
    first = fits.int().argmax(0, keepdim=True)  # argmax returns the first maximum: the first attempt that fits
    found = fits.any(0)
    w = torch.where(found, w.gather(0, first)[0], min(width, round(height * max(ratio))))
    h = torch.where(found, h.gather(0, first)[0], min(height, round(width / min(ratio))))
    top = torch.where(found, (torch.rand(n, generator=generator, device=device) * (height - h + 1)).floor(),
                      (height - h) // 2)
    left = torch.where(found, (torch.rand(n, generator=generator, device=device) * (width - w + 1)).floor(),
                       (width - w) // 2)
    return top, left, h, w


def crop_and_flip(x, generator):
    """RandomResizedCrop(scale=(0.2, 1)) with torchvision's box distribution + horizontal flip, per image."""
    height, width = x.shape[-2:]
    top, left, h, w = crop_boxes(len(x), height, width, generator, x.device)
    flip = torch.where(torch.rand(len(x), generator=generator, device=x.device) < 0.5, -1.0, 1.0)
    # align_corners=False: [-1, 1] spans the outer pixel edges, so a box maps to its centre and relative size.
    return random_affine(x, w / width * flip, h / height, (2 * left + w) / width - 1, (2 * top + h) / height - 1)


def shift_and_scale(x, generator, max_shift_pixels=2.0, scale=(0.9, 1.1)):
    """Small per-image zoom and translation that keeps the whole composite canvas in view."""
    n, device, shift = len(x), x.device, 2 * max_shift_pixels / x.shape[-1]
    zoom = 1.0 / uniform(*scale, n, generator, device)
    return random_affine(x, zoom, zoom, uniform(-shift, shift, n, generator, device),
                         uniform(-shift, shift, n, generator, device))


def grayscale(x):
    return (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def colour_jitter(x, generator, strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, then RandomGrayscale p 0.2, per image, on [0, 1] RGB; the
    hue shift rotates chroma in YIQ space, a close and fully batched stand-in for the HSV shift."""
    n, device = len(x), x.device
    apply = (torch.rand(n, generator=generator, device=device) < p_jitter).float().view(n, 1, 1, 1)
    brightness, contrast, saturation, hue = strength

    def factor(amount):
        return 1 + apply * uniform(-amount, amount, n, generator, device).view(n, 1, 1, 1)

    x = (x * factor(brightness)).clamp(0, 1)
    mean = grayscale(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    gray = grayscale(x)
    x = ((x - gray) * factor(saturation) + gray).clamp(0, 1)
    angle = (apply.view(n) * uniform(-hue, hue, n, generator, device) * 2 * math.pi).view(n, 1, 1)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=device)
    yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * angle.cos() - q * angle.sin(), i * angle.sin() + q * angle.cos()], dim=1)
    x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    to_gray = (torch.rand(n, generator=generator, device=device) < p_gray).view(n, 1, 1, 1)
    return torch.where(to_gray, grayscale(x).expand_as(x), x)


def augment_points(x, generator, keep=(0.5, 1.0), scale=(2 / 3, 3 / 2), shift=0.2, sigma=0.01, clip=0.02):
    """One view of point clouds [B, P, 3], per cloud: a random `keep` fraction of its points in random order,
    repeated cyclically up to P (duplicates change nothing under PointNet's max-pool); every axis scaled by its
    own factor from `scale`; shifted by U[-shift, shift] per coordinate; Gaussian jitter, clipped."""
    n, p, device = x.shape[0], x.shape[1], x.device
    order = torch.rand(n, p, generator=generator, device=device).argsort(dim=1)  # a random permutation per cloud
    kept = (uniform(*keep, n, generator, device) * p).ceil().long().clamp(1, p)
    index = order.gather(1, torch.arange(p, device=device)[None] % kept[:, None])
    x = x.gather(1, index[:, :, None].expand(n, p, 3))
    x = x * uniform(*scale, (n, 1, 3), generator, device) + uniform(-shift, shift, (n, 1, 3), generator, device)
    return x + (torch.randn(x.shape, generator=generator, device=device) * sigma).clamp(-clip, clip)


def text_view(words, generator, drop=0.1, window=3.0):
    """Token dropout and local shuffle of word ids [B, T], per word: dropped with probability `drop`, else
    sorted by position + U[0, window) (so it only trades places with near words) and packed to the front."""
    length, device = words.shape[1], words.device
    jitter = window * torch.rand(words.shape, generator=generator, device=device)
    keep = (words > 0) & (torch.rand(words.shape, generator=generator, device=device) >= drop)
    order = (torch.arange(length, device=device) + jitter + (~keep) * (2.0 * length + window)).argsort(dim=1)
    return torch.where(keep.gather(1, order), words.gather(1, order), torch.zeros_like(words))


def augment(x, info, generator, colour=True):
    """One augmented, normalised view of a batch, every sample with its own parameters. colour=False leaves out
    colour jitter and grayscale: the views SupContrast's main_linear.py trains its linear probe on."""
    if info.modality == "points":
        isotropic = info.augment == "points-isotropic"
        return augment_points(x.float(), generator, scale=(1.0, 1.0) if isotropic else (2 / 3, 3 / 2))
    if info.modality == "text" and info.extra["input"] == "tfidf":  # entry dropout, rows L2-renormalised
        return F.normalize(x.float() * (torch.rand(x.shape, generator=generator, device=x.device) >= 0.1), dim=1)
    if info.modality == "text":
        return ngram_ids(text_view(x, generator), info.extra["buckets"])
    if info.augment == "canvas":
        return standardize(shift_and_scale(x.float() / 255.0, generator), info)
    x = crop_and_flip(x.float() / 255.0, generator)
    return standardize(colour_jitter(x, generator) if info.channels == 3 and colour else x, info)


def two_views(x, info, generator):
    """Two independently augmented views of a batch, stacked view-major: [2, B, C, H, W]."""
    return torch.stack([augment(x, info, generator), augment(x, info, generator)])
