"""`create_model`: any timm, torchvision or headreg backbone, or an nn.Module, with any registered head."""

from __future__ import annotations

import fnmatch
import os
import pickle
import sys
from typing import Any

from torch import nn

from ..errors import HeadregError, InvalidValueError, UnknownBackboneError, did_you_mean
from . import lenetpp as _lenetpp  # noqa: F401 - registers LeNet++ into timm
from ._cache import NotCachedError, cache_only
from .head_model import BackboneAdapter, HeadModel, Neck

__all__ = ["create_model", "list_backbones", "create_backbone", "load_pretrained_file"]

TORCHVISION_PREFIX = "torchvision/"
#: headreg's own backbones: they take ``embed_dim`` and end in the embedding layer, so need no neck.
HEADREG_BACKBONES = ("lenetpp", "lenetpp_bn")
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def list_backbones(filter: str = "", torchvision: bool = True) -> list[str]:
    """Backbone names ``create_model`` accepts: timm's, ``torchvision/<name>``, headreg's own."""
    import timm

    names = list(timm.list_models(filter or ""))
    if torchvision:
        import torchvision.models as tvm

        tv = [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]
        names += [n for n in tv if not filter or fnmatch.fnmatchcase(n, filter)]
    return names


def _pretrained_error(name: str, exc: Exception) -> HeadregError:
    if isinstance(exc, NotCachedError) or type(exc).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return HeadregError(
            f"could not load pretrained weights for backbone '{name}': they are not in the local cache, and "
            f"headreg does not download ({type(exc).__name__}: {exc}). Fetch them once on a machine with "
            f"internet, e.g. `python -c \"import headreg; headreg.create_model('{name}', pretrained=True)\"`, "
            "and copy the Hugging Face cache ($HF_HOME/hub) or the torch hub cache ($TORCH_HOME/hub/checkpoints); "
            "or give the weights as a file with --pretrained-file"
        )
    return HeadregError(
        f"could not load pretrained weights for backbone '{name}': {type(exc).__name__}: {exc}. "
        "headreg never downloads during tests; on an offline machine put the weights in the "
        "Hugging Face / torch hub cache first, or pass pretrained=False"
    )


def _timm_backbone(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, int, dict[str, Any]]:
    import timm

    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as exc:
        raise InvalidValueError(f"backbone '{name}' does not accept these arguments {sorted(kwargs)}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise _pretrained_error(name, exc) from None
        raise
    # forward_head(pre_logits=True) yields head_hidden_size features (≠ num_features for
    # models with a hidden pre-logits layer, e.g. MobileNetV3's conv_head).
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width), dict(model.pretrained_cfg)


def _torchvision_backbone(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, int, dict[str, Any]]:
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        raise UnknownBackboneError(
            f"unknown torchvision backbone '{name}'{did_you_mean(name, available)} "
            "(torchvision.models.list_models() shows them)"
        )
    in_chans = kwargs.pop("in_chans", 3)
    try:
        model = tvm.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except TypeError as exc:
        raise InvalidValueError(f"backbone '{name}' does not accept these arguments {sorted(kwargs)}: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise _pretrained_error(TORCHVISION_PREFIX + name, exc) from None
        raise
    # The classifier is the last Linear layer; its input is the pooled feature width.
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidValueError(f"torchvision backbone '{name}' has no linear classifier headreg can remove")
    fc_name, fc = linears[-1]
    _set_submodule(model, fc_name, nn.Identity())
    if in_chans != 3:
        _adapt_first_conv(model, in_chans)
    size = 299 if name.startswith("inception") else 224
    cfg = {"input_size": (in_chans, size, size), "interpolation": "bilinear", "crop_pct": 0.875, **_IMAGENET}
    cfg["num_classes"] = int(fc.out_features)  # the removed classifier's classes (its weights', when pretrained)
    return model, int(fc.in_features), cfg


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            new = nn.Conv2d(
                in_chans,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups if conv.groups == 1 else in_chans,
                conv.bias is not None,
            )
            _set_submodule(model, name, new)
            return


def load_pretrained_file(module: nn.Module, path: str | os.PathLike[str], *, classifier: str | None = None) -> None:
    """Load a backbone state dict saved by ``torch.save`` into ``module``, renaming keys where it knows how.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers, so a crafted file cannot
    run code. The keys go through the ``checkpoint_filter_fn`` of the module's defining module when it
    has one (timm's convention; :mod:`headreg.models.iresnet` maps insightface's names). Keys of the
    removed classifier (``classifier``, from the data config) are dropped, as timm does; any other
    missing or unexpected key is an error.

    Args:
        module: the backbone (built with ``num_classes=0``).
        path: the file.
        classifier: the classifier's name prefix in the state dict, or None.

    Raises:
        HeadregError: the file cannot be read, is not a state dict, or does not fit ``module``.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise HeadregError(f"could not read pretrained_file {os.fspath(path)!r}: {type(exc).__name__}: {msg}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} wrapper of training scripts
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise HeadregError(f"pretrained_file {os.fspath(path)!r} must hold a state dict (name -> tensor)")
    convert = getattr(sys.modules.get(type(module).__module__), "checkpoint_filter_fn", None)
    if callable(convert):
        state = convert(state, module)
    if classifier:
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise HeadregError(
            f"pretrained_file {os.fspath(path)!r} does not fit backbone {type(module).__name__}: "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}"
        )


def create_backbone(
    backbone: str | nn.Module, *, pretrained: bool = False, download: bool = True, **kwargs: Any
) -> tuple[BackboneAdapter, dict[str, Any]]:
    """Resolve a backbone to a :class:`BackboneAdapter` and its timm-style data config.

    Args:
        backbone: timm name, ``torchvision/<name>``, ``lenetpp``, or an ``nn.Module``
            (with ``num_features``, or ``forward_features``/``forward_head`` as timm).
        pretrained: load pretrained weights (timm/torchvision; never downloaded in tests).
        download: with ``pretrained``, False reads the weights from the local caches only, never from the
            network (:func:`headreg.models._cache.cache_only`); a cache miss is an error saying how to fill it.
        **kwargs: backbone arguments, e.g. ``in_chans``, ``drop_rate``.
    """
    if pretrained and not download:
        with cache_only():
            return create_backbone(backbone, pretrained=True, **kwargs)
    if isinstance(backbone, nn.Module):
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int):
            raise InvalidValueError(
                "a backbone nn.Module must have an integer `num_features` attribute (its output width), "
                f"got {num_features!r}"
            )
        cfg = dict(getattr(backbone, "pretrained_cfg", None) or {"input_size": (3, 224, 224), **_IMAGENET})
        return BackboneAdapter(backbone, num_features), cfg
    if not isinstance(backbone, str) or not backbone:
        raise InvalidValueError(f"backbone must be a model name or an nn.Module, got {backbone!r}")
    if backbone.startswith(TORCHVISION_PREFIX):
        module, width, cfg = _torchvision_backbone(backbone[len(TORCHVISION_PREFIX) :], pretrained, kwargs)
        return BackboneAdapter(module, width), cfg
    import timm

    if not timm.is_model(backbone):
        names = timm.list_models()
        raise UnknownBackboneError(
            f"unknown backbone '{backbone}'{did_you_mean(backbone, names)} "
            "(timm.list_models() lists timm's; torchvision models are written 'torchvision/<name>')"
        )
    module, width, cfg = _timm_backbone(backbone, pretrained, kwargs)
    return BackboneAdapter(module, width), cfg


def _default_classes(backbone: str | nn.Module, head: str, cfg: dict[str, Any]) -> int:
    """The class count of the backbone's pretrained config, as timm's ``create_model`` defaults to it."""
    n = cfg.get("num_classes")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        name = backbone if isinstance(backbone, str) else type(backbone).__name__
        raise InvalidValueError(
            f"num_classes is required with head '{head}': backbone '{name}' has no class count in its pretrained "
            "config to default to; give num_classes=C (your data's classes)"
        )
    return n


def create_model(
    backbone: str | nn.Module,
    head: str | None = None,
    *,
    num_classes: int | None = None,
    embedding_dim: int | None = None,
    pretrained: bool = False,
    download: bool = True,
    pretrained_file: str | os.PathLike[str] | None = None,
    head_options: dict[str, Any] | None = None,
    neck: str | None = None,
    neck_dropout: float = 0.0,
    shard_head: bool = False,
    sample_rate: float = 1.0,
    **backbone_kwargs: Any,
) -> HeadModel:
    """Build backbone → neck → head, e.g. ``create_model("resnet18", head="arcface")``.

    As ``timm.create_model("resnet18")``, a head without ``num_classes`` gets the class count of the
    backbone's pretrained config (1000 for ImageNet backbones, 10 for LeNet++; torchvision's: its
    classifier's); a backbone whose config has none (the face backbones) needs ``num_classes``. To train
    on other classes, give ``num_classes`` here or resize later with
    ``model.reset_classifier(num_classes, head=...)``, which replaces the head (new, untrained weights).

    Args:
        backbone: a timm name (``timm.list_models()``), ``torchvision/<name>``, headreg's
            ``lenetpp``/``lenetpp_bn``, or an ``nn.Module``.
        head: a registered head name (``headreg.list_heads()``); None gives an embedding model.
        num_classes: classes of the head; None takes the backbone's pretrained config's ``num_classes``.
        embedding_dim: embedding width ``D``; None keeps the backbone's width. For LeNet++
            it sets the embedding layer itself.
        pretrained: load the backbone's pretrained weights (no download is attempted offline).
        download: with ``pretrained``, False loads them from the local caches only (the CLI's
            ``--pretrained``); a cache miss is then an error that says how to fill the cache.
        pretrained_file: a state dict of the backbone saved by ``torch.save`` (insightface's
            ``backbone.pth``, say), read with ``torch.load(weights_only=True)``, never unpickled in
            full; the backbone's ``checkpoint_filter_fn`` renames its keys (insightface's IResNet
            names). Not recorded in the model's config: a checkpoint never names a file to open.
        head_options: the head's options, e.g. ``{"margin": 0.3, "scale": 30}``.
        neck: ``"linear_bn"`` (default when ``embedding_dim`` is given: linear + batch norm as
            insightface), ``"linear"``, or ``"none"``.
        neck_dropout: dropout before the neck's projection.
        shard_head: split the head's classes into contiguous row blocks over the ranks of the initialised
            process group (Partial FC; docs/scale.md). The head must be ``shardable``. The model's
            config stays the logical (unsharded) one, so its checkpoint loads on any number of processes.
        sample_rate: with ``shard_head``, the fraction ``r`` in ``(0, 1]`` of each rank's classes scored per
            training step (the batch's classes, plus uniformly sampled others).
        **backbone_kwargs: passed to the backbone, e.g. ``in_chans=1``; ``None`` values are dropped.

    Returns:
        A :class:`HeadModel`.
    """
    backbone_kwargs = {k: v for k, v in backbone_kwargs.items() if v is not None}
    head_options = {k: v for k, v in (head_options or {}).items() if v is not None}
    if head is not None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise InvalidValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        from ..registry import get_head_class

        get_head_class(head)  # fail on an unknown head before building a large backbone
    if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
        raise InvalidValueError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
    if neck not in (None, "linear_bn", "linear", "none"):
        raise InvalidValueError(f"neck must be 'linear_bn', 'linear' or 'none', got {neck!r}")
    in_chans = backbone_kwargs.get("in_chans")
    if in_chans is not None and (isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1):
        raise InvalidValueError(f"in_chans must be a positive integer (image channels), got {in_chans!r}")
    if isinstance(neck_dropout, bool) or not isinstance(neck_dropout, (int, float)) or not 0 <= neck_dropout <= 1:
        raise InvalidValueError(f"neck_dropout must be a probability in [0, 1], got {neck_dropout!r}")

    own = isinstance(backbone, str) and backbone in HEADREG_BACKBONES
    if own and embedding_dim is not None:
        backbone_kwargs["embed_dim"] = embedding_dim
    if pretrained_file is not None and pretrained:
        raise InvalidValueError("give pretrained=True or pretrained_file, not both: they both load the weights")
    adapter, cfg = create_backbone(backbone, pretrained=pretrained, download=download, **backbone_kwargs)
    if head is not None and num_classes is None:
        num_classes = _default_classes(backbone, head, cfg)
    if pretrained_file is not None:
        load_pretrained_file(adapter.module, pretrained_file, classifier=cfg.get("classifier"))
    if in_chans is not None and "input_size" in cfg:
        cfg["input_size"] = (in_chans, *tuple(cfg["input_size"])[1:])

    width = adapter.num_features
    neck_kind = neck or ("linear_bn" if embedding_dim is not None and not own else "none")
    neck_module: nn.Module | None = None
    if neck_kind != "none":
        dim = embedding_dim if embedding_dim is not None else width
        neck_module = Neck(width, dim, dropout=neck_dropout, batch_norm=neck_kind == "linear_bn")
        width = dim
    elif embedding_dim is not None and embedding_dim != width:
        raise InvalidValueError(
            f"embedding_dim={embedding_dim} differs from the backbone's width {width}; use a neck "
            "('linear_bn' or 'linear') to project"
        )

    if shard_head and head is None:
        raise InvalidValueError("shard_head=True splits a head's classes over the ranks; give a head")
    if sample_rate != 1.0 and not shard_head:
        raise InvalidValueError(
            f"sample_rate={sample_rate!r} samples the classes of a sharded head; add shard_head=True"
        )
    head_module = None
    if head is not None:
        from ..registry import create_head

        if shard_head:
            from ..heads._sharded import ShardedHead

            def build(n: int) -> nn.Module:
                return create_head(head, width, n, **head_options)

            head_module = ShardedHead(build, head, width, num_classes, sample_rate=sample_rate)
        else:
            head_module = create_head(head, width, num_classes, **head_options)
    config = {
        "backbone": backbone if isinstance(backbone, str) else None,
        "backbone_kwargs": backbone_kwargs,
        "head": head,
        "head_options": head_options,
        "num_classes": num_classes if head is not None else 0,
        "embedding_dim": embedding_dim,
        "neck": neck_kind,
        "neck_dropout": neck_dropout,
    }
    return HeadModel(
        adapter,
        head_module,
        neck_module,
        embedding_dim=width,
        num_classes=config["num_classes"],
        pretrained_cfg=cfg,
        config=config,
    )
