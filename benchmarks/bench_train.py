"""headreg's training loop against a bare PyTorch loop: same model, data, head (nn.Linear + cross-entropy), steps.

    python benchmarks/bench_train.py [--steps 60] [--warmup 10] [--repeats 3] [--batch-size 128]
                                      [--model lenetpp_bn] [--widths 16,32,64] [--dataset mnist] [--device cpu]

The headreg side is ``headreg.engine.train.train`` itself (progress bar, schedule, running tallies,
training accuracy, stop checks), timed from inside by its ``on_step`` hook between step ``warmup``
and step ``steps``, so set-up, evaluation and checkpointing are left out. The bare side is the loop
anyone would write: a random permutation, ``index_select`` on the uint8 tensor, uint8 → float and
normalise, forward, ``F.cross_entropy``, backward, ``SGD.step``. The two alternate, ``repeats``
times each, in one process, and the median time per step of each is compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def headreg_loop(args: argparse.Namespace, widths: list[int]) -> float:
    """Seconds per step of headreg's loop over steps ``warmup..steps``."""
    from headreg.engine.train import TrainConfig, train

    stamps: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in (args.warmup, args.steps):
            stamps[step] = time.perf_counter()

    config = TrainConfig(
        model=args.model,
        head="softmax",
        dataset=args.dataset,
        embedding_dim=args.embedding_dim,
        model_options={"widths": widths},
        epochs=1,
        batch_size=args.batch_size,
        optimizer="sgd",
        lr=0.01,
        weight_decay=0.0,
        augment=False,
        device=args.device,
        limit=(args.steps + 1) * args.batch_size,
        test_limit=args.batch_size,
        amp=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        train(config, f"{tmp}/run", stop_after_steps=args.steps, on_step=on_step, progress=True)
    return (stamps[args.steps] - stamps[args.warmup]) / (args.steps - args.warmup)


def bare_loop(args: argparse.Namespace, widths: list[int], images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds per step of a plain PyTorch loop over the same model and data."""
    import headreg

    device = torch.device(args.device)
    torch.manual_seed(0)
    # The same backbone, without a headreg head: nn.Linear + cross-entropy written out by hand.
    model = headreg.create_model(args.model, None, embedding_dim=args.embedding_dim, widths=widths).to(device).train()
    fc = torch.nn.Linear(args.embedding_dim, 10).to(device)
    opt = torch.optim.SGD([*model.parameters(), *fc.parameters()], lr=0.01, momentum=0.9)
    mean, std = 0.1307, 0.3081
    images, labels = images.to(device), labels.to(device)
    order = torch.randperm(images.shape[0], device=device)
    t0 = 0.0
    for step in range(1, args.steps + 1):
        idx = order[(step - 1) * args.batch_size : step * args.batch_size]
        x = (images.index_select(0, idx).float().div_(255) - mean) / std
        y = labels.index_select(0, idx)
        loss = F.cross_entropy(fc(model(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == args.warmup:
            t0 = time.perf_counter()
    float(loss)  # wait for the device
    return (time.perf_counter() - t0) / (args.steps - args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="lenetpp_bn")
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--embedding-dim", type=int, default=2)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    widths = [int(w) for w in args.widths.split(",")]

    from headreg.data import create_dataset

    ds = create_dataset(args.dataset, "train")
    n = (args.steps + 1) * args.batch_size
    images, labels = ds.images[:n], ds.targets[:n]

    times: dict[str, list[float]] = {"headreg": [], "bare": []}
    for r in range(args.repeats):
        times["headreg"].append(headreg_loop(args, widths))
        times["bare"].append(bare_loop(args, widths, images, labels))
        print(f"repeat {r + 1}: headreg {1e3 * times['headreg'][-1]:.1f} ms/step, bare {1e3 * times['bare'][-1]:.1f}")
    h, b = statistics.median(times["headreg"]), statistics.median(times["bare"])
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, model {args.model} "
        f"widths {widths}, batch {args.batch_size}, steps {args.warmup}..{args.steps}, {args.repeats} repeats"
    )
    print("| loop | median ms/step | images/s | all repeats (ms/step) |")
    print("|---|---:|---:|---|")
    for name, t in (("bare PyTorch", b), ("headreg train", h)):
        reps = ", ".join(f"{1e3 * x:.1f}" for x in times["headreg" if name.startswith("headreg") else "bare"])
        print(f"| {name} | {1e3 * t:.1f} | {args.batch_size / t:.0f} | {reps} |")
    print(f"\nheadreg overhead: {100 * (h - b) / b:+.1f}% of the bare loop's step time")


if __name__ == "__main__":
    main()
