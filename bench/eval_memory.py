"""Peak host memory of the end-of-run evaluation's largest parts, at the real datasets' sizes.

Each case runs in a fresh process and prints its peak resident memory (ru_maxrss) against the process's
resident memory just before the case starts, so the figure is what the case adds. The inputs are
synthetic, at the real shapes: MNIST-format idx files of 60,000 random digits composed into hmnist at
192 px (the raw-pixel floor: every canvas composed, area-pooled to 32 px, a chunk at a time), and a sparse
matrix of rcv1's training shape (23,149 x 47,236; about 76 non-zeros a row) folded into the text floor's
4,096 buckets. Their result tensors alone are 60,000 x 1,024 and 23,149 x 4,096 float32: 0.25 and 0.38 GB.

    python bench/eval_memory.py            # both cases
    python bench/eval_memory.py hmnist     # one
"""

import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import data  # noqa: E402
import linear_eval  # noqa: E402


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def hmnist_floor():
    from test_data import write_idx

    with tempfile.TemporaryDirectory() as root:
        raw = os.path.join(root, "MNIST", "raw")
        os.makedirs(raw)
        rng = np.random.default_rng(0)
        write_idx(os.path.join(raw, "train-images-idx3-ubyte"), rng.integers(0, 256, (60_000, 28, 28)))
        write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), np.arange(60_000) % 10)
        dataset = data.load("hmnist", root, "train", image_size=192)
        before = peak_gib()
        floor = linear_eval.raw_inputs(dataset)
        return before, floor.shape


def rcv1_floor():
    import scipy.sparse

    rows, columns, per_row = 23_149, 47_236, 76
    rng = np.random.default_rng(0)
    indices = rng.integers(0, columns, rows * per_row)
    matrix = scipy.sparse.csr_matrix((rng.random(rows * per_row, dtype=np.float32),
                                      (np.repeat(np.arange(rows), per_row), indices)), shape=(rows, columns))
    info = data.text_info("rcv1", ["topic"], [["t"]], multilabel=True, input="tfidf", input_dim=columns)
    dataset = data.TfidfDataset(matrix, torch.zeros(rows, 1), info)
    before = peak_gib()
    floor = linear_eval.text_bag(dataset)
    return before, floor.shape


CASES = {"hmnist": hmnist_floor, "rcv1": rcv1_floor}

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    if len(names) > 1:
        for name in names:
            subprocess.run([sys.executable, __file__, name], check=True)
    else:
        started = time.perf_counter()
        before, shape = CASES[names[0]]()
        print(f"{names[0]} raw floor {tuple(shape)}: peak {peak_gib():.2f} GiB resident, {before:.2f} GiB before "
              f"it ({time.perf_counter() - started:.0f} s with the set-up)")
