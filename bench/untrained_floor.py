"""Linear top-1 of a randomly initialised, untrained encoder: a floor that a trained encoder has to beat.

For images the raw-pixel probe is the usual floor. For point clouds it is not enough: PointNet's
max-pool over random per-point features already separates simple shapes well, so training only helps
if it beats this probe. The encoder is built exactly as the method file builds it for training (same
seed, same data loading before it), and probed with the same fast protocol as every run.

    python bench/untrained_floor.py --dataset shapes --seeds 0 1 2
"""

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import linear_eval  # noqa: E402
from compare import mean_std  # noqa: E402  (bench/compare.py, beside this file)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="shapes", choices=data.DATASETS)
    p.add_argument("--method", default="supcon", help="method file whose encoder is built (they share encoders)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    module = importlib.import_module(args.method)
    device = torch.device(args.device)
    scores = {}
    for seed in args.seeds:
        config = module.parse_args(["--dataset", args.dataset, "--data-dir", args.data_dir, "--seed", str(seed)])
        torch.manual_seed(seed)
        train_set = data.load(args.dataset, args.data_dir, "train", seed=seed)
        test_set = data.load(args.dataset, args.data_dir, "test", seed=seed)
        encoder = module.build_model(config, train_set.info).encoder.to(device)
        results = linear_eval.evaluate(encoder, train_set, test_set, device)
        for level, result in results["levels"].items():
            scores.setdefault(level, []).append(result["linear_top1"])
        print(f"seed {seed}: " + ", ".join(f"{level} {r['linear_top1']:.3f}" for level, r in results["levels"].items()))
    print(f"untrained {config.arch} on {args.dataset}, seeds {args.seeds}: "
          + ", ".join(f"{level} {mean_std(values)}" for level, values in scores.items()))


if __name__ == "__main__":
    main()
