"""How hard does each MLCL head pull on the shared encoder? Gradient norms per head and temperature.

For one augmented hdigits batch, the gradient of each head's loss with respect to the shared encoder
output h = f(x) is measured for several coarse-head temperatures, beside SupCon's gradient (the
finest-label loss at t = 0.1 through its own head). With a trained checkpoint the heads are the
trained ones; without, both models are freshly initialised (the state the first steps see).

    python bench/head_gradients.py [--checkpoint runs/hdigits-mlcl-0-.../checkpoint.pt]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import mlcl  # noqa: E402


def head_gradient(model, h, head, positives, temperature):
    """||dL_head/dh|| (per sample, averaged) for one head, and the gradient itself."""
    h = h.detach().requires_grad_(True)
    views, batch = 2, len(positives)
    z = F.normalize(model.heads[head](h), dim=-1).view(views, batch, -1).transpose(0, 1)
    loss = mlcl.mlcl_loss(z[None], positives[None], [temperature])
    (grad,) = torch.autograd.grad(loss, h)
    return grad.norm(dim=1).mean().item(), grad.flatten(), loss.item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    train_set = data.load("hdigits", split="train")
    info = train_set.info
    config = mlcl.parse_args([])
    model = mlcl.build_model(config, info)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["model"])
    model.train()
    generator = torch.Generator().manual_seed(0)
    x, y = next(data.batches(data.to_device(train_set, "cpu"), args.batch_size, generator, torch.device("cpu")))
    with torch.no_grad():
        h = model.encoder(data.two_views(x, info, generator).flatten(0, 1))
    masks = mlcl.hierarchical_masks(y)
    print(f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'fresh initialisation'}; batch {args.batch_size}")
    fine_norm, fine_grad, fine_loss = head_gradient(model, h, 1, masks[1], 0.1)
    print(f"fine head  (class,    t=0.1): loss {fine_loss:.3f}, |dL/dh| {fine_norm:.2e}  (= SupCon's gradient)")
    for temperature in (0.1, 0.2, 0.5, 1.0):
        norm, grad, loss = head_gradient(model, h, 0, masks[0], temperature)
        cosine = F.cosine_similarity(grad, fine_grad, dim=0).item()
        print(f"coarse head (category, t={temperature}): loss {loss:.3f}, |dL/dh| {norm:.2e} "
              f"= {norm / fine_norm:.2f} x fine; cosine with the fine gradient {cosine:+.2f}")


if __name__ == "__main__":
    main()
