"""Embedding extraction (headreg.engine.extract) beside a bare timm inference loop, in one run.

Both loops run the very same timm module on the same images:

  bare     ``timm_model(x)`` over batches that are already transformed, on the device, in the memory format of the
           mode: the floor, nothing but the backbone
  headreg  ``extract_embeddings``: uint8 batches from ``create_loader`` → on-device transform → backbone →
           head logits → label rank, embeddings and labels kept on the device, tqdm bar (disabled here)

Modes: ``fp32`` (contiguous), ``channels_last`` (fp32), ``bf16_cl`` (bf16 autocast + channels_last). Each repeat
times every (mode, loop) pair in alternating order after one warm-up batch, so machine noise hits both loops
alike. Noise from other jobs only ever slows a pass down, so the table reports the best pass of each loop and
their ratio headreg / bare (the target is >= 0.95), beside the median of the per-repeat ratios.

    python benchmarks/bench_extract.py --model resnet18 --image-size 112 --batch-size 32 --batches 6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

MODES = {"fp32": (False, False), "channels_last": (False, True), "bf16_cl": (True, True)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--head", default="arcface")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6, help="batches per timed pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import timm.data

    import headreg
    from headreg.data import create_loader, resolve_transform
    from headreg.data._fake import create_fake
    from headreg.engine.extract import autocast_context, extract_embeddings
    from headreg.engine.runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = headreg.create_model(args.model, head=args.head, num_classes=args.num_classes).eval()
    bare = model.backbone.module  # the same timm module, weights and all
    n = args.batch_size * args.batches
    data = create_fake(
        "test", num_classes=args.num_classes, num_samples=n, image_size=args.image_size, channels=3, seed=0
    )
    transform = resolve_transform(timm.data.resolve_data_config(model=model), data, train=False).to(device)
    loader = create_loader(data, batch_size=args.batch_size, shuffle=False, device=device)
    with torch.inference_mode():
        floor_batches = [transform(x) for x, _ in loader]

    def run_bare(bf16: bool, cl: bool) -> float:
        fmt = torch.channels_last if cl else torch.contiguous_format
        bare.to(device, memory_format=fmt)
        xs = [x.contiguous(memory_format=fmt) for x in floor_batches]
        with torch.inference_mode(), autocast_context(device, bf16):
            bare(xs[0])  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for x in xs:
                bare(x)
            _sync(device)
        return n / (time.perf_counter() - t0)

    def run_headreg(bf16: bool, cl: bool) -> float:
        if not cl:
            model.to(memory_format=torch.contiguous_format)
        warm = [next(iter(loader))]
        extract_embeddings(model, warm, device=device, transform=transform, amp=bf16, channels_last=cl, progress=False)
        out = extract_embeddings(
            model, loader, device=device, transform=transform, amp=bf16, channels_last=cl, progress=False
        )
        return out.images_per_second

    rates: dict[tuple[str, str], list[float]] = {(m, k): [] for m in modes for k in ("bare", "headreg")}
    for r in range(args.repeats):
        for m in modes:
            bf16, cl = MODES[m]
            order = ("bare", "headreg") if r % 2 == 0 else ("headreg", "bare")
            for kind in order:
                rate = run_bare(bf16, cl) if kind == "bare" else run_headreg(bf16, cl)
                rates[(m, kind)].append(rate)
                print(f"repeat {r} {m:14s} {kind:8s} {rate:9.1f} img/s", file=sys.stderr)

    print(f"\n`python benchmarks/bench_extract.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print(
        f"{args.model} + {args.head} head ({args.num_classes} classes), {args.image_size} px, batch {args.batch_size}"
        f" x {args.batches}, {args.repeats} alternating repeats; device {device}"
        f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
        f" torch {torch.__version__}\n"
    )
    print("| mode | bare timm, best (img/s) | headreg extract, best (img/s) | ratio of best | median paired ratio |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        b, h = rates[(m, "bare")], rates[(m, "headreg")]
        paired = statistics.median(x / y for x, y in zip(h, b, strict=True))
        print(f"| {m} | {max(b):.1f} | {max(h):.1f} | {max(h) / max(b):.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
