"""Exported models read back: the ``export`` extra, the metadata an export carries, and an ONNX file as a module.

:class:`OnnxModel` wraps an onnxruntime session as an ``nn.Module`` that the one inference pass
(:func:`~headreg.engine.extract.extract_embeddings`) runs like any backbone: it has the data config the
transform is resolved from (``pretrained_cfg``, from the file's metadata), and its forward maps a batch of
normalised images to the embeddings, or to ``(embeddings, logits)`` for a model exported with its head.
``headreg export`` verifies an ONNX file through the same class, so what is checked is what ``headreg eval
--onnx`` runs.

The metadata (:data:`EXPORT_META`) is read from the file itself (ONNX ``metadata_props``, each value JSON
text; the ``headreg.json`` extra file of the other formats) and validated before anything is built from it.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from headreg._schema import Field, at_least, one_of, validate
from headreg.errors import ExportError, InvalidInputError, MissingExtraError

__all__ = ["EXPORT_META", "EXPORT_FORMAT", "OnnxModel", "load_onnx_model", "parse_metadata", "require_extra"]

#: The ``format_version`` of headreg's export metadata.
EXPORT_FORMAT = "headreg.export/1"
_PIP = "pip install 'headreg[export]'"

_NUMBERS = Field("list", items=Field("number"))
#: What an exported model's metadata holds (written by :func:`headreg.engine.export.export_model`).
EXPORT_META: Mapping[str, Field] = {
    "format_version": Field("str", required=True, check=one_of(EXPORT_FORMAT)),
    "format": Field("str", required=True, check=one_of("onnx", "exported-program", "torchscript")),
    "input_name": Field("str", required=True),
    "outputs": Field("list", required=True, items=Field("str", check=one_of("embeddings", "logits"))),
    "input_size": Field(
        "list",
        required=True,
        items=Field("int", check=at_least(1)),
        check=lambda v: None if len(v) == 3 else "must be [C, H, W]",
    ),  # fmt: skip
    "in_chans": Field("int", required=True, check=at_least(1)),
    "mean": Field("list", required=True, items=Field("number")),
    "std": Field("list", required=True, items=Field("number", check=lambda v: None if v > 0 else "must be > 0")),
    "interpolation": Field("str"),
    "crop_pct": Field("number"),
    "crop_mode": Field("str"),
    "embedding_dim": Field("int", required=True, check=at_least(1)),
    "normalized": Field("bool", required=True),
    "backbone": Field("str", nullable=True),
    "head": Field("str", nullable=True),
    "num_classes": Field("int", check=at_least(0)),
    "opset": Field("int", nullable=True, check=at_least(1)),
    "headreg_version": Field("str"),
    "torch_version": Field("str"),
}


def require_extra(*names: str, what: str) -> tuple[ModuleType, ...]:
    """Import the optional packages ``names`` of the ``export`` extra, or say how to install them.

    Args:
        names: module names, e.g. ``"onnx", "onnxruntime"``.
        what: the feature that needs them, for the message (``"headreg export --format onnx"``).

    Raises:
        MissingExtraError: naming the missing package and ``pip install 'headreg[export]'``.
    """
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as exc:
            raise MissingExtraError(
                f"{what} needs the optional package {name!r}, which is not installed ({exc}); install the "
                f"export extra: {_PIP}"
            ) from None
    return tuple(modules)


def parse_metadata(raw: Mapping[str, Any], *, where: str, json_values: bool) -> dict[str, Any]:
    """Validate an exported model's metadata (each value JSON text when ``json_values``, as in ONNX).

    Raises:
        ExportError: the file holds no headreg metadata, or it does not match :data:`EXPORT_META`.
    """
    if "format_version" not in raw:
        raise ExportError(f"{where} holds no headreg metadata; was it written by `headreg export`?")
    if json_values:
        try:
            raw = {k: json.loads(v) for k, v in raw.items() if k in EXPORT_META}
        except (TypeError, json.JSONDecodeError) as exc:
            raise ExportError(f"{where}: its headreg metadata is not valid JSON: {exc}") from None
    return dict(validate(dict(raw), EXPORT_META, where=where, error=ExportError))


class OnnxModel(nn.Module):
    """An ONNX file exported by headreg, run by onnxruntime, shaped for the one inference pass.

    ``forward(images)`` takes ``(B, C, H, W)`` float images, normalised as ``pretrained_cfg`` says, on any
    device, and returns ``(B, D)`` float32 embeddings on that device, or ``(embeddings, logits)`` when the
    file has the head's margin-free logits. It has no parameters and no ``head`` module: the pass takes the
    logits from the tuple.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the file.
        metadata: the file's validated metadata (:func:`parse_metadata`).
        path: the file, for messages.
    """

    def __init__(self, session: Any, metadata: dict[str, Any], path: Path) -> None:
        super().__init__()
        self.session = session
        self.metadata = metadata
        self.path = path
        self.input_size = tuple(metadata["input_size"])
        cfg = {k: metadata[k] for k in ("interpolation", "crop_pct", "crop_mode") if k in metadata}
        self.pretrained_cfg = {"input_size": self.input_size, "mean": tuple(metadata["mean"]),
                               "std": tuple(metadata["std"]), **cfg}  # fmt: skip
        self.num_features = self.embedding_dim = int(metadata["embedding_dim"])
        self.num_classes = 0
        self._input = session.get_inputs()[0].name
        self.providers = list(session.get_providers())

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, ...]:
        if not isinstance(images, Tensor) or tuple(images.shape[1:]) != self.input_size:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            c, h, w = self.input_size
            raise InvalidInputError(
                f"{self.path} takes images of shape (batch, {c}, {h}, {w}), got {got}; it was exported at "
                f"{h}x{w} (evaluate with --input-size {h},{w}, or export again with another --input-size)"
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = tuple(torch.from_numpy(o).to(images.device) for o in self.session.run(None, {self._input: array}))
        return outputs if len(outputs) > 1 else outputs[0]

    def extra_repr(self) -> str:
        return f"path={os.fspath(self.path)!r}, input_size={self.input_size}, providers={self.providers}"


def load_onnx_model(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> OnnxModel:
    """Open an ONNX file written by ``headreg export`` with onnxruntime.

    onnxruntime runs with as many intra-op threads as torch (``torch.get_num_threads()``, which
    ``OMP_NUM_THREADS`` sets), on its CUDA provider when ``device`` is a CUDA device and onnxruntime has one
    (``onnxruntime-gpu``), else on the CPU.

    Raises:
        MissingExtraError: onnxruntime is not installed.
        ExportError: the file is missing, not an ONNX model, or carries no valid headreg metadata.
    """
    (ort,) = require_extra("onnxruntime", what="running an ONNX model")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no ONNX model at {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is not an ONNX model onnxruntime can run: {first}") from None
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map, where=str(path), json_values=True)
    return OnnxModel(session, metadata, path)
