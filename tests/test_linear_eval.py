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
    result, predictions = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False)
    assert set(result) == {"top1"}
    assert result["top1"] > 0.9, result
    assert predictions.shape == test_y.shape
    assert (predictions == test_y).float().mean().item() == pytest.approx(result["top1"])


def test_linear_probe_with_validation_split():
    """With val_fraction > 0 (L2 strength chosen on a split of train) the probe still separates the blobs."""
    train_x, train_y = blobs(200, 4, 10, 2)
    test_x, test_y = blobs(200, 4, 10, 3)
    result, _ = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False, val_fraction=0.2)
    assert result["top1"] > 0.9, result


def test_linear_probe_random_labels_is_near_chance():
    """Random labels carry no signal: test top-1 stays near chance (0.25 for 4 classes), well below 0.45."""
    g = torch.Generator().manual_seed(4)
    train_x, test_x = torch.randn(200, 10, generator=g), torch.randn(400, 10, generator=g)
    train_y, test_y = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (400,), generator=g)
    result, _ = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=False)
    assert result["top1"] < 0.45, result


def test_linear_probe_multilabel():
    """Multi-label probe (one-vs-rest, BCE): labels that are linear in the input are recovered (micro-F1 > 0.9)."""
    g = torch.Generator().manual_seed(5)
    directions = torch.randn(10, 4, generator=g)
    train_x, test_x = torch.randn(300, 10, generator=g), torch.randn(300, 10, generator=g)
    train_y, test_y = (train_x @ directions > 0.3).float(), (test_x @ directions > 0.3).float()
    result, predictions = linear_eval.linear_probe(train_x, train_y, test_x, test_y, 4, multilabel=True)
    assert set(result) == {"micro_f1", "macro_f1", "map"}
    assert predictions.shape == test_y.shape and set(predictions.unique().tolist()) <= {0, 1}
    assert result["micro_f1"] > 0.9 and result["map"] > 0.9, result


def no_colour(*args, **kwargs):
    raise AssertionError("colour jitter or grayscale in the linear evaluation's views")


def test_supcon_protocol_views_are_crop_and_flip_only(monkeypatch):
    """--protocol supcon trains its probe on the reference's linear-eval views (main_linear.py: random crop
    and flip), never on the training augmentation's colour jitter and grayscale, here on colour images."""
    info = data.DatasetInfo("colour", "image", ["class"], [2], False, [["a", "b"]], channels=3, image_size=8,
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = data.ResidentDataset(images, torch.arange(16)[:, None] % 2, info)
    monkeypatch.setattr(data, "colour_jitter", no_colour)
    monkeypatch.setattr(data, "grayscale", no_colour)
    with pytest.raises(AssertionError, match="colour jitter"):  # the training views would call it
        data.augment(images, info, torch.Generator().manual_seed(0))
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    scores = linear_eval.supcon_protocol(encoder, dataset, dataset, torch.device("cpu"), epochs=2, batch_size=8)
    level_scores, predictions = scores[0]
    assert 0.0 <= level_scores["top1"] <= 1.0 and predictions.shape == (16,)


# The structure metrics, on cases small enough to work out by hand.

def at_angles(degrees):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_silhouette_by_hand():
    """Four unit vectors at 0, 90, 180, 270 degrees, classes {0, 90} and {180, 270}: cosine distances 1
    within the class, 2 and 1 to the other class, so every sample has a = 1, b = 1.5 and s = 1/3."""
    features = at_angles([0, 90, 180, 270])
    assert linear_eval.silhouette(features, torch.tensor([0, 0, 1, 1])) == pytest.approx(1 / 3)


def test_silhouette_subsample_is_fixed_and_shared():
    """At most max_samples samples, the same draw for every labelling: the score equals scikit-learn's on
    that draw, and it does not change between calls."""
    from sklearn.metrics import silhouette_score

    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(50, 4, generator=g), torch.arange(50) % 3
    got = linear_eval.silhouette(features, labels, max_samples=20, seed=7)
    keep = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:20]
    want = silhouette_score(features[keep].double().numpy(), labels[keep].numpy(), metric="cosine")
    assert got == pytest.approx(want) and got == linear_eval.silhouette(features, labels, max_samples=20, seed=7)


def test_silhouette_needs_two_classes():
    with pytest.raises(ValueError, match="2 to"):
        linear_eval.silhouette(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def test_coarse_neighbour_share_by_hand():
    """Classes A (0 deg, two samples at -5 and +5), B (10), C (25), D (90); A and B share parent 0, C and D
    parent 1. Nearest other centroid: A -> B (same parent), B -> A (10 deg beats 15), C -> B (15 beats 65:
    other parent), D -> C (same parent): 3 of 4. Chance: each class has 1 sibling among 3 others."""
    features = at_angles([-5, 5, 10, 25, 90])
    labels, parents = torch.tensor([0, 0, 1, 2, 3]), torch.tensor([0, 0, 0, 1, 1])
    assert linear_eval.coarse_neighbour_share(features, labels, parents) == pytest.approx(3 / 4)
    assert linear_eval.coarse_neighbour_chance(labels, parents) == pytest.approx(1 / 3)


def test_coarse_neighbour_chance_with_unequal_families():
    """Parents 0, 0, 0, 1: the three siblings see 2 of 3 others as siblings, the only child 0 of 3: 1/2."""
    assert linear_eval.coarse_neighbour_chance(torch.tensor([5, 6, 7, 8]), torch.tensor([0, 0, 0, 1])) == 0.5


def test_coarse_neighbour_share_rejects_bad_input():
    with pytest.raises(ValueError, match="2 classes"):
        linear_eval.coarse_neighbour_share(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        linear_eval.coarse_neighbour_chance(torch.tensor([0, 1]), torch.tensor([0, 0, 1]))


def test_total_variance_and_participation_ratio_by_hand():
    """Unit vectors at 0, 90, 180, 270 degrees: mean 0, variance 1/2 in each of the 2 dimensions (total 1),
    equal eigenvalues (ratio 2). Along one axis only (+-x): total 1, ratio 1. At 0 and 90 degrees: total
    1 - |mean|^2 = 1/2."""
    assert linear_eval.total_variance(at_angles([0, 90, 180, 270])) == pytest.approx(1.0)
    assert linear_eval.participation_ratio(at_angles([0, 90, 180, 270])) == pytest.approx(2.0)
    assert linear_eval.total_variance(at_angles([0, 180])) == pytest.approx(1.0)
    assert linear_eval.participation_ratio(at_angles([0, 180])) == pytest.approx(1.0)
    assert linear_eval.total_variance(at_angles([0, 90])) == pytest.approx(0.5)


def test_participation_ratio_matches_eigenvalues():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(30, 5, generator=g) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1])
    eigenvalues = torch.linalg.eigvalsh(torch.cov(features.double().T, correction=0))
    want = (eigenvalues.sum() ** 2 / eigenvalues.pow(2).sum()).item()
    assert linear_eval.participation_ratio(features) == pytest.approx(want)


# A three-level tree: root r in {0, 1}, middle m in 0..3 with parent m // 2, fine f in 0..7 with parent f // 2.
TREE = torch.tensor([[f // 4, f // 2, f] for f in range(8)])


def test_class_paths_from_targets():
    """Rows of the classes the targets show, -1 for the others (fine class 7 never occurs)."""
    paths = linear_eval.class_paths(TREE[:7], 2, 8)
    assert paths[:7].tolist() == TREE[:7].tolist() and paths[7].tolist() == [-1, -1, -1]
    assert linear_eval.class_paths(TREE, 1, 4).tolist() == [[0, 0], [0, 1], [1, 2], [1, 3]]


def test_hierarchical_consistency_by_hand():
    """Parents of fine predictions 0, 2, 3, 1 are 0, 1, 1, 0; coarse predictions 0, 0, 1, 1 agree twice.
    A fine class of unknown parent (-1) never agrees."""
    parents = torch.tensor([0, 0, 1, 1, -1])
    coarse, fine = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 3, 1])
    assert linear_eval.hierarchical_consistency(coarse, fine, parents) == 0.5
    assert linear_eval.hierarchical_consistency(torch.tensor([0]), torch.tensor([4]), parents) == 0.0
    with pytest.raises(ValueError, match="coarse"):
        linear_eval.hierarchical_consistency(coarse, fine[:3], parents)


def test_mistake_severity_by_hand():
    """True class 0 (path 0, 0, 0); predictions 0 (right, not counted), 1 (a sibling: 1), 2 (same root,
    other middle: 2), 4 (other root: 3 = L): mean (1 + 2 + 3) / 3 = 2. A class without a path counts L."""
    targets = TREE[[0, 0, 0, 0]]
    assert linear_eval.mistake_severity(torch.tensor([0, 1, 2, 4]), targets, TREE) == pytest.approx(2.0)
    unknown = linear_eval.class_paths(TREE[:7], 2, 8)
    assert linear_eval.mistake_severity(torch.tensor([7]), TREE[[0]], unknown) == 3.0
    assert math.isnan(linear_eval.mistake_severity(torch.tensor([0, 5]), TREE[[0, 5]], TREE))


def hierarchical_images(n, seed, multilabel=False):
    """Tiny 8x8 images whose brightness pattern encodes one of 6 fine classes (3 categories x 2)."""
    g = torch.Generator().manual_seed(seed)
    fine = torch.arange(n) % 6
    patterns = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(42)).float()
    images = (patterns[fine] + 40 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 255).to(torch.uint8)
    if multilabel:
        info = data.DatasetInfo("tiny-multilabel", "image", ["labels"], [4], True, [list("abcd")], image_size=8)
        targets = F.one_hot(fine % 4, 4).float()
    else:
        info = data.DatasetInfo("tiny", "image", ["category", "class"], [3, 6], False,
                                [list("abc"), list("uvwxyz")], image_size=8)
        targets = torch.stack([fine // 2, fine], dim=1)
    return data.ResidentDataset(images, targets, info)


def tiny_encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))


def test_evaluate_reports_the_structure(capsys):
    """evaluate() puts the embedding's structure and the probe's hierarchy into the results, computed by the
    metric functions on the L2-normalised test features, and report prints them in a block of their own."""
    train, test = hierarchical_images(120, 0), hierarchical_images(60, 1)
    encoder = tiny_encoder()
    results = linear_eval.evaluate(encoder, train, test, torch.device("cpu"))
    assert set(results["levels"]["class"]) == {"linear_top1", "knn_top1", "raw_linear_top1"}
    features = F.normalize(linear_eval.extract_features(encoder, test, torch.device("cpu")), dim=1)
    embedding = results["embedding"]
    assert embedding["total_variance"] == pytest.approx(linear_eval.total_variance(features))
    assert embedding["participation_ratio"] == pytest.approx(linear_eval.participation_ratio(features))
    assert embedding["silhouette"]["category"] == pytest.approx(linear_eval.silhouette(features, test.targets[:, 0]))
    assert set(embedding["silhouette"]) == {"category", "class"}
    assert set(embedding["coarse_neighbour_share"]) == set(embedding["coarse_neighbour_chance"]) == {"class"}
    assert embedding["coarse_neighbour_chance"]["class"] == pytest.approx(1 / 5)  # 1 sibling among 5 others
    assert embedding["coarse_neighbour_share"]["class"] == pytest.approx(
        linear_eval.coarse_neighbour_share(features, test.targets[:, 1], test.targets[:, 0]))
    hierarchy = results["probe_hierarchy"]
    assert set(hierarchy["consistency"]) == {"category->class"}
    assert 0.0 <= hierarchy["consistency"]["category->class"] <= 1.0
    wrong = round((1 - results["levels"]["class"]["linear_top1"]) * len(test))
    assert hierarchy["mistakes"] == wrong
    assert wrong == 0 or 1.0 <= hierarchy["mistake_severity"] <= 2.0
    linear_eval.report(results)
    printed = capsys.readouterr().out
    assert "participation ratio" in printed and "coarse neighbour share" in printed
    assert "consistency category->class" in printed and "mistake severity" in printed


def test_evaluate_on_multilabel_data_keeps_only_the_variance():
    train, test = hierarchical_images(80, 0, multilabel=True), hierarchical_images(40, 1, multilabel=True)
    results = linear_eval.evaluate(tiny_encoder(), train, test, torch.device("cpu"))
    assert set(results["embedding"]) == {"total_variance", "participation_ratio"}
    assert "probe_hierarchy" not in results


# Convergence support.

def test_hold_out_is_a_stratified_partition():
    """The held-out part takes round(share * N) samples, the same number from each (balanced) fine class,
    the rest is its complement; the same seed gives the same split."""
    dataset = hierarchical_images(60, 0)
    rest, held = linear_eval.hold_out(dataset, 0.2, seed=3)
    assert len(held) == 12 and len(rest) == 48
    assert torch.bincount(held.targets[:, 1], minlength=6).tolist() == [2] * 6
    seen = torch.cat([rest.inputs, held.inputs]).flatten(1)
    assert torch.equal(seen.sort(0).values, dataset.inputs.flatten(1).sort(0).values)
    assert torch.equal(linear_eval.hold_out(dataset, 0.2, seed=3)[1].inputs, held.inputs)
    for share in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            linear_eval.hold_out(dataset, share, seed=0)


def test_knn_probe_restores_the_mode_and_matches_knn_top1():
    bank, query = hierarchical_images(60, 0), hierarchical_images(30, 1)
    encoder = tiny_encoder().train()
    scores = linear_eval.knn_probe(encoder, bank, query, torch.device("cpu"))
    assert encoder.training
    bank_x = linear_eval.extract_features(encoder, bank, torch.device("cpu"))
    query_x = linear_eval.extract_features(encoder, query, torch.device("cpu"))
    for level, name in enumerate(("category", "class")):
        want = linear_eval.knn_top1(bank_x, bank.targets[:, level], query_x, query.targets[:, level], [3, 6][level])
        assert scores[name] == want
    assert linear_eval.knn_probe(encoder.eval(), bank, query, torch.device("cpu")) == scores
    assert not encoder.training


def test_knn_probe_on_multilabel_data_gives_map():
    """One number under the single level name: the mAP of the weighted share of neighbours with each label."""
    bank, query = hierarchical_images(60, 0, multilabel=True), hierarchical_images(30, 1, multilabel=True)
    encoder = tiny_encoder()
    scores = linear_eval.knn_probe(encoder, bank, query, torch.device("cpu"))
    bank_x = linear_eval.extract_features(encoder, bank, torch.device("cpu"))
    query_x = linear_eval.extract_features(encoder, query, torch.device("cpu"))
    shares = linear_eval.knn_shares(bank_x, bank.targets, query_x)
    assert list(scores) == ["labels"]
    assert scores["labels"] == pytest.approx(linear_eval.multilabel_metrics(shares, query.targets)["map"])
    assert 0.0 <= shares.min() and shares.max() <= 1.0


def test_raw_inputs_in_chunks_equal_the_whole_split():
    """The image floor is built a chunk at a time (bounded memory); the chunks change nothing."""
    dataset = data.load("hdigits", split="test", size=50)
    whole = linear_eval.raw_inputs(dataset, chunk=len(dataset))
    assert torch.equal(linear_eval.raw_inputs(dataset, chunk=7), whole)
    assert whole.shape == (50, 32 * 32)


def test_wide_tfidf_folds_into_buckets_without_densifying():
    """TF-IDF with more columns than the floor's buckets (rcv1: 47,236) is folded column mod buckets from
    the sparse matrix, then L2-normalised: checked against the dense matrix folded by hand."""
    scipy_sparse = pytest.importorskip("scipy.sparse")
    matrix = scipy_sparse.random(12, 300, density=0.05, format="csr", random_state=0, dtype=np.float32)
    matrix[0, 7], matrix[0, 7 + 64] = 1.0, 2.0  # two columns that fold into one bucket
    info = data.text_info("toy", ["a"], [["x", "y"]], input="tfidf", input_dim=300)
    dataset = data.TfidfDataset(matrix, torch.zeros(12, 1, dtype=torch.long), info)
    folded = linear_eval.text_bag(dataset, buckets=64)
    dense = torch.from_numpy(matrix.toarray())
    expected = torch.zeros(12, 64).index_add_(1, torch.arange(300) % 64, dense)
    assert torch.allclose(folded, F.normalize(expected, dim=1), atol=1e-6)
    assert folded[0, 7] > 0
    narrow = linear_eval.text_bag(dataset, buckets=512)  # no more columns than buckets: the rows as they are
    assert torch.equal(narrow, dense)
