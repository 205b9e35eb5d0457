"""How often does HCE's maximum change a level's loss?

HCE makes a coarser level's loss at least the largest finer-level loss. The reference code (and
`hmlc_loss`) takes that maximum between the levels' *mean* losses over the batch; the paper's Eq. 6/7
write it per pair. This script takes trained HMCE checkpoints (`hmlc_gmm.py --mask none`), feeds each
the training views of one epoch (same augmentation as in training, model in eval mode) and counts,
for the trained model and for an untrained one built from the same seed:
- batches in which the level-mean maximum binds (a coarser level's mean loss below a finer one's),
  and by how much it lifts the total;
- anchors for which a per-anchor maximum would bind (the paper's reading).

    python bench/hce_binding.py runs/claims/hdigits-HMCE-f1-s*/checkpoint.pt   # the runs of bench/claims.py
"""

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import hmlc_gmm  # noqa: E402
import mlcl  # noqa: E402
from compare import mean_std  # noqa: E402


def anchor_level_losses(z, labels, temperature):
    """Per-anchor SupCon losses of every level: z [B, V, D], labels [B, L] -> [L, N] (NaN: no positive)."""
    batch, views, _ = z.shape
    contrast = z.transpose(0, 1).reshape(views * batch, -1).float()
    is_self = torch.eye(views * batch, dtype=torch.bool)
    log_prob = torch.log_softmax((contrast @ contrast.T / temperature).masked_fill(is_self, float("-inf")), dim=1)
    losses = []
    for same_path in mlcl.hierarchical_masks(labels):  # [B, B] per level, coarse -> fine
        positives = same_path.repeat(views, views) & ~is_self
        count = positives.sum(1)
        loss = -torch.where(positives, log_prob, 0.0).sum(1) / count.clamp(min=1)
        losses.append(torch.where(count > 0, loss, float("nan")))
    return torch.stack(losses)  # coarse -> fine


@torch.no_grad()
def binding(model, train_set, args, seed):
    """Counts over one epoch of training views of the level-mean and the per-anchor maximum binding."""
    model.eval()
    info = train_set.info
    order = torch.Generator().manual_seed(seed)
    augment = torch.Generator().manual_seed(seed + 1)
    batches = mean_binds = lift = anchors = anchor_binds = 0
    for x, labels in data.batches(train_set, args.batch_size, order, torch.device("cpu")):
        views = data.two_views(x, info, augment)
        z = model(views.flatten(0, 1))[0][0].view(2, len(labels), -1).transpose(0, 1)
        per_anchor = anchor_level_losses(z, labels, args.temperature).flip(0)  # fine -> coarse
        level_means = per_anchor.nanmean(1)
        constrained = level_means.cummax(0).values
        batches += 1
        mean_binds += int((constrained > level_means).any())
        lift += float((constrained.mean() - level_means.mean()) / level_means.mean())
        valid = ~per_anchor.isnan().any(0)
        anchors += int(valid.sum())
        anchor_binds += int((per_anchor[:, valid].cummax(0).values > per_anchor[:, valid]).any(0).sum())
    return {"batches_bound": mean_binds / batches, "mean_lift": lift / batches,
            "anchors_bound": anchor_binds / max(anchors, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="checkpoint.pt files of hmlc_gmm.py --mask none runs")
    args = p.parse_args()
    rows = {"untrained": [], "trained": []}
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        run_args = argparse.Namespace(**state["config"])
        if state["method"] != "hmlc_gmm" or run_args.mask != "none":
            raise SystemExit(f"{path} is not an HMCE run (hmlc_gmm.py --mask none)")
        train_set = data.load(run_args.dataset, run_args.data_dir, "train", seed=run_args.seed)
        torch.manual_seed(run_args.seed)
        rows["untrained"].append(binding(hmlc_gmm.build_model(run_args, train_set.info), train_set, run_args,
                                         run_args.seed))
        trained = hmlc_gmm.build_model(run_args, train_set.info)
        trained.load_state_dict(state["model"])
        rows["trained"].append(binding(trained, train_set, run_args, run_args.seed))
        print(f"{path}: untrained {rows['untrained'][-1]}, trained {rows['trained'][-1]}", flush=True)
    print(f"\nmachine: {platform.machine()} CPU, torch {torch.__version__}; {run_args.dataset}, HMCE "
          f"(hmlc_gmm.py --mask none), {run_args.epochs} epochs, {len(args.checkpoints)} checkpoints\n")
    print("| model | batches where the level-mean max binds | mean relative lift of the total loss | "
          "anchors where a per-anchor max would bind |")
    print("|---|---|---|---|")
    for name, records in rows.items():
        cells = [mean_std([r[key] for r in records]) for key in ("batches_bound", "mean_lift", "anchors_bound")]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
