"""The reference input pipeline of bench/throughput.py (PIL transforms in DataLoader workers, `--aug
torchvision`) against ours (`--aug gpu`): the same samples, shapes and statistics, so that its speed ratio
compares like with like."""

import os
import sys

import pytest
import torch

import data
from conftest import ROOT
from test_data import colour_image, colour_info, hdigits, repeat  # noqa: F401  (fixtures)

sys.path.insert(0, os.path.join(ROOT, "bench"))
import throughput  # noqa: E402  (bench/throughput.py)


def image_set(images, info):
    return data.ResidentDataset(images, torch.arange(len(images)), info)


def epoch_views(dataset, aug, seed=0, batch_size=16, workers=0):
    torch.manual_seed(seed)  # torchvision's transforms draw from the global generator: the same views in any test order
    return list(throughput.training_views(dataset, dataset.info, aug, batch_size, torch.Generator().manual_seed(seed),
                                          torch.Generator().manual_seed(seed + 1), torch.device("cpu"), workers=workers))


@pytest.mark.parametrize("path", ["canvas", "crop"])
def test_reference_pipeline_matches_the_batched_one(path, hdigits, colour_image):
    """--aug torchvision yields what --aug gpu yields: [2, B, C, H, W] float views of the same samples in the
    same order, standardised with the dataset's statistics, with the same mean intensity over many views."""
    if path == "canvas":
        dataset = hdigits["train"].subset(range(64))
    else:
        dataset = image_set(repeat(colour_image, 64), colour_info())
    gpu, reference = epoch_views(dataset, "gpu"), epoch_views(dataset, "torchvision")
    assert len(gpu) == len(reference) == 4
    for (a, ya), (b, yb) in zip(gpu, reference):
        assert b.shape == a.shape == (2, 16, *dataset.inputs.shape[1:]) and b.dtype == torch.float32
        assert torch.equal(ya, yb)
        assert not torch.equal(b[0], b[1])
    mean = torch.tensor(dataset.info.mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(dataset.info.std).view(1, 1, -1, 1, 1)
    gpu_unit = torch.cat([v for v, _ in gpu], 1) * std + mean
    reference_unit = torch.cat([v for v, _ in reference], 1) * std + mean
    assert reference_unit.min() >= -1e-5 and reference_unit.max() <= 1 + 1e-5
    assert reference_unit.mean().item() == pytest.approx(gpu_unit.mean().item(), rel=0.1)


@pytest.mark.parametrize("aug", ["gpu", "torchvision"])
def test_canvas_views_keep_the_canvas_in_both_pipelines(aug, hdigits):
    """Canvas views only shift and zoom a little (zoom 0.9-1.1 alone moves the intensity by up to 21%): no
    view loses half the ink, and three in four stay within 25% of the original's (a crop to 20-100% would not)."""
    dataset = hdigits["train"].subset(range(200))
    views = epoch_views(dataset, aug, batch_size=200)[0][0]
    unit = views * dataset.info.std[0] + dataset.info.mean[0]
    ratio = unit.sum((2, 3, 4)) / (dataset.inputs.float() / 255).sum((1, 2, 3))
    assert (ratio > 0.5).all() and (ratio < 1.6).all(), ratio
    assert ((ratio > 0.75) & (ratio < 1.25)).float().mean() > 0.75


def test_reference_pipeline_in_worker_processes(hdigits):
    """With DataLoader workers (the reference's setting) the epoch has the same samples, in the same order."""
    dataset = hdigits["train"].subset(range(48))
    in_process = epoch_views(dataset, "torchvision")
    in_workers = epoch_views(dataset, "torchvision", workers=2)
    assert [y.tolist() for _, y in in_workers] == [y.tolist() for _, y in in_process]
    assert all(v.shape == (2, 16, 1, 32, 32) for v, _ in in_workers)


def test_training_views_rejects_bad_input(hdigits):
    with pytest.raises(ValueError, match="aug must be"):
        epoch_views(hdigits["train"].subset(range(16)), "cpu")
    points = data.load("shapes", split="train", size=8, points=16)
    with pytest.raises(ValueError, match="for images"):
        epoch_views(points, "torchvision", batch_size=4)
