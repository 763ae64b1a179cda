"""``headreg export``: a checkpoint's (or a bare backbone's) embedding model to ONNX, torch.export or TorchScript."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from . import run_cli
from ._eval_io import load_eval_model
from ._guards import check_output_paths
from ._options import LazyChoice, drop_none, engine_option, keyword_defaults


def _export_defaults() -> dict[str, Any]:
    from ..engine.export import export_model

    return keyword_defaults(export_model)


def _formats() -> tuple[str, ...]:
    from ..engine.export import EXPORT_FORMATS

    return EXPORT_FORMATS


@dataclass(frozen=True)
class ExportOptions:
    """``headreg export``'s options; the model fields have the names :func:`~headreg.cli._eval_io.load_eval_model`
    reads (a bare backbone has no head)."""

    checkpoint: Path | None
    model_name: str | None
    in_chans: int | None
    pretrained: bool
    pretrained_file: Path | None
    no_verify: bool
    format: str | None
    out: Path
    with_head: bool
    normalize: bool
    input_size: str | None
    opset: int | None
    as_json: bool
    head: None = None
    num_classes: None = None
    embedding_dim: None = None


def _input_size(value: str | None) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in value.split(","))
    except ValueError:
        size = ()
    if len(size) not in (1, 2, 3) or min(size) < 1:
        raise click.BadParameter(f"must be H, H,W or C,H,W positive integers, got {value!r}", param_hint="--input-size")
    return size[0] if len(size) == 1 else size


@click.command("export")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Run directory or .safetensors from save_model.")
@click.option("--model", "model_name", help="A bare backbone to export instead (timm, torchvision/NAME, lenetpp).")
@click.option("--in-chans", type=int, help="Input channels of a backbone built with --model.")
@click.option("--pretrained", is_flag=True, help="--model with its pretrained weights (must be in the local cache).")
@click.option(
    "--pretrained-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Backbone state dict for --model (torch.save'd, e.g. insightface's backbone.pth; read weights-only).",
)
@click.option("--no-verify", is_flag=True, help="Load a --checkpoint even if its recorded SHA-256 digests differ.")
@engine_option("--format", type=LazyChoice(_formats), defaults=_export_defaults, help="File format.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The file to write (and OUT.json beside).")
@click.option("--with-head", is_flag=True, help="Add the head's margin-free logits as a second output.")
@click.option("--normalize", is_flag=True, help="L2-normalise the embeddings output.")
@click.option("--input-size", help="H, H,W or C,H,W the exported model takes [default: the backbone's data config].")
@engine_option("--opset", type=click.IntRange(min=17), defaults=_export_defaults, help="ONNX opset.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar's JSON only on stdout.")
@run_cli
def export_cmd(**params: Any) -> None:
    """Export the embedding model (backbone + neck, no training head), verified against PyTorch.

    The file takes (B, C, H, W) float images normalised with the mean/std in its metadata, the batch axis
    dynamic, and returns the embeddings (and the logits with --with-head). It is run back on a sample batch
    (onnxruntime for ONNX) and kept only if every row matches PyTorch with cosine >= 0.99999.

    \b
    headreg export --checkpoint runs/arcface --out arcface.onnx
    headreg export --checkpoint runs/arcface --format exported-program --out arcface.pt2 --with-head
    headreg export --model iresnet50 --pretrained-file backbone.pth --normalize --out r50.onnx
    headreg eval --onnx arcface.onnx --dataset mnist
    """
    opts = ExportOptions(**params)
    if (opts.checkpoint is None) == (opts.model_name is None):
        raise click.UsageError("give one model: --checkpoint RUN or --model NAME")
    if opts.checkpoint is not None and (opts.in_chans is not None or opts.pretrained):
        raise click.UsageError("--in-chans and --pretrained go with --model (a checkpoint records its own)")
    if opts.model_name is not None and opts.with_head:
        raise click.UsageError("--with-head needs a --checkpoint: a bare --model has no trained head")
    check_output_paths((("--out", opts.out),))
    size = _input_size(opts.input_size)

    from headreg.engine.export import export_model

    model, _ = load_eval_model(opts)
    kwargs = drop_none({"format": opts.format, "opset": opts.opset, "input_size": size})
    result = export_model(model, opts.out, with_head=opts.with_head, normalize=opts.normalize, **kwargs)
    if opts.as_json:
        click.echo(result.sidecar.read_text(), nl=False)
        return
    meta = result.metadata
    outputs = ", ".join(f"{name} (B, {meta['embedding_dim'] if name == 'embeddings' else meta['num_classes']})"
                        for name in meta["outputs"])  # fmt: skip
    click.echo(f"exported {meta['backbone'] or 'model'} as {meta['format']} to {result.path} in {result.seconds:.1f}s")
    click.echo(f"input: {meta['input_name']} (B, {', '.join(map(str, meta['input_size']))}) float32, "
               f"mean {meta['mean']}, std {meta['std']}; outputs: {outputs}"
               f"{'; embeddings L2-normalised' if meta['normalized'] else ''}")  # fmt: skip
    worst = json.dumps({k: round(v, 7) for k, v in result.min_cosine.items()})
    click.echo(f"verified against PyTorch on a batch of 3: smallest row cosine {worst}")
    click.echo(f"metadata written to {result.sidecar}")
