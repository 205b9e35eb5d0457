"""Frozen-encoder evaluation shared by every method file.

For each label level: a linear classifier on the frozen encoder's features (top-1 of the final
iterate on the test set, never a best-epoch pick), a training-free weighted kNN (cosine, k = 20), and
the same linear probe on the raw input as the floor a learned representation has to beat. Multi-label
data gets a one-vs-rest linear layer with micro-F1, macro-F1 and mAP instead.

Protocols
- fast (default): features are extracted once without augmentation; the probe is an L2-regularised
  softmax regression fitted by full-batch L-BFGS. With --val-fraction > 0 the L2 strength is chosen on a
  validation split cut from the training set, then refitted on all of it.
- supcon: the reference's protocol for published numbers: the linear layer is trained for 100 epochs
  on augmented images (SGD, momentum 0.9, lr x0.2 at epochs 60, 75 and 90), with the views of the
  reference's main_linear.py: random crop and flip, no colour jitter or grayscale (composite canvases:
  their small shift and scale).

Run on a checkpoint written by any method file:
    python linear_eval.py --checkpoint runs/hdigits-supcon-0-.../checkpoint.pt
"""

import argparse
import importlib
import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data

WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
DEFAULT_WEIGHT_DECAY = 1e-4


@torch.no_grad()
def extract_features(encoder, dataset, device, batch_size=512):
    """Encoder outputs [N, D] (float32, on the CPU) of un-augmented inputs, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    features = []
    for start in range(0, len(dataset), batch_size):
        x = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        features.append(encoder(data.normalize(x.to(device), dataset.info)).float().cpu())
    encoder.train(was_training)
    return torch.cat(features)


def raw_inputs(dataset, max_side=32):
    """The raw-input floor's features: pixels, flattened (area-pooled to at most max_side per side)."""
    if dataset.info.modality == "points":
        # Point clouds are unordered, so their flattened coordinates mean nothing to a linear layer; the
        # floor is the fraction of the cloud's points in each cell of a fixed 8x8x8 grid over [-1, 1]^3.
        points = torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
        cells = ((points + 1) * 4).floor().long().clamp(0, 7)  # [N, P, 3] cell coordinates in 0..7
        flat = cells[..., 0] * 64 + cells[..., 1] * 8 + cells[..., 2]
        return torch.zeros(len(points), 512).scatter_add_(1, flat, torch.ones(flat.shape)) / points.shape[1]
    if dataset.info.modality == "text":
        return text_bag(dataset)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).float() / 255.0
    if images.shape[-1] > max_side:
        images = F.adaptive_avg_pool2d(images, max_side)
    return images.flatten(1)


RAW_TEXT_BUCKETS = 2 ** 12  # 2^14 gains a little on skdocs' finest level but costs 4x in the probe


def text_bag(dataset, buckets=RAW_TEXT_BUCKETS, chunk=2048):
    """The text floor's features: a TF-IDF input as it is (dense); word ids as a bag of their hashed uni- and
    bigrams (data.ngram_ids) with the counts folded into `buckets` columns (id mod buckets), log1p and
    L2-normalised: [N, buckets] (2^12 columns: 0.16 GB for 10,000 documents)."""
    if dataset.info.extra.get("input") == "tfidf":
        return torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
    bags = []
    for start in range(0, len(dataset), chunk):
        words = torch.stack([dataset[i][0] for i in range(start, min(start + chunk, len(dataset)))]).cpu()
        ids = data.ngram_ids(words, dataset.info.extra["buckets"])
        counts = torch.zeros(len(ids), buckets).scatter_add_(1, (ids - 1) % buckets, (ids > 0).float())
        bags.append(F.normalize(counts.log1p(), dim=1))
    return torch.cat(bags)


def fit_linear(x, y, num_outputs, multilabel, weight_decay, iterations=100):
    """L2-regularised linear classifier by full-batch L-BFGS; returns (weight [K, D], bias [K])."""
    weight = torch.zeros(num_outputs, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_outputs, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = x @ weight.T + bias
        fit = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
        loss = fit + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def top1(logits, y):
    return (logits.argmax(1) == y).float().mean().item()


def average_precision(scores, targets):
    """Per-label average precision [K] (labels without a positive give NaN)."""
    order = scores.argsort(dim=0, descending=True)
    hits = targets.gather(0, order)
    precision_at_hit = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=scores.dtype)[:, None]
    return (precision_at_hit * hits).sum(0) / hits.sum(0)


def multilabel_metrics(scores, targets, threshold=0.0):
    """micro-F1, macro-F1 (positive where score > threshold) and mAP over labels that occur."""
    predicted, targets = (scores > threshold).float(), targets.float()
    true_pos = (predicted * targets).sum(0)
    false_pos = (predicted * (1 - targets)).sum(0)
    false_neg = ((1 - predicted) * targets).sum(0)
    micro = 2 * true_pos.sum() / (2 * true_pos.sum() + false_pos.sum() + false_neg.sum()).clamp(min=1)
    macro = 2 * true_pos / (2 * true_pos + false_pos + false_neg).clamp(min=1)
    ap = average_precision(scores, targets)
    return {"micro_f1": micro.item(), "macro_f1": macro.mean().item(), "map": ap[~ap.isnan()].mean().item()}


def linear_probe(train_x, train_y, test_x, test_y, num_outputs, multilabel, val_fraction=0.0, seed=0):
    """Standardise, choose the L2 strength on a validation split if asked, fit on all of train, test."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight_decay = DEFAULT_WEIGHT_DECAY
    if val_fraction > 0:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        held_out = max(1, int(val_fraction * len(train_x)))
        val, fit = order[:held_out], order[held_out:]

        def validation_score(decay):
            weight, bias = fit_linear(train_x[fit], train_y[fit], num_outputs, multilabel, decay)
            logits = train_x[val] @ weight.T + bias
            return multilabel_metrics(logits, train_y[val])["map"] if multilabel else top1(logits, train_y[val])

        weight_decay = max(WEIGHT_DECAYS, key=validation_score)
    weight, bias = fit_linear(train_x, train_y, num_outputs, multilabel, weight_decay)
    logits = test_x @ weight.T + bias
    return multilabel_metrics(logits, test_y) if multilabel else {"top1": top1(logits, test_y)}


def knn_top1(train_features, train_y, test_features, test_y, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / temperature)."""
    train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    k = min(k, len(train_features))
    correct = 0
    for start in range(0, len(test_features), chunk):
        similarity = test_features[start : start + chunk] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes, dtype=similarity.dtype)
        votes.scatter_add_(1, train_y[top_index], (top_similarity / temperature).exp())
        correct += (votes.argmax(1) == test_y[start : start + chunk]).sum().item()
    return correct / len(test_features)


def supcon_protocol(encoder, train_set, test_set, device, epochs=100, lr=0.1, batch_size=256, seed=0):
    """Linear layers on the frozen encoder, trained on augmented images; final-epoch test accuracy per level."""
    info = train_set.info
    encoder.eval()
    with torch.no_grad():
        feature_dim = encoder(data.normalize(train_set[0][0][None].to(device), info)).shape[1]
    heads = torch.nn.ModuleList(torch.nn.Linear(feature_dim, k) for k in info.num_classes).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [60 * epochs // 100, 75 * epochs // 100,
                                                                90 * epochs // 100], gamma=0.2)
    generator = torch.Generator(device).manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="linear (supcon protocol)"):
        order = torch.Generator().manual_seed(seed + epoch)
        for x, y in data.batches(train_set, batch_size, order, device):
            with torch.no_grad():
                features = encoder(data.augment(x, info, generator, colour=False)).float()
            loss = sum(level_loss(head(features), y, level, info) for level, head in enumerate(heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    test_x = extract_features(encoder, test_set, device).to(device)
    test_y = test_set.targets.to(device)
    with torch.no_grad():
        if info.multilabel:
            return [multilabel_metrics(heads[0](test_x).cpu(), test_y.cpu())]
        return [{"top1": top1(head(test_x), test_y[:, level])} for level, head in enumerate(heads)]


def level_loss(logits, y, level, info):
    if info.multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y[:, level])


def evaluate(encoder, train_set, test_set, device, protocol="fast", val_fraction=0.0, seed=0, linear_epochs=100,
             classifier=None):
    """Evaluate a frozen encoder on every label level; returns the `levels` record of results.json.

    `classifier`: a linear layer trained jointly with the encoder (mlcl.py's CE term), or None; its own
    test figures on the same features go into the record as "classifier".
    """
    info = train_set.info
    if info.modality == "image":  # as in training, so that a checkpoint re-evaluates to the same numbers
        encoder = encoder.to(memory_format=torch.channels_last)
    train_features = extract_features(encoder, train_set, device)
    test_features = extract_features(encoder, test_set, device)
    train_raw, test_raw = raw_inputs(train_set), raw_inputs(test_set)
    train_targets, test_targets = train_set.targets.cpu(), test_set.targets.cpu()
    supcon_scores = supcon_protocol(encoder, train_set, test_set, device, epochs=linear_epochs, seed=seed) \
        if protocol == "supcon" else None

    levels = {}
    for level, name in enumerate(info.level_names):
        if info.multilabel:
            train_y, test_y = train_targets.float(), test_targets.float()
        else:
            train_y, test_y = train_targets[:, level], test_targets[:, level]
        num_outputs = info.num_classes[level]
        learned = supcon_scores[level] if supcon_scores else linear_probe(
            train_features, train_y, test_features, test_y, num_outputs, info.multilabel, val_fraction, seed)
        raw = linear_probe(train_raw, train_y, test_raw, test_y, num_outputs, info.multilabel, val_fraction, seed)
        if info.multilabel:
            record = {**learned, **{f"raw_{key}": value for key, value in raw.items()}}
        else:
            record = {"linear_top1": learned["top1"],
                      "knn_top1": knn_top1(train_features, train_y, test_features, test_y, num_outputs),
                      "raw_linear_top1": raw["top1"]}
        levels[name] = record
    results = {"protocol": protocol, "levels": levels}
    if classifier is not None:
        results["classifier"] = classifier_scores(classifier, test_features, test_targets, info, device)
    return results


@torch.no_grad()
def classifier_scores(classifier, test_features, test_targets, info, device):
    """Test figures of a classifier on the encoder's features: top-1 on the finest level (the level it was
    trained on), or micro-F1, macro-F1 and mAP for multi-label data."""
    logits = classifier(test_features.to(device)).float().cpu()
    if info.multilabel:
        return {"level": info.level_names[0], **multilabel_metrics(logits, test_targets.float())}
    return {"level": info.level_names[-1], "top1": top1(logits, test_targets[:, -1])}


def report(results, out=None):
    """Print the per-level table and write results.json into the run folder."""
    print(f"\n{results.get('method', '?')} on {results.get('dataset', '?')} ({results['protocol']} protocol)")
    for name, record in results["levels"].items():
        print(f"  {name:>12}: " + "  ".join(f"{key} {value:.4f}" for key, value in record.items()))
    if "classifier" in results:
        record = results["classifier"]
        print(f"  classifier trained with the encoder, on {record['level']}: "
              + "  ".join(f"{key} {value:.4f}" for key, value in record.items() if key != "level"))
    if out:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Linear evaluation of a checkpoint's frozen encoder")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by a method file")
    p.add_argument("--protocol", choices=("fast", "supcon"), default="fast", help="see the module docstring")
    p.add_argument("--val-fraction", type=float, default=0.0, help="validation split for the L2 strength (0: fixed)")
    p.add_argument("--linear-epochs", type=int, default=100, help="epochs of the supcon protocol's linear training")
    p.add_argument("--data-dir", default=None, help="override the dataset folder stored in the checkpoint")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    if args.linear_epochs < 1:
        p.error(f"--linear-epochs must be positive, got {args.linear_epochs}")
    if not os.path.isfile(args.checkpoint):
        p.error(f"no checkpoint at {args.checkpoint}")
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        config, method_file = SimpleNamespace(**state["config"]), state["method_file"]
    except Exception as error:
        raise SystemExit(f"cannot read checkpoint {args.checkpoint}: {error}") from error
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = importlib.import_module(os.path.splitext(method_file)[0])
    options = dict(download=False, seed=config.seed, image_size=config.image_size,
                   release=getattr(config, "wos_release", None))  # checkpoints older than --wos-release lack it
    data_dir = args.data_dir or config.data_dir
    train_set = data.load_or_exit(config.dataset, data_dir, "train", fraction=config.fraction, **options)
    test_set = data.load_or_exit(config.dataset, data_dir, "test", **options)
    model = method.build_model(config, train_set.info)
    model.load_state_dict(state["model"])
    results = evaluate(model.encoder.to(device), train_set, test_set, device, args.protocol, args.val_fraction,
                       config.seed, args.linear_epochs, classifier=getattr(model.to(device), "classifier", None))
    results = {"method": state["method"], "dataset": config.dataset, "fraction": config.fraction,
               "train_samples": len(train_set), **results}
    report(results, os.path.dirname(os.path.abspath(args.checkpoint)))
    return results


if __name__ == "__main__":
    main()
