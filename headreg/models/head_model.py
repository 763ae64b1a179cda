"""`HeadModel`: backbone → optional neck → head, with timm's conventions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidInputError, InvalidValueError
from ..heads.base import HeadOutput

__all__ = ["HeadModel", "Neck", "BackboneAdapter"]


class Neck(nn.Module):
    """Projection to the embedding width: dropout → linear → batch norm (insightface's "E" output).

    Args:
        in_features: backbone feature width.
        embedding_dim: output width ``D``.
        dropout: dropout probability before the projection.
        batch_norm: end with ``BatchNorm1d(D)`` (affine), as insightface's IResNet features.
    """

    def __init__(self, in_features: int, embedding_dim: int, dropout: float = 0.0, batch_norm: bool = True) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, embedding_dim, bias=not batch_norm)
        self.bn = nn.BatchNorm1d(embedding_dim) if batch_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(self.dropout(x)))


class BackboneAdapter(nn.Module):
    """Gives any feature extractor timm's ``forward_features`` / ``forward_head(pre_logits=True)``.

    For a module without them (torchvision models with the classifier replaced by
    identity, plain ``nn.Module`` s) the whole module is ``forward_features`` and
    ``forward_head`` flattens.
    """

    def __init__(self, module: nn.Module, num_features: int) -> None:
        super().__init__()
        self.module = module
        self.num_features = num_features
        self._timm_like = callable(getattr(module, "forward_features", None)) and callable(
            getattr(module, "forward_head", None)
        )

    def forward_features(self, x: Tensor) -> Tensor:
        return self.module.forward_features(x) if self._timm_like else self.module(x)

    def forward_head(self, x: Tensor) -> Tensor:
        if self._timm_like:
            return self.module.forward_head(x, pre_logits=True)
        return torch.flatten(x, 1) if x.dim() > 2 else x


class HeadModel(nn.Module):
    """An embedding model with a loss head, usable like a timm classifier.

    ``model(images, labels)`` → :class:`~headreg.HeadOutput` (loss, margin logits, embeddings);
    ``model(images)`` → ``(B, C)`` scaled logits without margin (or embeddings when there
    is no head); ``model.embed(images)`` → ``(B, D)`` embeddings.

    Build it with :func:`headreg.create_model`; the attributes follow timm:
    ``num_features`` (= ``embedding_dim``), ``num_classes``, ``pretrained_cfg``.

    Args:
        backbone: a :class:`BackboneAdapter`.
        head: a head module, or None for an embedding extractor.
        neck: a projection to ``embedding_dim``, or None.
        embedding_dim: width ``D`` of the embeddings.
        num_classes: classes of the head (0 without one).
        pretrained_cfg: timm data config (input size, mean, std, ...).
        config: the arguments that rebuild this model (for :func:`headreg.save_model`).
    """

    def __init__(
        self,
        backbone: BackboneAdapter,
        head: nn.Module | None,
        neck: nn.Module | None,
        *,
        embedding_dim: int,
        num_classes: int,
        pretrained_cfg: dict[str, Any],
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck if neck is not None else nn.Identity()
        self.head = head
        self.embedding_dim = self.num_features = self.head_hidden_size = embedding_dim
        self.num_classes = num_classes
        self.pretrained_cfg = pretrained_cfg
        self.default_cfg = pretrained_cfg  # older timm helpers read this name
        self.config = dict(config or {})

    # timm's split -------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone features before pooling (timm) or the backbone's output (others)."""
        self._check_images(x)
        try:
            return self.backbone.forward_features(x)
        except RuntimeError as exc:
            # torch's pooling and convolution refuse an input smaller than their window with a message
            # naming neither the backbone nor the size it needs; anything else propagates unchanged.
            if x.dim() != 4 or not any(p in str(exc) for p in _TOO_SMALL):
                raise
            expected = tuple(self.pretrained_cfg.get("input_size", ()))[1:]
            raise InvalidInputError(
                f"images of {x.shape[-2]}×{x.shape[-1]} are too small for this backbone (its data config says "
                f"{'×'.join(map(str, expected)) or 'unknown'}): {exc}"
            ) from None

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features → embeddings (``pre_logits=True``) or margin-free head logits."""
        emb = self.neck(self.backbone.forward_head(x))
        if pre_logits or self.head is None:
            return emb
        return self.head(emb)

    def embedding_layer(self) -> nn.Module | None:
        """The layer that outputs the embedding: the neck's linear layer, else the backbone's
        ``embedding_layer`` when it declares one (LeNet++), else None."""
        if isinstance(self.neck, Neck):
            return self.neck.fc
        layer = getattr(self.backbone.module, "embedding_layer", None)
        return layer if isinstance(layer, nn.Module) else None

    def embed(self, x: Tensor) -> Tensor:
        """``(B, C_in, H, W)`` images → ``(B, D)`` embeddings (not normalised)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> HeadOutput | Tensor:
        """Loss and logits with labels, margin-free logits without (see class docstring)."""
        if labels is not None and self.training and x.shape[0] < 2 and _has_batch_norm(self.neck):
            raise InvalidInputError("training needs a batch of at least 2 samples (the neck has batch norm), got 1")
        emb = self.embed(x)
        if self.head is None:
            if labels is not None:
                raise InvalidValueError("this model has no head (head=None), so it cannot compute a loss from labels")
            return emb
        if labels is None:
            return self.head(emb)
        out = self.head(emb, labels)
        out.embeddings = emb
        return out

    def get_classifier(self) -> nn.Module | None:
        return self.head

    def reset_classifier(self, num_classes: int, head: str | None = None, **head_options: Any) -> None:
        """Replace the head, e.g. to fine-tune on other classes; ``num_classes=0`` removes it.

        Args:
            num_classes: classes of the new head.
            head: registry name; defaults to the current head's.
            **head_options: options of the new head (the current ones when the head is kept).
        """
        from ..registry import create_head

        name = head or self.config.get("head")
        if num_classes == 0 or name is None:
            self.head, self.num_classes = None, 0
            self.config.update(head=None, num_classes=0, head_options={})
            return
        if head is None or head == self.config.get("head"):
            head_options = {**self.config.get("head_options", {}), **head_options}
        device = next(self.parameters()).device
        self.head = create_head(name, self.embedding_dim, num_classes, **head_options).to(device)
        self.num_classes = num_classes
        self.config.update(head=name, num_classes=num_classes, head_options=head_options)

    def _check_images(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"images must be a torch.Tensor, got {type(x).__name__}")
        in_chans = self.pretrained_cfg.get("input_size", (None,))[0]
        if x.dim() == 4 and in_chans is not None and x.shape[1] != in_chans:
            raise InvalidInputError(
                f"images must have {in_chans} channels (batch, {in_chans}, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise InvalidInputError(f"images must be a floating-point tensor (normalised), got {x.dtype}")
        # timm's ViTs fix the image size with their position embeddings and assert on any other.
        patch_embed = getattr(self.backbone.module, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None)
        if x.dim() == 4 and getattr(patch_embed, "strict_img_size", False) and size is not None:
            if tuple(x.shape[-2:]) != tuple(size):
                raise InvalidInputError(
                    f"this backbone takes images of exactly {size[0]}×{size[1]}, got {x.shape[-2]}×{x.shape[-1]}"
                )


#: Fragments of torch's messages for an input smaller than a pooling or convolution window.
_TOO_SMALL = ("too small", "can't be greater than actual input size", "Kernel size can't be greater")


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
