"""Frozen-encoder evaluation shared by every method file: the papers' numbers (their t-SNE maps: bench/tsne.py).

For each label level: a linear classifier on the frozen encoder's features (top-1 of the final iterate on the
test set, never a best-epoch pick), a training-free weighted kNN (cosine, k = 20), and the same linear probe on
the raw input as the floor a learned representation has to beat. Multi-label data gets a one-vs-rest linear
layer with micro-F1, macro-F1 and mAP instead.

Structure (results.json "embedding" and "probe_hierarchy", the second block of the printed report), on the
L2-normalised test features:
- total variance (sum of the per-dimension variances) and participation ratio (sum lambda)^2 / sum lambda^2 of
  the covariance eigenvalues, an effective number of dimensions: our reading of the "more variance in the
  embeddings" that Ott et al. report for G-HMLC without defining it;
- per level, the silhouette score (cosine, at most 2000 test samples drawn with a fixed seed);
- per level below the coarsest, the coarse neighbour share: the share of classes whose nearest other class
  centroid (cosine) has the same parent, beside its chance value (siblings / other classes, averaged);
- for the linear probe's predictions: consistency per adjacent pair of levels (the finer prediction's parent,
  from the training targets, is the coarser prediction) and mistake severity (over the wrong finest-level
  predictions, the levels one climbs until the predicted and true paths agree: 1 = a sibling, L = different
  at the root). Multi-label data gets the variance figures only.

Protocols
- fast (default): features are extracted once without augmentation; the probe is an L2-regularised softmax
  regression fitted by full-batch L-BFGS. With --val-fraction > 0 the L2 strength is chosen on a validation
  split cut from the training set, then refitted on all of it.
- supcon: the reference's protocol for published numbers: 100 epochs of a linear layer on augmented images
  (SGD, momentum 0.9, lr x0.2 at epochs 60, 75 and 90) with the views of the reference's main_linear.py:
  random crop and flip, no colour jitter or grayscale (composite canvases: their small shift and scale).

Convergence (the method files' --eval-every): `knn_probe` of a class-stratified part kept out by `hold_out`.

Run on checkpoints written by the method files (each gets results-<checkpoint>-<protocol>.json beside it):
    python linear_eval.py --checkpoint runs/hdigits-supcon-0-.../checkpoint.pt [runs/.../checkpoint.pt ...]
"""

import argparse
import importlib
import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score
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


def raw_inputs(dataset, max_side=32, chunk=2048):
    """The raw-input floor's features: pixels, flattened (area-pooled to at most max_side per side).

    Built `chunk` samples at a time, so that memory holds the result, not the split at full size (60,000
    hmnist canvases at 192 px would take 2.2 GB as bytes and 8.8 GB as floats)."""
    if dataset.info.modality == "points":
        # Point clouds are unordered, so their flattened coordinates mean nothing to a linear layer; the
        # floor is the fraction of the cloud's points in each cell of a fixed 8x8x8 grid over [-1, 1]^3.
        points = torch.stack([dataset[i][0] for i in range(len(dataset))]).float()
        cells = ((points + 1) * 4).floor().long().clamp(0, 7)  # [N, P, 3] cell coordinates in 0..7
        flat = cells[..., 0] * 64 + cells[..., 1] * 8 + cells[..., 2]
        return torch.zeros(len(points), 512).scatter_add_(1, flat, torch.ones(flat.shape)) / points.shape[1]
    if dataset.info.modality == "text":
        return text_bag(dataset)
    rows = []
    for start in range(0, len(dataset), chunk):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + chunk, len(dataset)))]).float() / 255.0
        if images.shape[-1] > max_side:
            images = F.adaptive_avg_pool2d(images, max_side)
        rows.append(images.flatten(1))
    return torch.cat(rows)


RAW_TEXT_BUCKETS = 2 ** 12  # 2^14 gains a little on skdocs' finest level but costs 4x in the probe


def text_bag(dataset, buckets=RAW_TEXT_BUCKETS, chunk=2048):
    """The text floor's features, [N, buckets] (2^12 columns: 0.16 GB for 10,000 documents), L2-normalised:
    word ids as a bag of their hashed uni- and bigrams (data.ngram_ids), log1p of the counts; TF-IDF rows
    as they are, or with more columns than `buckets` folded into them (column mod buckets) straight from
    the sparse matrix, never densified whole (rcv1's 23,149 x 47,236 would take 4.4 GB)."""
    if dataset.info.extra.get("input") == "tfidf":
        matrix = dataset.matrix.tocoo()
        if matrix.shape[1] <= buckets:
            return torch.from_numpy(matrix.toarray()).float()
        folded = torch.zeros(matrix.shape[0], buckets)
        index = (torch.from_numpy(matrix.row).long(), torch.from_numpy(matrix.col).long() % buckets)
        return F.normalize(folded.index_put_(index, torch.from_numpy(matrix.data).float(), accumulate=True), dim=1)
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
    """Standardise, choose the L2 strength on a validation split if asked, fit on all of train, test.

    Returns (scores, predictions): {"top1"} and class ids [N], or for multi-label data {"micro_f1",
    "macro_f1", "map"} and 0/1 labels [N, K] (positive where the logit is above 0)."""
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
    return probe_scores(test_x @ weight.T + bias, test_y, multilabel)


def probe_scores(logits, y, multilabel):
    """(scores, predictions) of a linear probe's logits, as linear_probe returns them."""
    if multilabel:
        return multilabel_metrics(logits, y), (logits > 0).long()
    return {"top1": top1(logits, y)}, logits.argmax(1)


def knn_shares(bank_features, bank_targets, query_features, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN on cosine similarity: each of a query's k most similar bank samples votes
    exp(sim / temperature) for each of its labels (`bank_targets`: multi-hot floats [N, K]); returns the
    weighted share of the neighbours that carry each label, [Q, K] in [0, 1]."""
    bank_features, query_features = F.normalize(bank_features, dim=1), F.normalize(query_features, dim=1)
    k = min(k, len(bank_features))
    shares = []
    for start in range(0, len(query_features), chunk):
        similarity = query_features[start : start + chunk] @ bank_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.einsum("qk,qkc->qc", weights, bank_targets[top_index].to(weights.dtype))
        shares.append(votes / weights.sum(1, keepdim=True))
    return torch.cat(shares)


def knn_top1(train_features, train_y, test_features, test_y, num_classes, k=20, temperature=0.07, chunk=1024):
    """Top-1 of the weighted kNN (knn_shares) with class ids: the class with the most weight is predicted."""
    shares = knn_shares(train_features, F.one_hot(train_y, num_classes), test_features, k, temperature, chunk)
    return (shares.argmax(1) == test_y).sum().item() / len(test_y)


def supcon_protocol(encoder, train_set, test_set, device, epochs=100, lr=0.1, batch_size=256, seed=0):
    """Linear layers on the frozen encoder, trained on augmented images; per level the final epoch's
    (scores, predictions) on the test set, as linear_probe returns them."""
    info = train_set.info
    encoder.eval()
    with torch.no_grad():
        feature_dim = encoder(data.normalize(train_set[0][0][None].to(device), info)).shape[1]
    heads = torch.nn.ModuleList(torch.nn.Linear(feature_dim, k) for k in info.num_classes).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=lr, momentum=0.9)
    milestones = [percent * epochs // 100 for percent in (60, 75, 90)]  # the reference: 60, 75, 90 of 100 epochs
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    generator = torch.Generator(device).manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="linear (supcon protocol)"):
        order = torch.Generator().manual_seed(seed + epoch)
        for x, y in data.batches(train_set, batch_size, order, device):
            with torch.no_grad():
                features = encoder(data.augment(x, info, generator, colour=False)).float()
            logits = [head(features) for head in heads]  # multi-label data has one head, over all labels
            loss = F.binary_cross_entropy_with_logits(logits[0], y.float()) if info.multilabel else \
                sum(F.cross_entropy(level_logits, y[:, level]) for level, level_logits in enumerate(logits))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    test_x, test_y = extract_features(encoder, test_set, device).to(device), test_set.targets.cpu()
    with torch.no_grad():
        return [probe_scores(head(test_x).cpu(), test_y if info.multilabel else test_y[:, level], info.multilabel)
                for level, head in enumerate(heads)]


# Structure of the embedding and of the probe's predictions: the numbers behind the papers' pictures.

def class_paths(targets, level, num_classes):
    """Each class of `level` with its ancestors, coarse -> fine, as hierarchical targets [N, L] show them:
    [num_classes, level + 1]; -1 in the rows of classes the targets lack."""
    paths = torch.full((num_classes, level + 1), -1, dtype=torch.long)
    paths[targets[:, level]] = targets[:, : level + 1]
    return paths


def silhouette(features, labels, max_samples=2000, seed=0):
    """Mean silhouette score, cosine distance, of `features` [N, D] grouped by `labels` [N], on at most
    `max_samples` samples drawn with `seed` (the same draw for every labelling of N samples): in [-1, 1],
    high where each sample is closer to its own class than to the next class."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} features but {len(labels)} labels")
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_samples]
    features, labels = features[keep], labels[keep]
    classes, samples = len(labels.unique()), len(labels)
    if not 2 <= classes < samples:
        raise ValueError(f"a silhouette needs 2 to {samples - 1} classes among {samples} samples, got {classes}")
    return float(silhouette_score(features.double().numpy(), labels.numpy(), metric="cosine"))


def class_parents(labels, parent_labels):
    """(each sample's class index [N] in 0..C-1, each class's parent [C]) of the samples' labels [N] and
    their parents' labels [N]."""
    if labels.shape != parent_labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and parent labels {tuple(parent_labels.shape)} differ in shape")
    classes, index = labels.unique(return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"the nearest other class needs 2 classes or more, got {len(classes)}")
    parents = torch.empty(len(classes), dtype=parent_labels.dtype)
    parents[index] = parent_labels
    return index, parents


def coarse_neighbour_share(features, labels, parent_labels):
    """Share of the classes whose nearest other class has the same parent: each class's centroid is the mean
    of its samples' `features` [N, D], "nearest" is by cosine similarity of the centroids; `labels` [N] are
    one level's, `parent_labels` [N] the level above's. A representation that keeps the hierarchy puts
    siblings next to each other (compare with coarse_neighbour_chance)."""
    index, parents = class_parents(labels, parent_labels)
    sums = torch.zeros(len(parents), features.shape[1], dtype=torch.float64).index_add_(0, index, features.double())
    centroids = F.normalize(sums, dim=1)  # the count would cancel in the cosine
    similarity = (centroids @ centroids.T).fill_diagonal_(-float("inf"))
    return (parents[similarity.argmax(1)] == parents).double().mean().item()


def coarse_neighbour_chance(labels, parent_labels):
    """coarse_neighbour_share if each class's nearest other class were drawn at random among the others:
    per class, its siblings / (classes - 1), averaged over the classes in `labels` [N]."""
    _, parents = class_parents(labels, parent_labels)
    siblings = (parents[:, None] == parents[None, :]).sum(1) - 1
    return (siblings.double() / (len(parents) - 1)).mean().item()


def total_variance(features):
    """Sum over the dimensions of the per-dimension variance (divided by N) of `features` [N, D]; for
    L2-normalised rows it is 1 - |mean feature|^2: 0 when all coincide, 1 when they average to zero."""
    return features.double().var(0, unbiased=False).sum().item()


def participation_ratio(features):
    """(sum of eigenvalues)^2 / sum of squared eigenvalues of the covariance of `features` [N, D]: an
    effective number of dimensions, from 1 (all variance along one direction) to D (isotropic). The
    eigenvalues are never formed: their sum is the trace, their squares sum to the squared entries. NaN
    for features without variance."""
    centred = features.double() - features.double().mean(0)
    covariance = centred.T @ centred / len(features)
    return (covariance.trace() ** 2 / covariance.pow(2).sum()).item()


def hierarchical_consistency(coarse_predictions, fine_predictions, parents):
    """Share of the samples whose fine prediction's parent is their coarse prediction; `parents` maps each
    fine class to its parent (-1 for a class of unknown parent, which never agrees)."""
    if coarse_predictions.shape != fine_predictions.shape:
        raise ValueError(f"{tuple(coarse_predictions.shape)} coarse but {tuple(fine_predictions.shape)} fine predictions")
    return (parents[fine_predictions] == coarse_predictions).double().mean().item()


def mistake_severity(fine_predictions, targets, paths):
    """Mean tree distance of the wrong finest-level predictions: how many levels one climbs from the fine
    level until the predicted and the true label paths agree, so 1 for a sibling of the true class and L
    for a class that differs at the root. `targets` [N, L] are the true paths, `paths` [classes, L] each
    finest class's path (class_paths; a class without one differs at the root). NaN without mistakes."""
    if targets.shape[1] != paths.shape[1]:
        raise ValueError(f"targets have {targets.shape[1]} levels but the class paths {paths.shape[1]}")
    wrong = fine_predictions != targets[:, -1]
    agreeing_levels = (paths[fine_predictions[wrong]] == targets[wrong]).long().cumprod(1).sum(1)
    return (targets.shape[1] - agreeing_levels).double().mean().item()


def embedding_structure(test_features, test_targets, info, max_samples=2000):
    """The `embedding` record of results.json, on the L2-normalised test features: total variance and
    participation ratio; for hierarchical data, per level the silhouette (at most `max_samples` samples)
    and, below the coarsest level, the coarse neighbour share and its chance value."""
    features = F.normalize(test_features, dim=1)
    record = {"total_variance": total_variance(features), "participation_ratio": participation_ratio(features)}
    if info.multilabel:
        return record
    names = info.level_names
    record["silhouette"] = {name: silhouette(features, test_targets[:, level], max_samples)
                            for level, name in enumerate(names)}
    record["coarse_neighbour_share"] = {names[level]: coarse_neighbour_share(
        features, test_targets[:, level], test_targets[:, level - 1]) for level in range(1, len(names))}
    record["coarse_neighbour_chance"] = {names[level]: coarse_neighbour_chance(
        test_targets[:, level], test_targets[:, level - 1]) for level in range(1, len(names))}
    return record


def probe_hierarchy(predictions, train_targets, test_targets, info):
    """The `probe_hierarchy` record of results.json from the linear probe's test predictions (one [N] per
    level): consistency of each adjacent pair of levels and the severity of the finest level's mistakes,
    with the class tree read from the training targets."""
    names, fine = info.level_names, len(info.level_names) - 1
    consistency = {f"{names[level - 1]}->{names[level]}": hierarchical_consistency(
        predictions[level - 1], predictions[level], class_paths(train_targets, level, info.num_classes[level])[:, -2])
        for level in range(1, len(names))}
    return {"consistency": consistency,
            "mistake_severity": mistake_severity(predictions[fine], test_targets,
                                                 class_paths(train_targets, fine, info.num_classes[fine])),
            "mistakes": int((predictions[fine] != test_targets[:, fine]).sum())}


def evaluate(encoder, train_set, test_set, device, protocol="fast", val_fraction=0.0, seed=0, linear_epochs=100,
             classifier=None):
    """Evaluate a frozen encoder on every label level; returns the results.json record: `levels` (the probes'
    scores), `embedding` (embedding_structure), for hierarchical data `probe_hierarchy`, and given `classifier`
    (a linear layer trained jointly with the encoder: mlcl.py's CE term) its test figures on the same features
    as "classifier"."""
    info = train_set.info
    encoder = encoder.to(memory_format=torch.channels_last)  # as in training: a checkpoint re-evaluates the same
    train_features = extract_features(encoder, train_set, device)
    test_features = extract_features(encoder, test_set, device)
    train_raw, test_raw = raw_inputs(train_set), raw_inputs(test_set)
    train_targets, test_targets = train_set.targets.cpu(), test_set.targets.cpu()
    supcon_scores = supcon_protocol(encoder, train_set, test_set, device, epochs=linear_epochs, seed=seed) \
        if protocol == "supcon" else None

    levels, predictions = {}, []
    for level, name in enumerate(info.level_names):
        train_y, test_y = (train_targets.float(), test_targets.float()) if info.multilabel else \
            (train_targets[:, level], test_targets[:, level])
        num_outputs = info.num_classes[level]
        learned, predicted = supcon_scores[level] if supcon_scores else linear_probe(
            train_features, train_y, test_features, test_y, num_outputs, info.multilabel, val_fraction, seed)
        raw, _ = linear_probe(train_raw, train_y, test_raw, test_y, num_outputs, info.multilabel, val_fraction, seed)
        levels[name] = {**learned, **{f"raw_{key}": value for key, value in raw.items()}} if info.multilabel else {
            "linear_top1": learned["top1"],
            "knn_top1": knn_top1(train_features, train_y, test_features, test_y, num_outputs),
            "raw_linear_top1": raw["top1"]}
        predictions.append(predicted)
    results = {"protocol": protocol, "levels": levels,
               "embedding": embedding_structure(test_features, test_targets, info)}
    if not info.multilabel:
        results["probe_hierarchy"] = probe_hierarchy(predictions, train_targets, test_targets, info)
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


def report(results, out=None, filename="results.json"):
    """Print the per-level table and the structure block, and write `filename` into the folder `out`."""
    print(f"\n{results.get('method', '?')} on {results.get('dataset', '?')} ({results['protocol']} protocol)")
    for name, record in results["levels"].items():
        print(f"  {name:>12}: " + "  ".join(f"{key} {value:.4f}" for key, value in record.items()))
    if "classifier" in results:
        record = results["classifier"]
        print(f"  classifier trained with the encoder, on {record['level']}: "
              + "  ".join(f"{key} {value:.4f}" for key, value in record.items() if key != "level"))
    if out:
        with open(os.path.join(out, filename), "w") as f:
            json.dump(results, f, indent=2)
    if "embedding" not in results:
        return
    embedding = results["embedding"]
    lines = [f"  embedding (L2-normalised test features): total variance {embedding['total_variance']:.4f}  "
             f"participation ratio {embedding['participation_ratio']:.1f}"]
    for name, value in embedding.get("silhouette", {}).items():
        line = f"  {name:>12}: silhouette {value:.4f}"
        if name in embedding["coarse_neighbour_share"]:
            line += (f"  coarse neighbour share {embedding['coarse_neighbour_share'][name]:.4f} "
                     f"(chance {embedding['coarse_neighbour_chance'][name]:.4f})")
        lines.append(line)
    if "probe_hierarchy" in results:
        hierarchy, fine = results["probe_hierarchy"], list(results["levels"])[-1]
        consistency = "".join(f"consistency {pair} {value:.4f}  " for pair, value in hierarchy["consistency"].items())
        lines.append(f"  linear probe: {consistency}mistake severity {hierarchy['mistake_severity']:.3f} "
                     f"over {hierarchy['mistakes']} wrong {fine} predictions")
    print("\n".join(lines))


# Convergence: probes the training loop runs on a held-out part of the training set.

def hold_out(train_set, share, seed):
    """(rest, held-out part) of a training set: the held-out part is round(share * N) samples, class-
    stratified (data.stratified_indices, drawn from `seed`), the rest is everything else. For watching
    convergence without ever touching the test set."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"the held-out share must lie in (0, 1), got {share}")
    held_out = data.stratified_indices(train_set.targets.cpu(), share, seed)
    rest = torch.ones(len(train_set), dtype=torch.bool).index_fill_(0, held_out, False)
    if not rest.any():
        raise ValueError(f"holding out {share} of {len(train_set)} samples leaves none to train on")
    return train_set.subset(rest.nonzero().flatten()), train_set.subset(held_out)


def knn_probe(encoder, bank_set, query_set, device):
    """Weighted cosine kNN (k = 20) of `query_set`'s features against `bank_set`'s: {level name: top-1};
    for multi-label data {level name: mAP} of the per-label kNN scores (the weighted share of neighbours
    that carry the label). The encoder runs in eval mode without gradients; its mode is restored."""
    info = bank_set.info
    bank, query = extract_features(encoder, bank_set, device), extract_features(encoder, query_set, device)
    bank_targets, query_targets = bank_set.targets.cpu(), query_set.targets.cpu()
    if info.multilabel:
        shares = knn_shares(bank, bank_targets.float(), query)
        return {info.level_names[0]: multilabel_metrics(shares, query_targets)["map"]}
    return {name: knn_top1(bank, bank_targets[:, level], query, query_targets[:, level], info.num_classes[level])
            for level, name in enumerate(info.level_names)}


# Command line.

def read_checkpoint(path):
    """(state, config, method module) of a checkpoint written by a method file; one line if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        config, method_file = SimpleNamespace(**state["config"]), state["method_file"]
    except Exception as error:
        raise SystemExit(f"cannot read checkpoint {path}: {error}") from None
    try:
        return state, config, importlib.import_module(os.path.splitext(method_file)[0])
    except ImportError:
        raise SystemExit(f"{path} names the method file {method_file!r}, which is not a script here") from None


def load_split(config, data_dir, split):
    """The split of the checkpoint's dataset it was trained (train: with its --fraction) or tested on."""
    release = getattr(config, "wos_release", None) if config.dataset == "wos" else None  # old runs: on every dataset
    options = dict(download=False, seed=config.seed, image_size=config.image_size, release=release)
    fraction = config.fraction if split == "train" else 1.0
    return data.load_or_exit(config.dataset, data_dir or config.data_dir, split, fraction=fraction, **options)


def evaluate_run(model, method, config, train_set, test_set, device, out, filename="results.json", **protocol):
    """evaluate's record of a trained model (with its run's fields), reported and written to out/filename."""
    results = {"method": method, "dataset": config.dataset, "fraction": config.fraction,
               "train_samples": len(train_set), **evaluate(model.encoder, train_set, test_set, device, seed=config.seed,
                                                           classifier=getattr(model, "classifier", None), **protocol)}
    report(results, out, filename)
    return results


def evaluate_checkpoint(path, device, data_dir=None, protocol="fast", **options):
    """Evaluate one checkpoint's frozen encoder; prints the report and writes results-<checkpoint>-<protocol>.json
    beside it, so that the training run's own results.json stays as the run wrote it."""
    state, config, method = read_checkpoint(path)
    train_set, test_set = load_split(config, data_dir, "train"), load_split(config, data_dir, "test")
    model = method.build_model(config, train_set.info)
    model.load_state_dict(state["model"])
    filename = f"results-{os.path.splitext(os.path.basename(path))[0]}-{protocol}.json"
    return evaluate_run(model.to(device), state["method"], config, train_set, test_set, device,
                        os.path.dirname(os.path.abspath(path)), filename, protocol=protocol, **options)


def checked_device(parser, checkpoints, device):
    """The torch device `device` names (None: cuda if available), once every checkpoint exists; else parser.error."""
    for path in checkpoints:
        if not os.path.isfile(path):
            parser.error(f"no checkpoint at {path}")
    if device is not None and data.device_problem(device):
        parser.error(data.device_problem(device))
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv=None):
    """Evaluate each checkpoint; results-<checkpoint>-<protocol>.json goes beside it."""
    p = argparse.ArgumentParser(description="Linear evaluation of checkpoints' frozen encoders")
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint.pt files written by the method files")
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
    device = checked_device(p, args.checkpoint, args.device)
    return [evaluate_checkpoint(path, device, args.data_dir, args.protocol, val_fraction=args.val_fraction,
                                linear_epochs=args.linear_epochs) for path in args.checkpoint]


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted") from None
    except (OSError, ValueError) as error:  # results that cannot be written, a test split too small for a silhouette
        raise SystemExit(f"error: {error}") from None
