"""Tests of linear_eval.py: multi-label metrics against scikit-learn, weighted kNN against a naive
loop, and the linear probe on problems whose answer is known."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, f1_score

import data
import linear_eval


def random_multilabel(n, k, seed):
    """Continuous scores (no ties) and multi-hot targets in which every label has a positive and a negative."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, k, generator=g) < 0.3).float()
    targets[0] = 1.0
    targets[1] = 0.0
    scores = torch.randn(n, k, generator=g) + 1.5 * targets - 0.5  # informative but imperfect
    return scores, targets


@pytest.mark.parametrize("threshold", [0.0, 0.7, -0.4])
@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_metrics_match_sklearn(seed, threshold):
    """micro-F1 and macro-F1 (positive where score > threshold) and mAP (per-label AP averaged) equal
    scikit-learn's f1_score / average_precision_score."""
    scores, targets = random_multilabel(60, 7, seed)
    got = linear_eval.multilabel_metrics(scores, targets, threshold=threshold)
    y, s = targets.numpy().astype(int), scores.numpy()
    predicted = (s > threshold).astype(int)
    assert got["micro_f1"] == pytest.approx(f1_score(y, predicted, average="micro", zero_division=0), abs=1e-6)
    assert got["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0), abs=1e-6)
    want_map = np.mean([average_precision_score(y[:, j], s[:, j]) for j in range(y.shape[1])])
    assert got["map"] == pytest.approx(want_map, abs=1e-6)


def test_multilabel_metrics_perfect_and_label_without_positive():
    """Perfect scores give 1.0 everywhere; mAP averages only over labels that occur."""
    scores, targets = random_multilabel(40, 5, 3)
    perfect = linear_eval.multilabel_metrics(4 * targets - 2, targets)
    assert perfect == pytest.approx({"micro_f1": 1.0, "macro_f1": 1.0, "map": 1.0})
    targets[:, 4] = 0.0  # label 4 never occurs
    got = linear_eval.multilabel_metrics(scores, targets)
    y, s = targets.numpy().astype(int), scores.numpy()
    want = np.mean([average_precision_score(y[:, j], s[:, j]) for j in range(4)])
    assert math.isfinite(got["map"]) and got["map"] == pytest.approx(want, abs=1e-6)


def naive_knn_top1(train_x, train_y, test_x, test_y, num_classes, k, temperature):
    """Weighted kNN written with loops in float64: cosine similarity, the k most similar training points each
    vote exp(sim / temperature) for their class, the class with the most votes is predicted."""
    train = F.normalize(train_x.double(), dim=1)
    test = F.normalize(test_x.double(), dim=1)
    k = min(k, len(train))
    correct = 0
    for i in range(len(test)):
        similarities = [(float(test[i] @ train[j]), j) for j in range(len(train))]
        similarities.sort(reverse=True)
        votes = [0.0] * num_classes
        for similarity, j in similarities[:k]:
            votes[int(train_y[j])] += math.exp(similarity / temperature)
        predicted = max(range(num_classes), key=lambda c: votes[c])
        correct += int(predicted == int(test_y[i]))
    return correct / len(test)


@pytest.mark.parametrize("k,chunk,temperature", [(5, 1024, 0.07), (3, 4, 0.5), (100, 7, 0.1), (1, 3, 0.07)])
def test_knn_top1_matches_naive_loop(k, chunk, temperature):
    """knn_top1 equals the naive loop, with chunking and with k larger than the training set."""
    g = torch.Generator().manual_seed(k + chunk)
    centres = 2 * torch.randn(3, 6, generator=g)
    train_y = torch.randint(0, 3, (40,), generator=g)
    test_y = torch.randint(0, 3, (25,), generator=g)
    train_x = centres[train_y] + torch.randn(40, 6, generator=g)
    test_x = centres[test_y] + torch.randn(25, 6, generator=g)
    got = linear_eval.knn_top1(train_x, train_y, test_x, test_y, 3, k=k, temperature=temperature, chunk=chunk)
    want = naive_knn_top1(train_x, train_y, test_x, test_y, 3, k, temperature)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.0 < got <= 1.0


def test_knn_top1_weighting_matters():
    """The votes are weighted: one very close neighbour of class 1 beats two distant ones of class 0 (k=3),
    where an unweighted majority would pick class 0."""
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-0.2, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_x = torch.tensor([[1.0, 0.05]])
    assert linear_eval.knn_top1(train_x, train_y, test_x, torch.tensor([1]), 2, k=3) == 1.0
    assert naive_knn_top1(train_x, train_y, test_x, torch.tensor([1]), 2, 3, 0.07) == 1.0


def blobs(n, classes, dim, seed, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_linear_probe_separable():
    """On linearly separable Gaussian blobs (4 classes) the probe reaches > 0.9 test top-1."""
    train_x, train_y = blobs(200, 4, 10, 0)
    test_x, test_y = blobs(200, 4, 10, 1)
    result = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False)
    assert set(result) == {"top1"}
    assert result["top1"] > 0.9, result


def test_linear_probe_with_validation_split():
    """With val_fraction > 0 (L2 strength chosen on a split of train) the probe still separates the blobs."""
    train_x, train_y = blobs(200, 4, 10, 2)
    test_x, test_y = blobs(200, 4, 10, 3)
    result = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False, val_fraction=0.2)
    assert result["top1"] > 0.9, result


def test_linear_probe_random_labels_is_near_chance():
    """Random labels carry no signal: test top-1 stays near chance (0.25 for 4 classes), well below 0.45."""
    g = torch.Generator().manual_seed(4)
    train_x, test_x = torch.randn(200, 10, generator=g), torch.randn(400, 10, generator=g)
    train_y, test_y = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (400,), generator=g)
    result = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False)
    assert result["top1"] < 0.45, result


def test_linear_probe_multilabel():
    """Multi-label probe (one-vs-rest, BCE): labels that are linear in the input are recovered (micro-F1 > 0.9)."""
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(10, 4, generator=g)
    train_x, test_x = torch.randn(300, 10, generator=g), torch.randn(300, 10, generator=g)
    train_y, test_y = (train_x @ directions > 0.3).float(), (test_x @ directions > 0.3).float()
    result = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=True)
    assert set(result) == {"micro_f1", "macro_f1", "map"}
    assert result["micro_f1"] > 0.9 and result["map"] > 0.9, result


def no_colour(*args, **kwargs):
    raise AssertionError("colour jitter or grayscale in the linear evaluation's views")


def test_supcon_protocol_views_are_crop_and_flip_only(monkeypatch):
    """--protocol supcon trains its probe on the reference's linear-eval views (main_linear.py: random crop
    and flip), never on the training augmentation's colour jitter and grayscale, here on colour images."""
    info = data.DatasetInfo("colour", "image", ["class"], [2], False, [["a", "b"]], channels=3, image_size=8,
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = data.ImageTensorDataset(images, torch.arange(16)[:, None] % 2, info)
    monkeypatch.setattr(data, "colour_jitter", no_colour)
    monkeypatch.setattr(data, "grayscale", no_colour)
    with pytest.raises(AssertionError, match="colour jitter"):  # the training views would call it
        data.augment(images, info, torch.Generator().manual_seed(0))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    scores = linear_eval.supcon_protocol(encoder, dataset, dataset, torch.device("cpu"), epochs=2, batch_size=8)
    assert 0.0 <= scores[0]["top1"] <= 1.0
