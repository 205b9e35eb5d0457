"""MLCL: multi-level supervised contrastive learning, one file.

Paper: Ghanooni, Pajoum, Rawal, Fellenz, Le Duy, Kloft, "Multi-level Supervised Contrastive
Learning", arXiv 2502.02202 (2025). Builds on SupCon (Khosla et al., NeurIPS 2020, Eq. 2).

What this file implements
- One shared encoder f and H projection heads g_h (MLP D_enc -> D_enc -> 128), one per label level
  (hierarchical data) or one per label plus a global head (multi-label data). Each head h has its own
  positive set P_h, temperature t_h and weight a_h:

      L_MLCL = sum_h a_h * L_h,   L_h = SupCon L_out on z^h = normalize(g_h(f(x))) with P_h and t_h

  `mlcl_loss` computes all heads in one batched pass; `hierarchical_masks` and `multilabel_masks`
  build the positive (and anchor) masks of every head from one broadcast comparison.
- The cross-entropy term the paper adds for text: a linear classifier on f(x) trained jointly,
  L = w_ce * CE(finest level) + lambda * L_MLCL (BCE-with-logits for multi-label data); w_ce defaults
  to 1 on text datasets and 0 otherwise (--ce-weight sets it). When it is trained, the classifier's own
  test figures go into results.json beside the linear probe's ("classifier").
- The training loop shared with supcon.py (diff the two files to see exactly what MLCL adds).

Run
    python mlcl.py                                     # hdigits demo: two heads, category and class
    python mlcl.py --dataset hdigits-multilabel        # 10 label heads + a global head
    python mlcl.py --dataset cifar100 --epochs 200 --temperatures 0.5 0.1
    python mlcl.py --dataset skdocs                    # text: fastText encoder + the CE term, ~1 CPU minute

Choices: what the paper says, what the SupCon reference code (HobbitLong/SupContrast, on which MLCL
builds) does, what we do, and the flag; tests/test_mlcl.py pins each row.

    | choice          | paper                       | reference code | here                               | flag                  |
    |-----------------|-----------------------------|----------------|------------------------------------|-----------------------|
    | positives       | same label at level h       | -              | same label path, root down to h    | -                     |
    | temperatures    | per head; warm coarse helps | one t (0.07)   | 0.5 coarser levels, 0.1 finest and | --temperatures        |
    |                 | (Fig. 4, 0.5)               |                | global; 0.1 every multi-label head |                       |
    | head weights    | a_h, a hyperparameter       | -              | 1                                  | --weights             |
    | loss factor     | not stated                  | t / 0.07       | none (see below)                   | --base-temperature    |
    | CE term (text)  | CE + lambda * MLCL          | -              | w_ce = 1 on text, else 0           | --ce-weight, --lambda |
    | global head     | multi-label data            | -              | multi-label on, hierarchical off   | --heads               |

    Label path: with global ids (every loader here) it is the same as the same label at level h; with
    parent-local ids (a user's own data, WOS's raw YL2) only the path is right. Loss factor: with
    SupContrast's t / 0.07 a t = 0.5 head weighs 7x a t = 0.1 head, which may be part of why the paper
    found a warm superclass head better; --base-temperature 0.07 reproduces it.
"""

import argparse
import contextlib
import datetime
import json
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import data
import linear_eval

METHOD = "mlcl"


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def hierarchical_masks(labels):
    """Positive masks of the level heads: [B, L] labels (coarse -> fine) -> [L, B, B] bool.

    P_h(i) = samples whose label path from the root down to level h is the anchor's: they agree at
    level h and at every coarser level. With global ids (fine ids unique across the tree, as every
    loader here gives them) that is the same as agreeing at level h; with parent-local ids (fine ids
    numbered 0.. inside each parent, like WOS's YL2) only the path test is right. The diagonal is True,
    so the other views of the anchor's own sample are positives at every level.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, L], got shape {tuple(labels.shape)}")
    levels = labels.T
    same_path = levels[:, :, None] == levels[:, None, :]  # [L, B, B], one broadcast comparison
    for level in range(1, len(same_path)):  # and agree at every coarser level (a loop over levels only)
        same_path[level] &= same_path[level - 1]
    return same_path


def multilabel_masks(targets, groups=None):
    """Positive and anchor masks of the multi-label heads.

    Args:
        targets: [B, K] multi-hot labels.
        groups: optional list of label-index lists (for many labels); then one head per group.
    Returns:
        positives [H, B, B] bool and anchors [H, B] bool with H = K + 1 (or len(groups) + 1).
        Head k: anchors are the samples with label k, positives the samples with label k (a sample
        without it is never an anchor there but stays in every denominator). Group head: the same
        with "has a label of the group" / "shares a label of the group". Last, the global head:
        positives share at least one label with the anchor.
    """
    if targets.dim() != 2:
        raise ValueError(f"targets must be [B, K], got shape {tuple(targets.shape)}")
    has = targets > 0.5
    if groups is None:
        per_head = has.T  # [K, B]
        positives = per_head[:, :, None] & per_head[:, None, :]
    else:
        membership = torch.zeros(len(groups), targets.shape[1], device=targets.device)
        for g, labels in enumerate(groups):
            membership[g, labels] = 1.0
        in_group = has.float()[None] * membership[:, None, :]  # [G, B, K]
        positives = torch.bmm(in_group, in_group.transpose(1, 2)) > 0
        per_head = in_group.sum(2) > 0
    shared = has.float() @ has.float().T > 0
    positives = torch.cat([positives, shared[None]])
    anchors = torch.cat([per_head, has.any(1)[None]])
    return positives, anchors


@torch.autocast("cuda", enabled=False)  # the loss stays in float32 inside a bf16 training step
@torch.autocast("cpu", enabled=False)
def mlcl_loss(features, pos_masks, temperatures, weights=None, anchor_masks=None, base_temperature=None,
              check_finite=True):
    """Multi-level supervised contrastive loss: L = sum_h a_h * L_h, each L_h SupCon's Eq. 2 (L_out).

        l_i^h = -1/|P_h(i)| sum_{p in P_h(i)} log( exp(z_i^h.z_p^h/t_h) / sum_{a in A(i)} exp(z_i^h.z_a^h/t_h) )
        L_h   = (t_h / t_base) * mean of l_i^h over the anchors of head h that have a positive

    Args:
        features: [H, B, V, D] L2-normalised embeddings of every head, V views of each of B samples.
            Rows are stacked view-major, as in supcon_loss: row v*B + b is view v of sample b.
        pos_masks: [H, B, B] positives per head (nonzero = positive; the diagonal marks the other
            views of the same sample).
        temperatures: [H] t_h (tensor or sequence).
        weights: [H] a_h; None means 1 for every head.
        anchor_masks: [H, B] which samples are anchors of head h; None means all. Non-anchors stay in
            every denominator A(i).
        base_temperature: t_base; None means no rescaling. The SupCon reference code uses 0.07, which
            multiplies head h's loss, and so its gradient, by t_h / 0.07 (by 7 for a t = 0.5 head).
        check_finite: raise ValueError on NaN or Inf features. It reads a value back from the device, a
            host sync, so the training step turns it off and checks the loss every ten steps instead.
    Returns a scalar, computed in float32 (float64 stays float64), all heads in the same batched products.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be [H, B, V, D], got shape {tuple(features.shape)}")
    heads, batch, views, _ = features.shape
    if pos_masks.shape != (heads, batch, batch):
        raise ValueError(f"pos_masks must be [H, B, B] = [{heads}, {batch}, {batch}], got {tuple(pos_masks.shape)}")
    if anchor_masks is not None and anchor_masks.shape != (heads, batch):
        raise ValueError(f"anchor_masks must be [H, B] = [{heads}, {batch}], got {tuple(anchor_masks.shape)}")
    if check_finite and not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf")
    if features.dtype != torch.float64:
        features = features.float()
    temperatures = torch.as_tensor(temperatures, dtype=features.dtype, device=features.device)
    weights = torch.ones_like(temperatures) if weights is None else \
        torch.as_tensor(weights, dtype=features.dtype, device=features.device)
    if temperatures.shape != (heads,) or weights.shape != (heads,):
        raise ValueError(f"temperatures and weights must be [H] = [{heads}], got {tuple(temperatures.shape)} "
                         f"and {tuple(weights.shape)}")

    contrast = features.transpose(1, 2).reshape(heads, views * batch, -1)  # [H, N, D], view-major
    logits = torch.bmm(contrast, contrast.transpose(1, 2)) / temperatures[:, None, None]  # [H, N, N]
    # A(i) leaves out i itself; excluding it before the softmax keeps every logit finite for any input scale.
    logits.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    log_prob = torch.log_softmax(logits, dim=2)
    positives = (pos_masks != 0).repeat(1, views, views)  # P_h(i), [H, N, N]
    positives.diagonal(dim1=1, dim2=2).fill_(False)
    positive_count = positives.sum(2)
    per_anchor = -torch.where(positives, log_prob, 0.0).sum(2) / positive_count.clamp(min=1)  # l_i^h, [H, N]
    counted = positive_count > 0
    if anchor_masks is not None:
        counted = counted & (anchor_masks != 0).repeat(1, views)
    counted = counted.to(per_anchor.dtype)
    per_head = (per_anchor * counted).sum(1) / counted.sum(1).clamp(min=1)  # L_h
    scale = 1.0 if base_temperature is None else temperatures / base_temperature
    return (weights * scale * per_head).sum()


# --------------------------------------------------------------------------------------------------
# The method: model, positives and one training step's loss
# --------------------------------------------------------------------------------------------------


def head_names(info, args):
    """One head per level (coarse -> fine) or per label / label group, plus the global head."""
    if info.multilabel:
        groups = info.extra.get("label_groups")
        names = [group_name for group_name, _ in groups] if groups else list(info.label_names[0])
        return names + ["global"]
    return list(info.level_names) + (["global"] if args.heads == "levels+global" else [])


def head_temperatures(info, args):
    """--temperatures, or 0.1 on the finest level (and global head), 0.5 on coarser levels."""
    names = head_names(info, args)
    if args.temperatures is not None:
        return list(args.temperatures)
    if info.multilabel:
        return [0.1] * len(names)
    return [0.5] * (len(info.level_names) - 1) + [0.1] * (len(names) - len(info.level_names) + 1)


class MLCLModel(nn.Module):
    """Shared encoder f, one projection head per level or label, and the optional CE classifier."""

    def __init__(self, arch, info, num_heads, classifier):
        super().__init__()
        self.encoder, feature_dim = build_encoder(arch, info)
        self.heads = nn.ModuleList(projection_head(feature_dim) for _ in range(num_heads))
        self.classifier = nn.Linear(feature_dim, info.num_classes[-1]) if classifier else None

    def forward(self, x):
        """-> (z [H, N, 128] normalised per head, classifier logits [N, C] or None)."""
        h = self.encoder(x)
        z = torch.stack([F.normalize(head(h), dim=-1) for head in self.heads])
        return z, (self.classifier(h) if self.classifier is not None else None)


def head_masks(targets, info, args):
    """(positives [H, B, B], anchors [H, B] or None) of every head for a batch of targets."""
    if info.multilabel:
        groups = info.extra.get("label_groups")
        return multilabel_masks(targets, [labels for _, labels in groups] if groups else None)
    positives = hierarchical_masks(targets)
    if args.heads == "levels+global":  # the global head of hierarchical data: same finest label
        positives = torch.cat([positives, positives[-1:]])
    return positives, None


def method_forward(model, views, targets):
    """views [V, B, ...] -> (z [B, H, V, D], classifier logits [B, V, C] or None), sample-major so that
    chunks of samples concatenate."""
    num_views, batch = views.shape[:2]
    z, logits = model(views.flatten(0, 1))
    z = z.view(len(z), num_views, batch, -1).permute(2, 0, 1, 3)
    return z, (None if logits is None else logits.view(num_views, batch, -1).transpose(0, 1))


def method_loss(outputs, targets, args, info):
    """lambda * MLCL on the global batch (+ w_ce * CE on this rank's views)."""
    z, logits = outputs
    z, global_targets = gather_across_ranks(z).transpose(0, 1), gather_across_ranks(targets)
    positives, anchors = head_masks(global_targets, info, args)
    loss = args.mlcl_weight * mlcl_loss(z, positives, head_temperatures(info, args), args.weights, anchors,
                                        args.base_temperature, check_finite=False)
    if logits is not None:
        logits, view_targets = logits.flatten(0, 1).float(), targets.repeat_interleave(logits.shape[1], 0)
        if info.multilabel:
            classification = F.binary_cross_entropy_with_logits(logits, view_targets.float())
        else:
            classification = F.cross_entropy(logits, view_targets[:, -1])
        loss = loss + args.ce_weight * classification
    return loss


def build_model(args, info):
    if args.ce_weight is None:  # the CE term is on by default for text only (--ce-weight 0 turns it off)
        args.ce_weight = 1.0 if info.modality == "text" else 0.0
    names = head_names(info, args)
    for flag, values in (("--temperatures", args.temperatures), ("--weights", args.weights)):
        if values is not None and len(values) != len(names):
            raise SystemExit(f"{flag} needs {len(names)} values, one per head ({', '.join(names)}); got {len(values)}")
    return MLCLModel(args.arch, info, len(names), classifier=args.ce_weight > 0)


def add_method_arguments(p):
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="one temperature per head (coarse -> fine, then global); default 0.5 coarse, 0.1 fine")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one loss weight per head; default 1")
    p.add_argument("--heads", choices=("levels", "levels+global"), default="levels",
                   help="hierarchical data: one head per level, optionally plus a global head (same finest label)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight w_ce of the jointly trained linear classifier's CE (BCE for multi-label) in "
                        "L = w_ce * CE + lambda * MLCL; default 1 on text datasets (the paper's text recipe), else 0")
    p.add_argument("--lambda", dest="mlcl_weight", type=float, default=1.0, help="weight of the MLCL loss")
    p.add_argument("--base-temperature", type=float, default=None,
                   help="scale head h's loss by t_h/base (0.07 reproduces the SupCon reference code; a t = 0.5 "
                        "head then weighs 7x); default: no scaling")


def check_method_arguments(p, args):
    if args.temperatures is not None and min(args.temperatures) <= 0:
        p.error(f"--temperatures must be positive, got {args.temperatures}")
    if args.weights is not None and min(args.weights) < 0:
        p.error(f"--weights must not be negative, got {args.weights}")
    if (args.ce_weight is not None and args.ce_weight < 0) or args.mlcl_weight < 0:
        p.error("--ce-weight and --lambda must not be negative")
    if args.base_temperature is not None and args.base_temperature <= 0:
        p.error(f"--base-temperature must be positive, got {args.base_temperature}")


# --------------------------------------------------------------------------------------------------
# Encoders, projection head and the global-batch gather (identical in every method file)
# --------------------------------------------------------------------------------------------------


def small_cnn(in_channels, width=16):
    """A four-stage VGG-style CNN that trains in minutes on a CPU; output width*8 features."""

    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = stage(in_channels, width) + [nn.MaxPool2d(2)] + stage(width, 2 * width) + [nn.MaxPool2d(2)]
    layers += stage(2 * width, 4 * width) + [nn.MaxPool2d(2)] + stage(4 * width, 8 * width)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 8 * width


def cifar_resnet(name, in_channels):
    """torchvision ResNet with the CIFAR stem: 3x3 stride-1 first convolution, no max-pool, no fc."""
    net = getattr(torchvision.models, name)(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


class PointNet(nn.Module):
    """PointNet (Qi et al., CVPR 2017) without its input and feature transforms: a shared per-point MLP
    3 -> 64 -> 64 -> 128 -> D (1x1 convolutions with BatchNorm and ReLU), then a max-pool over the points.
    Input [B, P, 3], output [B, D]; the max makes it invariant to the order of the points."""

    def __init__(self, feature_dim=256):
        super().__init__()
        layers, width = [], 3
        for out in (64, 64, 128, feature_dim):
            layers += [nn.Conv1d(width, out, 1, bias=False), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            width = out
        self.mlp = nn.Sequential(*layers)

    def forward(self, points):
        return self.mlp(points.transpose(1, 2)).amax(dim=2)


class FastText(nn.Module):
    """fastText-style text encoder (Joulin et al., EACL 2017): the mean of learned embeddings of a document's
    hashed uni- and bigram ids [B, T] (data.ngram_ids; 0 = padding, left out of the mean), then a LayerNorm.
    Embeddings start small, as in fastText (uniform in +-1/D). Output [B, D]."""

    def __init__(self, buckets, feature_dim=128):
        super().__init__()
        self.embedding = nn.EmbeddingBag(buckets + 1, feature_dim, mode="mean", padding_idx=0)
        nn.init.uniform_(self.embedding.weight, -1 / feature_dim, 1 / feature_dim)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.norm = nn.LayerNorm(feature_dim)

    def forward(self, ids):
        # One flat bag of the non-padding ids per document: most of a padded row is 0, and leaving the
        # zeros out makes the backward pass (which sorts the ids) several times cheaper.
        present = ids > 0
        counts = present.sum(1)
        return self.norm(self.embedding(ids[present], torch.cumsum(counts, 0) - counts))


def text_encoder(arch, info, feature_dim=128):
    """fastText over hashed n-grams ("fasttext"), or one linear layer + LayerNorm on TF-IDF ("tfidf-linear")."""
    wanted = {"fasttext": "words", "tfidf-linear": "tfidf"}[arch]
    if info.modality != "text" or info.extra.get("input") != wanted:
        raise ValueError(f"--arch {arch} needs a text dataset with {wanted} input; {info.name} has "
                         f"{info.modality} data ({info.extra.get('input', 'no text input')})")
    if arch == "fasttext":
        return FastText(info.extra["buckets"], feature_dim), feature_dim
    return nn.Sequential(nn.Linear(info.extra["input_dim"], feature_dim), nn.LayerNorm(feature_dim)), feature_dim


ARCHS = ("cnn", "resnet18", "resnet50", "pointnet", "fasttext", "tfidf-linear")


def build_encoder(arch, info):
    """Encoder f for a dataset: returns (module mapping a batch to [B, feature_dim], feature_dim)."""
    if arch == "cnn":
        return small_cnn(info.channels)
    if arch in ("resnet18", "resnet50"):
        return cifar_resnet(arch, info.channels)
    if arch == "pointnet":
        return PointNet(feature_dim=256), 256
    if arch in ("fasttext", "tfidf-linear"):
        return text_encoder(arch, info)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def projection_head(feature_dim, out_dim=128):
    return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, out_dim))


class GatherAcrossRanks(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient for the local rows.

    Every rank computes the same loss on the global batch, so the local rows receive world_size times
    their single-process gradient; DDP's gradient averaging divides that back out.
    """

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_across_ranks(tensor):
    """The global batch: every rank's tensor concatenated along dim 0 (identity outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return GatherAcrossRanks.apply(tensor)


# --------------------------------------------------------------------------------------------------
# Command line, presets and the training loop (identical in every method file)
# --------------------------------------------------------------------------------------------------

PRESETS = {
    "hdigits": dict(arch="cnn", batch_size=128, lr=0.2, epochs=25, warmup_epochs=1),
    "hdigits-multilabel": dict(arch="cnn", batch_size=128, lr=0.2, epochs=25, warmup_epochs=1),
    "hmnist": dict(arch="resnet18", batch_size=256, lr=0.2, epochs=100, warmup_epochs=5),
    # The SupCon reference recipe for CIFAR-100.
    "cifar100": dict(arch="resnet50", batch_size=1024, lr=0.5, epochs=1000, warmup_epochs=10),
    # Point clouds: PointNet. The shapes demo took 3.8 min on 2 CPU cores shared with other jobs.
    "shapes": dict(arch="pointnet", batch_size=64, lr=0.1, epochs=3, warmup_epochs=1),
    "modelnet40": dict(arch="pointnet", batch_size=256, lr=0.2, epochs=200, warmup_epochs=10),
    # Text: fastText over hashed uni+bigrams; rcv1 (TF-IDF input) through one linear layer. Only the
    # skdocs presets were measured (lr 0.1 beat 0.03 and 0.5; 2 diverged); the others are untuned.
    "skdocs": dict(arch="fasttext", batch_size=128, lr=0.1, epochs=20, warmup_epochs=1),
    "skdocs-multilabel": dict(arch="fasttext", batch_size=128, lr=0.1, epochs=20, warmup_epochs=1),
    "20newsgroups": dict(arch="fasttext", batch_size=256, lr=0.1, epochs=30, warmup_epochs=2),
    "wos": dict(arch="fasttext", batch_size=512, lr=0.1, epochs=30, warmup_epochs=2),
    "rcv1": dict(arch="tfidf-linear", batch_size=512, lr=0.1, epochs=30, warmup_epochs=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="hdigits", choices=data.DATASETS, help="dataset (data.py)")
    p.add_argument("--data-dir", default="./data", help="where datasets are read from / downloaded to")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="fetch a missing dataset that has a checksummed source (cifar100, hmnist, 20newsgroups, "
                        "rcv1) into --data-dir; --no-download forbids it")
    p.add_argument("--wos-release", choices=data.WOS_RELEASES, default="46985", help="the release --dataset wos reads")
    p.add_argument("--arch", choices=ARCHS, help="encoder; default from the dataset preset")
    p.add_argument("--epochs", type=int, help="training epochs; default from the preset")
    p.add_argument("--batch-size", type=int, help="global batch size (samples, each with 2 views)")
    p.add_argument("--lr", type=float, help="peak SGD learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="SGD weight decay")
    p.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs before the cosine decay")
    p.add_argument("--seed", type=int, default=0, help="seeds python, numpy and torch")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--fraction", type=float, default=1.0, help="class-stratified fraction of the training set")
    p.add_argument("--image-size", type=int, default=None, help="canvas size of composite datasets (hmnist)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (lazily composed data, --aug torchvision)")
    p.add_argument("--aug", choices=("gpu", "torchvision"), default="gpu",
                   help="gpu: both views made batched on the training device; torchvision: the reference pipeline, "
                        "PIL transforms per image in DataLoader workers (images only, for speed comparisons)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype (the losses stay fp32): auto is bf16 on GPUs that have it natively, fp16 "
                        "with a loss scaler on older ones (T4, V100), fp32 on a CPU")
    p.add_argument("--chunks", default="auto",
                   help="compute each step's batch in this many chunks of samples (gradient caching): the gradient of "
                        "that many DDP ranks, in a chunk's memory; auto: 1 on a CPU, the fewest that fit on a GPU")
    p.add_argument("--out", default=None, help="run folder; default runs/<dataset>-<method>-<seed>-<time>")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs (and at the end)")
    p.add_argument("--no-eval", action="store_true", help="skip the linear evaluation at the end")
    p.add_argument("--eval-every", type=int, default=0,
                   help="every N optimizer steps, a kNN probe (k = 20) of a held-out part of the training set "
                        "(--probe-share, left out of training) into metrics.jsonl; 0: off")
    p.add_argument("--probe-share", type=float, default=0.1,
                   help="--eval-every: class-stratified share of the training set held out for the probe")
    add_method_arguments(p)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, save_every=args.save_every)
    for name, value in positive.items():
        if value <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if min(args.warmup_epochs, args.weight_decay, args.workers) < 0:
        p.error("--warmup-epochs, --weight-decay and --workers must not be negative")
    if not 0.0 < args.fraction <= 1.0:
        p.error(f"--fraction must lie in (0, 1], got {args.fraction}")
    if args.eval_every < 0 or not 0.0 < args.probe_share < 1.0:
        p.error("--eval-every must not be negative and --probe-share must lie in (0, 1)")
    if args.chunks != "auto" and not (args.chunks.isdigit() and int(args.chunks) > 0):
        p.error(f"--chunks must be a positive integer or auto, got {args.chunks!r}")
    check_method_arguments(p, args)
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to the peak, then cosine decay to peak/1000."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    floor = peak * 1e-3
    return floor + (peak - floor) * 0.5 * (1 + np.cos(np.pi * progress))


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, args):
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise SystemExit(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(state, dict) or state.get("method") != METHOD:
        found = state.get("method") if isinstance(state, dict) else type(state).__name__
        raise SystemExit(f"{path} is not a {METHOD} checkpoint (found {found!r})")
    return state


# What a resumed run may change: where it runs, reads and writes, not what it computes.
RESUMABLE = ("data_dir", "download", "device", "workers", "compile", "precision", "chunks", "out", "resume",
             "save_every", "no_eval")


def check_same_run(state, args):
    """Refuse to resume with an option that changes the data, the schedule or the method, naming it."""
    for key, value in state["config"].items():
        if key not in RESUMABLE and getattr(args, key, None) != value:
            raise SystemExit(f"{args.resume} was trained with --{key.replace('_', '-')} {value!r}, this run has "
                             f"{getattr(args, key, None)!r}; --resume continues a run (give another --out to start one)")


def keep_metrics_until(path, epoch, step):
    """Drop the metrics lines of epochs after `epoch` and the probes after global step `step`: a run killed
    after its last checkpoint logged them, and the resumed run takes those steps again."""
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f]
        kept = [record for record in records if (record["step"] <= step if "step" in record else record["epoch"] <= epoch)]
        with open(path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)


def setup_distributed(args):
    """(rank, world_size, device); under torchrun a process group with nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world_size == 1:
        return 0, 1, torch.device(device_name)
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision, device):
    """auto: bf16 on GPUs that have it natively (Ampere and newer), fp16 with a loss scaler before them
    (T4, V100), fp32 on a CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def training_step(model, views, targets, args, info, chunks, autocast, scaler):
    """Forward, loss and backward of one step (gradients scaled by `scaler`); returns the loss.

    chunks > 1 is gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory
    Limited Setup", 2021): every chunk of samples is embedded without a graph, the loss and its gradient
    with respect to the embeddings are taken on the whole batch, then each chunk is embedded again and
    back-propagated with its part of that gradient, so memory is that of one chunk. BatchNorm normalises
    each chunk on its own: the gradient is that of `chunks` DDP ranks with the batch split between them
    (how the SupCon reference trained, on 8 GPUs). Every chunk starts from the step's buffers and only
    chunk 0's BatchNorm statistics are kept, as DDP keeps rank 0's. We chose this over activation
    checkpointing (full-batch BatchNorm) because that cuts memory by a fixed factor, while chunks cut it
    as far as a card needs.
    """
    if chunks == 1:
        with autocast:
            loss = method_loss(method_forward(model, views, targets), targets, args, info)
        scaler.scale(loss).backward()
        return loss
    sizes = [len(part) for part in torch.arange(views.shape[1]).tensor_split(chunks)]
    step_buffers = [buffer.clone() for buffer in model.buffers()]

    def embed(index):
        for buffer, value in zip(model.buffers(), step_buffers):
            buffer.copy_(value)
        with autocast:
            return method_forward(model, views.split(sizes, 1)[index], targets.split(sizes)[index])

    with torch.no_grad():
        parts = [embed(index) for index in range(chunks)]
    cached = [None if part[0] is None else torch.cat(part).requires_grad_() for part in zip(*parts)]
    with autocast:
        loss = method_loss(cached, targets, args, info)
    scaler.scale(loss).backward()
    for index in reversed(range(chunks)):  # chunk 0 last: its buffers stay, and DDP reduces the gradients then
        with model.no_sync() if index > 0 and hasattr(model, "no_sync") else contextlib.nullcontext():
            pairs = [(output, cache.grad.split(sizes)[index]) for output, cache in zip(embed(index), cached)
                     if cache is not None and cache.grad is not None]
            torch.autograd.backward(*zip(*pairs))
    return loss


def fewest_chunks(model, views, targets, autocast, device):
    """--chunks auto on a GPU: (chunks, fits, peak bytes) for the fewest chunks, 1, 2, 4, ..., in which one
    chunk's forward and backward fit, tried on a real batch; buffers and gradients are left as they were."""
    step_buffers = [buffer.clone() for buffer in model.buffers()]
    chunks, batch = 1, views.shape[1]
    while True:
        size = -(-batch // chunks)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with autocast:
                outputs = method_forward(model, views[:, :size], targets[:size])
            sum(output.float().sum() for output in outputs if output is not None).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        outputs = None
        model.zero_grad(set_to_none=True)
        for buffer, value in zip(model.buffers(), step_buffers):
            buffer.copy_(value)
        torch.cuda.empty_cache()
        if fits or size == 1:
            return chunks, fits, torch.cuda.max_memory_allocated(device)
        chunks *= 2


def any_rank(flag, world_size, device):
    """True on every rank when `flag` is true on one: ranks must agree to leave the loop at the same step."""
    if world_size == 1:
        return bool(flag)
    value = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(value)
    return value.item() > 0


def train(args):
    rank, world_size, device = setup_distributed(args)
    seed_everything(args.seed)
    default_out = os.path.join("runs", f"{args.dataset}-{METHOD}-{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else default_out)
    if world_size > 1:  # every rank writes into rank 0's run folder
        shared = [args.out]
        dist.broadcast_object_list(shared)
        args.out = shared[0]
    checkpoint_path = os.path.join(args.out, "checkpoint.pt")
    if rank == 0 and args.resume is None and os.path.exists(checkpoint_path):
        raise SystemExit(f"{checkpoint_path} exists; pass --resume {checkpoint_path} or another --out")
    resumed = load_checkpoint(args.resume, args) if args.resume else None

    options = dict(download=args.download, fraction=args.fraction, seed=args.seed, image_size=args.image_size,
                   release=args.wos_release)
    # Rank 0 downloads a missing dataset first, so that no two ranks write the same files; the others wait
    # in a gloo group of their own whose deadline no download reaches (nccl's watchdog would end them).
    download_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30)) if world_size > 1 else None
    if rank > 0:
        dist.barrier(group=download_wait)
    train_set = data.load_or_exit(args.dataset, args.data_dir, "train", **options)
    if rank == 0 and world_size > 1:
        dist.barrier(group=download_wait)
    if args.eval_every:  # the convergence probe never looks at the test set
        train_set, probe_set = linear_eval.hold_out(train_set, args.probe_share, args.seed)
    info = train_set.info
    if args.aug == "torchvision" and info.modality != "image":
        raise SystemExit(f"--aug torchvision is the reference image pipeline; {args.dataset} holds {info.modality}")
    resident = data.to_device(train_set, device) if args.aug == "gpu" else train_set

    model = build_model(args, info).to(device)
    if resumed:  # after build_model, which settles the method's automatic defaults
        check_same_run(resumed, args)
    if info.modality == "image":  # NHWC convolutions: faster on GPUs and on CPUs alike
        model = model.to(memory_format=torch.channels_last)
    if world_size > 1:
        if args.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    core = model.module if world_size > 1 else model
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    _, rank_batch, steps = data.rank_shape(len(train_set), args.batch_size, world_size)
    total_steps, warmup_steps = args.epochs * steps, args.warmup_epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, total_steps, warmup_steps, args.lr) / args.lr)
    precision = resolve_precision(args.precision, device)
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs its loss scaled
    start_epoch, start_step, start_losses = 0, 0, []
    if resumed:
        core.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, start_step = resumed["epoch"], resumed["step"]
        start_losses = [loss.to(device) for loss in resumed["losses"]]
        random.setstate(resumed["rng"]["python"])
        np.random.set_state(resumed["rng"]["numpy"])
        torch.set_rng_state(resumed["rng"]["torch"])

    if args.chunks != "auto":
        chunks = int(args.chunks)
    elif device.type == "cuda":  # try the step on a real batch in 1, 2, 4, ... chunks; keep the fewest that fit
        views, y = next(iter(data.training_views(resident, info, args.aug, args.batch_size, torch.Generator(),
                                                 torch.Generator(device), device, rank, world_size, args.workers)))
        chunks, fits, peak = fewest_chunks(core, views, y, autocast, device)
        if world_size > 1:
            agreed = torch.tensor([chunks, 1 - fits], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            chunks, fits = int(agreed[0]), not agreed[1]
        if not fits:
            raise SystemExit(f"out of memory: a step of one sample does not fit on {device}; lower --image-size or "
                             f"use a smaller --arch")
        if rank == 0:
            tried = " or ".join(f"{count} chunks" for count in [1 << k for k in range(chunks.bit_length() - 1)])
            print(f"memory: {rank_batch} samples a step " + (f"did not fit in {tried}; chose --chunks {chunks}"
                  if chunks > 1 else "fit in one piece") + f", peak {peak / 2**30:.1f} GiB of "
                  f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
        del views, y
    else:
        chunks = 1
    if chunks > rank_batch:
        raise SystemExit(f"--chunks {chunks} is more than the {rank_batch} samples of a step on each rank")
    if chunks > 1 and args.sync_bn:
        raise SystemExit("--sync-bn with --chunks above 1 cannot be exact (each chunk's statistics would be synced "
                         "across ranks but not across chunks); use one or the other")

    def checkpoint(epoch, step=0, losses=()):
        """After `epoch` epochs and `step` steps of the next one, whose losses so far are kept for its mean."""
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "method": METHOD, "method_file": os.path.basename(__file__), "config": vars(args), "epoch": epoch,
                "step": step, "losses": [loss.cpu() for loss in losses[:step]], "model": core.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}})

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if resumed:
            keep_metrics_until(metrics_path, start_epoch, start_epoch * steps + start_step)
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump({**vars(args), "train_samples": len(train_set)}, f, indent=2)
        print(f"{METHOD} on {args.dataset} ({len(train_set)} train samples, --fraction {args.fraction:g}): "
              f"{args.arch}, {args.epochs} epochs x {steps} steps of {args.batch_size}"
              f"{f' in {chunks} chunks' if chunks > 1 else ''}, {precision}, device {device}, world {world_size} "
              f"-> {args.out}")
    progress = tqdm(total=total_steps, initial=start_epoch * steps + start_step, disable=rank != 0, desc=METHOD,
                    dynamic_ncols=True)
    stop = []  # Ctrl-C and SIGTERM (preemption, time limits) end the run at the next step boundary

    def request_stop(signum, frame):
        stop.append(signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    handlers = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    epoch, skip, losses = start_epoch, start_step, start_losses  # skip > 0 in the epoch a stopped run stopped in
    try:
        for epoch in range(start_epoch, args.epochs):
            model.train()
            # Data order and augmentation depend only on (seed, epoch, rank): a resumed run replays them.
            order = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
            augment = torch.Generator(device).manual_seed(args.seed * 100_003 + epoch * 1_009 + rank + 1)
            started = time.perf_counter()
            epoch_views = data.training_views(resident, info, args.aug, args.batch_size, order, augment, device,
                                              rank, world_size, args.workers)
            for step, (views, y) in enumerate(epoch_views):
                if step < skip:  # taken before the stop; its views are still drawn, so that later ones match
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = training_step(step_model, views, y, args, info, chunks, autocast, scaler)
                scaler.step(optimizer)  # skipped when fp16 gradients overflowed; the scaler then backs off
                scaler.update()
                scheduler.step()
                losses.append(loss.detach())
                progress.update()
                global_step = epoch * steps + step + 1
                if args.eval_every and global_step % args.eval_every == 0 and rank == 0:
                    probe = linear_eval.knn_probe(core.encoder, train_set, probe_set, device)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"epoch": epoch + 1, "step": global_step, "probe_knn_top1": probe}) + "\n")
                if (step + 1) % 10 == 0 or step + 1 == steps:  # one host sync per ten steps
                    check_finite(losses, epoch, steps, checkpoint_path)
                    rate = (step + 1 - skip) * args.batch_size * 2 / (time.perf_counter() - started)
                    progress.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.4f}",
                                         views_per_s=f"{rate:.0f}")
                if any_rank(stop, world_size, device):
                    check_finite(losses, epoch, steps, checkpoint_path)
                    checkpoint(epoch, step + 1, losses)
                    raise SystemExit(f"\n{stop[0] if stop else 'a signal to another rank'}: stopped after step "
                                     f"{step + 1}/{steps} of epoch {epoch + 1}; saved {checkpoint_path} (the same "
                                     f"command with --resume {checkpoint_path} continues from there)")
            epoch_loss = torch.stack(losses).mean().item()
            seconds = time.perf_counter() - started
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"epoch": epoch + 1, "loss": epoch_loss, "lr": scheduler.get_last_lr()[0],
                                        "seconds": seconds,
                                        "views_per_s": (steps - skip) * args.batch_size * 2 / seconds}) + "\n")
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                checkpoint(epoch + 1)
            skip, losses = 0, []
    except torch.OutOfMemoryError:
        raise SystemExit(f"out of memory in epoch {epoch + 1} with --chunks {chunks}; the last checkpoint is kept: "
                         f"the same command with --chunks {2 * chunks} (and --resume {checkpoint_path}, if it "
                         f"exists) uses less") from None
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
    results = linear_eval.evaluate(core.encoder, train_set, test_set, device,
                                   classifier=getattr(core, "classifier", None))
    results = {"method": METHOD, "dataset": args.dataset, "fraction": args.fraction,
               "train_samples": len(train_set), **results}
    linear_eval.report(results, args.out)
    return results


def check_finite(losses, epoch, steps, checkpoint_path):
    """Stop at the first non-finite loss of the epoch so far; the last good checkpoint is kept."""
    values = torch.stack(losses)
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        step = int(bad[0])
        raise SystemExit(f"non-finite loss {values[step].item()} at epoch {epoch + 1}, step {step + 1}/{steps}; "
                         f"stopping (last good checkpoint, if any: {checkpoint_path})")


if __name__ == "__main__":
    train(parse_args())
