"""MLCL: the batched multi-head loss against a loop written from the equation, mask builders, the script."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import mlcl
import supcon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_features(heads, batch, views, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, batch, views, dim, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1)


def naive_mlcl(features, pos_masks, temperatures, weights, anchor_masks):
    """L = sum_h a_h * mean_{anchors i of h with P_h(i) nonempty} l_i^h, loops over heads, anchors, positives."""
    heads, batch, views, _ = features.shape
    total = 0.0
    for h in range(heads):
        rows = [(v, b) for v in range(views) for b in range(batch)]
        anchor_losses = []
        for i, (vi, bi) in enumerate(rows):
            if anchor_masks is not None and not anchor_masks[h, bi]:
                continue
            zi = features[h, bi, vi]
            denominator = sum(math.exp(float(zi @ features[h, b, v]) / temperatures[h])
                              for j, (v, b) in enumerate(rows) if j != i)
            terms = [math.log(math.exp(float(zi @ features[h, b, v]) / temperatures[h]) / denominator)
                     for j, (v, b) in enumerate(rows) if j != i and pos_masks[h, bi, b]]
            if terms:
                anchor_losses.append(-sum(terms) / len(terms))
        if anchor_losses:
            total += weights[h] * sum(anchor_losses) / len(anchor_losses)
    return total


@pytest.mark.parametrize("views", [1, 2, 3])
@pytest.mark.parametrize("with_anchors", [False, True])
def test_mlcl_loss_matches_loop(views, with_anchors):
    """Per-head temperatures, weights and anchor masks: the batched loss equals the loop in float64."""
    generator = torch.Generator().manual_seed(views)
    heads, batch = 3, 6
    features = random_features(heads, batch, views, 5, seed=views)
    pos_masks = torch.rand(heads, batch, batch, generator=generator) < 0.4
    anchor_masks = torch.rand(heads, batch, generator=generator) < 0.6 if with_anchors else None
    temperatures, weights = [0.1, 0.5, 0.3], [1.0, 0.5, 2.0]
    loss = mlcl.mlcl_loss(features, pos_masks, temperatures, weights, anchor_masks)
    expected = naive_mlcl(features, pos_masks, temperatures, weights, anchor_masks)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_one_head_equals_supcon():
    """H = 1 with the label mask is exactly SupCon's Eq. 2."""
    features = random_features(1, 8, 2, 6)
    labels = torch.tensor([0, 0, 1, 2, 1, 3, 3, 0])
    mask = labels[:, None] == labels[None, :]
    loss = mlcl.mlcl_loss(features, mask[None], [0.2])
    assert torch.allclose(loss, supcon.supcon_loss(features[0], labels, temperature=0.2), rtol=1e-12)


def test_identical_heads_sum_supcon_losses():
    """Identical heads with equal temperature give sum_h a_h * SupCon."""
    one = random_features(1, 8, 2, 6)
    features = one.expand(3, -1, -1, -1)
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 3, 3])
    mask = (labels[:, None] == labels[None, :]).expand(3, -1, -1)
    weights = [0.5, 1.0, 2.5]
    loss = mlcl.mlcl_loss(features, mask, [0.1, 0.1, 0.1], weights)
    assert torch.allclose(loss, sum(weights) * supcon.supcon_loss(one[0], labels, temperature=0.1), rtol=1e-12)


def test_float32_inside_under_bf16():
    """bf16 features are computed in float32 and agree with the float32 result."""
    features = random_features(2, 8, 2, 16).float()
    masks = mlcl.hierarchical_masks(torch.tensor([[0, 0], [0, 1], [1, 2], [1, 2], [0, 0], [1, 3], [0, 1], [1, 3]]))
    low = mlcl.mlcl_loss(features.bfloat16(), masks, [0.5, 0.1])
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(mlcl.mlcl_loss(features.bfloat16().float(), masks, [0.5, 0.1]).item(), rel=1e-6)


def test_gradcheck():
    features = random_features(2, 5, 2, 4).requires_grad_(True)
    masks = mlcl.hierarchical_masks(torch.tensor([[0, 0], [0, 1], [1, 2], [1, 2], [0, 0]]))
    anchors = torch.tensor([[True, True, False, True, True], [True, False, True, True, True]])
    assert torch.autograd.gradcheck(lambda f: mlcl.mlcl_loss(f, masks, [0.5, 0.1], [1.0, 2.0], anchors), (features,))


def test_hierarchical_masks_follow_the_label_path():
    """Positive at level l = the labels agree at every level from the root down to l. With parent-local
    fine ids (0..3 inside each coarse class) a column test would pair samples of different parents."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 3, (20,), generator=generator)
    local_fine = torch.randint(0, 4, (20,), generator=generator)
    local = torch.stack([coarse, local_fine], dim=1)
    masks = mlcl.hierarchical_masks(local)
    for level in range(2):
        for i in range(20):
            for j in range(20):
                assert masks[level, i, j].item() == bool((local[i, : level + 1] == local[j, : level + 1]).all())
    assert (masks[1] != (local_fine[:, None] == local_fine[None, :])).any(), "the column test differs here"
    global_ids = torch.stack([coarse, coarse * 10 + local_fine], dim=1)
    assert torch.equal(mlcl.hierarchical_masks(global_ids), masks)


def test_base_temperature_scales_each_head_by_its_own_temperature():
    """SupContrast's factor: head h's loss times t_h / t_base (a t = 0.5 head then weighs 5x as much as a t = 0.1 head)."""
    features = random_features(2, 6, 2, 4, seed=3)
    masks = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.5
    temperatures, weights = [0.5, 0.1], [1.0, 2.0]
    plain = [mlcl.mlcl_loss(features[h : h + 1], masks[h : h + 1], temperatures[h : h + 1]).item() for h in range(2)]
    scaled = mlcl.mlcl_loss(features, masks, temperatures, weights, base_temperature=0.07).item()
    assert scaled == pytest.approx(sum(w * t / 0.07 * loss for w, t, loss in zip(weights, temperatures, plain)), rel=1e-10)
    one_head = mlcl.mlcl_loss(features[:1], masks[:1], [0.5], base_temperature=0.07)
    reference = supcon.supcon_loss(features[0], mask=masks[0], temperature=0.5, base_temperature=0.07)
    assert torch.allclose(one_head, reference, rtol=1e-12)
    assert mlcl.parse_args(["--base-temperature", "0.07"]).base_temperature == 0.07
    assert mlcl.parse_args([]).base_temperature is None


@pytest.mark.parametrize("groups", [None, [[0, 1], [2, 3, 4]]])
def test_multilabel_masks_match_row_loop(groups):
    generator = torch.Generator().manual_seed(1)
    targets = (torch.rand(12, 5, generator=generator) < 0.3).float()
    positives, anchors = mlcl.multilabel_masks(targets, groups)
    head_labels = [[k] for k in range(5)] if groups is None else groups
    assert positives.shape == (len(head_labels) + 1, 12, 12) and anchors.shape == (len(head_labels) + 1, 12)
    for h, labels in enumerate(head_labels):
        for i in range(12):
            assert anchors[h, i].item() == any(targets[i, k] > 0 for k in labels)
            for j in range(12):
                assert positives[h, i, j].item() == any(targets[i, k] > 0 and targets[j, k] > 0 for k in labels)
    for i in range(12):
        assert anchors[-1, i].item() == bool(targets[i].sum() > 0)
        for j in range(12):
            assert positives[-1, i, j].item() == bool((targets[i] * targets[j]).sum() > 0)


def test_bad_shapes_raise():
    features = random_features(2, 4, 2, 3)
    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\[H, B, V, D\]"):
        mlcl.mlcl_loss(features[0], masks, [0.1, 0.1])
    with pytest.raises(ValueError, match="pos_masks"):
        mlcl.mlcl_loss(features, masks[:1], [0.1, 0.1])
    with pytest.raises(ValueError, match="temperatures"):
        mlcl.mlcl_loss(features, masks, [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="anchor_masks"):
        mlcl.mlcl_loss(features, masks, [0.1, 0.1], anchor_masks=torch.ones(2, 3))


def test_wrong_temperature_count_is_a_cli_error(tmp_path):
    result = subprocess.run([sys.executable, "mlcl.py", "--temperatures", "0.1", "0.2", "0.3", "--epochs", "1",
                             "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--temperatures needs 2 values" in result.stderr


def test_default_temperatures_follow_the_levels():
    """0.5 on the coarse level, 0.1 on the finest (and on the optional global head)."""
    import data

    info = data.load("hdigits", size=100).info
    args = mlcl.parse_args(["--heads", "levels+global"])
    assert mlcl.head_names(info, args) == ["category", "class", "global"]
    assert mlcl.head_temperatures(info, args) == [0.5, 0.1, 0.1]


@pytest.mark.parametrize("dataset, extra", [("hdigits", []), ("hdigits-multilabel", ["--ce-weight", "1"])])
def test_mlcl_script_beats_chance(tmp_path, dataset, extra):
    """A short run on hierarchical and multi-label data learns features that beat chance by a margin."""
    out = tmp_path / dataset
    result = subprocess.run([sys.executable, "mlcl.py", "--dataset", dataset, "--epochs", "3", "--fraction", "0.3",
                             "--batch-size", "128", "--device", "cpu", "--out", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    levels = json.loads((out / "results.json").read_text())["levels"]
    if dataset == "hdigits":
        assert levels["category"]["linear_top1"] > 0.2
        assert levels["class"]["linear_top1"] > 0.06
    else:
        # A digit appears in about 19% of the images: predicting none or all gives micro-F1 0 or ~0.32.
        assert levels["digits"]["micro_f1"] > 0.45
        assert levels["digits"]["map"] > 0.4
