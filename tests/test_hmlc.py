"""HMLC loss (HMC / HCE / HMCE), GMM masks (G-HMLC), attention masks (A-HMLC), and both scripts."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hmlc_attention
import hmlc_gmm
import supcon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_MODULES = [hmlc_gmm, hmlc_attention]


def tree_labels(batch, seed=0):
    """[B, 3] labels coarse -> fine with global ids (a fine id implies its ancestors)."""
    generator = torch.Generator().manual_seed(seed)
    fine = torch.randint(0, 8, (batch,), generator=generator)
    return torch.stack([fine // 4, fine // 2 + 10, fine + 100], dim=1)


def naive_level_loss(features, labels, level, temperature):
    """SupCon L_out of one label column by explicit loops (features [B, V, D], float64)."""
    batch, views, _ = features.shape
    rows = [(v, b) for v in range(views) for b in range(batch)]
    losses = []
    for i, (vi, bi) in enumerate(rows):
        zi = features[bi, vi]
        denominator = sum(math.exp(float(zi @ features[b, v]) / temperature) for j, (v, b) in enumerate(rows) if j != i)
        terms = [math.log(math.exp(float(zi @ features[b, v]) / temperature) / denominator)
                 for j, (v, b) in enumerate(rows) if j != i and labels[b, level] == labels[bi, level]]
        if terms:
            losses.append(-sum(terms) / len(terms))
    return sum(losses) / len(losses)


def naive_hmlc(features, labels, temperature, loss_type):
    levels = labels.shape[1]
    per_level = [naive_level_loss(features if features.dim() == 3 else features[c], labels, c, temperature)
                 for c in range(levels)]
    fine_first = per_level[::-1]  # l = 1 is the finest level
    total = 0.0
    for l in range(1, levels + 1):
        loss = max(fine_first[:l]) if loss_type in ("hce", "hmce") else fine_first[l - 1]
        weight = 2 ** (1 / l) if loss_type in ("hmc", "hmce") else 1.0
        total += weight * loss
    return total / levels


@pytest.mark.parametrize("module", LOSS_MODULES)
@pytest.mark.parametrize("loss_type", ["hmc", "hce", "hmce"])
@pytest.mark.parametrize("per_level", [False, True])
def test_hmlc_loss_matches_loop(module, loss_type, per_level):
    """Both files' hmlc_loss equal a loop over levels and anchors, for shared and per-level features."""
    labels = tree_labels(6, seed=1)
    generator = torch.Generator().manual_seed(2)
    shape = (3, 6, 2, 5) if per_level else (6, 2, 5)
    features = torch.nn.functional.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)
    loss = module.hmlc_loss(features, labels, temperature=0.3, loss_type=loss_type)
    assert loss.item() == pytest.approx(naive_hmlc(features, labels, 0.3, loss_type), rel=1e-10)


@pytest.mark.parametrize("module", LOSS_MODULES)
def test_one_level_is_supcon(module):
    """L = 1: HCE is SupCon, HMC and HMCE are SupCon weighted by lambda_1 = 2^(1/1) = 2."""
    labels = torch.tensor([[0], [1], [0], [2], [1], [2]])
    features = torch.nn.functional.normalize(torch.randn(6, 2, 4, dtype=torch.float64), dim=-1)
    expected = supcon.supcon_loss(features, labels[:, 0], temperature=0.1)
    assert torch.allclose(module.hmlc_loss(features, labels, 0.1, "hce"), expected, rtol=1e-12)
    assert torch.allclose(module.hmlc_loss(features, labels, 0.1, "hmc"), 2 * expected, rtol=1e-12)
    assert torch.allclose(module.hmlc_loss(features, labels, 0.1, "hmce"), 2 * expected, rtol=1e-12)


def test_hierarchy_constraint_binds():
    """When a coarse level's own loss is below a finer one, HCE lifts it: HCE = mean of the fine->coarse cummax."""
    labels = tree_labels(8, seed=3)
    generator = torch.Generator().manual_seed(4)
    features = torch.nn.functional.normalize(torch.randn(3, 8, 2, 6, generator=generator, dtype=torch.float64), dim=-1)
    own = [naive_level_loss(features[c], labels, c, 0.2) for c in range(3)][::-1]  # fine -> coarse
    constrained = np.maximum.accumulate(own)
    assert all(np.diff(constrained) >= 0)
    assert (constrained > np.array(own) + 1e-9).any(), "pick a seed where the constraint binds"
    hce = hmlc_gmm.hmlc_loss(features, labels, 0.2, "hce").item()
    assert hce == pytest.approx(constrained.mean(), rel=1e-10)
    assert hce > np.mean(own)


def test_hmlc_loss_rejects_bad_input():
    labels = tree_labels(4)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        hmlc_gmm.hmlc_loss(torch.randn(4, 2, 3), labels[:, 0])
    with pytest.raises(ValueError, match="L = 3"):
        hmlc_gmm.hmlc_loss(torch.randn(2, 4, 2, 3), labels)
    with pytest.raises(ValueError, match="loss_type"):
        hmlc_gmm.hmlc_loss(torch.randn(4, 2, 3), labels, loss_type="sum")


def test_hmlc_gradcheck():
    labels = tree_labels(4, seed=5)
    features = torch.nn.functional.normalize(torch.randn(3, 4, 2, 3, dtype=torch.float64), dim=-1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: hmlc_attention.hmlc_loss(f, labels, 0.5, "hmce"), (features,))


def well_separated_rows(rows, dim, levels, seed):
    """Each row: D entries drawn from `levels` 1-D Gaussians with far-apart means, shuffled."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rows):
        means = np.sort(rng.choice(np.arange(-20, 20, 4.0), size=levels, replace=False))
        sizes = rng.multinomial(dim - 3 * levels, np.ones(levels) / levels) + 3
        row = np.concatenate([rng.normal(m, 0.3, size=s) for m, s in zip(means, sizes)])
        data.append(rng.permutation(row))
    return torch.tensor(np.array(data), dtype=torch.float32)


@pytest.mark.parametrize("levels", [2, 3])
def test_gmm_masks_agree_with_sklearn(levels):
    """Per-row assignments equal sklearn's GaussianMixture, up to sorting components by mean."""
    from sklearn.mixture import GaussianMixture

    embeddings = well_separated_rows(12, 64, levels, seed=levels)
    masks = hmlc_gmm.gmm_masks(embeddings, levels)
    assert masks.shape == (levels, 12, 64)
    for n, row in enumerate(embeddings.numpy()):
        gmm = GaussianMixture(levels, random_state=0).fit(row[:, None])
        rank = np.argsort(np.argsort(-gmm.means_[:, 0]))  # 0 = largest mean -> coarsest level
        expected = rank[gmm.predict(row[:, None])]
        assert np.array_equal(masks[:, n].argmax(0).numpy(), expected), f"row {n}"


def test_gmm_masks_partition_and_fallback():
    """Masks are 0/1 and partition the dimensions; a level left empty falls back to all ones."""
    embeddings = torch.randn(32, 128)
    masks = hmlc_gmm.gmm_masks(embeddings, 3)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    full = (masks.sum(2) == 128)
    partition = masks.sum(0) == 1
    assert (partition.all(1) | full.any(0)).all()
    # Two clusters but three levels: one level must be empty for every row and becomes all ones.
    two_clusters = torch.cat([torch.full((4, 10), 5.0), torch.full((4, 10), -5.0)], dim=1) + 0.01 * torch.randn(4, 20)
    masks = hmlc_gmm.gmm_masks(two_clusters, 3)
    assert (masks.sum(2) == 20).any(0).all()


def test_level_attention_range_and_gradient():
    attention = hmlc_attention.LevelAttention(16, 8, levels=3)
    h = torch.randn(5, 16, requires_grad=True)
    masks = attention(h)
    assert masks.shape == (3, 5, 8)
    assert ((masks > 0) & (masks < 1)).all()
    masks[1].sum().backward()
    assert h.grad.abs().sum() > 0
    assert attention.w1.grad[1].abs().sum() > 0 and attention.w1.grad[0].abs().sum() == 0


def test_level_attention_matches_per_level_gates():
    """The batched einsum equals an explicit sigmoid(W2 relu(W1 h + b1) + b2) per level."""
    attention = hmlc_attention.LevelAttention(12, 6, levels=2)
    h = torch.randn(4, 12)
    for level in range(2):
        hidden = torch.relu(h @ attention.w1[level].T + attention.b1[level])
        expected = torch.sigmoid(hidden @ attention.w2[level].T + attention.b2[level])
        assert torch.allclose(attention(h)[level], expected, atol=1e-6)


@pytest.mark.parametrize("script, extra", [("hmlc_gmm.py", []), ("hmlc_gmm.py", ["--mask", "none"]),
                                           ("hmlc_attention.py", [])])
def test_hmlc_scripts_beat_chance(tmp_path, script, extra):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, script, "--epochs", "3", "--fraction", "0.3", "--batch-size", "128",
                             "--device", "cpu", "--out", str(out), *extra],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    levels = json.loads((out / "results.json").read_text())["levels"]
    assert levels["category"]["linear_top1"] > 0.2
    assert levels["class"]["linear_top1"] > 0.06


def test_hmlc_scripts_refuse_multilabel_data(tmp_path):
    result = subprocess.run([sys.executable, "hmlc_attention.py", "--dataset", "hdigits-multilabel", "--epochs", "1",
                             "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "multi-label" in result.stderr
