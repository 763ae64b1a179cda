"""Embedding extraction: model + batches → ``(N, D)`` embeddings, labels and label ranks under the head.

This is headreg's one inference pass: ``headreg eval``, training's per-epoch test evaluation (and so
``headreg compare`` and its figure) all run :func:`extract_embeddings`, so a checkpoint's test accuracy is
one number whichever command reports it.

The loop is built to cost nothing beyond the backbone (``benchmarks/bench_extract.py`` checks it against a
bare timm inference loop): batches stay on the device, nothing synchronises the host per batch (no
``.item()``, no ``.cpu()``), the transform runs on the device, and the head's logits (for the rank of the
true label among them) are computed once after the loop, in large blocks, rather than per batch. Under
``torchrun`` each rank extracts its shard; :func:`gather_extraction` concatenates the shards in rank order,
which restores dataset order because evaluation loaders shard contiguously.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from headreg.data.transforms import BatchTransform
from headreg.engine.runtime import autocast, comm_device
from headreg.errors import InvalidValueError
from headreg.metrics.classification import label_rank

__all__ = [
    "TTA_MODES",
    "Extraction",
    "autocast_context",
    "extract_dataset",
    "extract_embeddings",
    "extraction_info",
    "gather_extraction",
    "resolve_precision",
]


@dataclass
class Extraction:
    """What one pass over a dataset produced (this rank's shard, or all of it after :func:`gather_extraction`).

    Attributes:
        embeddings: ``(N, D)`` float32 embeddings, not normalised, on the extraction device.
        labels: ``(N,)`` int64 class labels.
        label_rank: ``(N,)`` int64 :func:`headreg.metrics.classification.label_rank` under the head's
            margin-free logits (0 = top-1 hit; top-k accuracy is ``mean(label_rank < k)``, ties counting as
            hits), or None without a head. Kept instead of ``N x C`` logits, which do not fit memory for large
            class counts. A label outside the head's classes gets ``C``.
        indices: ``(N,)`` int64 dataset indices of the rows, or None when the loader does not say.
        seconds: Wall time of the loop, device synchronised at the end.
        images: Images processed (``N``).
        precision: ``"bf16"``, ``"fp16"`` (a training pass on a GPU without bf16) or ``"fp32"``.
        channels_last: Whether the model ran in channels_last memory format.
        tta: The test-time augmentation of the pass (:data:`TTA_MODES`).
    """

    embeddings: Tensor
    labels: Tensor
    label_rank: Tensor | None = None
    indices: Tensor | None = None
    seconds: float = 0.0
    images: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    tta: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        """Throughput of the loop in images per second (0 when nothing ran)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


#: Test-time augmentations: ``flip-sum`` adds the embedding of the horizontal mirror to the image's (as
#: insightface's verification does; the metrics then normalise the sum), ``flip-concat`` appends it (``2D`` wide).
TTA_MODES = ("none", "flip-sum", "flip-concat")

_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_precision(device: torch.device, amp: bool | None) -> tuple[bool, bool]:
    """Decide ``(use_bf16, use_channels_last)`` for a device.

    Args:
        device: The extraction device.
        amp: None: bf16 autocast and channels_last on CUDA only; True: both on any device (CPU included);
            False: neither (plain float32).
    """
    on = device.type == "cuda" if amp is None else bool(amp)
    return on, on


def autocast_context(
    device: torch.device, bf16: bool, dtype: torch.dtype = torch.bfloat16
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(device.type, dtype=dtype)`` when ``bf16`` (autocast on; bf16 unless ``dtype`` says), else a
    no-op context."""
    return autocast(device, dtype if bf16 else None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    # unit="img" + unit_scale gives "1.23kimg/s": the images/s of the loop as it runs.
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=not enabled, mininterval=0.5, leave=False)


def _head_of(model: nn.Module) -> nn.Module | None:
    head = getattr(model, "head", None)
    return head if isinstance(head, nn.Module) and getattr(model, "num_classes", 0) else None


def _embed_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    # timm's split first: HeadModel.embed is exactly this, and a timm model's `embed` may be a layer (LeNet++).
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    return model


def _split(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """Float32 embeddings, and the logits of a model that returns ``(embeddings, logits)`` (else None)."""
    return (out[0].float(), out[1]) if isinstance(out, tuple) else (out.float(), None)


def _label_ranks(head: nn.Module, embeddings: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """:func:`label_rank` of every row, logits in 64 MiB blocks; a sharded head's own ``label_rank`` (collective)."""
    if callable(getattr(head, "label_rank", None)):
        return head.label_rank(embeddings, labels)
    n, rows = embeddings.shape[0], max(1, (64 * 2**20) // (4 * max(int(num_classes), 1)))
    return torch.cat([label_rank(head(embeddings[s : s + rows]), labels[s : s + rows]) for s in range(0, n, rows)])


def extract_embeddings(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device | str,
    transform: Callable[[Tensor], Tensor] | None = None,
    amp: bool | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
    channels_last: bool | None = None,
    with_predictions: bool = True,
    tta: str = "none",
    progress: bool = True,
    desc: str = "extract",
) -> Extraction:
    """Run ``model`` over every batch of ``loader`` and collect embeddings, labels and label ranks.

    The model is moved to ``device`` and put in eval mode for the pass (its training mode is restored after; its
    weights keep the channels_last layout when that was used, which is harmless for training).

    Args:
        model: A :class:`~headreg.HeadModel` (``embed`` + ``head``), a timm model (``forward_features`` /
            ``forward_head``), or any module mapping images to ``(B, D)``, or to ``(embeddings, logits)`` (an
            exported model with its head, :class:`~headreg.engine._onnx.OnnxModel`: ranks from those logits).
        loader: Iterable of ``(images, labels)``: ``(B, C, H, W)`` uint8 or float images, ``(B,)`` int labels,
            e.g. from :func:`headreg.data.create_loader`.
        device: Where the model runs.
        transform: Applied on the device to each image batch (e.g. :func:`headreg.data.resolve_transform`);
            None passes batches as they come.
        amp: See :func:`resolve_precision`.
        amp_dtype: The autocast dtype when ``amp`` is on: bf16, or float16 for training's evaluation on a device
            that trains in float16 (a GPU without bf16, MPS).
        channels_last: Override the memory format :func:`resolve_precision` picks (None: follow ``amp``).
        with_predictions: Keep the rank of each sample's label under the head's logits when the model has a head
            (never with a test-time augmentation: the head scores single views).
        tta: One of :data:`TTA_MODES`; the mirror is taken of the transformed batch, on the device, in the same
            pass.
        progress: Show a tqdm bar with images/s on stderr.
        desc: Label of the bar.

    Returns:
        An :class:`Extraction` of this process's batches.

    Raises:
        InvalidValueError: the loader yielded no batch, or an unknown ``tta``.
    """
    from headreg._checks import check_choice

    tta = check_choice(tta, TTA_MODES, "tta")
    device = torch.device(device)
    low_precision, auto_cl = resolve_precision(device, amp)
    channels_last = auto_cl if channels_last is None else bool(channels_last)
    was_training = model.training
    model.eval()
    model.to(device, memory_format=torch.channels_last) if channels_last else model.to(device)
    if transform is not None and isinstance(transform, nn.Module):
        transform = transform.to(device).eval()
    embed = _embed_fn(model)
    head = _head_of(model) if with_predictions and tta == "none" else None
    direct_layout = channels_last and isinstance(transform, BatchTransform)
    total = getattr(loader, "num_samples", None)
    embs: list[Tensor] = []
    labs: list[Tensor] = []
    batch_ranks: list[Tensor] = []  # from the logits of a model that returns them (an exported one with its head)
    ranks: Tensor | None = None
    embeddings: Tensor | None = None
    all_labels: Tensor | None = None
    n = 0
    non_blocking = device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bar = _progress(total, desc, progress)
    _synchronize(device)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            # One autocast region around the whole loop, not one per batch: leaving the outermost
            # region clears autocast's cache of low-precision weight copies, so a per-batch region would
            # cast every weight again for every batch (docs/benchmarks.md measures it).
            with autocast_context(device, low_precision, amp_dtype):
                for images, labels in loader:
                    x = images.to(device, non_blocking=non_blocking)
                    y = torch.as_tensor(labels).to(device, non_blocking=non_blocking)
                    if transform is not None:
                        # In float32 (a nested region keeps the cache). headreg's transform writes its
                        # result straight into channels_last, which saves a copy of the float batch.
                        with torch.autocast(device.type, enabled=False):
                            x = transform(x, memory_format=torch.channels_last) if direct_layout else transform(x)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)  # a no-op when already so
                    emb, logits = _split(embed(x))
                    if logits is not None and with_predictions and tta == "none":
                        batch_ranks.append(label_rank(logits.float(), y))
                    if tta != "none":
                        mirror = _split(embed(x.flip(-1).contiguous(memory_format=fmt)))[0]
                        emb = emb + mirror if tta == "flip-sum" else torch.cat([emb, mirror], 1)
                    embs.append(emb)
                    labs.append(y)
                    b = int(x.shape[0])
                    n += b
                    bar.update(b)
            if embs:
                embeddings, all_labels = torch.cat(embs), torch.cat(labs).long()
                del embs[:], labs[:]
            if head is not None and embeddings is not None:
                # Margin-free logits (no labels): the class ranking a classifier would report. Once,
                # after the loop, in blocks of up to 64 MiB of logits: the head's weight is read and
                # normalised once per block instead of once per batch. The head computes in float32
                # whatever the autocast state, so this equals doing it batch by batch.
                ranks = _label_ranks(head, embeddings, all_labels, getattr(model, "num_classes", 1))
            elif batch_ranks:
                ranks = torch.cat(batch_ranks)
        _synchronize(device)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    if embeddings is None or all_labels is None:
        raise InvalidValueError(f"the loader yielded no batch: nothing to extract ({desc})")
    indices = None
    sample_indices = getattr(loader, "sample_indices", None)
    if callable(sample_indices):
        indices = sample_indices()[:n].to(device)
    return Extraction(
        embeddings=embeddings,
        labels=all_labels,
        label_rank=ranks,
        indices=indices,
        seconds=seconds,
        images=n,
        precision=_PRECISION.get(amp_dtype, str(amp_dtype)) if low_precision else "fp32",
        channels_last=channels_last,
        tta=tta,
    )


def extract_dataset(
    model: nn.Module,
    dataset: Any,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    workers: int | None = None,
    limit: int | None = None,
    input_size: int | tuple[int, ...] | None = None,
    amp: bool | None = None,
    distributed: bool | None = None,
    tta: str = "none",
    progress: bool = True,
    desc: str = "extract",
) -> Extraction:
    """Resolve the backbone's transform, build a sharded loader, and extract ``dataset``.

    Args:
        model: As :func:`extract_embeddings`; its data config comes from ``timm.data.resolve_data_config``.
        dataset: From :func:`headreg.data.create_dataset`.
        device: Where the model runs; in-memory datasets are held there too (no host copy per batch).
        batch_size: Images per batch (per process).
        workers: DataLoader workers for file-backed datasets; None: ``min(8, CPUs)``.
        limit: Use a seeded subset of this many samples (the same subset on every rank).
        input_size: ``H``, ``(H, W)`` or ``(C, H, W)`` overriding the image size.
        amp: See :func:`resolve_precision`.
        distributed: None: shard across ranks when a process group is up; False: read everything.
        tta: See :func:`extract_embeddings`.
        progress: Show a progress bar.
        desc: Label of the bar.

    Returns:
        This rank's :class:`Extraction` (call :func:`gather_extraction` for the whole set).
    """
    from timm.data import resolve_data_config

    from headreg.data import TensorImageDataset, create_loader, resolve_transform
    from headreg.data.loader import default_workers
    from headreg.data.transforms import face_data_config
    from headreg.engine.runtime import dist_info

    device = torch.device(device)
    info = dist_info()
    pool = len(dataset) if limit is None else min(limit, len(dataset))
    if info.is_distributed and distributed is not False and pool < info.world_size:
        # Decided alike on every rank, so all of them stop here instead of one waiting in a collective.
        raise InvalidValueError(
            f"{pool} sample(s) cannot be shared among {info.world_size} processes (each needs at least one); "
            "use more samples (--limit) or fewer processes"
        )
    if workers is None:
        workers = default_workers()
    config = resolve_data_config(model=model)
    if getattr(dataset, "faces", False):  # face pairs, IJB: 112 px and mean/std 0.5 unless the backbone says
        config = face_data_config(config, getattr(model, "pretrained_cfg", None))
    transform = resolve_transform(config, dataset, train=False, input_size=input_size)
    in_memory = isinstance(dataset, TensorImageDataset)
    loader = create_loader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=0 if in_memory else workers,
        distributed=distributed,
        limit=limit,
        device=device if in_memory else None,
    )
    return extract_embeddings(
        model, loader, device=device, transform=transform, amp=amp, tta=tta, progress=progress, desc=desc
    )


def extraction_info(parts: Sequence[Extraction], device: torch.device | str, world_size: int) -> dict[str, Any]:
    """The ``info`` fields of an evaluation that describe its extraction passes (one per split)."""
    seconds = sum(p.seconds for p in parts)
    images = sum(p.images for p in parts)
    return {
        "device": str(device),
        "precision": parts[0].precision,
        "channels_last": parts[0].channels_last,
        "world_size": world_size,
        "extract_seconds": round(seconds, 4),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else None,
    }


def gather_extraction(part: Extraction) -> Extraction:
    """Concatenate every rank's :class:`Extraction` in rank order; the input itself in a single process.

    Every rank receives the whole result. Seconds are the slowest rank's, images the sum.
    """
    from headreg.engine.runtime import all_gather_variable, dist_info

    if not dist_info().is_distributed:
        return part
    import torch.distributed as dist

    comm = comm_device()

    def gather(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return all_gather_variable(t.to(comm)).to(part.embeddings.device)

    seconds = torch.tensor([part.seconds], dtype=torch.float64, device=comm)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    embeddings = gather(part.embeddings)
    assert embeddings is not None
    return replace(
        part,
        embeddings=embeddings,
        labels=gather(part.labels),  # type: ignore[arg-type]
        label_rank=gather(part.label_rank),
        indices=gather(part.indices),
        seconds=float(seconds.item()),
        images=int(embeddings.shape[0]),
    )


def iter_batches(tensors: Tensor, labels: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` slices of in-memory tensors (for benchmarks and tests)."""
    for start in range(0, tensors.shape[0], batch_size):
        yield tensors[start : start + batch_size], labels[start : start + batch_size]
