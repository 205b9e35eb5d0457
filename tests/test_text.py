"""Text: hashing, views, the text loaders on fixtures in their real formats, the text floor, the scripts.

Every fixture is written here from synthetic words; nothing is downloaded.
"""

import codecs
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F

import data
import linear_eval
import mlcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_words(generator, count, vocabulary):
    return [vocabulary[i] for i in torch.randint(len(vocabulary), (count,), generator=generator).tolist()]


# --------------------------------------------------------------------------------------------------
# Hashing, n-grams and views
# --------------------------------------------------------------------------------------------------


def test_hashing_is_deterministic_lowercased_and_padded():
    """Word ids are CRC-32 based (the same in another process with another hash seed), case-blind, 0-padded."""
    texts = ["Zorp blick, ZORP! quux_9", "", "a " * 300]
    ids = data.encode_texts(texts, length=8)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    zorp, blick, quux, nine = (data.hash_token(w) for w in ("zorp", "blick", "quux", "9"))
    assert ids[0].tolist() == [zorp, blick, zorp, quux, nine, 0, 0, 0]  # "_" splits words
    assert ids[1].tolist() == [0] * 8
    assert (ids[2] == data.hash_token("a")).all()  # truncated to the first `length` words
    assert 1 <= ids[ids > 0].min() and ids.max() <= data.TEXT_BUCKETS
    code = "import data; print(data.encode_texts(['Zorp blick, ZORP! quux_9'], length=8).tolist())"
    other = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert json.loads(other.stdout) == ids[:1].tolist()


def test_ngram_ids_hash_ordered_pairs_and_keep_padding():
    words = torch.tensor([[5, 9, 5, 0, 0], [9, 5, 0, 0, 0]])
    grams = data.ngram_ids(words, buckets=1000)
    assert grams.shape == (2, 9)
    assert torch.equal(grams[:, :5], words)
    bigrams = grams[:, 5:]
    assert (bigrams[0, :2] > 0).all() and (bigrams[0, 2:] == 0).all() and (bigrams[1, 1:] == 0).all()
    assert bigrams[0, 0] != bigrams[0, 1]  # (5, 9) and (9, 5) are different bigrams
    assert bigrams[0, 1] == bigrams[1, 0]  # the same pair gets the same id in any document
    assert 1 <= bigrams[bigrams > 0].min() and bigrams.max() <= 1000
    assert torch.equal(data.ngram_ids(words, buckets=1000), grams)


def test_text_views_drop_and_shuffle_locally_per_sample():
    """Every sample draws its own dropout and shuffle; a seed replays them; padding stays at the end."""
    length, used = 64, 50
    words = torch.zeros(200, length, dtype=torch.long)
    words[:, :used] = torch.arange(1, used + 1)  # word id = 1 + original position
    view = data.text_view(words, torch.Generator().manual_seed(0))
    again = data.text_view(words, torch.Generator().manual_seed(0))
    assert torch.equal(view, again)
    assert not torch.equal(view, data.text_view(words, torch.Generator().manual_seed(1)))
    assert len({tuple(row.tolist()) for row in view}) == len(view)  # identical inputs, different views

    kept = (view > 0).sum(1)
    assert (kept <= used).all()
    assert 0.05 < 1 - kept.float().mean().item() / used < 0.15  # about 10% of the words dropped
    for row, count in zip(view, kept.tolist()):
        assert (row[count:] == 0).all() and (row[:count] > 0).all()  # packed: padding only at the end
        values = row[:count]
        assert len(set(values.tolist())) == count  # every word at most once, none invented
        assert values.max() <= used
        # Local shuffle: a word never ends up behind a word that came 3 or more places after it.
        position = values - 1
        later = position[None, :] - position[:, None]  # later[i, j] = pos_j - pos_i
        order = torch.arange(count)
        assert not ((later >= 3) & (order[None, :] < order[:, None])).any()
    assert (view[:, :used] != words[:, :used]).any(1).float().mean() > 0.9  # nearly every row changed


def test_text_augment_and_normalize_dispatch():
    info = data.text_info("toy", ["a"], [["x", "y"]])
    words = data.encode_texts(["one two three four", "five six"], length=6)
    views = data.two_views(words, info, torch.Generator().manual_seed(0))
    assert views.shape == (2, 2, 11) and views.dtype == torch.long
    assert torch.equal(data.normalize(words, info), data.ngram_ids(words, info.extra["buckets"]))

    tfidf_info = data.text_info("toy", ["a"], [["x"]], input="tfidf", input_dim=30)
    rows = torch.rand(4, 30, generator=torch.Generator().manual_seed(0))
    view = data.augment(rows, tfidf_info, torch.Generator().manual_seed(0))
    assert view.shape == rows.shape
    assert torch.allclose(view.norm(dim=1), torch.ones(4))
    assert ((view == 0) & (rows != 0)).float().mean() > 0.02  # some entries dropped
    assert torch.equal(data.normalize(rows, tfidf_info), rows)


# --------------------------------------------------------------------------------------------------
# Web of Science
# --------------------------------------------------------------------------------------------------

WOS_AREAS = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]  # (YL1, YL2) of the areas, in (YL1, YL2) order


def wos_y(area, n):
    """Y.txt's value for document n of an area, with the quirks of the real WOS-46985: one Y value (3, like
    the real 40, 43 and 76) occurs under two domains, and there are more Y values (7) than areas (6)."""
    if area == 5 and n % 2:
        return 3  # area 5 lies in domain 2, area 3 (also Y = 3) in domain 1
    return 6 if area == 0 and n % 3 == 0 else area


def write_wos(root, per_area=10, release="46985", line_end="\n"):
    """root/WebOfScience/WOS<release>/{X,Y,YL1,YL2}.txt, one value per line, as in WebOfScience.zip. Document
    n of area a begins with the word "Doc<a>x<n>"; the first one holds "\x85" and "\u2028", which
    str.splitlines would take for line breaks."""
    folder = root / "WebOfScience" / f"WOS{release}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    lines = {"X": [], "Y": [], "YL1": [], "YL2": []}
    for area, (domain, local) in enumerate(WOS_AREAS):
        vocabulary = [f"dom{domain}word{k}" for k in range(5)] + [f"area{area}term{k}" for k in range(5)]
        for n in range(per_area):
            lines["X"].append(f"Doc{area}x{n} " + " ".join(synthetic_words(generator, 30, vocabulary)))
            lines["Y"].append(str(wos_y(area, n)))
            lines["YL1"].append(str(domain))
            lines["YL2"].append(str(local))
    lines["X"][0] += " an\x85odd\u2028break"
    for name, values in lines.items():
        (folder / f"{name}.txt").write_bytes((line_end.join(values) + line_end).encode("utf-8"))
    return lines


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_wos_reads_the_text_files_with_a_fixed_stratified_split(tmp_path, line_end):
    lines = write_wos(tmp_path, line_end=line_end)
    train = data.load("wos", str(tmp_path), "train")
    test = data.load("wos", str(tmp_path), "test")
    info = train.info
    assert info.modality == "text" and not info.multilabel
    assert info.level_names == ["domain", "area"] and info.num_classes == [3, 6]
    assert info.label_names[1][5] == "domain 2, area 0"
    assert len(train) == 48 and len(test) == 12  # 80/20 of every area's 10 documents
    for area in range(6):
        assert (train.targets[:, 1] == area).sum() == 8 and (test.targets[:, 1] == area).sum() == 2

    # Every document once, in one split, with its own (domain, area) and its own words.
    by_first_word = {data.hash_token(text.split()[0].lower()): i for i, text in enumerate(lines["X"])}
    seen = []
    for dataset in (train, test):
        for x, y in (dataset[i] for i in range(len(dataset))):
            i = by_first_word[int(x[0])]
            seen.append(i)
            assert y.tolist() == [int(lines["YL1"][i]), WOS_AREAS.index((int(lines["YL1"][i]), int(lines["YL2"][i])))]
            assert torch.equal(x, data.encode_texts([lines["X"][i]])[0])
    assert sorted(seen) == list(range(60))
    assert torch.equal(data.load("wos", str(tmp_path), "test").inputs, test.inputs)  # the same split every time


def test_wos_hierarchy_from_label_files_shaped_like_the_release(tmp_path):
    """Y.txt as published does not make a hierarchy (a Y value under two domains); the areas are the
    (YL1, YL2) pairs, so every area lies in one domain and every document keeps its domain."""
    lines = write_wos(tmp_path)
    domains_of_y3 = {d for y, d in zip(lines["Y"], lines["YL1"]) if y == "3"}
    assert domains_of_y3 == {"1", "2"} and len(set(lines["Y"])) == 7  # the fixture has the quirk
    train = data.load("wos", str(tmp_path), "train")
    domain_of_area = {}
    for domain, area in train.targets.tolist():
        assert domain_of_area.setdefault(area, domain) == domain
    assert domain_of_area == {area: domain for area, (domain, _) in enumerate(WOS_AREAS)}


def test_wos_smaller_releases(tmp_path):
    """release= (--wos-release) reads WOS-11967 or WOS-5736 from the same archive."""
    write_wos(tmp_path, per_area=5, release="5736")
    assert len(data.load("wos", str(tmp_path), "train", release="5736")) == 24
    with pytest.raises(data.DataError, match="WOS46985"):
        data.load("wos", str(tmp_path), "train")
    assert mlcl.parse_args(["--dataset", "wos", "--wos-release", "11967"]).wos_release == "11967"


def cut_last_line(path):
    path.write_text("\n".join(path.read_text().split("\n")[:-2]))


def bad_value(path):
    values = path.read_text().split("\n")
    values[2] = "two"
    path.write_text("\n".join(values))


@pytest.mark.parametrize("name, damage, match", [
    ("YL2", cut_last_line, "YL2.txt has 59 lines but .*X.txt has 60"),
    ("YL1", bad_value, "YL1.txt, line 3: 'two' is not a label id"),
    ("YL1", lambda path: path.unlink(), "YL1.txt not found"),
    ("X", lambda path: path.write_text(""), "X.txt is empty"),
])
def test_wos_damaged_files_name_the_file(tmp_path, name, damage, match):
    write_wos(tmp_path)
    damage(tmp_path / "WebOfScience" / "WOS46985" / f"{name}.txt")
    with pytest.raises(data.DataError, match=match) as error:
        data.load("wos", str(tmp_path), "train")
    message = str(error.value)
    assert "\n" not in message
    if name == "YL1" and "not found" in match:  # which file of the set is missing, and no other
        assert "X.txt" not in message.split("not found")[0] and "YL2.txt" not in message.split("not found")[0]


@pytest.mark.parametrize("name, hint", [("wos", "WebOfScience.zip"), ("20newsgroups", "--no-download"),
                                        ("rcv1", "--no-download")])
def test_missing_text_data_names_the_path_and_the_flag(tmp_path, name, hint):
    with pytest.raises(data.DataError, match=hint) as error:
        data.load(name, str(tmp_path), "train")
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name, fetcher, size, folder", [("20newsgroups", "fetch_20newsgroups", "14 MB", "20news_home"),
                                                         ("rcv1", "fetch_rcv1", "656 MB", "RCV1")])
def test_failed_sklearn_download_is_one_line(tmp_path, monkeypatch, capsys, name, fetcher, size, folder):
    """A missing scikit-learn dataset is fetched (after a line saying what, how big and where to); a
    failure (here a checksum mismatch, raised by scikit-learn as OSError) ends in one DataError line
    that says what was tried and where to put the files by hand."""
    import sklearn.datasets

    def fake_fetch(download_if_missing, **options):
        if download_if_missing:
            raise OSError("lyrl2004.dat.gz has an SHA256 checksum differing from expected,\nfile may be corrupted.")
        raise OSError("not found")

    monkeypatch.setattr(sklearn.datasets, fetcher, fake_fetch)
    with pytest.raises(data.DataError, match="could not download") as error:
        data.load(name, str(tmp_path), "train", download=True)
    message = str(error.value)
    assert "checksum" in message and "figshare" in message and "\n" not in message
    assert os.path.join(str(tmp_path), folder) in message
    assert f"({size}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# 20 Newsgroups: a tiny scikit-learn cache (20news-bydate_py3.pkz), built the way sklearn builds it
# --------------------------------------------------------------------------------------------------

GROUPS = ["comp.graphics", "comp.windows.x", "rec.autos", "rec.sport.hockey", "sci.space"]


def write_newsgroups(root, tmp_path):
    from sklearn.datasets import load_files

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 3)):
        for g, group in enumerate(GROUPS):
            folder = tmp_path / "src" / f"20news-bydate-{split}" / group
            folder.mkdir(parents=True)
            vocabulary = [f"{group.split('.')[0]}common{k}" for k in range(4)] + [f"grp{g}word{k}" for k in range(4)]
            for n in range(count):
                body = " ".join(synthetic_words(generator, 25, vocabulary))
                text = (f"From: someone{n}@example.invalid\nSubject: headerword {n}\n\n{body}\n"
                        f"> quotedword from an earlier post\n\n--\nsignatureword\n")
                (folder / f"{1000 * g + n}").write_text(text, encoding="latin1")
    cache = {split: load_files(str(tmp_path / "src" / f"20news-bydate-{split}"), encoding="latin1")
             for split in ("train", "test")}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "20news-bydate_py3.pkz"), "wb") as f:
        f.write(codecs.encode(pickle.dumps(cache), "zlib_codec"))


def test_20newsgroups_from_the_sklearn_cache(tmp_path):
    root = str(tmp_path / "data")
    write_newsgroups(root, tmp_path)
    train, test = data.load("20newsgroups", root, "train"), data.load("20newsgroups", root, "test")
    info = train.info
    assert info.level_names == ["top", "group"]
    assert info.label_names == [["comp", "rec", "sci"], GROUPS] and info.num_classes == [3, 5]
    assert len(train) == 30 and len(test) == 15
    assert torch.equal(train.targets[:, 1].bincount(), torch.full((5,), 6))
    coarse_of_group = torch.tensor([0, 0, 1, 1, 2])
    assert torch.equal(train.targets[:, 0], coarse_of_group[train.targets[:, 1]])
    # Headers, quotes and signatures are removed; the body's words are kept.
    for removed in ("headerword", "someone0", "quotedword", "signatureword"):
        assert not (train.inputs == data.hash_token(removed)).any(), removed
    for words, (coarse, fine) in zip(train.inputs.tolist(), train.targets.tolist()):
        top = GROUPS[fine].split(".")[0]
        assert top == info.label_names[0][coarse]
        assert {data.hash_token(f"{top}common{k}") for k in range(4)} & set(words)  # its own group's words


# --------------------------------------------------------------------------------------------------
# RCV1: scikit-learn's joblib files under data_home/RCV1
# --------------------------------------------------------------------------------------------------

TOPICS = np.array(["C15", "C151", "CCAT", "E21", "ECAT", "G15", "GCAT", "GDIS", "M11", "MCAT"], dtype=object)
RCV1_TRAIN = 23149  # fetch_rcv1's fixed LYRL2004 split: the first 23,149 rows are the training set


def write_rcv1(root, test_rows=40, features=30):
    import joblib

    rows = RCV1_TRAIN + test_rows
    rng = np.random.default_rng(0)
    topics = np.zeros((rows, len(TOPICS)), dtype=np.uint8)
    topics[np.arange(rows), rng.integers(len(TOPICS), size=rows)] = 1
    topics[np.arange(rows), rng.integers(len(TOPICS), size=rows)] = 1
    # Feature k is on for documents with topic k % 10, so the topics can be read off the input.
    col = np.concatenate([rng.integers(features, size=rows), topics.argmax(1) + 10 * rng.integers(3, size=rows)])
    row = np.concatenate([np.arange(rows), np.arange(rows)])
    samples = scipy.sparse.csr_matrix((rng.random(2 * rows) + 0.1, (row, col)), shape=(rows, features))
    folder = os.path.join(root, "RCV1")
    os.makedirs(folder)
    joblib.dump(samples, os.path.join(folder, "samples_py3.pkl"))
    joblib.dump(np.arange(rows, dtype=np.uint32) + 2286, os.path.join(folder, "sample_id_py3.pkl"))
    joblib.dump(scipy.sparse.csr_matrix(topics), os.path.join(folder, "sample_topics_py3.pkl"))
    joblib.dump(TOPICS, os.path.join(folder, "topics_names_py3.pkl"))
    return samples, topics


def test_rcv1_from_the_sklearn_files(tmp_path):
    samples, topics = write_rcv1(str(tmp_path))
    train = data.load("rcv1", str(tmp_path), "train")
    test = data.load("rcv1", str(tmp_path), "test")
    info = train.info
    assert info.multilabel and info.modality == "text" and info.num_classes == [10]
    assert info.extra["input"] == "tfidf" and info.extra["input_dim"] == 30
    assert info.extra["label_groups"] == [("CCAT", [0, 1, 2]), ("ECAT", [3, 4]), ("GCAT", [5, 6, 7]),
                                          ("MCAT", [8, 9])]
    assert len(train) == RCV1_TRAIN and len(test) == 40
    x, y = test[5]
    assert x.dtype == torch.float32 and x.shape == (30,)
    assert np.allclose(x.numpy(), samples[RCV1_TRAIN + 5].toarray()[0])
    assert torch.equal(y, torch.from_numpy(topics[RCV1_TRAIN + 5].astype(np.float32)))
    assert len(data.load("rcv1", str(tmp_path), "test", test_size=10)) == 10

    # mlcl.py's heads on rcv1: one per root topic plus the global head.
    args = mlcl.parse_args(["--dataset", "rcv1"])
    assert mlcl.head_names(info, args) == ["CCAT", "ECAT", "GCAT", "MCAT", "global"]

    # Batches are densified one at a time; the TF-IDF encoder reads them.
    small = train.subset(range(64))
    batches = list(data.batches(small, 16, torch.Generator().manual_seed(0), torch.device("cpu")))
    assert len(batches) == 4
    xb, yb = batches[0]
    assert xb.shape == (16, 30) and xb.dtype == torch.float32 and yb.shape == (16, 10)
    encoder, dim = mlcl.build_encoder("tfidf-linear", info)
    assert encoder(data.augment(xb, info, torch.Generator().manual_seed(0))).shape == (16, dim)
    with pytest.raises(ValueError, match="fasttext"):
        mlcl.build_encoder("fasttext", info)


def test_rcv1_test_subset_does_not_follow_the_run_seed(tmp_path):
    """The test documents kept are a fixed draw: runs with different --seed are scored on the same ones."""
    write_rcv1(str(tmp_path))
    a = data.load("rcv1", str(tmp_path), "test", seed=0, test_size=10)
    b = data.load("rcv1", str(tmp_path), "test", seed=7, test_size=10)
    assert (a.matrix != b.matrix).nnz == 0 and torch.equal(a.targets, b.targets)


# --------------------------------------------------------------------------------------------------
# skdocs: scikit-learn's own docstrings
# --------------------------------------------------------------------------------------------------


def test_docstring_documents_and_name_masking():
    doc = """Frobnicate the widgets.

    A longer account of the FooBarRegressor and what it does.

    Parameters
    ----------
    alpha : float, default=1.0
        How much to frob.

        More on alpha.

    beta : int
        Beta value.

    Attributes
    ----------
    coef_ : ndarray
        Not a parameter.
    """
    documents = data.docstring_documents(doc)
    assert len(documents) == 3
    assert documents[0].startswith("Frobnicate") and "FooBarRegressor" in documents[0]
    assert documents[1].startswith("alpha : float") and "More on alpha." in documents[1]
    assert documents[2] == "beta : int\n    Beta value."

    text = "The FooBarRegressor (a foo bar regressor) beats FooBar and foobarregressor_path; regress on."
    masked = data.mask_name(text, "FooBarRegressor")
    assert masked == ("The [MASK] (a [MASK] [MASK] [MASK]) beats [MASK] [MASK] and [MASK]_path; regress on.")
    assert data.tokenize(masked).count("[mask]") == 7


def test_skdocs_loaders():
    train, test = data.load("skdocs", split="train"), data.load("skdocs", split="test")
    info = train.info
    assert info.level_names == ["module", "estimator"] and "linear_model" in info.label_names[0]
    assert "LogisticRegression" in info.label_names[1] and info.num_classes[1] > 100
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.2, abs=0.02)
    # Every estimator has at least 4 documents, so it is in both splits; a fine id implies its module.
    assert set(train.targets[:, 1].tolist()) == set(test.targets[:, 1].tolist()) == set(range(info.num_classes[1]))
    both = torch.cat([train.targets, test.targets])
    for fine in range(info.num_classes[1]):
        assert len(both[both[:, 1] == fine, 0].unique()) == 1
    # The estimator's name is masked in its own documents.
    lr = info.label_names[1].index("LogisticRegression")
    rows = train.inputs[train.targets[:, 1] == lr]
    assert not (rows == data.hash_token("logistic")).any()
    assert (rows == data.hash_token("[mask]")).any()

    multi_train = data.load("skdocs-multilabel", split="train")
    multi_test = data.load("skdocs-multilabel", split="test")
    assert multi_train.info.multilabel and multi_train.info.label_names == [list(data.ESTIMATOR_TYPES)]
    assert (multi_train.targets.sum(1) > 0).all() and (multi_test.targets.sum(1) > 0).all()
    assert (multi_train.targets.sum(0) > 0).all()
    assert len(multi_train) < len(train) and len(multi_test) < len(test)
    train_rows = {tuple(row) for row in train.inputs.tolist()}
    assert all(tuple(row) in train_rows for row in multi_train.inputs.tolist())  # same split of the documents


# --------------------------------------------------------------------------------------------------
# The text floor and the multi-label evaluation
# --------------------------------------------------------------------------------------------------


def keyword_dataset(n, seed):
    """Multi-label synthetic text: label k is on when keyword k appears; every document has filler words."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(n, 4, generator=generator) < 0.35).float()
    texts = []
    for row in targets:
        words = synthetic_words(generator, 20, [f"filler{k}" for k in range(30)])
        words += [f"keyword{k}" for k in range(4) if row[k] > 0]
        texts.append(" ".join(words[i] for i in torch.randperm(len(words), generator=generator).tolist()))
    info = data.text_info("keywords", ["labels"], [[f"label{k}" for k in range(4)]], multilabel=True)
    return data.ResidentDataset(data.encode_texts(texts, length=32), targets, info)


def test_text_bag_counts_hashed_ngrams():
    dataset = keyword_dataset(3, seed=0)
    bag = linear_eval.text_bag(dataset, buckets=64)
    assert bag.shape == (3, 64)
    ids = data.ngram_ids(dataset.inputs, dataset.info.extra["buckets"])[0]
    ids = ids[ids > 0]
    counts = torch.zeros(64).index_add_(0, (ids - 1) % 64, torch.ones(len(ids)))
    assert torch.allclose(bag[0], F.normalize(counts.log1p(), dim=0))


def test_linear_eval_on_multilabel_text():
    """Raw-floor and learned multi-label metrics come out, the floor reads the keywords, and a jointly
    trained classifier gets its own record computed on the same features."""
    train, test = keyword_dataset(300, seed=1), keyword_dataset(100, seed=2)
    torch.manual_seed(0)
    encoder, dim = mlcl.build_encoder("fasttext", train.info)
    classifier = torch.nn.Linear(dim, 4)
    results = linear_eval.evaluate(encoder, train, test, torch.device("cpu"), classifier=classifier)
    record = results["levels"]["labels"]
    assert set(record) == {"micro_f1", "macro_f1", "map", "raw_micro_f1", "raw_macro_f1", "raw_map"}
    prevalence = test.targets.mean(0)
    assert record["raw_map"] > 0.8 > prevalence.max() + 0.3  # a score blind to the text has AP = prevalence
    assert record["raw_micro_f1"] > 0.7
    assert 0 <= record["micro_f1"] <= 1 and 0 <= record["map"] <= 1
    features = linear_eval.extract_features(encoder, test, torch.device("cpu"))
    expected = linear_eval.multilabel_metrics(classifier(features).detach(), test.targets)
    assert results["classifier"] == {"level": "labels", **expected}


# --------------------------------------------------------------------------------------------------
# The method scripts on skdocs
# --------------------------------------------------------------------------------------------------

TINY = ["--epochs", "4", "--device", "cpu"]


def run_script(*args, timeout=900):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def majority_rate(targets):
    """Top-1 of always answering the most frequent class: the chance level a classifier must beat."""
    return targets.bincount().max().item() / len(targets)


@pytest.mark.parametrize("script", ["supcon.py", "mlcl.py", "hmlc_gmm.py", "hmlc_attention.py"])
def test_method_scripts_learn_skdocs(tmp_path, script):
    out = tmp_path / "run"
    # MLCL's CE classifier over 188 estimators needs 6 epochs to clear twice the majority rate (0.024 at 4)
    run_script(script, "--dataset", "skdocs", *TINY, *(["--epochs", "6"] if script == "mlcl.py" else []),
               "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    test = data.load("skdocs", split="test")
    levels = results["levels"]
    assert levels["module"]["linear_top1"] > majority_rate(test.targets[:, 0]) + 0.15
    assert levels["estimator"]["linear_top1"] > 2.5 * majority_rate(test.targets[:, 1])
    if script == "mlcl.py":  # the CE term is on by default for text, and its classifier is evaluated
        assert json.loads((out / "config.json").read_text())["ce_weight"] is None  # not given: on for text
        assert results["classifier"]["level"] == "estimator"
        assert results["classifier"]["top1"] > 2 * majority_rate(test.targets[:, 1])
    else:
        assert "classifier" not in results


def test_mlcl_learns_skdocs_multilabel(tmp_path):
    out = tmp_path / "run"
    run_script("mlcl.py", "--dataset", "skdocs-multilabel", "--epochs", "8", "--device", "cpu", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    test = data.load("skdocs-multilabel", split="test")
    prevalence = test.targets.mean(0)
    record = results["levels"]["types"]
    # Chance: a score that ignores the text has AP = prevalence; answering "yes" to everything has
    # micro-F1 = 2p / (1 + p) with p the overall rate of positive labels.
    p = test.targets.mean().item()
    assert record["map"] > prevalence.mean().item() + 0.2
    assert record["micro_f1"] > 2 * p / (1 + p) + 0.05
    # The jointly trained classifier learns more slowly (mAP 0.43 after 8 epochs, 0.56 after the
    # preset's 20, against 0.27 by chance); its F1 is not yet above answering "yes" everywhere.
    classifier = results["classifier"]
    assert classifier["level"] == "types" and set(classifier) == {"level", "micro_f1", "macro_f1", "map"}
    assert classifier["map"] > prevalence.mean().item() + 0.1
