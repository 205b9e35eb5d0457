"""G-HMLC: hierarchical contrastive learning with GMM feature masks, one file.

Papers: Ott, Vysotskaya, Sun, Servadei, Wille, "Feature Identification for Hierarchical Contrastive
Learning", arXiv 2510.00837 (2025), on the loss of Zhang, Xu, Xiong, Ramaiah, "Use All The Labels: A
Hierarchical Multi-Label Contrastive Learning Framework", CVPR 2022 (HMC / HCE / HMCE), itself built
on SupCon (Khosla et al., NeurIPS 2020, Eq. 2).

What this file implements
- `hmlc_loss`: HMC, HCE and HMCE (default), shared or per-level features.
- `gmm_masks`: for every embedding e in R^D (one per view of every image), a 1-D Gaussian mixture with
  L components is fitted to its own D entries by a few EM steps, batched over the whole batch. Entry d
  belongs to level l when its most likely component is the l-th largest by mean (largest mean ->
  coarsest level), so the L hard masks partition the dimensions; an empty mask falls back to all ones.
  The fit runs on the detached embedding: the masks select features, they are not trained. The first
  50 steps (`--mask-warmup-steps`) train plain HMCE with all-ones masks: on an untrained head the
  embeddings share one direction, the GMM then fits shared offsets, and one seed in five collapsed
  without the warm-up (bench/hmce_baselines.md: 5 seeds, worst 0.246 -> 0.746 category).
- The model: encoder f -> projection head E -> e; level features z_l = normalize(e * M_l) go into
  `hmlc_loss` with that level's positives. `--mask none` skips the masks: the plain HMLC/HMCE baseline.
- Our reading of "a GMM is fitted on this embedding vector to generate a mask for each hierarchy
  level" is per sample (above, the default). Other readings, each one flag away: `--gmm-over dims`
  (one GMM over the dimensions, each scored by how much of its label variance the coarse labels
  explain; one partition per batch, smoothed over batches by --dims-momentum), `--mask-on encoder`
  (masks on f(x), then one shared projection head), `--shared-term` (HMCE on the unmasked embedding
  added to the masked levels' terms).
- How it compares: no reading reaches HMCE on hdigits (the README's results; the tables, commands and the
  diagnosis are in bench/feature_masks.md and bench/hmce_baselines.md).
- The training loop shared with supcon.py.

Run
    python hmlc_gmm.py                       # hdigits demo, G-HMLC with HMCE
    python hmlc_gmm.py --mask none           # the HMCE baseline
    python hmlc_gmm.py --dataset cifar100 --epochs 200

Choices: what the papers say, what the HMLC reference code (salesforce/hierarchicalContrastiveLearning)
does, what we do, and the flag; tests/test_hmlc.py pins each row.

    | choice           | paper                  | reference code              | here                  | flag                |
    |------------------|------------------------|-----------------------------|-----------------------|---------------------|
    | level positives  | same label at level l  | same label path (prefix)    | same label path       | -                   |
    | level weight     | a penalty lambda_l     | loss 2^(1/l); training      | 2^(1/l)               | --level-weight-base |
    |                  |                        | script e^(1/l)              |                       |                     |
    | HCE maximum      | per pair (Eq. 6/7)     | over levels' mean losses    | over levels' means    | -                   |
    | levels summed    | every level            | l = 1..L-1, divided by L    | l = 1..L, / L         | -                   |
    | de-duplication   | -                      | one sample per label path   | none: every view at   | -                   |
    |                  |                        | kept for the next level     | every level           |                     |
    | loss factor      | -                      | t / 0.07, t = 0.07: 1       | none                  | -                   |
    | temperature      | -                      | 0.07                        | 0.1                   | --temperature       |
    | GMM fitted to    | "this embedding        | no public code              | each view's own D     | --gmm-over          |
    |                  | vector", per image     |                             | entries, detached     |                     |
    | mask -> level    | -                      | -                           | largest mean: coarsest| -                   |
    | empty mask       | -                      | -                           | all ones              | -                   |
    | mask warm-up     | -                      | -                           | 50 steps of all ones  | --mask-warmup-steps |
    | mask floor       | -                      | -                           | none                  | --mask-floor        |
    | masked features  | the embedding          | -                           | projection output e   | --mask-on           |

    Levels summed: the reference loop masks the last l label columns for l = 1..L-1, so its finest
    column never forms a level of its own. HCE maximum: on hdigits the level-mean maximum never
    binds, before or after training (bench/hce_binding.md): the coarse level's mean loss stays above the
    fine level's, so HMCE acts as HMC there; a per-anchor maximum would bind for 15 % of anchors of an
    untrained model and 0.2 % of a trained one.
    GMM per sample, in practice: on trained hdigits embeddings the coarsest mask holds about 1 of 128
    dimensions, so the coarse level sees almost nothing (bench/feature_masks.md).
"""

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data
import linear_eval

METHOD = "hmlc_gmm"


# The loss ---------------------------------------------------------------------------------------------


@torch.autocast("cuda", enabled=False)  # the loss stays in float32 inside a bf16 training step
@torch.autocast("cpu", enabled=False)
def hmlc_loss(features, labels, temperature=0.1, loss_type="hmce", level_weight_base=2.0, deduplicate=False,
              base_temperature=None, check_finite=True):
    """Hierarchical multi-label contrastive loss of Zhang et al. (CVPR 2022): HMC, HCE or HMCE.

    Levels are counted from the finest, l = 1..L. Level l's positives share the anchor's label path from
    the root down to level l (with global ids: the same label at level l), and loss_l is SupCon's L_out
    (Khosla et al., Eq. 2) with those positives, averaged over the anchors. Then

        HMC:  L = 1/L sum_l lambda_l loss_l,          lambda_l = base^(1/l)  (base 2: the reference's "pow_2")
        HCE:  L = 1/L sum_l max(loss_l, max_{l' < l} loss_l')   (a coarser level's loss is at least
              every finer level's: a cummax from fine to coarse)
        HMCE: both: L = 1/L sum_l lambda_l max(loss_l, max_{l' < l} loss_l')

    The maximum is taken between levels' mean losses, as the reference code does; the paper's Eq. 6/7
    write it per pair. Every view is used at every level, as the paper describes, unless `deduplicate`.

    Args:
        features: [B, V, D] L2-normalised embeddings shared by all levels, or [L, B, V, D] with one
            (masked) embedding per level, indexed like the label columns (index 0 = coarsest).
        labels: [B, L] global ids per level, coarse -> fine.
        temperature: t, the same at every level.
        loss_type: "hmc", "hce" or "hmce".
        level_weight_base: base of lambda_l = base^(1/l); 2 as in the paper and the reference loss, e as
            in the reference training script (layer_penalty=torch.exp).
        deduplicate: as the reference code does, every level above the finest keeps (as anchors and in
            the denominators) only the first sample of each label path of the level below it.
        base_temperature: t_base; the loss is multiplied by t / t_base (the reference code's 0.07).
        check_finite: raise ValueError on NaN or Inf features. It reads a value back from the device, a
            host sync, so the training step turns it off and checks the loss every ten steps instead.
    Returns a scalar in float32 (float64 stays float64), all levels in one batched computation.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, L], got shape {tuple(labels.shape)}")
    batch, levels = labels.shape
    if features.dim() == 3:
        features = features[None]
    if features.dim() != 4 or features.shape[0] not in (1, levels) or features.shape[1] != batch:
        raise ValueError(f"features must be [B, V, D] or [L, B, V, D] with B = {batch}, L = {levels}; "
                         f"got shape {tuple(features.shape)}")
    if loss_type not in ("hmc", "hce", "hmce"):
        raise ValueError(f"loss_type must be 'hmc', 'hce' or 'hmce', got {loss_type!r}")
    if check_finite and not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    if features.dtype != torch.float64:
        features = features.float()
    views = features.shape[2]

    contrast = features.transpose(1, 2).reshape(len(features), views * batch, -1)  # [1 or L, N, D]
    logits = torch.bmm(contrast, contrast.transpose(1, 2)) / temperature  # shared features: one product
    is_self = torch.eye(views * batch, dtype=torch.bool, device=features.device)
    log_prob = torch.log_softmax(logits.masked_fill(is_self, float("-inf")), dim=2)
    level_labels = labels.T  # [L, B], column order: coarse -> fine
    same_path = level_labels[:, :, None] == level_labels[:, None, :]  # [L, B, B]
    for level in range(1, levels):  # and agree at every coarser level (a loop over levels only)
        same_path[level] &= same_path[level - 1]
    positives = same_path.repeat(1, views, views) & ~is_self
    if deduplicate:  # a sample is kept at level j when it is the first on its level-(j + 1) path
        first = torch.arange(batch, device=labels.device)
        kept = torch.cat([same_path[1:].int().argmax(2) == first, torch.ones_like(same_path[:1, 0])]).repeat(1, views)
        log_prob = torch.log_softmax(logits.masked_fill(is_self | ~kept[:, None, :], float("-inf")), dim=2)
        positives &= kept[:, :, None] & kept[:, None, :]
    positive_count = positives.sum(2)
    per_anchor = -torch.where(positives, log_prob, 0.0).sum(2) / positive_count.clamp(min=1)  # [L, N]
    counted = (positive_count > 0).to(per_anchor.dtype)
    level_loss = (per_anchor * counted).sum(1) / counted.sum(1).clamp(min=1)  # [L], coarse -> fine

    fine_first = level_loss.flip(0)  # index l - 1 holds level l, counted from the finest
    if loss_type in ("hce", "hmce"):
        fine_first = fine_first.cummax(0).values
    if loss_type in ("hmc", "hmce"):
        level = torch.arange(1, levels + 1, device=fine_first.device, dtype=fine_first.dtype)
        fine_first = fine_first * level_weight_base ** (1.0 / level)
    return fine_first.mean() * (1.0 if base_temperature is None else temperature / base_temperature)


def reference_loop_loss(features, labels, temperature=0.1, loss_type="hmce", level_weight_base=2.0):
    """HMLC as the reference code's loss computes it (salesforce/hierarchicalContrastiveLearning,
    losses.py) on the label columns as given, [B, L] coarse -> fine: its loop runs l = 1..L-1, masking
    the last l columns, so the finest column is never a level of its own (labels [coarse, fine] contrast
    the coarse labels only; its DeepFashion layout appends a per-image id column so that both count); it
    de-duplicates per level, multiplies every level's loss by t / 0.07 and divides the sum by L. That is
    `hmlc_loss` on the first L - 1 columns with deduplicate=True and base_temperature=0.07, times (L-1)/L.
    Per-level features [L, B, V, D] lose the finest level's with its column."""
    levels = labels.shape[1]
    if labels.dim() != 2 or levels < 2:
        raise ValueError(f"the reference loop needs labels [B, L] with L >= 2, got shape {tuple(labels.shape)}")
    if features.dim() == 4 and len(features) == levels:
        features = features[:-1]
    return (levels - 1) / levels * hmlc_loss(features, labels[:, :-1], temperature, loss_type, level_weight_base,
                                             deduplicate=True, base_temperature=0.07, check_finite=False)


# The method: model, positives and one training step's loss --------------------------------------------


@torch.no_grad()
def gmm_masks(embeddings, levels, iters=10, min_dims=0):
    """Hard per-level feature masks from a 1-D GMM fitted to each embedding's own entries.

    Args:
        embeddings: [N, D]; row n is one sample's embedding, its D entries the 1-D data of its GMM.
        levels: L, the number of mixture components and masks.
        iters: EM iterations. Two starts run side by side, from the row's quantiles and from points
            evenly spaced between its minimum and maximum (each entry first assigned to the nearest);
            each row keeps the fit with the higher likelihood.
        min_dims: a floor on a mask's size: a mask with fewer entries also takes the entries most likely
            (highest posterior) under its component, up to min_dims; masks may then overlap.
    Returns:
        [L, N, D] float masks of 0/1; mask 0 (coarsest level) holds the entries of the component with
        the largest mean. Each entry is in exactly one mask, except that an empty mask becomes all ones
        (and the floor above).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if levels < 1 or iters < 1 or not 0 <= min_dims <= embeddings.shape[1]:
        raise ValueError(f"levels and iters must be at least 1 and min_dims in [0, D], got {levels}, {iters} "
                         f"and {min_dims}")
    x = embeddings.double() if embeddings.dtype == torch.float64 else embeddings.float()
    n, dim = x.shape
    steps = torch.arange(levels, dtype=x.dtype, device=x.device)
    quantile_start = torch.quantile(x, (steps + 0.5) / levels, dim=1).T  # [N, L]
    low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    spaced_start = low + (high - low) * (steps + 0.5) / levels
    x = x.repeat(2, 1)  # rows [0, N) start at the quantiles, rows [N, 2N) evenly spaced
    start = torch.cat([quantile_start, spaced_start])
    # Tensors are [2N, L, D], entries innermost: a components-last layout runs 3x slower on a CPU, and
    # there .min(1).indices is 10x faster than .argmin(1) over the short components axis.
    # Like scikit-learn, the first M step uses hard responsibilities (nearest starting mean).
    nearest = (x[:, None, :] - start[:, :, None]).abs().min(1).indices  # [2N, D]
    resp = (nearest[:, None, :] == steps.long()[None, :, None]).to(x.dtype)  # [2N, L, D]
    floor = 1e-3 * x.var(dim=1, keepdim=True) + 1e-6  # keeps variances positive, also for constant rows
    for _ in range(iters):
        mass = resp.sum(2) + 1e-10  # M step: [2N, L]
        means = (resp * x[:, None, :]).sum(2) / mass
        squared_deviation = (x[:, None, :] - means[:, :, None]) ** 2
        variances = (resp * squared_deviation).sum(2) / mass + floor
        # E step: log pi_k + log N(x_d | mu_k, var_k), then responsibilities over the components
        joint = (torch.log(mass / dim) - 0.5 * torch.log(2 * math.pi * variances))[:, :, None] \
            - 0.5 * squared_deviation / variances[:, :, None]
        resp = torch.softmax(joint, dim=1)
    better = (torch.logsumexp(joint, dim=1).sum(1).view(2, n).argmax(0) * n) + torch.arange(n, device=x.device)
    component = joint[better].max(1).indices  # [N, D]
    rank_of_component = means[better].argsort(dim=1, descending=True).argsort(dim=1)  # 0 = largest mean
    level_of_entry = rank_of_component.gather(1, component)  # [N, D]
    masks = (level_of_entry[None] == steps.long()[:, None, None]).to(embeddings.dtype)
    if min_dims > 0:
        component_of_level = means[better].argsort(dim=1, descending=True)  # [N, L]
        posterior = torch.log_softmax(joint[better], dim=1).gather(1, component_of_level[:, :, None].expand(-1, -1, dim))
        likeliest = torch.zeros_like(masks).scatter_(2, posterior.topk(min_dims, dim=2).indices.transpose(0, 1), 1.0)
        masks = torch.where(masks.sum(2, keepdim=True) < min_dims, torch.maximum(masks, likeliest), masks)
    empty = masks.sum(2, keepdim=True) == 0
    return torch.where(empty, torch.ones_like(masks), masks)


def label_variance_scores(features, labels):
    """How coarse the label information of each dimension is: [N, D] features, [N, L] labels -> [D].

    For level l, eta2_l[d] = (variance of the level-l class means of dimension d) / (variance of d),
    the share of d's variance that level l's labels explain. Finer labels refine coarser ones, so
    eta2 grows from coarse to fine; the score is mean_l eta2_l / eta2_finest in [0, 1]: near 1 when the
    coarse labels already explain what the fine ones do, lower when d separates the fine classes only.
    """
    x = features.float()
    centred = x - x.mean(0)
    total = centred.pow(2).mean(0) + 1e-12
    explained = []
    for level_ids in labels.T:  # a loop over the L levels; samples are vectorised
        ids = torch.unique(level_ids, return_inverse=True)[1]
        sums = torch.zeros(int(ids.max()) + 1, x.shape[1], device=x.device).index_add_(0, ids, centred)
        counts = torch.bincount(ids).clamp(min=1)[:, None]
        explained.append((sums / counts)[ids].pow(2).mean(0) / total)
    explained = torch.stack(explained)  # [L, D], coarse -> fine
    return (explained / explained[-1].clamp(min=1e-12)).clamp(max=1).mean(0)


class GHMLCModel(nn.Module):
    """Encoder f, projection head E and the hard per-level masks of the chosen reading.

    forward(x, labels) -> (level features [L, N, D], shared features [N, D] or None), all normalised:
    z_l = normalize(E(f(x)) * M_l) (masks on the projection), or normalize(E(f(x) * M_l)) (masks on
    the encoder feature, one shared head). `mask="none"` gives [1, N, D], the plain HMCE embedding.
    The first `mask_warmup_steps` training steps use all-ones masks (plain HMCE), so that the GMM is
    fitted to features that mean something; the count is a buffer, one per training forward pass (the
    chunked step restores buffers before every chunk, so a step counts once whatever --chunks is).
    """

    def __init__(self, arch, info, mask="gmm", mask_on="projection", gmm_over="sample", mask_per="view",
                 gmm_iters=10, dims_momentum=0.9, shared_term=False, mask_warmup_steps=50, mask_floor=0.0):
        super().__init__()
        self.encoder, feature_dim = build_encoder(arch, info)
        self.head = projection_head(feature_dim)
        self.levels, self.mask, self.mask_on, self.gmm_over, self.mask_per = len(info.level_names), mask, mask_on, gmm_over, mask_per
        self.gmm_iters, self.dims_momentum, self.shared_term = gmm_iters, dims_momentum, shared_term
        masked_dim = feature_dim if mask_on == "encoder" else self.head[-1].out_features
        self.mask_warmup_steps, self.min_dims = mask_warmup_steps, math.ceil(mask_floor * masked_dim)
        # --gmm-over dims: the running label-variance score of every masked dimension (NaN until the first batch)
        self.register_buffer("dimension_scores", torch.full((masked_dim,), float("nan")))
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))

    def level_masks(self, features, labels, views=1):
        """[L, N, D] (per sample) or [L, 1, D] (per batch) 0/1 masks from detached features [N, D], whose
        rows are `views` view-major blocks (mask_per="image" fits one GMM to each image's mean embedding)."""
        if self.training:
            self.steps_trained += 1
            if self.steps_trained <= self.mask_warmup_steps:
                return torch.ones(self.levels, 1, features.shape[-1], dtype=features.dtype, device=features.device)
        if self.gmm_over == "sample" and self.mask_per == "image":
            images = features.view(views, -1, features.shape[-1]).mean(0)
            return gmm_masks(images, self.levels, self.gmm_iters, self.min_dims).repeat(1, views, 1)
        if self.gmm_over == "sample":
            return gmm_masks(features, self.levels, self.gmm_iters, self.min_dims)
        if self.training:
            scores = label_variance_scores(features, labels)
            previous, momentum = self.dimension_scores, self.dims_momentum
            self.dimension_scores.copy_(torch.where(previous.isnan(), scores, momentum * previous + (1 - momentum) * scores))
        return gmm_masks(self.dimension_scores[None], self.levels, self.gmm_iters, self.min_dims)

    def forward(self, x, labels=None, views=1):
        return self.embed(self.encoder(x), labels, views)

    def embed(self, h, labels, views=1):
        """Everything after the encoder: encoder features h [N, F] -> (level features, shared features)."""
        if self.mask == "none":
            return F.normalize(self.head(h), dim=-1)[None], None
        if self.mask_on == "encoder":
            masks = self.level_masks(h.detach(), labels, views)
            levels = F.normalize(self.head(h[None] * masks.to(h.dtype)), dim=-1)
            shared = F.normalize(self.head(h), dim=-1) if self.shared_term else None
            return levels, shared
        e = self.head(h)
        masks = self.level_masks(e.detach(), labels, views)
        shared = F.normalize(e, dim=-1) if self.shared_term else None
        return F.normalize(e[None] * masks.to(e.dtype), dim=-1), shared


def method_forward(model, views, targets):
    """views [V, B, ...] -> (level features [B, L or 1, V, D], shared features [B, 1, V, D] or None),
    sample-major so that chunks of samples concatenate."""
    num_views, batch = views.shape[:2]
    levels, shared = model(views.flatten(0, 1), targets.repeat(num_views, 1), num_views)  # [L or 1, V*B, D], [V*B, D]

    def sample_major(z):  # [K, V*B, D] -> [B, K, V, D]
        return z.view(len(z), num_views, batch, -1).permute(2, 0, 1, 3)

    return sample_major(levels), (None if shared is None else sample_major(shared[None]))


def method_loss(outputs, targets, args, info):
    """HMCE on the global batch over the per-level masked features (+ the shared embedding's HMCE with
    --shared-term); --id-column appends a per-image id as the finest label column."""
    global_targets = gather_across_ranks(targets)
    if args.id_column:
        ids = torch.arange(len(global_targets), device=global_targets.device)
        global_targets = torch.cat([global_targets, global_targets[:, -1:].max() + 1 + ids[:, None]], dim=1)

    def hmce(z):  # [B, K, V, D] of this rank -> HMCE on the global batch
        z = gather_across_ranks(z).transpose(0, 1)
        if args.loop == "reference":
            return reference_loop_loss(z, global_targets, args.temperature, args.loss_type, args.level_weight_base)
        return hmlc_loss(z, global_targets, args.temperature, args.loss_type, args.level_weight_base,
                         args.deduplicate, args.base_temperature, check_finite=False)

    return sum(hmce(z) for z in outputs if z is not None)


def build_model(args, info):
    if info.multilabel:
        raise SystemExit(f"{METHOD} needs hierarchical labels; {info.name} is multi-label")
    return GHMLCModel(args.arch, info, args.mask, args.mask_on, args.gmm_over, args.mask_per, args.gmm_iters,
                      args.dims_momentum, args.shared_term, args.mask_warmup_steps, args.mask_floor)


def add_method_arguments(p):
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature tau (all levels)")
    p.add_argument("--loss-type", choices=("hmc", "hce", "hmce"), default="hmce",
                   help="level weights base^(1/l) (hmc), the hierarchy constraint (hce), or both (hmce)")
    p.add_argument("--level-weight-base", type=float, default=2.0,
                   help="lambda_l = base^(1/l), l = 1 the finest level: 2 as in the paper and the reference loss, "
                        "2.71828 (e) as in the reference training script")
    p.add_argument("--loop", choices=("ours", "reference"), default="ours",
                   help="reference: the HMLC reference code's loss on the label columns as given (levels 1..L-1, "
                        "de-duplicated, t/0.07, divided by L)")
    p.add_argument("--deduplicate", action="store_true",
                   help="our loss with the reference's per-level de-duplication (one sample per finer label path)")
    p.add_argument("--base-temperature", type=float, default=None,
                   help="our loss times t/base (0.07: the reference's factor); default none")
    p.add_argument("--id-column", action="store_true",
                   help="append a per-image id as the finest label column (the reference's DeepFashion layout)")
    p.add_argument("--mask", choices=("gmm", "none"), default="gmm", help="none: the plain HMLC baseline")
    p.add_argument("--mask-warmup-steps", type=int, default=50,
                   help="train plain HMCE (all-ones masks) for this many steps before the GMM masks start")
    p.add_argument("--mask-floor", type=float, default=0.0,
                   help="a floor on a mask's size, as a share of the D dimensions: a smaller mask also takes the "
                        "entries likeliest under its component; 0: none")
    p.add_argument("--gmm-iters", type=int, default=10, help="EM iterations of the GMM")
    p.add_argument("--gmm-over", choices=("sample", "dims"), default="sample",
                   help="sample: a GMM over each embedding's own entries, masks per image; dims: one GMM over "
                        "the dimensions, each scored by how coarse its label information is, masks per batch")
    p.add_argument("--mask-per", choices=("view", "image"), default="view",
                   help="--gmm-over sample: a GMM per view's embedding, or one per image on its views' mean")
    p.add_argument("--dims-momentum", type=float, default=0.9,
                   help="--gmm-over dims: running average of the dimension scores over batches")
    p.add_argument("--mask-on", choices=("projection", "encoder"), default="projection",
                   help="multiply the masks into the projection output e, or into the encoder feature f(x) "
                        "before one shared projection head")
    p.add_argument("--shared-term", action="store_true",
                   help="add HMCE on the unmasked embedding to the masked levels' HMCE (instead of replacing it)")


def check_method_arguments(p, args):
    if not args.temperature > 0:  # (not ... > 0 also refuses NaN)
        p.error(f"--temperature must be positive, got {args.temperature}")
    if not args.level_weight_base > 0:
        p.error(f"--level-weight-base must be positive, got {args.level_weight_base}")
    if args.base_temperature is not None and not args.base_temperature > 0:
        p.error(f"--base-temperature must be positive, got {args.base_temperature}")
    if args.id_column and args.mask != "none":
        p.error("--id-column is for the plain baseline (--mask none): the masks have no level for the id")
    if args.mask_warmup_steps < 0:
        p.error(f"--mask-warmup-steps must not be negative, got {args.mask_warmup_steps}")
    if not 0.0 <= args.mask_floor <= 1.0:
        p.error(f"--mask-floor must lie in [0, 1], got {args.mask_floor}")
    if args.gmm_iters < 1:
        p.error(f"--gmm-iters must be at least 1, got {args.gmm_iters}")
    if not 0.0 <= args.dims_momentum < 1.0:
        p.error(f"--dims-momentum must lie in [0, 1), got {args.dims_momentum}")


# Encoders, projection head, global-batch gather and the training loop (identical in every method file) --


def small_cnn(in_channels, width=16):
    """A four-stage VGG-style CNN that trains in minutes on a CPU; width * 8 features."""
    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = stage(in_channels, width) + [nn.MaxPool2d(2)] + stage(width, 2 * width) + [nn.MaxPool2d(2)]
    layers += stage(2 * width, 4 * width) + [nn.MaxPool2d(2)] + stage(4 * width, 8 * width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 8 * width


def cifar_resnet(name, in_channels):
    """torchvision ResNet with the CIFAR stem: 3x3 stride-1 first convolution, no max-pool, no fc."""
    net = getattr(torchvision.models, name)(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool, feature_dim, net.fc = nn.Identity(), net.fc.in_features, nn.Identity()
    return net, feature_dim


class PointNet(nn.Module):
    """PointNet (Qi et al., CVPR 2017) without its transforms: a shared per-point MLP 3-64-64-128-D (1x1
    convolutions, BatchNorm, ReLU), then the max over the points: [B, P, 3] -> [B, D], order-invariant."""

    def __init__(self, feature_dim=256):
        super().__init__()
        widths = (3, 64, 64, 128, feature_dim)
        self.mlp = nn.Sequential(*[layer for cin, cout in zip(widths, widths[1:]) for layer in
                                   (nn.Conv1d(cin, cout, 1, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))])

    def forward(self, points):
        return self.mlp(points.transpose(1, 2)).amax(dim=2)


class FastText(nn.Module):
    """fastText-style encoder (Joulin et al., EACL 2017): the mean learned embedding of a document's hashed
    uni- and bigram ids [B, T] (data.ngram_ids; 0 = padding, left out), then a LayerNorm; [B, D]."""

    def __init__(self, buckets, feature_dim=128):
        super().__init__()
        self.embedding = nn.EmbeddingBag(buckets + 1, feature_dim, mode="mean")  # row 0 (padding) is never read
        nn.init.uniform_(self.embedding.weight, -1 / feature_dim, 1 / feature_dim)  # small, as in fastText
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, ids):
        present = ids > 0  # one flat bag without the padding: the backward pass gets several times cheaper
        counts = present.sum(1)
        return self.norm(self.embedding(ids[present], torch.cumsum(counts, 0) - counts))


# --arch: the input each encoder reads, and its builder from the dataset's info: (module, feature_dim).
ENCODERS = {"cnn": ("image", lambda info: small_cnn(info.channels)),
            "resnet18": ("image", lambda info: cifar_resnet("resnet18", info.channels)),
            "resnet50": ("image", lambda info: cifar_resnet("resnet50", info.channels)),
            "pointnet": ("points", lambda info: (PointNet(), 256)),
            "fasttext": ("words", lambda info: (FastText(info.extra["buckets"]), 128)),
            "tfidf-linear": ("tfidf", lambda info: (nn.Sequential(nn.Linear(info.extra["input_dim"], 128),
                                                                  nn.LayerNorm(128)), 128))}


def build_encoder(arch, info):
    """Encoder f for a dataset: (module mapping a batch to [B, feature_dim], feature_dim)."""
    reads, build = ENCODERS[arch]
    given = info.extra.get("input", info.modality)
    if reads != given:
        raise ValueError(f"--arch {arch} reads {reads} input; {info.name} has {given} input, which "
                         f"{', '.join(name for name, (kind, _) in ENCODERS.items() if kind == given)} read")
    return build(info)


def projection_head(feature_dim, out_dim=128):
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, out_dim))


class GatherAcrossRanks(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for the local rows: every rank takes
    the same loss on the global batch, so its rows get world_size times their gradient; DDP averages it back.
    (torch.distributed.nn.all_gather, deprecated, returned twice that under gloo with torch 2.14.)"""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_across_ranks(tensor):
    """The global batch: every rank's tensor concatenated along dim 0 (identity outside torchrun)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return GatherAcrossRanks.apply(tensor) if distributed else tensor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--dataset", default="hdigits", choices=data.DATASETS, help="dataset (data.py)")
    add("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    add("--download", action=argparse.BooleanOptionalAction, default=True, help="fetch a missing dataset (checksummed)")
    add("--wos-release", choices=data.WOS_RELEASES, default=None, help="the release --dataset wos reads (46985)")
    add("--arch", choices=ENCODERS, help="encoder; default from the dataset preset (data.PRESETS)")
    add("--epochs", type=int, help="training epochs; default from the preset")
    add("--batch-size", type=int, help="global batch size (samples, two views each); default from the preset")
    add("--lr", type=float, help="peak SGD learning rate; default from the preset")
    add("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    add("--warmup-epochs", type=int, help="linear warm-up epochs before the cosine decay; default from the preset")
    add("--seed", type=int, default=0, help="seeds the weights, the data order and the augmentation")
    add("--device", default=None, help="cuda if available, else cpu")
    add("--fraction", type=float, default=1.0, help="class-stratified fraction of the training set")
    add("--image-size", type=int, default=None, help="image side of hmnist (its canvas) and of --dataset folder/csv")
    add("--workers", type=int, default=2, help="DataLoader workers for data that is not kept resident")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    add("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
        help="autocast dtype (losses stay fp32): auto is bf16 on GPUs that have it, fp16 with a loss scaler before")
    add("--chunks", default="auto", help="compute each step in this many chunks of samples (gradient caching, the "
        "gradient of that many DDP ranks); auto: 1 on a CPU, on a GPU the fewest that fit")
    add("--out", default=None, help="run folder; default runs/<dataset>-<method>-<seed>-<time>")
    add("--resume", default=None, help="checkpoint to continue from, with the same options, in its own folder")
    add("--save-every", type=int, default=10, help="checkpoint every N epochs (and at the end)")
    add("--no-eval", action="store_true", help="skip the linear evaluation at the end")
    add("--eval-every", type=int, default=0, help="every N steps, a kNN probe of a held-out part of the training "
        "set (--probe-share, left out of training) into metrics.jsonl; 0: off")
    add("--probe-share", type=float, default=0.1, help="--eval-every: class-stratified share held out for the probe")
    add_method_arguments(p)
    args = p.parse_args(argv)
    for key, value in data.PRESETS[args.dataset].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    # (--batch-size 1: one sample's two views, the positive is the whole denominator and the loss 0)
    for name, low in (("epochs", 1), ("batch_size", 2), ("lr", 0), ("save_every", 1), ("seed", 0),
                      ("warmup_epochs", 0), ("weight_decay", 0), ("workers", 0), ("eval_every", 0)):
        value = getattr(args, name)
        if not low <= value < (2 ** 32 if name == "seed" else math.inf) or (name == "lr" and value == 0):  # NaN too
            p.error(f"--{name.replace('_', '-')} must be {'positive' if name == 'lr' else f'at least {low}'}, got {value}")
    if not (0.0 < args.fraction <= 1.0 and 0.0 < args.probe_share < 1.0):
        p.error(f"--fraction must lie in (0, 1] and --probe-share in (0, 1), got {args.fraction}, {args.probe_share}")
    if args.chunks != "auto" and not (args.chunks.isdigit() and int(args.chunks) > 0):
        p.error(f"--chunks must be a positive integer or auto, got {args.chunks!r}")
    if "" in (args.out, args.resume) or (args.device is not None and data.device_problem(args.device)):
        p.error("--out and --resume must name a path" if "" in (args.out, args.resume) else data.device_problem(args.device))
    check_method_arguments(p, args)
    return args


def read_checkpoint(path, args):
    """The checkpoint at `path`, or one line saying why it cannot continue this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise SystemExit(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("method") != METHOD or not isinstance(state.get("config"), dict):
        raise SystemExit(f"{path} is not a {METHOD} checkpoint")
    resumable = {"data_dir", "download", "device", "workers", "compile", "precision", "chunks", "out", "resume",
                 "save_every", "no_eval"}  # where a run runs, reads and writes, not what it computes
    for key, value in state["config"].items():
        if key not in resumable and getattr(args, key, None) != value:
            raise SystemExit(f"{path} was trained with --{key.replace('_', '-')} {value!r}, this run has "
                             f"{getattr(args, key, None)!r}; --resume continues a run (give another --out to start one)")
    return state


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def mixed_precision(precision, device):
    """(precision, autocast, loss scaler) for --precision: auto is bf16 on GPUs with bf16 units (Ampere and newer),
    fp16 before them (its gradients need the loss scale), fp32 on a CPU."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return (precision, torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"),
            torch.amp.GradScaler(device.type, enabled=precision == "fp16"))


def training_step(model, views, targets, args, info, chunks, autocast, scaler):
    """Forward, loss and backward of one step (gradients scaled by `scaler`); returns the loss.

    chunks > 1 is gradient caching (Gao et al., 2021): each chunk of samples is embedded without a graph,
    the loss and its gradient with respect to the embeddings are taken on the whole batch, then each chunk is
    embedded again and back-propagated with its part of that gradient: the memory of one chunk, the gradient
    of `chunks` DDP ranks (each chunk's BatchNorm starts from the step's buffers; chunk 0's statistics stay).
    """
    if chunks == 1:
        with autocast:
            loss = method_loss(method_forward(model, views, targets), targets, args, info)
        scaler.scale(loss).backward()
        return loss
    view_chunks, target_chunks = views.tensor_split(chunks, dim=1), targets.tensor_split(chunks)
    step_buffers = [buffer.clone() for buffer in model.buffers()]

    def embed(index):
        for buffer, value in zip(model.buffers(), step_buffers):
            buffer.copy_(value)
        with autocast:
            return method_forward(model, view_chunks[index], target_chunks[index])

    with torch.no_grad():
        parts = [embed(index) for index in range(chunks)]
    cached = [None if part[0] is None else torch.cat(part).requires_grad_() for part in zip(*parts)]
    with autocast:
        loss = method_loss(cached, targets, args, info)
    scaler.scale(loss).backward()
    for index in reversed(range(chunks)):  # chunk 0 last: its buffers stay, and DDP reduces the gradients then
        with model.no_sync() if index > 0 and hasattr(model, "no_sync") else contextlib.nullcontext():
            pairs = [(output, cache.grad.tensor_split(chunks)[index]) for output, cache in zip(embed(index), cached)
                     if cache is not None and cache.grad is not None]
            torch.autograd.backward(*zip(*pairs))
    return loss


def fewest_chunks(model, views, targets, autocast):
    """--chunks auto on a GPU: the fewest of 1, 2, 4, ..., B chunks in which one chunk's forward and backward fit,
    tried on a copy of the model (its buffers and gradients stay) without the loss, so without a collective;
    0 if one sample does not fit."""
    probe, chunks = copy.deepcopy(model), 1
    while True:
        size = -(-views.shape[1] // chunks)
        try:
            with autocast:
                outputs = method_forward(probe, views[:, :size], targets[:size])
            sum(output.float().sum() for output in outputs if output is not None).backward()
            return chunks
        except torch.OutOfMemoryError:
            outputs = None
            torch.cuda.empty_cache()
            if size == 1:
                return 0
        chunks = min(2 * chunks, views.shape[1])


def train(args):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world_size > 1:  # torchrun: one process per device, nccl on CUDA, gloo on CPU
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    torch.manual_seed(args.seed)  # the weights; the data order and the views have seeded generators of their own
    default_out = os.path.join("runs", f"{args.dataset}-{METHOD}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    shared = [args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else default_out)]
    if world_size > 1:  # every rank writes into rank 0's run folder
        dist.broadcast_object_list(shared)
    args.out = shared[0]
    checkpoint_path, metrics_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "metrics.jsonl")
    if rank == 0 and not args.resume and (os.path.exists(checkpoint_path) or os.path.exists(metrics_path)):
        raise SystemExit(f"{args.out} holds another run; pass --resume {checkpoint_path} or another --out")
    resumed = read_checkpoint(args.resume, args) if args.resume else None
    if args.resume and os.path.abspath(args.out) != os.path.dirname(os.path.abspath(args.resume)):
        raise SystemExit(f"--resume continues in its checkpoint's folder, {os.path.dirname(args.resume)}; leave out --out")

    options = dict(download=args.download, fraction=args.fraction, seed=args.seed, image_size=args.image_size,
                   release=args.wos_release)
    # Rank 0 downloads a missing dataset first; the others wait in a gloo group of their own, whose deadline
    # no download reaches (nccl's watchdog would end them after 10 minutes).
    download_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30)) if world_size > 1 else None
    if rank > 0:
        dist.barrier(group=download_wait)
    train_set = data.load_or_exit(args.dataset, args.data_dir, "train", **options)
    if rank == 0 and world_size > 1:
        dist.barrier(group=download_wait)
    try:
        if args.eval_every:  # the convergence probe never looks at the test set
            train_set, probe_set = linear_eval.hold_out(train_set, args.probe_share, args.seed)
        if args.batch_size > len(train_set):
            raise ValueError(f"--batch-size {args.batch_size} is more than the {len(train_set)} training samples")
        # channels_last: NHWC convolutions, faster on GPUs and CPUs alike (it leaves other weights as they are)
        model = build_model(args, train_set.info).to(device, memory_format=torch.channels_last)
    except ValueError as error:  # options that do not fit this data (--arch, --probe-share, --batch-size)
        raise SystemExit(f"error: {error}") from None
    info, resident = train_set.info, data.to_device(train_set, device)
    if world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world_size > 1 else model
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    _, rank_batch, steps = data.rank_shape(len(train_set), args.batch_size, world_size)
    total_steps, warmup = args.epochs * steps, args.warmup_epochs * steps

    def lr_factor(step):  # linear warm-up to the peak, then cosine decay to a thousandth of it
        if step < warmup:
            return (step + 1) / warmup
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    precision, autocast, scaler = mixed_precision(args.precision, device)
    epoch, skip, losses = 0, 0, []  # skip > 0: the steps a stopped run took of the epoch it stopped in
    if resumed:
        for part, target in (("model", core), ("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            if resumed.get(part):  # (a checkpoint of an fp32 run holds an empty scaler)
                target.load_state_dict(resumed[part])
        epoch, skip, losses = resumed["epoch"], resumed["step"], [loss.to(device) for loss in resumed["losses"]]
        if rank == 0 and os.path.exists(metrics_path):  # a run killed past its last checkpoint logged steps it retakes
            os.truncate(metrics_path, min(resumed.get("metrics_bytes", math.inf), os.path.getsize(metrics_path)))

    chunks = 1 if args.chunks == "auto" else int(args.chunks)
    if args.chunks == "auto" and device.type == "cuda":  # every rank tries a real batch; the most chunks win
        x, y = next(data.batches(resident, args.batch_size, torch.Generator(), device, rank, world_size, args.workers))
        fitted = torch.tensor([fewest_chunks(core, data.two_views(x, info, torch.Generator(device)), y, autocast) or
                               2 * rank_batch], device=device)  # 2 * rank_batch: not even one sample fits
        if world_size > 1:
            dist.all_reduce(fitted, op=dist.ReduceOp.MAX)
        chunks = int(fitted)
    if chunks > rank_batch or (chunks > 1 and args.sync_bn):
        raise SystemExit(f"--chunks {chunks} cannot work here: more than the {rank_batch} samples of a step on each "
                         "rank (auto: one sample does not fit), or with --sync-bn (statistics not synced across chunks)")

    def checkpoint(epoch, step=0):
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "method": METHOD, "method_file": os.path.basename(__file__), "config": vars(args), "epoch": epoch,
                "step": step, "losses": [loss.cpu() for loss in losses[:step]], "model": core.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "metrics_bytes": os.path.getsize(metrics_path) if os.path.exists(metrics_path) else 0})

    def log(record):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if rank == 0:  # a folder that cannot be made ends here, before anything trains, in one line (OSError)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "train_samples": len(train_set)}, f, indent=2)
        print(f"{METHOD} on {args.dataset} ({len(train_set)} train samples, --fraction {args.fraction:g}): {args.arch}, "
              f"{args.epochs} epochs x {steps} steps of {args.batch_size}{f' in {chunks} chunks' * (chunks > 1)}, "
              f"{precision}, device {device}, world {world_size} -> {args.out}")
        if "summary" in info.extra:  # what a loader of your own data found (data.py: folder, csv)
            print(info.extra["summary"])
    progress = tqdm(total=total_steps, initial=epoch * steps + skip, disable=rank != 0, desc=METHOD, dynamic_ncols=True)
    stop = []  # Ctrl-C and SIGTERM (preemption, time limits) end the run at the next step boundary

    def request_stop(signum, frame):
        stop.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    handlers = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for epoch in range(epoch, args.epochs):
            started = time.perf_counter()
            order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)  # data order: (seed, epoch) only
            for step, (x, y) in enumerate(data.batches(resident, args.batch_size, order, device, rank, world_size,
                                                       args.workers)):
                if step < skip:  # taken before the stop
                    continue
                global_step = epoch * steps + step + 1  # the views depend on (seed, step, rank) only
                augment = torch.Generator(device).manual_seed((args.seed * 10_000_019 + global_step) * 1_024 + rank)
                optimizer.zero_grad(set_to_none=True)
                losses.append(training_step(step_model, data.two_views(x, info, augment), y, args, info, chunks,
                                            autocast, scaler).detach())
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scaler then backs off
                scaler.update()
                scheduler.step()
                progress.update()
                if args.eval_every and global_step % args.eval_every == 0 and rank == 0:
                    log({"epoch": epoch + 1, "step": global_step, f"probe_knn_{'map' if info.multilabel else 'top1'}":
                         linear_eval.knn_probe(core.encoder, train_set, probe_set, device)})
                stopping = bool(stop)
                if world_size > 1:  # every rank stops at the same step (a collective, and a host sync, per step)
                    signalled = torch.tensor([float(stopping)], device=device)
                    dist.all_reduce(signalled)
                    stopping = signalled.item() > 0
                if stopping or (step + 1) % 10 == 0 or step + 1 == steps:  # one host sync per ten steps
                    values = torch.stack(losses)
                    bad = int(values.isfinite().int().argmin())  # the first non-finite loss, if there is one
                    if not values[bad].isfinite():  # stop there; the last good checkpoint stays
                        raise SystemExit(f"non-finite loss {values[bad].item()} at epoch {epoch + 1}, step {bad + 1}/"
                                         f"{steps}; stopping (last good checkpoint, if any: {checkpoint_path})")
                    rate = (step + 1 - skip) * args.batch_size * 2 / (time.perf_counter() - started)
                    progress.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.4f}",
                                         views_per_s=f"{rate:.0f}")
                if stopping:
                    checkpoint(epoch, step + 1)
                    raise SystemExit(f"\n{stop[0] if stop else 'another rank was signalled'}: stopped after step "
                                     f"{step + 1}/{steps} of epoch {epoch + 1}; saved {checkpoint_path} (the same "
                                     f"command with --resume {checkpoint_path} continues from there)")
            seconds = time.perf_counter() - started
            log({"epoch": epoch + 1, "loss": torch.stack(losses).mean().item(), "lr": scheduler.get_last_lr()[0],
                 "seconds": seconds, "views_per_s": (steps - skip) * args.batch_size * 2 / seconds})
            skip, losses = 0, []
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                checkpoint(epoch + 1)
    except torch.OutOfMemoryError:
        raise SystemExit(f"out of memory in epoch {epoch + 1} with --chunks {chunks}; the same command with --chunks "
                         f"{2 * chunks} (and --resume {checkpoint_path}, if it exists) needs less") from None
    finally:
        progress.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)

    if world_size > 1:  # leave the group first: no rank then waits on a collective while rank 0 evaluates
        dist.barrier()
        dist.destroy_process_group()
    if rank > 0 or args.no_eval:
        return None
    test_set = data.load_or_exit(args.dataset, args.data_dir, "test", **{**options, "fraction": 1.0})
    return linear_eval.evaluate_run(core, METHOD, args, train_set, test_set, device, args.out)


if __name__ == "__main__":
    try:
        train(parse_args())
    except KeyboardInterrupt:  # before or after the training loop (start-up, the final evaluation): nothing to save
        raise SystemExit("\ninterrupted") from None
    except OSError as error:  # the run folder or a file in it cannot be written
        raise SystemExit(f"error: {error}") from None
