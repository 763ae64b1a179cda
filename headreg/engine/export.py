"""``headreg export``: a model's embedding network (backbone and neck) as ONNX, a ``torch.export`` program or
TorchScript, with its metadata inside and beside it, verified against PyTorch before it is kept.

The exported graph takes ``(B, C, H, W)`` float images, already normalised with the recorded mean and std
(the transform stays outside, as in timm), with a dynamic batch axis and a fixed ``H x W``; it returns the
``(B, D)`` embeddings (L2-normalised with ``normalize``), and with ``with_head`` also the head's margin-free
``(B, C)`` logits (what ``model(images)`` returns at inference). The training head's margin never enters.

The file is written under a temporary name, run back (onnxruntime for ONNX; :mod:`._export_formats`) on a
batch of another size than the one it was traced with, and compared with the PyTorch model row by row; only
a file whose every output row has cosine >= :data:`MIN_COSINE` takes the real name, so a failed export leaves
nothing that looks valid. A sidecar ``FILE.json`` repeats the metadata with the file's SHA-256 and the
verification's figures.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headreg._atomic import atomic_output, atomic_write_text
from headreg._version import __version__
from headreg.data.transforms import BatchTransform
from headreg.engine._export_formats import read_exported, write_exported
from headreg.engine._onnx import EXPORT_FORMAT
from headreg.errors import ExportError, InvalidValueError

__all__ = ["EXPORT_FORMATS", "DEFAULT_OPSET", "MIN_COSINE", "ExportModule", "ExportResult", "export_model"]

#: The formats :func:`export_model` writes.
EXPORT_FORMATS = ("onnx", "exported-program", "torchscript")
#: The ONNX opset written by default: torch 2.14's exporter's own, so no version conversion runs.
DEFAULT_OPSET = 20
#: The smallest cosine between an exported output row and PyTorch's that passes the verification.
MIN_COSINE = 0.99999
_INPUT = "images"


class ExportModule(nn.Module):
    """What is exported: images → embeddings (optionally L2-normalised), and the margin-free logits with the head.

    Args:
        model: a :class:`~headreg.HeadModel` (``embed`` and ``head``).
        with_head: also return the head's inference logits, computed from the embeddings before normalising.
        normalize: L2-normalise the embedding output (``F.normalize``, eps 1e-12).
    """

    def __init__(self, model: nn.Module, *, with_head: bool = False, normalize: bool = False) -> None:
        super().__init__()
        self.model = model
        self.with_head = with_head
        self.normalize = normalize

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        emb = self.model.embed(images)
        out = F.normalize(emb, dim=1) if self.normalize else emb
        if self.with_head:
            return out, self.model.head(emb)
        return out


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and measured.

    Attributes:
        path: the exported file.
        sidecar: the JSON file beside it (``path`` + ``.json``).
        metadata: what the file carries (:data:`headreg.engine._onnx.EXPORT_META`).
        min_cosine: per output, the smallest row cosine between the exported model and PyTorch.
        max_abs_diff: per output, the largest absolute difference.
        seconds: wall time of the export and its verification.
    """

    path: Path
    sidecar: Path
    metadata: dict[str, Any]
    min_cosine: dict[str, float] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def export_input_size(model: nn.Module, input_size: int | tuple[int, ...] | None = None) -> tuple[int, int, int]:
    """The ``(C, H, W)`` an export is traced at: ``input_size`` (H, (H, W) or (C, H, W)), else the size the
    backbone is fixed to (a ViT built with ``img_size``), else its data config's ``input_size``."""
    cfg_size = tuple(int(v) for v in model.pretrained_cfg.get("input_size", (3, 224, 224)))
    chans, hw = cfg_size[0], cfg_size[1:]
    fixed = getattr(getattr(getattr(model, "backbone", None), "module", None), "patch_embed", None)
    if getattr(fixed, "img_size", None) is not None:
        hw = tuple(int(v) for v in fixed.img_size)
    if input_size is not None:
        size = (input_size,) if isinstance(input_size, int) else tuple(input_size)
        if len(size) not in (1, 2, 3) or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
            raise InvalidValueError(f"input_size must be H, (H, W) or (C, H, W) positive integers, got {input_size!r}")
        if len(size) == 3 and size[0] != chans:
            raise InvalidValueError(f"input_size has {size[0]} channels, but the model takes {chans}")
        hw = (size[0], size[0]) if len(size) == 1 else size[-2:]
    return chans, int(hw[0]), int(hw[1])


def export_metadata(
    model: nn.Module, fmt: str, input_size: tuple[int, int, int], *, with_head: bool, normalize: bool, opset: int
) -> dict[str, Any]:
    """The metadata an exported file carries: input, normalisation, outputs, model and versions."""
    cfg = model.pretrained_cfg
    stats = BatchTransform(cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225)),
                           in_chans=input_size[0])  # fmt: skip
    config = getattr(model, "config", {}) or {}
    extra = {k: cfg[k] for k in ("interpolation", "crop_pct", "crop_mode") if isinstance(cfg.get(k), (str, float))}
    return {
        "format_version": EXPORT_FORMAT,
        "format": fmt,
        "input_name": _INPUT,
        "outputs": ["embeddings", "logits"] if with_head else ["embeddings"],
        "input_size": list(input_size),
        "in_chans": input_size[0],
        # fitted to the channels as the transform does (RGB statistics → luma for 1 channel); float32's digits
        "mean": [round(float(v), 6) for v in stats.mean.flatten()],
        "std": [round(float(v), 6) for v in stats.std.flatten()],
        **extra,
        "embedding_dim": int(model.num_features),
        "normalized": bool(normalize),
        "backbone": config.get("backbone"),
        "head": config.get("head") if with_head else None,
        "num_classes": int(model.num_classes) if with_head else 0,
        "opset": opset if fmt == "onnx" else None,
        "headreg_version": __version__,
        "torch_version": torch.__version__,
    }


def compare_outputs(
    reference: tuple[Tensor, ...], exported: tuple[Tensor, ...], names: list[str], *, min_cosine: float = MIN_COSINE
) -> tuple[dict[str, float], dict[str, float]]:
    """Per output, the smallest row cosine and the largest absolute difference between exported and PyTorch.

    Raises:
        ExportError: a shape differs, a value is not finite, or a row's cosine is below ``min_cosine``,
            saying which output, which row and by how much.
    """
    if len(exported) != len(reference):
        raise ExportError(f"the exported model returns {len(exported)} output(s), PyTorch {len(reference)}")
    cosines, diffs = {}, {}
    for name, ref, out in zip(names, reference, exported, strict=True):
        ref, out = ref.detach().double().cpu(), out.detach().double().cpu()
        if out.shape != ref.shape:
            raise ExportError(f"exported {name} have shape {tuple(out.shape)}, PyTorch's {tuple(ref.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise ExportError(f"the exported model's {name} hold NaN or infinite values where PyTorch's do not")
        cos = F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=1, eps=1e-30)
        worst = int(cos.argmin())
        cosines[name], diffs[name] = float(cos[worst]), float((out - ref).abs().max())
        if cosines[name] < min_cosine:
            raise ExportError(
                f"the exported model does not match PyTorch: {name} row {worst} has cosine {cosines[name]:.7f} "
                f"with PyTorch's, below the required {min_cosine} by {min_cosine - cosines[name]:.2e} (largest "
                f"absolute difference {diffs[name]:.3g}); the file was not kept"
            )
    return cosines, diffs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "onnx",
    with_head: bool = False,
    normalize: bool = False,
    input_size: int | tuple[int, ...] | None = None,
    opset: int = DEFAULT_OPSET,
    verify_batch: int = 3,
    min_cosine: float = MIN_COSINE,
) -> ExportResult:
    """Export ``model``'s embedding network to ``path``, verified, with a sidecar ``path.json``.

    Args:
        model: a :class:`~headreg.HeadModel` (from :func:`headreg.load_model` or :func:`headreg.create_model`);
            it is exported in float32 on the CPU, in eval mode (its mode is restored after).
        path: the file to write (``.onnx``, ``.pt2``, ``.pt`` by convention; any name is taken).
        format: one of :data:`EXPORT_FORMATS`.
        with_head: add the head's margin-free logits as a second output ``logits``.
        normalize: L2-normalise the ``embeddings`` output.
        input_size: ``H``, ``(H, W)`` or ``(C, H, W)`` the graph takes; None: see :func:`export_input_size`.
        opset: ONNX opset (>= 17).
        verify_batch: images in the verification batch (traced with 2, so 3 also checks the dynamic batch).
        min_cosine: the smallest row cosine the verification accepts.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ExportError: the exporter failed, or the file does not match PyTorch (then ``path`` is left as it was).
        MissingExtraError: ONNX without ``pip install 'headreg[export]'``.
        InvalidValueError: a bad format, opset, input size, or ``with_head`` on a model without a head.
    """
    from headreg._checks import check_choice

    start = time.perf_counter()
    fmt = check_choice(format, EXPORT_FORMATS, "format")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise InvalidValueError(f"opset must be an integer >= 17, got {opset!r}")
    if with_head and getattr(model, "head", None) is None:
        raise InvalidValueError("with_head needs a model with a head; this one has none (export it without)")
    path = Path(path)
    if fmt == "exported-program" and path.suffix != ".pt2":
        raise InvalidValueError(f"an exported program is a .pt2 archive (torch.export.load reads no other), got {path}")
    size = export_input_size(model, input_size)
    was_training = model.training
    model.to("cpu", torch.float32).eval()
    module = ExportModule(model, with_head=with_head, normalize=normalize).eval()
    metadata = export_metadata(model, fmt, size, with_head=with_head, normalize=normalize, opset=opset)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, *size, generator=gen)
    sample = torch.randn(verify_batch, *size, generator=gen)
    try:
        with torch.no_grad():
            reference = module(sample)
        reference = reference if isinstance(reference, tuple) else (reference,)
        if with_head and not isinstance(reference[1], Tensor):
            raise InvalidValueError("with_head: this model's head returns no logits (it has no class weights)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:  # verified under the temporary name; any failure removes it
            write_exported(fmt, module, example, tmp, metadata, metadata["outputs"])
            run, stored = read_exported(fmt, tmp)
            if stored != metadata:
                raise ExportError(f"the metadata read back from {path} differs from what was written")
            cosines, diffs = compare_outputs(reference, run(sample), metadata["outputs"], min_cosine=min_cosine)
    finally:
        model.train(was_training)
    sidecar = path.with_name(path.name + ".json")
    seconds = time.perf_counter() - start
    verification = {"batch": verify_batch, "min_cosine": cosines, "max_abs_diff": diffs, "threshold": min_cosine}
    record = {**metadata, "file": path.name, "sha256": _sha256(path), "verification": verification}
    atomic_write_text(sidecar, json.dumps(record, indent=2) + "\n")
    return ExportResult(path, sidecar, metadata, cosines, diffs, seconds)
