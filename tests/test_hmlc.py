"""HMLC loss (HMC / HCE / HMCE), GMM masks (G-HMLC), attention masks (A-HMLC), and both scripts."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
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


def naive_anchor_losses(features, labels, level, temperature):
    """SupCon l_i of every anchor at one level by explicit loops (features [B, V, D], float64), None where
    the anchor has no positive; positives share the label path from the root (column 0) down to `level`."""
    batch, views, _ = features.shape
    rows = [(v, b) for v in range(views) for b in range(batch)]
    losses = []
    for i, (vi, bi) in enumerate(rows):
        zi = features[bi, vi]
        denominator = sum(math.exp(float(zi @ features[b, v]) / temperature) for j, (v, b) in enumerate(rows) if j != i)
        terms = [math.log(math.exp(float(zi @ features[b, v]) / temperature) / denominator)
                 for j, (v, b) in enumerate(rows)
                 if j != i and bool((labels[b, : level + 1] == labels[bi, : level + 1]).all())]
        losses.append(-sum(terms) / len(terms) if terms else None)
    return losses


def naive_level_loss(features, labels, level, temperature):
    """loss_l: the mean of l_i over the anchors that have a positive."""
    losses = [loss for loss in naive_anchor_losses(features, labels, level, temperature) if loss is not None]
    return sum(losses) / len(losses)


def naive_hmlc(features, labels, temperature, loss_type, base=2.0):
    levels = labels.shape[1]
    per_level = [naive_level_loss(features if features.dim() == 3 else features[c], labels, c, temperature)
                 for c in range(levels)]
    fine_first = per_level[::-1]  # l = 1 is the finest level
    total = 0.0
    for l in range(1, levels + 1):
        loss = max(fine_first[:l]) if loss_type in ("hce", "hmce") else fine_first[l - 1]
        weight = base ** (1 / l) if loss_type in ("hmc", "hmce") else 1.0
        total += weight * loss
    return total / levels


@pytest.mark.parametrize("module", LOSS_MODULES)
@pytest.mark.parametrize("loss_type", ["hmc", "hce", "hmce"])
@pytest.mark.parametrize("per_level", [False, True])
def test_hmlc_loss_matches_loop(module, loss_type, per_level):
    """Both files' hmlc_loss equal a loop over levels and anchors, for shared and per-level features. No
    per-level de-duplication: repeated label paths all count, at every level."""
    labels = tree_labels(6, seed=1)
    assert len(torch.unique(labels[:, :1], dim=0)) < 6, "the batch repeats label paths"
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
    # The maximum is taken between the levels' mean losses (reference code), not per anchor (the paper's
    # Eq. 6/7), which would give a larger value here.
    per_anchor = np.array([naive_anchor_losses(features[c], labels, c, 0.2) for c in range(3)][::-1], dtype=float)
    per_anchor_hce = np.maximum.accumulate(per_anchor, axis=0).mean(1).mean()
    assert per_anchor_hce > hce + 1e-3


@pytest.mark.parametrize("module", LOSS_MODULES)
def test_parent_local_ids_give_the_same_loss_as_global_ids(module):
    """Positives follow the label path: fine ids numbered inside each parent (0, 1, ...) give exactly the
    loss of the same tree with global ids, and match the loop."""
    global_ids = tree_labels(8, seed=6)
    local_ids = torch.stack([global_ids[:, 0], global_ids[:, 1] % 2, global_ids[:, 2] % 2], dim=1)
    assert (local_ids[:, 2, None] == local_ids[None, :, 2]).sum() > (global_ids[:, 2, None] == global_ids[None, :, 2]).sum()
    features = torch.nn.functional.normalize(torch.randn(8, 2, 5, dtype=torch.float64), dim=-1)
    local = module.hmlc_loss(features, local_ids, 0.2)
    assert torch.allclose(local, module.hmlc_loss(features, global_ids, 0.2), rtol=1e-12)
    assert local.item() == pytest.approx(naive_hmlc(features, local_ids, 0.2, "hmce"), rel=1e-10)


@pytest.mark.parametrize("module", LOSS_MODULES)
def test_level_weight_base(module):
    """lambda_l = base^(1/l): 2 by default (paper, reference loss), e as in the reference training script."""
    labels = tree_labels(6, seed=7)
    features = torch.nn.functional.normalize(torch.randn(6, 2, 4, dtype=torch.float64), dim=-1)
    for loss_type in ("hmc", "hmce"):
        got = module.hmlc_loss(features, labels, 0.3, loss_type, level_weight_base=math.e)
        assert got.item() == pytest.approx(naive_hmlc(features, labels, 0.3, loss_type, base=math.e), rel=1e-10)
    assert module.parse_args([]).level_weight_base == 2.0 and module.parse_args([]).temperature == 0.1
    assert module.parse_args(["--level-weight-base", "2.718281828"]).level_weight_base == pytest.approx(math.e)


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


def test_gmm_mask_floor_tops_up_small_masks_with_their_likeliest_entries():
    """A mask under min_dims entries also takes the entries likeliest under its component: for the coarsest
    level (largest mean) the largest values; masks already big enough, and min_dims=0, are unchanged."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 64, generator=generator)
    rows[:, :2] = 10.0  # two outliers: the largest-mean component holds only them
    plain, floored = hmlc_gmm.gmm_masks(rows, 2), hmlc_gmm.gmm_masks(rows, 2, min_dims=12)
    assert torch.equal(hmlc_gmm.gmm_masks(rows, 2, min_dims=0), plain)
    assert (plain[0].sum(1) < 12).all() and (plain[1].sum(1) > 12).all()
    assert (floored[0].sum(1) == 12).all() and torch.equal(floored[1], plain[1])
    for row, mask in zip(rows, floored[0].bool()):
        assert row[mask].min() > row[~mask].max()  # the 12 largest entries
    with pytest.raises(ValueError, match="min_dims"):
        hmlc_gmm.gmm_masks(rows, 2, min_dims=65)


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
                                           ("hmlc_attention.py", ["--epochs", "8"])])
def test_hmlc_scripts_beat_chance(tmp_path, script, extra):
    """(A-HMLC's gates learn slower: at 3 and 5 epochs its category probe sits at 0.19-0.21, so it gets 8.)"""
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


# --------------------------------------------------------------------------------------------------
# The readings of the feature masks (bench/feature_masks.py measures them)
# --------------------------------------------------------------------------------------------------


def masked_model(module, flags):
    info = data.load("hdigits", split="test", size=8).info
    torch.manual_seed(0)
    return module.build_model(module.parse_args(["--arch", "cnn", *flags]), info).eval(), info


def test_all_ones_masks_and_constant_gates_give_exactly_hmce():
    """A mask of ones turns G-HMLC into HMCE (loss and encoder gradient), and so do A-HMLC gates frozen at
    a constant (normalisation removes the scale)."""
    h = torch.randn(12, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([[0, 0], [0, 1], [0, 1], [1, 10], [1, 10], [1, 11]])
    for module, flags in ((hmlc_gmm, []), (hmlc_attention, [])):
        model, _ = masked_model(module, flags)
        model = model.double()
        if module is hmlc_gmm:
            model.level_masks = lambda features, labels, views=1: torch.ones(2, *features.shape, dtype=features.dtype)
        else:
            with torch.no_grad():
                model.attention.w2.zero_()
                model.attention.b2.fill_(3.0)
        results = []
        for masked in (True, False):
            leaf = h.clone().requires_grad_()
            if masked:
                z = model.embed(leaf, labels.repeat(2, 1))[0]
            else:
                z = torch.nn.functional.normalize(model.head(leaf), dim=-1)[None]
            z = z.view(len(z), 2, 6, -1).permute(0, 2, 1, 3)
            loss = module.hmlc_loss(z, labels)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-12), module.METHOD
        assert torch.allclose(results[0][1], results[1][1], atol=1e-12), module.METHOD


def test_gmm_over_dims_gives_one_partition_per_batch():
    """--gmm-over dims: one [L, 1, D] partition of the dimensions, shared by every sample; dimensions that
    only the fine labels explain land in the fine mask."""
    model, _ = masked_model(hmlc_gmm, ["--gmm-over", "dims", "--mask-warmup-steps", "0"])
    model.train()
    generator = torch.Generator().manual_seed(1)
    coarse = torch.arange(64) % 4
    fine = coarse * 10 + torch.arange(64) // 4 % 4
    features = torch.randn(64, 128, generator=generator) * 0.1
    features[:, :64] += coarse[:, None].float()  # coarse information in the first half
    features[:, 64:] += (fine % 10)[:, None].float()  # fine-only information in the second half
    masks = model.level_masks(features, torch.stack([coarse, fine], 1))
    assert masks.shape == (2, 1, 128)
    assert torch.equal(masks.sum(0), torch.ones(1, 128))
    assert masks[0, 0, :64].mean() > 0.9 and masks[1, 0, 64:].mean() > 0.9


def test_masks_are_all_ones_for_the_warm_up_steps_then_the_gmm_s():
    """--mask-warmup-steps N: the first N training forward passes get all-ones masks (plain HMCE), the next
    the GMM partition; evaluation passes neither count nor use the warm-up."""
    model, _ = masked_model(hmlc_gmm, ["--mask-warmup-steps", "2"])
    features = torch.randn(6, 128, generator=torch.Generator().manual_seed(0))
    partition = hmlc_gmm.gmm_masks(features, 2)
    assert torch.equal(model.level_masks(features, None), partition)  # eval mode: the GMM's, not counted
    model.train()
    for _ in range(2):
        assert torch.equal(model.level_masks(features, None).expand(2, 6, 128), torch.ones(2, 6, 128))
    assert torch.equal(model.level_masks(features, None), partition)
    assert model.steps_trained.item() == 3  # a buffer: saved in the checkpoint, restored on --resume


@pytest.mark.parametrize("flags, levels_out", [(["--mask-on", "encoder"], 2), (["--shared-term"], 2),
                                               (["--mask", "none"], 1)])
def test_gmm_readings_shapes(flags, levels_out):
    model, info = masked_model(hmlc_gmm, flags)
    x = torch.randn(6, 1, 32, 32)
    labels = torch.tensor([[0, 0], [0, 1], [1, 10], [1, 11], [2, 20], [2, 20]])
    levels, shared = model(x, labels)
    assert levels.shape == (levels_out, 6, 128)
    assert torch.allclose(levels.norm(dim=-1), torch.ones(levels_out, 6), atol=1e-5)
    assert (shared is not None) == ("--shared-term" in flags)


@pytest.mark.parametrize("flags", [["--gate-input", "projection"], ["--gate", "residual"], ["--mask-on", "encoder"],
                                   ["--shared-term"]])
def test_attention_readings_shapes_and_gate_range(flags):
    model, info = masked_model(hmlc_attention, flags)
    x = torch.randn(6, 1, 32, 32)
    levels, shared = model(x)
    assert levels.shape == (2, 6, 128)
    h = model.encoder(x)
    gates = model.gates(h if "projection" not in flags else model.head(h))
    low, high = (1, 2) if "residual" in flags else (0, 1)
    assert gates.min() > low and gates.max() < high
    assert (shared is not None) == ("--shared-term" in flags)
    with pytest.raises(SystemExit):
        hmlc_attention.parse_args(["--mask-on", "encoder", "--gate-input", "projection"])


def test_per_sample_gmm_on_standard_normal_rows():
    """The choices table's G-HMLC row: each row gets its own masks; on N(0, 1) rows the coarsest mask (the
    largest-mean component) holds only positive entries with 3 levels and mostly positive ones with 2, so
    coarse-level cosines are never negative with 3 levels."""
    rows = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    for levels, positive_share in ((3, 1.0), (2, 0.8)):
        coarse = hmlc_gmm.gmm_masks(rows, levels)[0]
        assert ((rows > 0) & (coarse > 0)).sum() >= positive_share * coarse.sum()
        assert len(torch.unique(coarse, dim=0)) > 200, "masks differ from row to row"
    z = torch.nn.functional.normalize(rows * hmlc_gmm.gmm_masks(rows, 3)[0], dim=-1)
    assert (z @ z.T).min() >= 0


def test_attention_gates_read_the_encoder_feature_by_default():
    """The choices table's A-HMLC rows: z_l = normalize(e * M_l(f(x))), plain gates, masks on e."""
    model, _ = masked_model(hmlc_attention, [])
    h = torch.randn(6, 128)
    levels, shared = model.embed(h)
    expected = torch.nn.functional.normalize(model.head(h)[None] * model.attention(h), dim=-1)
    assert torch.allclose(levels, expected, atol=1e-6) and shared is None


def naive_reference_loop(features, labels, temperature, loss_type, base=2.0):
    """The HMLC reference code's loss (salesforce/hierarchicalContrastiveLearning, losses.py), as its loop
    is defined, by explicit loops: for l = 1..L-1 the last l label columns are masked, positives share the
    rest, SupCon's loss times t / 0.07; HCE takes the max with the largest loss so far, HMC weighs base^(1/l);
    then the batch keeps the first sample of every distinct masked label row; the sum is divided by L."""
    levels = labels.shape[1]
    total, largest = 0.0, -math.inf
    for l in range(1, levels):
        prefix = labels[:, : levels - l]
        ids = torch.tensor([[next(i for i in range(len(prefix)) if torch.equal(prefix[i], row))] for row in prefix])
        loss = naive_level_loss(features, ids, 0, temperature) * temperature / 0.07
        if loss_type in ("hce", "hmce"):
            loss = max(loss, largest)
        total += (base ** (1 / l) if loss_type in ("hmc", "hmce") else 1.0) * loss
        largest = max(largest, loss)
        first = sorted({int(i) for i in ids[:, 0]})
        features, labels = features[first], labels[first]
    return total / levels


@pytest.mark.parametrize("loss_type", ["hmc", "hce", "hmce"])
@pytest.mark.parametrize("columns", ["coarse, fine", "3 levels", "3 levels + id"])
def test_reference_loop_matches_its_definition(loss_type, columns):
    """--loop reference equals the reference loop written out: on [coarse, fine] it contrasts the coarse
    labels only; with an id column every real level counts."""
    labels = tree_labels(8, seed=3)
    labels = {"coarse, fine": labels[:, [0, 2]], "3 levels": labels,
              "3 levels + id": torch.cat([labels, 200 + torch.arange(8)[:, None]], dim=1)}[columns]
    generator = torch.Generator().manual_seed(4)
    features = torch.nn.functional.normalize(torch.randn(8, 2, 5, generator=generator, dtype=torch.float64), dim=-1)
    loss = hmlc_gmm.reference_loop_loss(features, labels, temperature=0.3, loss_type=loss_type)
    assert loss.item() == pytest.approx(naive_reference_loop(features, labels, 0.3, loss_type), rel=1e-10)


def test_reference_loop_on_two_columns_is_coarse_supcon():
    """[coarse, fine]: one level, lambda_1 = 2, divided by L = 2, times t / 0.07: SupCon on the coarse labels."""
    labels = tree_labels(8, seed=5)[:, [0, 2]]
    features = torch.nn.functional.normalize(torch.randn(8, 2, 5, dtype=torch.float64), dim=-1)
    expected = supcon.supcon_loss(features, labels[:, 0], temperature=0.1) * 0.1 / 0.07
    assert torch.allclose(hmlc_gmm.reference_loop_loss(features, labels, 0.1), expected, rtol=1e-12)


@pytest.mark.parametrize("module", LOSS_MODULES)
@pytest.mark.parametrize("loss_type", ["hmc", "hmce"])
def test_deduplicate_and_base_temperature_are_the_reference_loop_with_an_id_column(module, loss_type):
    """Our loss with deduplicate=True and base_temperature=0.07 on L columns is the reference loop on the
    same columns plus an id column, but for its division by L + 1 instead of L."""
    labels = tree_labels(8, seed=6)
    assert len(torch.unique(labels[:, 2])) < 8, "the batch repeats fine labels, so de-duplication matters"
    features = torch.nn.functional.normalize(torch.randn(8, 2, 5, dtype=torch.float64), dim=-1)
    ours = module.hmlc_loss(features, labels, 0.3, loss_type, deduplicate=True, base_temperature=0.07)
    with_id = torch.cat([labels, 200 + torch.arange(8)[:, None]], dim=1)
    assert ours.item() == pytest.approx(naive_reference_loop(features, with_id, 0.3, loss_type) * 4 / 3, rel=1e-10)
    plain = module.hmlc_loss(features, labels, 0.3, loss_type)
    if loss_type == "hmc":  # (under HMCE the fine level's maximum can bind and hide the coarser levels)
        assert not torch.allclose(module.hmlc_loss(features, labels, 0.3, loss_type, deduplicate=True), plain)
    assert torch.allclose(module.hmlc_loss(features, labels, 0.3, loss_type, base_temperature=0.07), plain * 0.3 / 0.07)


@pytest.mark.parametrize("flags", [["--loop", "reference"], ["--loop", "reference", "--id-column"],
                                   ["--deduplicate", "--base-temperature", "0.07"]])
def test_reference_baseline_flags_train(flags, tmp_path):
    """The reference's baseline, one flag away, runs through the training loop."""
    out = tmp_path / "run"
    hmlc_gmm.train(hmlc_gmm.parse_args(["--mask", "none", *flags, "--fraction", "0.05", "--batch-size", "64",
                                        "--epochs", "1", "--no-eval", "--device", "cpu", "--out", str(out)]))
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
