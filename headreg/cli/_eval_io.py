"""``headreg eval``'s inputs and outputs: an embeddings file, a model, datasets; the JSON, table, plot and file."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .._atomic import atomic_output, atomic_write_text


def show_progress(flag: bool | None) -> bool:
    """``--progress/--no-progress``, or (unset) whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def from_files(opts: Any, metrics: tuple[str, ...] | None, device: Any) -> Any:
    from headreg.data import load_embeddings
    from headreg.data._pairs import has_issame
    from headreg.engine.evaluate import EvalResult, broadcast_from_main, combine_query_gallery, evaluate_embeddings

    if has_issame(opts.embeddings_file):
        from ._pairs import from_pairs_file

        return from_pairs_file(opts.embeddings_file, opts.gallery_embeddings, metrics, device)
    data = load_embeddings(opts.embeddings_file)
    emb, labels = data["embeddings"], data["labels"]
    is_query, is_gallery = data.get("is_query"), data.get("is_gallery")
    if opts.gallery_embeddings is not None:
        if is_query is not None or is_gallery is not None:
            raise click.UsageError(
                f"{opts.embeddings_file} already holds is_query/is_gallery masks; drop --gallery-embeddings"
            )
        gal = load_embeddings(opts.gallery_embeddings)
        emb, labels, is_query, is_gallery = combine_query_gallery(emb, labels, gal["embeddings"], gal["labels"])
    elif (is_query is None) != (is_gallery is None):
        n = emb.shape[0]
        import torch

        ones = torch.ones(n, dtype=torch.bool)
        is_query = ones if is_query is None else is_query
        is_gallery = ones if is_gallery is None else is_gallery

    def compute() -> Any:
        return evaluate_embeddings(
            emb.to(device),
            labels.to(device),
            is_query=None if is_query is None else is_query.to(device),
            is_gallery=None if is_gallery is None else is_gallery.to(device),
            **opts.engine_kwargs("recall_k", "knn", metrics=metrics, progress=show_progress(opts.progress)),
        )

    values, warnings = broadcast_from_main(compute)
    protocol = "leave-one-out" if is_query is None else "query/gallery"
    n = int(emb.shape[0])
    info = {
        "source": str(opts.embeddings_file),
        **({"gallery_source": str(opts.gallery_embeddings)} if opts.gallery_embeddings else {}),
        **{f"file_{k}": v for k, v in data.get("metadata", {}).items()},
        "protocol": protocol,
        "num_samples": n,
        "num_queries": n if is_query is None else int(is_query.sum()),
        "num_gallery": n if is_gallery is None else int(is_gallery.sum()),
        "embedding_dim": int(emb.shape[1]),
        "device": str(device),
    }
    return EvalResult(values, emb, labels, is_query, is_gallery, None, info, warnings)


def load_eval_model(opts: Any, device: Any = "cpu") -> tuple[Any, dict[str, Any]]:
    from headreg.models import create_model, load_model, read_config

    if getattr(opts, "onnx", None) is not None:
        from headreg.engine._onnx import load_onnx_model

        model = load_onnx_model(opts.onnx, device)
        meta = model.metadata
        return model, {"onnx": str(opts.onnx), "model": meta.get("backbone"), "head": meta.get("head"),
                       "onnx_providers": model.providers}  # fmt: skip
    if opts.checkpoint is not None:
        if opts.pretrained_file is not None:
            raise click.UsageError("--pretrained-file goes with --model (a checkpoint holds its own weights)")
        path = opts.checkpoint
        model = load_model(path, head=opts.head, num_classes=opts.num_classes, verify=not opts.no_verify)
        config = read_config(path)
        return model, {"checkpoint": str(path), "model": config.get("backbone"), "head": config.get("head")}
    if opts.head is not None and opts.num_classes is None:
        raise click.UsageError("--model with --head needs --num-classes")
    model = create_model(
        opts.model_name,
        opts.head,
        num_classes=opts.num_classes if opts.head else None,
        embedding_dim=opts.embedding_dim,
        pretrained=opts.pretrained,
        download=False,  # --pretrained reads the local cache only
        pretrained_file=opts.pretrained_file,
        in_chans=opts.in_chans,
    )
    return model, {"model": opts.model_name, "head": opts.head, "pretrained": opts.pretrained}


def onnx_input_size(model: Any, size: int | tuple[int, ...] | None) -> tuple[int, int]:
    """The ``(H, W)`` an exported model was traced at, which ``--input-size`` (when given) must repeat."""
    c, h, w = model.input_size
    given = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if given is not None and (tuple(given[-2:]) != (h, w) or (len(given) == 3 and given[0] != c)):
        raise click.BadParameter(
            f"{model.path} was exported at {c}x{h}x{w} and takes no other size, got {size!r} (leave --input-size "
            "out, or export again at the size you want)",
            param_hint="--input-size",
        )
    return h, w


def load_datasets(opts: Any) -> tuple[Any, Any, dict[str, Any]]:
    from headreg.data import create_dataset

    name, data_dir = opts.dataset, opts.data_dir
    if opts.query_split is None or opts.query_split == opts.gallery_split:
        split = opts.query_split or opts.split
        return create_dataset(name, split, data_dir=data_dir), None, {"dataset": name, "split": split}
    query = create_dataset(name, opts.query_split, data_dir=data_dir)
    gallery = create_dataset(name, opts.gallery_split, data_dir=data_dir)
    return query, gallery, {"dataset": name, "query_split": opts.query_split, "gallery_split": opts.gallery_split}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4f}"
    return str(value)


def write_outputs(result: Any, opts: Any) -> None:
    payload = result.to_dict()
    text = json.dumps(payload, indent=2, sort_keys=False)
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if opts.save_embeddings is not None:
        from headreg.data import save_embeddings

        keys = ("model", "head", "dataset", "split", "checkpoint", "onnx", "tta")
        meta = {k: str(v) for k, v in result.info.items() if k in keys}
        with atomic_output(opts.save_embeddings) as tmp:  # a kill mid-write leaves the old file, not half of one
            if result.issame is not None:
                from headreg.data._pairs import save_pair_embeddings

                save_pair_embeddings(tmp, result.embeddings, result.issame, metadata=meta or None)
            else:
                save_embeddings(
                    tmp,
                    result.embeddings,
                    result.labels,
                    is_query=result.is_query,
                    is_gallery=result.is_gallery,
                    metadata=meta or None,
                )
    if opts.output is not None:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(opts.output, text + "\n")
    if opts.plot is not None:
        from headreg.plotting import _save_plot  # the evaluation checked these embeddings already

        title = " / ".join(str(result.info[k]) for k in ("model", "head", "dataset") if result.info.get(k))
        with atomic_output(opts.plot) as tmp:
            _save_plot(tmp, result.embeddings, result.labels, title or None)
    if opts.as_json:
        click.echo(text)
        return
    from .heads import echo_table

    info = result.info
    what = info.get("checkpoint") or info.get("onnx") or info.get("model") or info.get("source")
    click.echo(f"evaluated {what}: {info['protocol']}, {info['num_queries']} queries, {info['num_gallery']} gallery, "
               f"D={info['embedding_dim']}")  # fmt: skip
    if info.get("images_per_second"):
        click.echo(
            f"extraction: {info['images_per_second']:.1f} images/s on {info['device']} ({info['precision']}"
            f"{', channels_last' if info.get('channels_last') else ''}, {info['world_size']} process(es))"
        )
    echo_table([{"metric": k, "value": _fmt(v)} for k, v in result.metrics.items()], ["metric", "value"])
    for path, label in ((opts.save_embeddings, "embeddings"), (opts.output, "results"), (opts.plot, "plot")):
        if path is not None:
            click.echo(f"{label} written to {path}")
