"""Training throughput: images/s of forward + backward + AdamW step for a backbone on this machine.

    python benchmarks/bench_train.py [--backbone tf_efficientnet_lite0] [--size 224] [--batch 32] [--threads 2]

Synthetic input (throughput does not depend on pixel values); data loading is not included,
so this is the ceiling a full training run can reach on the same device.
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    """Parse options, time training steps, print images/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--freeze-stages", type=int, default=0, help="stem + N block stages frozen (as in the config)")
    args = ap.parse_args()

    import torch

    from dermscreen.training.config import TrainConfig
    from dermscreen.training.distributed import resolve_device
    from dermscreen.training.model import build_model

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, _ = build_model(TrainConfig(backbone=args.backbone, weights="none", freeze_stages=args.freeze_stages), 7)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 7, (args.batch,), device=device)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x)[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rate = args.steps * args.batch / dt
    print(f"{args.backbone} {args.size}px batch {args.batch} freeze_stages {args.freeze_stages} on {device} "
          f"({args.threads} threads): "
          f"{rate:.1f} images/s training (fwd+bwd+step), {dt / args.steps:.2f} s/step")


if __name__ == "__main__":
    main()
