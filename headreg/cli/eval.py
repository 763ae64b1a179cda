"""``headreg eval``: embeddings of a model (or from a file) → retrieval, verification, clustering, accuracy."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click

from . import run_cli
from ._eval_io import from_files, load_datasets, load_eval_model, onnx_input_size, write_outputs
from ._guards import check_input_size, check_output_paths
from ._options import LazyChoice, data_dir_default, dataset_names, drop_none, engine_option, keyword_defaults

_PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _parse_ints(value: str | None, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or any(v < 1 for v in out):
        raise click.BadParameter(
            f"must be comma-separated positive integers such as 1,2,4,8, got {value!r}", param_hint=name
        )
    return out


def _input_size(value: str | None) -> int | tuple[int, ...] | None:
    size = _parse_ints(value, "--input-size")
    if size is None:
        return None
    if len(size) not in (1, 2, 3):
        raise click.BadParameter(f"must be H, H,W or C,H,W, got {value!r}", param_hint="--input-size")
    return size[0] if len(size) == 1 else size


def _evaluate_defaults() -> dict[str, Any]:
    from ..engine.evaluate import evaluate_model

    return keyword_defaults(evaluate_model)


def _knn_backends() -> tuple[str, ...]:
    from ..engine.evaluate import KNN_BACKENDS

    return KNN_BACKENDS


def _tta_modes() -> tuple[str, ...]:
    from ..engine.extract import TTA_MODES

    return TTA_MODES


def _recall_k_default() -> str:
    """The engine's k, then each retrieval benchmark's own where it differs."""
    from ..data._retrieval_sets import RECALL_K
    from ..engine._roles import DEFAULT_RECALL_K

    def ks(k: tuple[int, ...]) -> str:
        return ",".join(map(str, k))

    own = [f"{name} {ks(k)}" for name, k in RECALL_K.items() if k != DEFAULT_RECALL_K]
    return f"{ks(DEFAULT_RECALL_K)}; {', '.join(own)}"


def _metrics_help() -> str:
    from ..engine.evaluate import ALL_METRICS

    return f"Comma-separated: {','.join(ALL_METRICS)}."


@dataclass(frozen=True)
class EvalOptions:
    """``headreg eval``'s options, parsed; None leaves a setting to :func:`~headreg.engine.evaluate.evaluate_model`.

    The fields from ``batch_size`` to ``progress`` are keyword arguments of the engine's evaluation
    functions, under the same names.
    """

    checkpoint: Path | None
    onnx: Path | None
    model_name: str | None
    head: str | None
    num_classes: int | None
    embedding_dim: int | None
    in_chans: int | None
    pretrained: bool
    pretrained_file: Path | None
    dataset: str | None
    split: str
    query_split: str | None
    gallery_split: str | None
    data_dir: Path | None
    embeddings_file: Path | None
    gallery_embeddings: Path | None
    save_embeddings: Path | None
    device: str | None
    batch_size: int | None
    workers: int | None
    limit: int | None
    input_size: int | tuple[int, ...] | None
    amp: bool | None
    metrics: str | None
    recall_k: tuple[int, ...] | None
    knn: str | None
    tta: str | None
    detector_score: bool | None
    progress: bool | None
    shard_gallery: bool
    as_json: bool
    output: Path | None
    plot: Path | None
    no_verify: bool

    @classmethod
    def parse(cls, **params: Any) -> EvalOptions:
        """Build from click's values, turning the text of --recall-k and --input-size into integers."""
        params["recall_k"] = _parse_ints(params["recall_k"], "--recall-k")
        params["input_size"] = _input_size(params["input_size"])
        plot = params["plot"]
        if plot is not None and plot.suffix.lower() not in _PLOT_SUFFIXES:
            raise click.BadParameter(
                f"must end in one of {', '.join(_PLOT_SUFFIXES)}, got {str(plot)!r}", param_hint="--plot"
            )
        return cls(**params)

    def engine_kwargs(self, *names: str, **values: Any) -> dict[str, Any]:
        """The fields ``names`` (and ``values``) that are set, as engine keyword arguments."""
        return drop_none({**{name: getattr(self, name) for name in names}, **values})


@click.command("eval")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="Run directory or .safetensors from save_model.")
@click.option(
    "--onnx", type=click.Path(path_type=Path), help="A model written by `headreg export`, run by onnxruntime."
)
@click.option(
    "--model", "model_name", help="Backbone to build instead of a checkpoint (timm, torchvision/NAME, lenetpp)."
)
@click.option("--head", help="Head to build with --model; with --checkpoint, the head it must hold.")
@click.option("--num-classes", type=int, help="Classes of the head (with --model --head).")
@click.option("--embedding-dim", type=int, help="Embedding width (with --model); None keeps the backbone's.")
@click.option("--in-chans", type=int, help="Input channels of a backbone built with --model.")
@click.option("--pretrained", is_flag=True, help="Load the backbone's pretrained weights (must be in the local cache).")
@click.option(
    "--pretrained-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Backbone state dict for --model (torch.save'd, e.g. insightface's backbone.pth; read weights-only).",
)
@click.option("--no-verify", is_flag=True, help="Load a --checkpoint even if its recorded SHA-256 digests differ.")
@engine_option("--dataset", help_text=lambda: f"Dataset: {dataset_names()}.")
@click.option("--split", default="test", show_default=True, help="Split evaluated leave-one-out.")
@click.option("--query-split", help="Split whose samples query (with --gallery-split).")
@click.option("--gallery-split", help="Split searched by the queries (with --query-split).")
@engine_option("--data-dir", type=click.Path(path_type=Path), help="Dataset root.", default_text=data_dir_default)
@click.option("--limit", type=click.IntRange(min=1), help="Use a seeded subset of N samples of each split.")
@click.option("--input-size", help="Override the model input size: H, H,W or C,H,W.")
@click.option("--embeddings", "embeddings_file", type=click.Path(path_type=Path), help="Precomputed embeddings file.")
@click.option("--gallery-embeddings", type=click.Path(path_type=Path), help="A second file searched by --embeddings.")
@click.option(
    "--save-embeddings", type=click.Path(path_type=Path), help="Write the embeddings to this safetensors file."
)
@engine_option("--device", defaults=_evaluate_defaults, help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps.")
@engine_option("--batch-size", type=click.IntRange(min=1), defaults=_evaluate_defaults, help="Images per batch.")
@click.option("--workers", type=click.IntRange(min=0), help="DataLoader workers for image folders (default: up to 8).")
@click.option(
    "--amp/--no-amp", default=None, help="bf16 autocast + channels_last (default: on CUDA only; --amp: on CPU too)."
)
@engine_option("--metrics", help_text=_metrics_help)
@engine_option("--recall-k", help="k of recall@k.", default_text=lambda: _recall_k_default())
@engine_option("--knn", type=LazyChoice(_knn_backends), defaults=_evaluate_defaults, help="k-NN backend.")
@click.option(
    "--tta",
    type=LazyChoice(_tta_modes),
    help="Test-time augmentation: the horizontal mirror's embedding added (flip-sum) or appended (flip-concat) "
    "[default: flip-sum for face pairs (bin:, lfw:, pairs:) and IJB (ijbb:, ijbc:), else none].",
)
@click.option(
    "--detector-score/--no-detector-score",
    default=None,
    help="IJB (ijbb:, ijbc:): weight each face by its detector score in its template [default: on, as insightface].",
)
@click.option(
    "--shard-gallery",
    is_flag=True,
    help="Under torchrun, each rank keeps its 1/W of the embeddings and the exact k-NN search is merged across "
    "ranks (no gather of N x D): retrieval and classification only (docs/eval.md).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only on stdout.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the JSON results to this file.")
@click.option("--plot", type=click.Path(path_type=Path), help="Scatter plot of the embeddings (2-D or PCA), by class.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@run_cli
def eval_cmd(**params: Any) -> None:
    """Evaluate embeddings: leave-one-out on --split, or --query-split against --gallery-split.

    \b
    headreg eval --checkpoint runs/arcface --dataset mnist
    headreg eval --checkpoint runs/arcface --dataset mnist --query-split test --gallery-split train
    headreg eval --embeddings emb.safetensors --json
    headreg eval --checkpoint runs/arcface --dataset bin:faces/lfw.bin
    headreg eval --model iresnet50 --pretrained-file backbone.pth --dataset ijbc:IJB_release/IJBC
    headreg eval --onnx arcface.onnx --dataset mnist
    torchrun --nproc_per_node=2 -m headreg eval --checkpoint runs/arcface --dataset mnist
    """
    opts = EvalOptions.parse(**params)
    _check_options(opts)
    check_output_paths((("--output", opts.output), ("--plot", opts.plot), ("--save-embeddings", opts.save_embeddings)))

    from headreg.engine.evaluate import evaluate_model, parse_metric_names
    from headreg.engine.runtime import cleanup_distributed, init_distributed, is_main_process
    from headreg.errors import HeadregError

    metrics = parse_metric_names(opts.metrics)
    info, device = init_distributed(**drop_none({"device_spec": opts.device}))
    main = is_main_process()
    try:
        if opts.embeddings_file is not None:
            result = from_files(opts, metrics, device)
        else:
            model, source = load_eval_model(opts, device)
            if opts.onnx is not None:  # its graph has a fixed size
                opts = replace(opts, input_size=onnx_input_size(model, opts.input_size))
            else:
                check_input_size(model, opts.input_size)
            query, gallery, described = load_datasets(opts)
            names = ("batch_size", "workers", "limit", "input_size", "amp", "recall_k", "knn", "tta", "progress")
            names += ("detector_score",)
            kwargs = opts.engine_kwargs(*names, metrics=metrics, shard_gallery=opts.shard_gallery or None)
            result = evaluate_model(model, query, gallery, device=device, **kwargs)
            result.info = {**source, **described, **result.info}
        if main:
            write_outputs(result, opts)
    except HeadregError:
        if not main:
            sys.exit(1)  # rank 0 reports the same error; one message is enough
        raise
    finally:
        cleanup_distributed()


def _check_options(opts: EvalOptions) -> None:
    has_file = opts.embeddings_file is not None
    has_model = opts.checkpoint is not None or opts.model_name is not None or opts.onnx is not None
    if has_file and (has_model or opts.dataset):
        raise click.UsageError(
            "give either --embeddings FILE or a model (--checkpoint/--model) with --dataset, not both"
        )
    if opts.gallery_embeddings is not None and not has_file:
        raise click.UsageError("--gallery-embeddings needs --embeddings (the query file)")
    if not has_file and not has_model:
        raise click.UsageError(
            "nothing to evaluate: give --checkpoint PATH, --model NAME, --onnx FILE, or --embeddings FILE"
        )
    if sum(x is not None for x in (opts.checkpoint, opts.model_name, opts.onnx)) > 1:
        raise click.UsageError("give one of --checkpoint, --model and --onnx (each names its own model)")
    model_flags = (("--head", opts.head), ("--num-classes", opts.num_classes), ("--embedding-dim", opts.embedding_dim),
                   ("--in-chans", opts.in_chans), ("--pretrained-file", opts.pretrained_file))  # fmt: skip
    given = [flag for flag, value in model_flags if value is not None]
    if opts.onnx is not None and (given or opts.pretrained):
        raise click.UsageError(f"{(given or ['--pretrained'])[0]} does not apply to --onnx (the file is the model)")
    if has_model and not opts.dataset:
        raise click.UsageError(f"a model needs --dataset ({dataset_names()})")
    if (opts.query_split is None) != (opts.gallery_split is None):
        raise click.UsageError("--query-split and --gallery-split go together (or use --split for leave-one-out)")
    if opts.detector_score is not None and not str(opts.dataset or "").lower().startswith(("ijbb:", "ijbc:")):
        raise click.UsageError("--detector-score/--no-detector-score applies to IJB datasets (ijbb:DIR, ijbc:DIR)")
    if has_file and opts.tta is not None:
        raise click.UsageError("--tta applies while extracting embeddings; an --embeddings file was made already")
    if opts.shard_gallery:
        clash = [n for n, v in (("--embeddings", has_file), ("--save-embeddings", opts.save_embeddings),
                                ("--plot", opts.plot)) if v]  # fmt: skip
        if clash:
            raise click.UsageError(
                f"--shard-gallery keeps the embeddings spread over the ranks; {', '.join(clash)} needs all of them "
                "in one process (drop --shard-gallery for that)"
            )
    if has_file and opts.save_embeddings is not None:
        raise click.UsageError(
            "--save-embeddings writes a model's embeddings; with --embeddings they are already saved"
        )
