"""Training with a class-sharded head (:class:`~headreg.heads._sharded.ShardedHead`): the step model, the
optimiser's update of the sampled rows, and world-size-independent state.

- **The step model.** DDP wraps the backbone and the neck only (:class:`ShardedStep`): the head's rows differ
  per rank and their gradients are already exact, so DDP must never average them.
- **Sampled rows** (``sample_rate < 1``). Before the optimiser's step, the head's per-class parameters are
  stepped on the kept rows only, by an optimiser of the same kind over a ``(K, D)`` copy holding those rows'
  slice of the state, and their gradient is then cleared so the main step skips them: rows not sampled get
  no update, neither from SGD's momentum and weight decay nor from AdamW's moments and decay (a "lazy"
  AdamW: a row's moments move only on the steps that sample it; the bias correction counts every step).
- **State independent of the world size.** Nothing is gathered: each rank writes its rows of the head and
  of the optimiser's per-row state to its own file, under the unsharded names, and rank 0 commits an index
  of the files (:mod:`headreg.models._shards`); the index describes the logical ``(C, D)`` tensors. Loading
  reads this rank's rows from whichever files hold them, so ``--resume`` works on another number of
  processes and no rank ever holds more than its own shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidValueError
from ..heads._sharded import ShardedHead, shard_bounds
from ..models._shards import RowSplit, logical_state, row_range
from ._checkpoint import state_key

__all__ = ["ShardedStep", "wrap_for_training", "hold_unsampled_rows", "train_state", "load_train_state", "is_sharded"]

_INNER = "head.inner."
_HEAD = "head."


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s head is class-sharded."""
    return isinstance(getattr(model, "head", None), ShardedHead)


class _Embedder(nn.Module):
    """Backbone and neck of a model, without its head: what DDP synchronises."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.neck = model.backbone, model.neck
        self._embed = model.embed  # a bound method, not a submodule: the head stays out of DDP

    def forward(self, x: Tensor) -> Tensor:
        return self._embed(x)


class ShardedStep(nn.Module):
    """``(images, labels) → HeadOutput`` for a training step: DDP over the embedder, then the sharded head."""

    def __init__(self, model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> None:
        super().__init__()
        self.embedder = wrap(_Embedder(model))
        self.head = model.head

    def forward(self, x: Tensor, labels: Tensor) -> Any:
        emb = self.embedder(x)
        out = self.head(emb, labels)
        out.embeddings = emb
        return out


def wrap_for_training(
    model: nn.Module, wrap: Callable[[nn.Module], nn.Module], optimizer: torch.optim.Optimizer
) -> nn.Module:
    """The module a step calls: ``wrap(model)`` (DDP), or a :class:`ShardedStep` for a sharded head.

    With a sampling head, also hooks the optimiser so that rows not sampled are not updated.
    """
    if not is_sharded(model):
        return wrap(model)
    if model.head.sample_rate < 1.0:
        hold_unsampled_rows(optimizer, model.head)
    return ShardedStep(model, wrap)


def hold_unsampled_rows(optimizer: torch.optim.Optimizer, head: ShardedHead) -> None:
    """Hook ``optimizer`` so that each step updates only the rows ``head`` kept in its last forward."""
    rows = {id(p) for p in head.inner.parameters() if p.ndim}  # 0-d: replicated, stepped by the main step
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: _step_kept_rows(opt, head, rows))


@torch.no_grad()
def _step_kept_rows(optimizer: torch.optim.Optimizer, head: ShardedHead, row_ids: set[int]) -> None:
    """Step the head's per-class parameters on the last step's kept rows only, then hide them from the step."""
    kept = head.kept
    if kept is None:
        return
    n_local = head.hi - head.lo
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in row_ids or p.grad is None:
                continue
            per = p.shape[0] // n_local
            idx = (kept.unsqueeze(1) * per + torch.arange(per, device=kept.device)).flatten()
            sub = p.detach().index_select(0, idx).requires_grad_()
            sub.grad = p.grad.index_select(0, idx)
            state = optimizer.state[p]
            settings = {k: v for k, v in group.items() if k != "params"}
            tmp = type(optimizer)([{"params": [sub], **settings}])
            tmp.state[sub] = {k: _rows(v, p, idx) for k, v in state.items()}
            with torch.enable_grad():
                tmp.step()
            p.index_copy_(0, idx, sub.detach())
            for k, v in tmp.state[sub].items():
                if isinstance(v, Tensor) and v.ndim and v.shape[0] == idx.numel():
                    full = state.get(k)
                    if full is None:
                        full = state[k] = torch.zeros_like(p)
                    full.index_copy_(0, idx, v)
                else:
                    state[k] = v
            p.grad = None  # the main step leaves p alone


def _rows(v: Any, p: Tensor, idx: Tensor) -> Any:
    return v.index_select(0, idx) if isinstance(v, Tensor) and v.shape == p.shape else v


# ---------------------------------------------------------------------------------------------- state
def _row_params(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[set[int], list[Tensor]]:
    params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
    return {id(p) for p in model.head.inner.parameters() if p.ndim}, params  # 0-d (a learned scale): replicated


def train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Tensor], dict[str, Any] | None, RowSplit | None]:
    """The model's and the optimiser's state dicts, and for a sharded head which tensors hold this rank's rows.

    No collective, nothing gathered: under a sharded head the model's state is named as the unsharded
    model's (``head.weight``) but holds this rank's rows, and so does the optimiser's per-row state. The
    :class:`~headreg.models._shards.RowSplit` names them by their key in the saved state
    (:func:`~headreg.engine._checkpoint.state_key`), with the logical rows each holds, for
    :meth:`~headreg.engine._rundir.RunDir.save_state` to write one file per rank.
    """
    opt_state = optimizer.state_dict() if optimizer is not None else None
    model_state, split = logical_state(model)
    if split is None:
        return model_state, opt_state, None
    head: ShardedHead = model.head
    rows = {state_key("model", k): r for k, r in split.rows.items()}
    if opt_state is not None:
        row_ids, params = _row_params(model, optimizer)
        for i, p in enumerate(params):
            if id(p) in row_ids and i in opt_state["state"]:
                for k, v in opt_state["state"][i].items():
                    if isinstance(v, Tensor) and v.shape == p.shape:
                        rows[state_key("optimizer", "state", i, k)] = row_range(v.shape[0], head)
    return model_state, opt_state, RowSplit(rows, head.num_classes)


def load_train_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, Tensor],
    opt_state: dict[str, Any],
    device: torch.device,
) -> None:
    """Load :func:`train_state`'s state dicts into this rank's model and optimiser.

    Under a sharded head the per-row tensors hold this rank's rows already (``RunDir.load_state`` read only
    those); a logical tensor (a state saved whole, before per-rank files) is sliced here.
    """
    if not is_sharded(model):
        model.load_state_dict({k: v.to(device) for k, v in model_state.items()})
        optimizer.load_state_dict(opt_state)
        return
    head: ShardedHead = model.head
    own = model.state_dict()
    mine: dict[str, Tensor] = {}
    for key, t in model_state.items():
        name = _INNER + key[len(_HEAD) :] if key.startswith(_HEAD) else key
        mine[name] = _local_rows(t, own[name], head, name) if name.startswith(_INNER) and t.ndim and name in own else t
    model.load_state_dict({k: v.to(device) for k, v in mine.items()})
    row_ids, params = _row_params(model, optimizer)
    for i, p in enumerate(params):
        if id(p) in row_ids and i in opt_state["state"]:
            entry = opt_state["state"][i]
            for k, v in list(entry.items()):
                if isinstance(v, Tensor) and v.ndim and v.shape[1:] == p.shape[1:]:
                    entry[k] = _local_rows(v, p, head, f"optimizer state {k} of {_HEAD}")
    optimizer.load_state_dict(opt_state)


def _local_rows(t: Tensor, own: Tensor, head: ShardedHead, name: str) -> Tensor:
    """``t`` when it holds this rank's rows already; this rank's rows of a logical tensor; else a clear error."""
    if t.shape == own.shape:
        return t
    per = own.shape[0] // (head.hi - head.lo)
    if t.shape[1:] == own.shape[1:] and t.shape[0] == per * head.num_classes:
        lo, hi = shard_bounds(head.num_classes, head.world_size, head.rank)
        return t[lo * per : hi * per].clone()
    raise InvalidValueError(
        f"--resume: the saved {name} has shape {tuple(t.shape)}, this process's block of {head.num_classes} "
        f"classes needs {tuple(own.shape)}; did the data's classes change since the run was stopped?"
    )
