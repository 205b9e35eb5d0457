"""MLCL: multi-level supervised contrastive learning, one file.

Paper: Ghanooni, Pajoum, Rawal, Fellenz, Le Duy, Kloft, "Multi-level Supervised Contrastive
Learning", arXiv 2502.02202 (2025). Builds on SupCon (Khosla et al., NeurIPS 2020, Eq. 2).

What this file implements
- One shared encoder f and H projection heads g_h (MLP D_enc -> D_enc -> 128), one per label level
  (hierarchical data) or one per label plus a global head (multi-label data). Each head h has its own
  positive set P_h, temperature t_h and weight a_h:

      L_MLCL = sum_h a_h * L_h,   L_h = SupCon L_out on z^h = normalize(g_h(f(x))) with P_h and t_h

  `mlcl_loss` computes the heads one after another, each vectorised; `hierarchical_masks` and `multilabel_masks`
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

METHOD = "mlcl"


# The loss ---------------------------------------------------------------------------------------------


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
    Returns a scalar, computed in float32 (float64 stays float64); each head is vectorised over its samples.
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

    # One head at a time: all H at once builds [H, 2B, 2B] temporaries, which on a CPU at B = 1024 ran 1.4x
    # slower than H separate passes (bench/loss_speed.py); the arithmetic is the same.
    is_self = torch.eye(views * batch, dtype=torch.bool, device=features.device)
    per_head = []
    for h in range(heads):
        contrast = features[h].transpose(0, 1).reshape(views * batch, -1)  # [N, D], view-major
        # A(i) leaves out i itself; excluding it before the softmax keeps every logit finite for any input scale.
        log_prob = torch.log_softmax((contrast @ contrast.T / temperatures[h]).masked_fill(is_self, float("-inf")), 1)
        positives = (pos_masks[h] != 0).repeat(views, views) & ~is_self  # P_h(i), [N, N]
        positive_count = positives.sum(1)
        per_anchor = -torch.where(positives, log_prob, 0.0).sum(1) / positive_count.clamp(min=1)  # l_i^h, [N]
        counted = positive_count > 0
        if anchor_masks is not None:
            counted = counted & (anchor_masks[h] != 0).repeat(views)
        counted = counted.to(per_anchor.dtype)
        per_head.append((per_anchor * counted).sum() / counted.sum().clamp(min=1))  # L_h
    per_head = torch.stack(per_head)
    scale = 1.0 if base_temperature is None else temperatures / base_temperature
    return (weights * scale * per_head).sum()


# The method: model, positives and one training step's loss --------------------------------------------


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
        loss = loss + ce_weight(args, info) * classification
    return loss


def ce_weight(args, info):
    """--ce-weight, by default 1 on text (the paper's text recipe) and 0 elsewhere."""
    return args.ce_weight if args.ce_weight is not None else 1.0 if info.modality == "text" else 0.0


def build_model(args, info):
    if args.mlcl_weight == 0 and ce_weight(args, info) == 0:
        raise ValueError("--lambda 0 without a CE term (--ce-weight) leaves no loss to train")
    names = head_names(info, args)
    for flag, values in (("--temperatures", args.temperatures), ("--weights", args.weights)):
        if values is not None and len(values) != len(names):
            raise SystemExit(f"{flag} needs {len(names)} values, one per head ({', '.join(names)}); got {len(values)}")
    return MLCLModel(args.arch, info, len(names), classifier=ce_weight(args, info) > 0)


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
    if args.temperatures is not None and not all(t > 0 for t in args.temperatures):  # (all: min() skips a NaN)
        p.error(f"--temperatures must be positive, got {args.temperatures}")
    if args.weights is not None and not all(0 <= w < math.inf for w in args.weights):
        p.error(f"--weights must not be negative, got {args.weights}")
    if (args.ce_weight is not None and not args.ce_weight >= 0) or not args.mlcl_weight >= 0:
        p.error("--ce-weight and --lambda must not be negative")
    if args.base_temperature is not None and not args.base_temperature > 0:
        p.error(f"--base-temperature must be positive, got {args.base_temperature}")


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
