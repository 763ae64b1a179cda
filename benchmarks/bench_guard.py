"""The cost of the per-step non-finite guard and of gradient clipping on one training step.

    python benchmarks/bench_guard.py [--model lenetpp_bn] [--batch-size 128] [--image-size 28] [--channels 1]
                                     [--steps 150] [--warmup 10] [--device cpu]

One model, one batch of random images, SGD; a step is forward, backward and the optimiser step, timed
whole (``torch.cuda.synchronize`` around it on a GPU). Three settings alternate **step by step** in one
process, so each sees the same load on a shared machine, ``steps`` timed steps each:

- ``off``: ``optimizer.step()`` alone, what the loop does with ``--max-bad-steps 0``;
- ``guard``: headreg's :class:`~headreg.engine._guard.StepGuard` (``begin``: the buffer snapshot; ``observe``:
  the forward's finiteness flags; ``step``: the fused gradient norm, the verdict's one host synchronisation,
  the optimiser step), what the loop does by default;
- ``guard+clip``: the same with ``clip_grad_norm=1`` (clipping reuses the guard's norm).

The median ms/step of each and its difference from ``off`` are printed as a Markdown table, then the
guard's own calls timed alone (``begin``, ``observe`` and ``step`` with an optimiser whose step does
nothing, on the gradients of the last step), the absolute cost that the step times above bury in their
spread on a loaded machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenetpp_bn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--embedding-dim", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import headreg
    from headreg.engine._guard import StepGuard

    dev = torch.device(args.device)
    options = {"widths": [16, 32, 64]} if args.model.startswith("lenetpp") else {}
    model = headreg.create_model(
        args.model, head="arcface", num_classes=args.classes, embedding_dim=args.embedding_dim,
        in_chans=args.channels, **options,
    ).to(dev).train()  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, args.classes, (args.batch_size,), device=dev)
    guards = {
        "off": None,
        "guard": StepGuard(model, max_bad_steps=10),
        "guard+clip": StepGuard(model, max_bad_steps=10, clip_grad_norm=1.0),
    }

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(guard: StepGuard | None, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if guard is not None:
            guard.begin()
        out = model(x, y)
        out.loss.backward()
        if guard is not None:
            guard.observe(x, out)
            assert guard.step(opt, None, n)
        else:
            opt.step()
        sync()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {m: [] for m in guards}
    for n in range(args.warmup + args.steps):
        for mode, guard in guards.items():
            t = step(guard, n + 1)
            if n >= args.warmup:
                times[mode].append(t)
    own = _own_cost(model, x, y, sync, args.warmup + args.steps)
    where = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch_size}, {args.image_size} px, torch {torch.__version__}, {where}")
    base = statistics.median(times["off"])
    print("| setting | median ms/step | vs off | quartiles (ms/step) |\n|---|---:|---:|---|")
    for mode, ts in times.items():
        q1, med, q3 = statistics.quantiles(ts, n=4)
        print(f"| {mode} | {med * 1e3:.2f} | {100 * (med / base - 1):+.1f} % | {q1 * 1e3:.2f} – {q3 * 1e3:.2f} |")
    params, buffers = sum(1 for _ in model.parameters()), sum(1 for _ in model.buffers())
    q1, med, q3 = statistics.quantiles(own, n=4)
    print(
        f"\nthe guard's own calls ({params} parameters, {buffers} buffers): median {med * 1e6:.0f} µs per step "
        f"(quartiles {q1 * 1e6:.0f} – {q3 * 1e6:.0f}), {100 * med / base:.1f} % of the median step without it"
    )


class _NoStep:
    """An optimiser whose step does nothing: what is left to time is the guard itself."""

    def step(self) -> None:
        pass


def _own_cost(model, x, y, sync, n: int) -> list[float]:
    from headreg.engine._guard import StepGuard

    guard = StepGuard(model, max_bad_steps=10)
    out = model(x, y)
    out.loss.backward()
    times = []
    for i in range(n):
        sync()
        t0 = time.perf_counter()
        guard.begin()
        guard.observe(x, out)
        guard.step(_NoStep(), None, i + 1)
        sync()
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    main()
