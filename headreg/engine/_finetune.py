"""Fine-tuning: the backbone frozen for the first epochs of a run (``freeze_backbone``).

While frozen, the backbone's parameters (less the embedding layer, which is trained with the head, as
``head_lr_scale`` counts it; :func:`~headreg.engine._optim.backbone_parameters`) stop requiring gradients,
so autograd neither computes nor stores anything for them and the optimiser skips them (a parameter
without a gradient gets no step, no moment update and no weight decay). The backbone is also held in
eval mode: its batch-norm running statistics stay those it came with (the pretrained ones) and its
dropout is off, so the neck and the head learn on the features the backbone will give once unfrozen,
not on statistics drifting towards a new dataset through a fixed network.

The phase is a function of the epoch, set at the start of each one, so a resumed run is frozen exactly
when the uninterrupted run was. Under DDP the model is wrapped again when the phase changes: DDP reduces
the gradients of the parameters that required them when it was built.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ._loop import StepContext
from ._optim import backbone_parameters

__all__ = ["BackboneFreeze"]


class BackboneFreeze:
    """Freezes ``model.backbone`` (less the embedding layer) for epochs ``0 .. epochs - 1``.

    Args:
        model: the unwrapped :class:`~headreg.HeadModel`.
        epochs: how many epochs the backbone stays frozen; 0 never freezes it.
    """

    def __init__(self, model: nn.Module, epochs: int) -> None:
        self.model = model
        self.epochs = epochs
        self.params = backbone_parameters(model) if epochs > 0 else []
        self.frozen = False

    @property
    def module(self) -> nn.Module | None:
        """The module held in eval mode while frozen (the backbone), else None."""
        return getattr(self.model, "backbone", None) if self.frozen else None

    def enter(
        self,
        epoch: int,
        ctx: StepContext,
        *,
        wrap: Callable[[nn.Module], nn.Module] | None,
        say: Callable[[str], None],
    ) -> None:
        """At the start of ``epoch``: its phase, told to the step context (and DDP wrapped anew, ``wrap``) on a change.

        Args:
            epoch: the epoch about to run (0-based).
            ctx: the run's step context (``frozen``, ``model``).
            wrap: wraps the model in DDP under several ranks; None in one process.
            say: where the line about the change goes.
        """
        if not self.apply(epoch):
            return
        ctx.frozen = self.module
        if wrap is not None:
            ctx.model = wrap(self.model)
        if self.frozen:
            say(f"backbone frozen for epochs {epoch + 1}-{self.epochs}: training the neck and the head")
        elif epoch > 0:
            say(f"backbone unfrozen from epoch {epoch + 1}")

    def apply(self, epoch: int) -> bool:
        """Put the model in the phase of ``epoch`` (0-based); True when the phase changed."""
        want = epoch < self.epochs and bool(self.params)
        if want == self.frozen:
            return False
        for p in self.params:
            p.requires_grad_(not want)
        self.frozen = want
        backbone = self.model.backbone
        if want:
            backbone.eval()
        else:
            backbone.train(self.model.training)
        return True
