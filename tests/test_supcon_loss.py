"""Tests of supcon.supcon_loss: Eq. 2 of Khosla et al. against a naive loop, known values,
invariances, gradients, numerical robustness and input validation."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from supcon import supcon_loss


# --------------------------------------------------------------------------------------------------
# Naive reference: Eq. 2 written with explicit Python loops, in float64 (lives only in the tests).
# --------------------------------------------------------------------------------------------------


def reference_supcon(features, labels=None, mask=None, temperature=0.1, contrast_mode="all", base_temperature=None):
    """L = (t / t_base) * mean_{i with P(i) != {}} -1/|P(i)| sum_{p in P(i)} log softmax_{a in A(i)}(z_i.z_a/t)_p.

    Rows are stacked view-major: row v*B + b is view v of sample b. Returns a Python float.
    """
    batch, views, _ = features.shape
    rows = [features[b, v].double() for v in range(views) for b in range(batch)]
    n = len(rows)

    def sample(r):
        return r % batch

    def positive(bi, bp):
        if labels is not None:
            return bool(labels[bi] == labels[bp])
        if mask is not None:
            return bool(mask[bi, bp] != 0)
        return bi == bp

    anchors = range(n) if contrast_mode == "all" else range(batch)
    per_anchor = []
    for i in anchors:
        others = [a for a in range(n) if a != i]
        logits = {a: float(rows[i] @ rows[a]) / temperature for a in others}
        top = max(logits.values())
        log_denominator = top + math.log(sum(math.exp(logits[a] - top) for a in others))
        pos = [p for p in others if positive(sample(i), sample(p))]
        if not pos:
            continue  # anchors without a positive are left out of the mean
        total = 0.0
        for p in pos:
            total += logits[p] - log_denominator
        per_anchor.append(-total / len(pos))
    loss = sum(per_anchor) / len(per_anchor) if per_anchor else 0.0
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return scale * loss


def unit_features(batch, views, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, views, dim, generator=g, dtype=torch.float64), dim=-1).to(dtype)


# Six samples: classes {0, 1} have two members, 2 and 3 are singletons (with V = 1 they have no positive).
LABELS = torch.tensor([0, 1, 0, 2, 1, 3])


def positives_for(kind, batch, seed):
    """(labels, mask) for one kind of positive definition."""
    g = torch.Generator().manual_seed(seed + 1000)
    if kind == "labels":
        return LABELS[:batch], None
    if kind == "mask":  # random, non-symmetric, random diagonal (bool)
        mask = torch.rand(batch, batch, generator=g) < 0.4
        assert not torch.equal(mask, mask.T)
        return None, mask
    if kind == "mask_weights":  # float mask: any nonzero entry is a positive, whatever its value
        values = torch.tensor([0.0, 0.0, 0.3, 2.0, -1.0])
        mask = values[torch.randint(len(values), (batch, batch), generator=g)]
        return None, mask
    if kind == "none":
        return None, None
    raise AssertionError(kind)


GRID = list(itertools.product([1, 2, 3], ["all", "one"], ["labels", "mask", "mask_weights", "none"],
                              [0.1, 0.5], [None, 0.07]))


@pytest.mark.parametrize("views,contrast_mode,kind,temperature,base_temperature", GRID)
def test_matches_naive_loop(views, contrast_mode, kind, temperature, base_temperature):
    """supcon_loss equals Eq. 2 computed by explicit loops (float64, rtol 1e-10) over the whole grid."""
    batch = len(LABELS)
    seed = views * 100 + temperature * 10 + (base_temperature is None)
    features = unit_features(batch, views, 5, int(seed))
    labels, mask = positives_for(kind, batch, int(seed))
    got = supcon_loss(features, labels=labels, mask=mask, temperature=temperature, contrast_mode=contrast_mode,
                      base_temperature=base_temperature)
    want = reference_supcon(features, labels, mask, temperature, contrast_mode, base_temperature)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=0.0), (got.item(), want)


def test_naive_loop_grid_is_not_degenerate():
    """The grid really exercises left-out anchors: V=1 with singleton classes has anchors without positives,
    and the reference then differs from counting those anchors as zero."""
    features = unit_features(len(LABELS), 1, 5, 0)
    got = supcon_loss(features, labels=LABELS, temperature=0.1)
    kept = reference_supcon(features, LABELS, None, 0.1)
    # counting the 2 singleton anchors as 0 in a mean over all 6 would give 4/6 of the kept-anchor mean
    assert abs(got.item() - kept) < 1e-12
    assert abs(got.item() - kept * 4 / 6) > 1e-3


def test_base_temperature_only_rescales():
    """base_temperature multiplies the loss by t / t_base and changes nothing else."""
    features = unit_features(5, 2, 4, 3)
    labels = torch.tensor([0, 0, 1, 1, 2])
    plain = supcon_loss(features, labels=labels, temperature=0.2)
    scaled = supcon_loss(features, labels=labels, temperature=0.2, base_temperature=0.07)
    assert torch.allclose(scaled, plain * 0.2 / 0.07, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Known values derived by hand
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_collapsed_simclr_is_log_2b_minus_1(batch, temperature):
    """Collapsed features, SimCLR (no labels), V=2: every logit of every anchor is 1/t, |A(i)| = 2B-1 and the
    single positive (the other view) has probability 1/(2B-1), so the loss is log(2B-1) for any t."""
    z = F.normalize(torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64), dim=0)
    features = z.expand(batch, 2, 3).clone()
    loss = supcon_loss(features, temperature=temperature)
    assert torch.allclose(loss, torch.tensor(math.log(2 * batch - 1), dtype=torch.float64), rtol=1e-12, atol=1e-12)
    loss32 = supcon_loss(features.float(), temperature=temperature)
    assert abs(loss32.item() - math.log(2 * batch - 1)) < 1e-5


@pytest.mark.parametrize("temperature", [0.07, 0.1, 1.0])
def test_regular_tetrahedron_is_log_3(temperature):
    """Regular tetrahedron (4 unit vectors, pairwise dot -1/3), one view each, all in one class: A(i) is the other
    3 rows with the same logit -1/(3t), all 3 are positives, each has probability 1/3, so l_i = log 3 = L."""
    vertices = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) / math.sqrt(3)
    gram = vertices @ vertices.T
    assert torch.allclose(gram, torch.full((4, 4), -1 / 3, dtype=torch.float64) + 4 / 3 * torch.eye(4, dtype=torch.float64))
    loss = supcon_loss(vertices[:, None, :], labels=torch.zeros(4, dtype=torch.long), temperature=temperature)
    assert torch.allclose(loss, torch.tensor(math.log(3), dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_two_orthogonal_samples_simclr(temperature):
    """B=2 orthogonal samples, both views identical, SimCLR: anchor logits over A(i) are {1/t (other view),
    0, 0}, so l_i = -log(e^{1/t} / (e^{1/t} + 2)) = log(1 + 2 e^{-1/t}) for every anchor."""
    e = torch.eye(3, dtype=torch.float64)
    features = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])])  # [2, 2, 3]
    loss = supcon_loss(features, temperature=temperature)
    want = math.log(1 + 2 * math.exp(-1 / temperature))
    assert abs(loss.item() - want) < 1e-12
    # contrast_mode "one": anchors are view 0 only, same per-anchor value
    assert abs(supcon_loss(features, temperature=temperature, contrast_mode="one").item() - want) < 1e-12


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
def test_sample_permutation_invariance(contrast_mode):
    """Permuting the samples (features, labels and mask rows/columns together) leaves the loss unchanged."""
    features = unit_features(7, 2, 6, 11)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5))
    a = supcon_loss(features, labels=labels, contrast_mode=contrast_mode)
    b = supcon_loss(features[perm], labels=labels[perm], contrast_mode=contrast_mode)
    assert torch.allclose(a, b, rtol=1e-12)
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(6)) < 0.5
    c = supcon_loss(features, mask=mask, contrast_mode=contrast_mode)
    d = supcon_loss(features[perm], mask=mask[perm][:, perm], contrast_mode=contrast_mode)
    assert torch.allclose(c, d, rtol=1e-12)


@pytest.mark.parametrize("views", [2, 3])
def test_view_swap_invariance_all_mode(views):
    """With contrast_mode "all", reordering the views (e.g. swapping view 0 and 1) leaves the loss unchanged."""
    features = unit_features(6, views, 5, 21)
    order = torch.tensor([1, 0] + list(range(2, views)))
    for kind in ("labels", "mask", "none"):
        labels, mask = positives_for(kind, 6, 21)
        a = supcon_loss(features, labels=labels, mask=mask)
        b = supcon_loss(features[:, order], labels=labels, mask=mask)
        assert torch.allclose(a, b, rtol=1e-12), kind


def test_view_swap_matters_in_one_mode():
    """Sanity check of the invariance test: in "one" mode the anchors are view 0, so swapping views changes L."""
    features = unit_features(6, 2, 5, 22)
    a = supcon_loss(features, labels=LABELS, contrast_mode="one")
    b = supcon_loss(features[:, [1, 0]], labels=LABELS, contrast_mode="one")
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------------------------------
# Gradients and numerics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,contrast_mode", [("labels", "all"), ("mask", "one"), ("none", "all")])
def test_gradcheck(kind, contrast_mode):
    """Analytic gradients match finite differences (float64, unnormalised features)."""
    features = torch.randn(4, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    labels = torch.tensor([0, 1, 0, 2]) if kind == "labels" else None
    mask = (torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) < 0.5) if kind == "mask" else None
    assert torch.autograd.gradcheck(
        lambda f: supcon_loss(f, labels=labels, mask=mask, temperature=0.5, contrast_mode=contrast_mode), (features,))


def test_large_unnormalised_features_are_finite():
    """Entries ~1e3 in float32 (logits ~1e8): loss and gradients stay finite (self masked before log_softmax)."""
    g = torch.Generator().manual_seed(3)
    features = (1e3 * torch.randn(8, 2, 16, generator=g)).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = supcon_loss(features, labels=labels, temperature=0.1)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert torch.isfinite(features.grad).all()
    # identical rows at a huge scale: collapsed SimCLR is still log(2B - 1)
    same = torch.full((3, 2, 4), 1e3)
    assert abs(supcon_loss(same).item() - math.log(5)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_computed_in_float32(dtype):
    """bf16/fp16 features are upcast: the loss is float32 and equals the loss of the upcast features."""
    features = unit_features(8, 2, 16, 4, dtype=torch.float32).to(dtype)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = supcon_loss(features, labels=labels)
    assert loss.dtype == torch.float32
    want = supcon_loss(features.float(), labels=labels)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)


def test_autocast_does_not_lower_precision():
    """The loss is computed in at least float32 *also under autocast* (the training loop calls it
    inside torch.autocast(bfloat16) on CUDA). CPU autocast has the same policy for matmul, so under
    torch.autocast("cpu", bfloat16) the result must be float32 and equal the loss computed outside autocast."""
    features = unit_features(32, 2, 64, 9, dtype=torch.float32)
    labels = torch.arange(32) % 5
    want = supcon_loss(features, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = supcon_loss(features, labels=labels)
    assert got.dtype == torch.float32 and torch.allclose(got.float(), want, rtol=1e-5), (
        f"BUG supcon.supcon_loss: under autocast the logits matmul runs in bfloat16 and the loss comes back as "
        f"{got.dtype} = {got.item():.6f} instead of float32 {want.item():.6f}; the loss needs its own "
        f"torch.autocast(..., enabled=False) region after casting the features up")


def test_float32_input_stays_float32():
    """float32 input gives a float32 loss close to the float64 computation."""
    features = unit_features(6, 2, 8, 7)
    loss32 = supcon_loss(features.float(), labels=LABELS)
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - supcon_loss(features, labels=LABELS).item()) < 1e-5


def test_no_anchor_with_positive_returns_connected_zero():
    """V=1 and all labels distinct: no anchor has a positive, the loss is 0 and backward() works."""
    features = unit_features(5, 1, 4, 8, dtype=torch.float32).requires_grad_()
    loss = supcon_loss(features, labels=torch.arange(5))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert torch.count_nonzero(features.grad) == 0


def test_single_row_no_nan_gradient():
    """B=1, V=1 (A(i) empty): the loss is 0 with finite gradients, not NaN."""
    features = torch.ones(1, 1, 3, requires_grad=True)
    loss = supcon_loss(features)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(features.grad).all()


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_rejects_rank_2_features():
    """features must be [B, V, D]; the error names the shape it got."""
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        supcon_loss(torch.randn(4, 8))


def test_rejects_labels_of_wrong_length():
    """labels length != B raises and names both the expected B and the shape given."""
    with pytest.raises(ValueError, match=r"4.*\(3,\)"):
        supcon_loss(torch.randn(4, 2, 8), labels=torch.tensor([0, 1, 0]))


def test_rejects_labels_of_rank_2():
    """labels [B, 1] (rank 2) raises and names its shape."""
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        supcon_loss(torch.randn(4, 2, 8), labels=torch.zeros(4, 1, dtype=torch.long))


def test_rejects_labels_and_mask_together():
    """labels and mask are mutually exclusive."""
    with pytest.raises(ValueError, match="labels.*mask|mask.*labels"):
        supcon_loss(torch.randn(4, 2, 8), labels=torch.zeros(4, dtype=torch.long), mask=torch.eye(4))


@pytest.mark.parametrize("shape", [(3, 3), (4, 5), (4,), (1, 4, 4)])
def test_rejects_mask_of_wrong_shape(shape):
    """mask must be [B, B]; the error names the shape it got."""
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        supcon_loss(torch.randn(4, 2, 8), mask=torch.ones(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite_features(bad):
    """NaN or Inf in the features raises instead of returning NaN."""
    features = torch.randn(4, 2, 8)
    features[2, 1, 3] = bad
    with pytest.raises(ValueError, match="NaN|Inf|finite"):
        supcon_loss(features)


def test_rejects_bad_contrast_mode():
    """contrast_mode other than "all"/"one" raises and names the bad value."""
    with pytest.raises(ValueError, match="contrast_mode.*anchor"):
        supcon_loss(torch.randn(4, 2, 8), contrast_mode="anchor")


def test_choices_table_defaults():
    """The docstring's choices: t = 0.1 and no t / t_base factor by default; multi-label positives share a
    label; an anchor without positives is left out of the mean instead of making it NaN."""
    import supcon

    args = supcon.parse_args([])
    assert args.temperature == 0.1 and args.base_temperature is None
    multi_hot = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert supcon.positive_mask(multi_hot).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    features = torch.nn.functional.normalize(torch.randn(3, 1, 4, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 0, 1])  # one view each: sample 2 has no positive
    loss = supcon_loss(features, labels=labels)
    z = features[:, 0]
    by_hand = [-(z[i] @ z[1 - i] / 0.1 - torch.logsumexp(torch.stack([z[i] @ z[j] / 0.1 for j in range(3) if j != i]), 0))
               for i in range(2)]
    assert loss.item() == pytest.approx(float(sum(by_hand) / 2), rel=1e-12)
