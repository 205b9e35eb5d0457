"""Datasets, label conventions and batched two-view augmentation shared by every method file.

Label conventions (SPEC §2): hierarchical targets are a LongTensor [L] ordered coarse -> fine with
global ids at every level (a fine id implies its ancestors); multi-label targets are a multi-hot
FloatTensor [K].

    ds = data.load("hdigits", "./data", "train")        # a torch Dataset of (x, y) with ds.info
    views = data.two_views(x, ds.info, generator)        # [2, B, C, H, W], per-sample random parameters

Image datasets are held as uint8 tensors ("resident": the training loop moves them to the GPU once and
slices batches there); `hmnist` composes its images lazily and goes through a DataLoader.
"""

import gzip
import math
import os
import pickle
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


@dataclass
class DatasetInfo:
    """What a method script needs to know about a dataset."""

    name: str
    modality: str  # "image", "points" or "text"
    level_names: list  # coarse -> fine; for multi-label data a single "labels" entry
    num_classes: list  # one per level (multi-label: [K])
    multilabel: bool
    label_names: list  # one list of names per level
    channels: int = 1
    image_size: int = 32
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    # "crop": random resized crop + flip + colour (natural images);
    # "canvas": small shifts and scales only, so the composite's ring digit is never cut away.
    augment: str = "crop"
    extra: dict = field(default_factory=dict)


class ImageTensorDataset(Dataset):
    """Images as a uint8 tensor [N, C, H, W] and their targets, small enough to keep resident."""

    def __init__(self, images, targets, info):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets, self.info = images, targets, info

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]

    def subset(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(self.images[indices], self.targets[indices], self.info)


class IndexedSubset(Dataset):
    """A subset of a lazily composed dataset that keeps `info` and `targets`."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, torch.as_tensor(indices, dtype=torch.long)
        self.info, self.targets = dataset.info, dataset.targets[self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]

    def subset(self, indices):
        return IndexedSubset(self.dataset, self.indices[torch.as_tensor(indices, dtype=torch.long)])


# --------------------------------------------------------------------------------------------------
# hdigits: scikit-learn's bundled 8x8 handwritten digits composed like hierarchical MNIST.
# --------------------------------------------------------------------------------------------------

DIGIT_NAMES = [str(d) for d in range(10)]


def ring_positions(canvas, centre_start, centre_end, patch):
    """Top-left corners where a patch x patch digit lies inside the canvas and outside the centre box."""
    corners = []
    for row in range(canvas - patch + 1):
        for col in range(canvas - patch + 1):
            rows_clear = row + patch <= centre_start or row >= centre_end
            cols_clear = col + patch <= centre_start or col >= centre_end
            if rows_clear or cols_clear:
                corners.append((row, col))
    return corners


def compose_digits(central, small, corners):
    """Paste big central digits [N, S, S] and small ring digits [N, p, p] on a canvas at the given corners."""
    n, canvas_size = len(central), central.shape[-1]
    patch = small.shape[-1]
    canvas = central.clone()
    rows = torch.arange(patch)
    r = (corners[:, 0, None] + rows)[:, :, None].expand(n, patch, patch)
    c = (corners[:, 1, None] + rows)[:, None, :].expand(n, patch, patch)
    batch = torch.arange(n)[:, None, None].expand(n, patch, patch)
    canvas[batch, r, c] = torch.maximum(canvas[batch, r, c], small)
    return canvas.reshape(n, 1, canvas_size, canvas_size)


def hdigits_split(split, size, multilabel):
    """Compose `size` 32x32 hierarchical digits; train and test draw on disjoint halves of the source digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    # A fixed split of the source digits (not the run seed), so every method sees the same data.
    source_order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    pool = source_order[: len(labels) * 2 // 3] if split == "train" else source_order[len(labels) * 2 // 3 :]
    by_digit = [pool[labels[pool] == d] for d in range(10)]

    generator = torch.Generator().manual_seed({"train": 1, "test": 2}[split])
    fine = torch.arange(size) % 100  # balanced: every (category, class) pair equally often
    fine = fine[torch.randperm(size, generator=generator)]
    category, digit_class = fine // 10, fine % 10

    def draw(digit_ids):
        picks = torch.empty(len(digit_ids), dtype=torch.long)
        for d in range(10):
            where = (digit_ids == d).nonzero().flatten()
            choice = torch.randint(len(by_digit[d]), (len(where),), generator=generator)
            picks[where] = by_digit[d][choice]
        return images[picks]

    central = F.interpolate(draw(digit_class)[:, None], scale_factor=2, mode="bilinear", align_corners=False)
    central = F.pad(central[:, 0], (8, 8, 8, 8))  # the 16x16 digit fills the centre box [8, 24)^2
    corners = torch.tensor(ring_positions(32, 8, 24, 8))
    corners = corners[torch.randint(len(corners), (size,), generator=generator)]
    canvas = compose_digits(central, draw(category), corners)
    canvas = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)

    if multilabel:
        targets = torch.zeros(size, 10)
        targets[torch.arange(size), category] = 1.0
        targets[torch.arange(size), digit_class] = 1.0
        info = DatasetInfo("hdigits-multilabel", "image", ["digits"], [10], True, [DIGIT_NAMES], augment="canvas")
    else:
        targets = torch.stack([category, fine], dim=1)
        fine_names = [f"{k}/{c}" for k in range(10) for c in range(10)]
        info = DatasetInfo("hdigits", "image", ["category", "class"], [10, 100], False,
                           [DIGIT_NAMES, fine_names], augment="canvas")
    info.mean, info.std = (0.1,), (0.25,)
    return ImageTensorDataset(canvas, targets, info)


# --------------------------------------------------------------------------------------------------
# CIFAR-100 from the python pickles (torchvision's CIFAR100 drops the coarse labels).
# --------------------------------------------------------------------------------------------------

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# Superclass of each of the 100 classes, in the order of the pickles' fine label ids.
FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]


def cifar100_split(root, split, download):
    folder = os.path.join(root, "cifar-100-python")
    path = os.path.join(folder, split)
    if not os.path.exists(path):
        if not download:
            raise FileNotFoundError(f"CIFAR-100 not found at {path}; pass --download to fetch it")
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR100_URL, root, md5=CIFAR100_MD5)
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    with open(os.path.join(folder, "meta"), "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    images = torch.from_numpy(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    fine = torch.tensor(entry[b"fine_labels"], dtype=torch.long)
    coarse = torch.tensor(entry[b"coarse_labels"], dtype=torch.long)
    if not torch.equal(coarse, torch.tensor(FINE_TO_COARSE)[fine]):
        raise ValueError(f"{path}: coarse labels disagree with the CIFAR-100 superclass table")
    names = [[n.decode() for n in meta[b"coarse_label_names"]], [n.decode() for n in meta[b"fine_label_names"]]]
    info = DatasetInfo("cifar100", "image", ["superclass", "class"], [20, 100], False, names, channels=3,
                       mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), augment="crop")
    return ImageTensorDataset(images, torch.stack([coarse, fine], dim=1), info)


# --------------------------------------------------------------------------------------------------
# Hierarchical MNIST (Ott et al.): a big central MNIST digit and a small one in the ring around it.
# --------------------------------------------------------------------------------------------------

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path):
    """Read an IDX file (MNIST's format), plain or gzipped, into a tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise ValueError(f"{path} is not an unsigned-byte IDX file")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        except struct.error as error:
            raise ValueError(f"{path}: truncated IDX header") from error
        array = np.frombuffer(f.read(), dtype=np.uint8)
    if array.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes")
    return torch.from_numpy(array.reshape(shape).copy())


def find_mnist_file(root, name, download):
    raw = os.path.join(root, "MNIST", "raw")
    for candidate in (os.path.join(raw, name), os.path.join(raw, name + ".gz")):
        if os.path.exists(candidate):
            return candidate
    if not download:
        raise FileNotFoundError(f"MNIST file {os.path.join(raw, name)} not found; pass --download to fetch it")
    from torchvision.datasets import MNIST

    MNIST(root, download=True)  # torchvision checks the md5 of every file
    return find_mnist_file(root, name, download=False)


class HierarchicalMNIST(Dataset):
    """Composite MNIST: central digit = class, small ring digit = category; composed on demand.

    The central 28x28 digit is padded to 32 and scaled to the centre box; the ring is a sixth of the
    canvas wide (32 px at the paper's 192) and holds a second MNIST digit of that size, at a position
    drawn from (seed, split, index), so item i is the same image every time it is asked for.
    """

    def __init__(self, root, split, download=False, image_size=192, seed=0):
        if image_size < 12:
            raise ValueError(f"--image-size must be at least 12 for hmnist, got {image_size}")
        image_file, label_file = MNIST_FILES[split]
        self.digits = read_idx(find_mnist_file(root, image_file, download))
        self.digit_labels = read_idx(find_mnist_file(root, label_file, download)).long()
        self.image_size, self.ring = image_size, max(1, round(image_size / 6))
        self.corners = torch.tensor(ring_positions(image_size, self.ring, image_size - self.ring, self.ring))
        self.seed = seed + (0 if split == "train" else 1_000_003)
        rng = torch.Generator().manual_seed(self.seed)
        self.small_index = torch.randint(len(self.digits), (len(self.digits),), generator=rng)
        self.corner_index = torch.randint(len(self.corners), (len(self.digits),), generator=rng)
        category = self.digit_labels[self.small_index]
        self.targets = torch.stack([category, 10 * category + self.digit_labels], dim=1)
        self.info = DatasetInfo("hmnist", "image", ["category", "class"], [10, 100], False,
                                [DIGIT_NAMES, [f"{k}/{c}" for k in range(10) for c in range(10)]],
                                image_size=image_size, mean=(0.05,), std=(0.2,), augment="canvas")

    def __len__(self):
        return len(self.digits)

    def subset(self, indices):
        return IndexedSubset(self, indices)

    def __getitem__(self, index):
        centre = self.image_size - 2 * self.ring
        big = F.pad(self.digits[index].float()[None, None], (2, 2, 2, 2))
        big = F.interpolate(big, size=(centre, centre), mode="bilinear", align_corners=False)[0, 0]
        big = F.pad(big, (self.ring,) * 4)
        small = self.digits[self.small_index[index]].float()[None, None]
        small = F.interpolate(small, size=(self.ring, self.ring), mode="bilinear", align_corners=False)[0]
        corner = self.corners[self.corner_index[index]][None]
        canvas = compose_digits(big[None], small, corner)[0]
        return canvas.clamp(0, 255).round().to(torch.uint8), self.targets[index]


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------

# Each loader: (root, split, download, seed, **options) -> Dataset with .info and .targets.
LOADERS = {
    "hdigits": lambda root, split, download, seed, size=None, **_: hdigits_split(
        split, size or (5000 if split == "train" else 1000), multilabel=False),
    "hdigits-multilabel": lambda root, split, download, seed, size=None, **_: hdigits_split(
        split, size or (5000 if split == "train" else 1000), multilabel=True),
    "cifar100": lambda root, split, download, seed, **_: cifar100_split(root, split, download),
    "hmnist": lambda root, split, download, seed, image_size=None, **_: HierarchicalMNIST(
        root, split, download, image_size=image_size or 192, seed=seed),
}
DATASETS = tuple(LOADERS)


def load(name, root="./data", split="train", download=False, fraction=1.0, seed=0, **options):
    """Return a Dataset of (x, y) with `.info` (SPEC §4).

    `fraction` keeps a class-stratified fraction of the training split, drawn from `seed` (the same
    subset for every method). Options: `size` (hdigits composites; 5000 train / 1000 test by default),
    `image_size` (hmnist canvas, 192 as in the paper); options a dataset does not use are ignored.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    dataset = LOADERS[name](root, split, download, seed, **options)
    if split == "train" and fraction < 1.0:
        dataset = dataset.subset(stratified_indices(dataset.targets, fraction, seed))
    return dataset


def stratified_indices(targets, fraction, seed):
    """Indices of a class-stratified `fraction` of the samples (finest level; multi-hot sets as classes)."""
    if targets.dtype.is_floating_point:
        keys = (targets > 0.5).long() @ (2 ** torch.arange(targets.shape[1]))
    else:
        keys = targets[:, -1]
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for key in keys.unique():
        members = (keys == key).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        kept.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(kept).sort().values


def batches(dataset, batch_size, generator, device, rank=0, world_size=1, workers=0):
    """One epoch of shuffled training batches (x, y) on `device`; every rank gets an equal shard.

    Resident datasets are sliced in place (after `to_device`), lazily composed ones go through a
    DataLoader. Incomplete batches are dropped so that all ranks take the same number of steps.
    """
    order = torch.randperm(len(dataset), generator=generator)
    per_rank = len(order) // world_size
    batch_size = min(batch_size, per_rank)
    steps = per_rank // batch_size
    shard = order[rank * per_rank : rank * per_rank + steps * batch_size]
    if isinstance(dataset, ImageTensorDataset):
        for step in range(steps):
            index = shard[step * batch_size : (step + 1) * batch_size].to(dataset.images.device)
            yield dataset.images[index].to(device, non_blocking=True), dataset.targets[index].to(device, non_blocking=True)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, sampler=shard.tolist(), num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def steps_per_epoch(dataset, batch_size, world_size=1):
    per_rank = len(dataset) // world_size
    return per_rank // min(batch_size, per_rank)


def to_device(dataset, device, max_bytes=8 << 30):
    """Keep a resident dataset on the training device when it fits, so batches never cross the bus."""
    if isinstance(dataset, ImageTensorDataset) and dataset.images.numel() <= max_bytes:
        return ImageTensorDataset(dataset.images.to(device), dataset.targets.to(device), dataset.info)
    return dataset


# --------------------------------------------------------------------------------------------------
# Batched augmentation with per-sample random parameters
# --------------------------------------------------------------------------------------------------


def standardize(x, info):
    """[0, 1] float images [B, C, H, W] -> standardised with the dataset's channel statistics."""
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def normalize(x, info):
    """The un-augmented network input of a uint8 batch [B, C, H, W]."""
    return standardize(x.float() / 255.0, info)


def uniform(low, high, n, generator, device):
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def random_affine(x, scale_x, scale_y, shift_x, shift_y):
    """Resample each image of x with its own axis-aligned affine map (scales and shifts in [-1, 1] units)."""
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale_x, scale_y
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_and_flip(x, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop + horizontal flip with one crop per image (area and log-ratio drawn uniformly)."""
    n, device = len(x), x.device
    area = uniform(*scale, n, generator, device)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]), n, generator, device)
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    centre_x = (1 - width) * uniform(-1, 1, n, generator, device)
    centre_y = (1 - height) * uniform(-1, 1, n, generator, device)
    flip = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return random_affine(x, width * flip, height, centre_x, centre_y)


def shift_and_scale(x, generator, max_shift_pixels=2.0, scale=(0.9, 1.1)):
    """Small per-image zoom and translation that keeps the whole composite canvas in view."""
    n, device = len(x), x.device
    zoom = 1.0 / uniform(*scale, n, generator, device)
    shift = 2 * max_shift_pixels / x.shape[-1]
    return random_affine(x, zoom, zoom, uniform(-shift, shift, n, generator, device),
                         uniform(-shift, shift, n, generator, device))


def grayscale(x):
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def colour_jitter(x, generator, strength=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, then RandomGrayscale p 0.2, per image, on [0, 1] RGB.

    The hue shift rotates chroma in YIQ space, a close and fully batched stand-in for the HSV shift.
    """
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


def augment(x, info, generator):
    """One augmented, normalised view of a uint8 batch [B, C, H, W]; every image draws its own parameters."""
    x = x.float() / 255.0
    if info.augment == "canvas":
        x = shift_and_scale(x, generator)
    else:
        x = crop_and_flip(x, generator)
        if info.channels == 3:
            x = colour_jitter(x, generator)
    return standardize(x, info)


def two_views(x, info, generator):
    """Two independently augmented views of a batch, stacked view-major: [2, B, C, H, W]."""
    return torch.stack([augment(x, info, generator), augment(x, info, generator)])
