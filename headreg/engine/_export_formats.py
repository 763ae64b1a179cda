"""The three export formats: how each is written with its metadata inside, and how it is run back.

Each writer takes the module to export (images → embeddings, or → ``(embeddings, logits)``), an example
batch, the target path and the metadata, and writes one self-contained file with a dynamic batch axis:

- ``onnx``: ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter, onnxscript's
  translation), the metadata as ``metadata_props`` (one entry per key, each value JSON text), the weights
  inside the file (no external data).
- ``exported-program``: ``torch.export.export`` then ``torch.export.save`` (a ``.pt2`` archive), the
  metadata as the extra file ``headreg.json``.
- ``torchscript``: ``torch.jit.trace`` under ``no_grad`` then ``torch.jit.save``, the metadata as the extra
  file ``headreg.json``.

Each reader returns a callable batch → tuple of output tensors, and the metadata read from the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headreg.engine._onnx import load_onnx_model, parse_metadata, require_extra
from headreg.errors import ExportError

__all__ = ["EXTRA_FILE", "Runner", "read_exported", "write_exported"]

#: The extra file of ``.pt2`` and TorchScript archives that holds the metadata.
EXTRA_FILE = "headreg.json"
#: Runs an exported file: ``(B, C, H, W)`` float images → its outputs.
Runner = Callable[[Tensor], tuple[Tensor, ...]]


def _batch_dim() -> Any:
    # max: torch.export's default upper bound (int64 max) trips some symbolic shape checks; no batch is larger.
    return torch.export.Dim("batch", min=1, max=2**20)


def _quietly() -> contextlib.AbstractContextManager[Any]:
    """Silence what the exporters print and warn while they run (the command prints its own summary)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _failed(fmt: str, exc: Exception) -> ExportError:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    summary = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
    return ExportError(
        f"the model could not be exported as {fmt}: {type(exc).__name__}: {summary.strip()[:400]} "
        "(another --format may work: docs/export.md lists what each format supports)"
    )


def _write_onnx(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, Any], outputs: list[str]) -> None:
    require_extra("onnx", "onnxscript", "onnxruntime", what="headreg export --format onnx")
    try:
        with _quietly():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=int(metadata["opset"]),
                input_names=[metadata["input_name"]],
                output_names=outputs,
                dynamic_shapes=({0: _batch_dim()},),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - torch.export and the exporter raise many types
        raise _failed("onnx", exc) from None
    assert program is not None
    program.model.metadata_props.update({k: json.dumps(v) for k, v in metadata.items()})
    program.save(os.fspath(path), external_data=False)


def _write_exported_program(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, Any]) -> None:
    try:
        with _quietly():
            program = torch.export.export(module, (example,), dynamic_shapes=({0: _batch_dim()},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        raise _failed("exported-program", exc) from None
    torch.export.save(program, os.fspath(path), extra_files={EXTRA_FILE: json.dumps(metadata)})


def _write_torchscript(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, Any]) -> None:
    try:
        # no_grad: the heads' custom autograd Function is only used where a gradient is needed, and the tracer
        # cannot record it. The trace's own check is replaced by the verification on another batch size.
        with _quietly(), torch.no_grad():
            traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - the tracer raises many types
        raise _failed("torchscript", exc) from None
    with _quietly():
        torch.jit.save(traced, os.fspath(path), _extra_files={EXTRA_FILE: json.dumps(metadata)})


def write_exported(
    fmt: str, module: nn.Module, example: Tensor, path: Path, metadata: dict[str, Any], outputs: list[str]
) -> None:
    """Write ``module`` traced on ``example`` to ``path`` in format ``fmt``, ``metadata`` inside.

    Raises:
        ExportError: the exporter failed (the first line of its error is kept).
        MissingExtraError: ONNX without the ``export`` extra.
    """
    if fmt == "onnx":
        _write_onnx(module, example, path, metadata, outputs)
    elif fmt == "exported-program":
        _write_exported_program(module, example, path, metadata)
    else:
        _write_torchscript(module, example, path, metadata)


def read_exported(fmt: str, path: Path) -> tuple[Runner, dict[str, Any]]:
    """Load an exported file for a run on the CPU: onnxruntime for ONNX, ``torch.export.load`` for an exported
    program, ``torch.jit.load`` for TorchScript; with its validated metadata.

    The two torch formats are read with torch's own loaders, which trust the file (TorchScript holds code): use
    them on files you made or trust (docs/export.md).
    """
    where = str(path)
    if fmt == "onnx":
        model = load_onnx_model(path)

        def run_onnx(x: Tensor) -> tuple[Tensor, ...]:
            out = model(x)
            return out if isinstance(out, tuple) else (out,)

        return run_onnx, model.metadata
    extra = {EXTRA_FILE: ""}
    with _quietly():
        if fmt == "exported-program":
            program = torch.export.load(os.fspath(path), extra_files=extra).module()
        else:
            program = torch.jit.load(os.fspath(path), map_location="cpu", _extra_files=extra)
    text = extra[EXTRA_FILE]
    try:
        raw = json.loads(text.decode() if isinstance(text, bytes) else text) if text else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{where}: its {EXTRA_FILE} is not valid JSON: {exc}") from None
    metadata = parse_metadata(raw if isinstance(raw, dict) else {}, where=where, json_values=False)

    def run_torch(x: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            out = program(x)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run_torch, metadata
