"""One execution of a training run (fresh or resumed): setup, the epoch loop, evaluation and saving.

Private: :func:`headreg.engine.train.train` and :func:`~headreg.engine.train.resume` are the entry points.
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import HeadregError, InvalidValueError
from . import _checkpoint as ckpt
from ._config import TrainConfig, TrainResult
from ._feasibility import MarginFeasibilityWarning, TrainingWarning, margin_feasibility
from ._loop import EpochTally, StepContext, StopFlag, evaluate_split, run_epoch
from ._optim import build_optimizer

__all__ = ["Run"]

RUN_FORMAT = "headreg.run/1"


def _stderr(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)


class Run:
    """One execution of a run (fresh or resumed): setup, the epoch loop, saving."""

    def __init__(self, config: TrainConfig, run_dir: Path, *, progress: bool, log: Callable[[str], None] | None):
        self.config = config
        self.run_dir = run_dir
        self.progress = progress
        self._log = log
        self.extra_record: dict[str, Any] = {}

    def say(self, msg: str) -> None:
        if self.main:
            (self._log or _stderr)(msg)

    # ------------------------------------------------------------------------------------------ setup
    def execute(
        self, *, resume: bool, overwrite: bool, stop_after_steps: int | None, on_step: Callable[[int], None] | None
    ) -> TrainResult:
        from .runtime import broadcast_object, init_distributed

        cfg = self.config
        self.info, self.device = init_distributed(cfg.device)
        self.main = self.info.rank == 0
        world = self.info.world_size
        if cfg.batch_size % world:
            raise InvalidValueError(
                f"batch_size={cfg.batch_size} is the global batch and must divide evenly over {world} processes"
            )
        # Only rank 0 touches the directory; the others learn whether it worked.
        failure: HeadregError | None = None
        if self.main:
            try:
                if resume:
                    self.state = ckpt.load_resume(self.run_dir)
                else:
                    ckpt.prepare_run_dir(self.run_dir, cfg.to_dict(), overwrite=overwrite)
            except HeadregError as exc:
                failure = exc
        message = broadcast_object(str(failure) if failure is not None else None)
        if failure is not None:
            raise failure
        if message is not None:
            raise HeadregError(message)
        if resume and not self.main:
            self.state = ckpt.load_resume(self.run_dir)
        self._setup()
        if resume:
            self._restore(self.state)
        else:
            self.epoch, self.tally_state = 0, None
        self._write_run_record("running")
        self.ctx.on_step = on_step
        return self._loop(stop_after_steps)

    def _setup(self) -> None:
        from ..data import create_dataset, create_loader, resolve_transform
        from ..models import create_model

        cfg, dev = self.config, self.device
        _seed_everything(cfg.seed)
        train_ds = create_dataset(cfg.dataset, "train", data_dir=cfg.data_dir)
        test_ds = create_dataset(cfg.dataset, "test", data_dir=cfg.data_dir)
        self.num_classes = self._check_classes(train_ds, test_ds)
        for msg in margin_feasibility(cfg.head, cfg.head_options, cfg.embedding_dim, self.num_classes):
            if self.main:
                warnings.warn(msg, MarginFeasibilityWarning, stacklevel=2)
        model = create_model(
            cfg.model,
            cfg.head,
            num_classes=self.num_classes,
            embedding_dim=cfg.embedding_dim,
            head_options=cfg.head_options,
            neck=cfg.neck,
            **cfg.model_options,
        )
        self.model = model.to(dev).train()
        world, rank = self.info.world_size, self.info.rank
        self.per_rank_batch = cfg.batch_size // world
        on_device = dev if dev.type != "cpu" else None
        self.train_loader = create_loader(
            train_ds, batch_size=self.per_rank_batch, shuffle=True, seed=cfg.seed, drop_last=True,
            limit=cfg.limit, device=on_device,
        )  # fmt: skip
        if len(self.train_loader) == 0:
            n = len(train_ds) if cfg.limit is None else min(cfg.limit, len(train_ds))
            raise InvalidValueError(
                f"batch_size={cfg.batch_size} is larger than the {n} training samples"
                f"{f' (limit={cfg.limit})' if cfg.limit else ''}; lower --batch-size or raise --limit"
            )
        self.test_loader = create_loader(
            test_ds, batch_size=max(256, self.per_rank_batch), shuffle=False, seed=cfg.seed,
            limit=cfg.test_limit, device=on_device,
        )  # fmt: skip
        data_cfg = dict(model.pretrained_cfg)
        self.train_tf = resolve_transform(data_cfg, train_ds, train=True, augment=cfg.augment, seed=cfg.seed + rank)
        self.test_tf = resolve_transform(data_cfg, test_ds, train=False)
        self.optimizer = build_optimizer(
            model, cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.momentum, head_lr_scale=cfg.head_lr_scale
        )
        head_targets = _check_head_warmup(model.head, cfg.head, cfg.head_warmup)
        self.autocast_dtype = _amp_dtype(cfg.amp, dev)
        scaler = torch.amp.GradScaler(dev.type) if self.autocast_dtype == torch.float16 else None
        wrapped: torch.nn.Module = model
        if self.info.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        steps_per_epoch = len(self.train_loader)
        self.ctx = StepContext(
            model=wrapped, optimizer=self.optimizer, transform=self.train_tf, device=dev, base_lr=cfg.base_lr,
            schedule=cfg.schedule, total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch), autocast_dtype=self.autocast_dtype,
            scaler=scaler, distributed=self.info.is_distributed, head=model.head,
            head_warmup=cfg.head_warmup, head_targets=head_targets,
        )  # fmt: skip

    def _check_classes(self, train_ds: Any, test_ds: Any) -> int:
        cfg = self.config
        have = int(train_ds.num_classes)
        n = cfg.num_classes if cfg.num_classes is not None else have
        top_train = int(train_ds.targets.max())
        top_test = int(test_ds.targets.max())
        if top_train >= n or top_test >= n:
            split, top = ("train", top_train) if top_train >= n else ("test", top_test)
            raise InvalidValueError(
                f"num_classes={n} but the {split} split of dataset '{cfg.dataset}' has labels up to {top}; "
                f"labels must lie in [0, num_classes), so use num_classes >= {max(top_train, top_test) + 1}"
            )
        if n > have:
            warnings.warn(
                f"num_classes={n} but dataset '{cfg.dataset}' has only {have} classes: "
                f"{n - have} head classes will never see a sample",
                TrainingWarning,
                stacklevel=3,
            )
        return n

    def _restore(self, state: dict[str, Any]) -> None:
        prog = state["progress"]
        world = self.info.world_size
        if prog["world_size"] != world:
            raise InvalidValueError(
                f"--resume {self.run_dir}: the run was trained on {prog['world_size']} process(es), now {world}; "
                "resume with the same number of processes (the data shards depend on it)"
            )
        if prog["steps_per_epoch"] != len(self.train_loader):
            raise InvalidValueError(
                f"--resume {self.run_dir}: {len(self.train_loader)} steps per epoch now, {prog['steps_per_epoch']} "
                "when the run was stopped; the data or the batch size changed"
            )
        self.model.load_state_dict({k: v.to(self.device) for k, v in state["model"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ctx.scaler is not None and state.get("scaler"):
            self.ctx.scaler.load_state_dict(state["scaler"])
        rank = self.info.rank
        ckpt.restore_rng(state["rng"][rank])
        self.train_tf.generator.set_state(state["transform_rng"][rank])
        self.ctx.global_step = int(prog["global_step"])
        self.epoch = int(prog["epoch"])
        self.tally_state = prog["tally"]
        self.history = [h for h in self._read_history() if h["epoch"] <= self.epoch]
        if self.main:  # drop lines of epochs that will be run again (stopped between line and checkpoint)
            path = self.run_dir / ckpt.METRICS
            path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        self.say(f"resuming {self.run_dir} at epoch {self.epoch + 1}, step {self.ctx.global_step}")

    def _read_history(self) -> list[dict[str, Any]]:
        path = self.run_dir / ckpt.METRICS
        if not path.is_file():
            return []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                break  # a torn last line
        return out

    # ------------------------------------------------------------------------------------------ loop
    def _loop(self, stop_after_steps: int | None) -> TrainResult:
        from tqdm import tqdm

        cfg, ctx = self.config, self.ctx
        if not hasattr(self, "history"):
            self.history = []
        self._tally: EpochTally | None = None
        stop = StopFlag()
        emb = labels = None
        status = "completed"
        with stop.catch_sigint():
            try:
                while self.epoch < cfg.epochs:
                    e = self.epoch
                    tally = (
                        EpochTally.from_state(self.tally_state, self.device) if self.tally_state
                        else EpochTally.zeros(self.device)
                    )  # fmt: skip
                    self.tally_state = None
                    self._tally = tally
                    self.train_loader.set_epoch(e)
                    bar = tqdm(
                        total=len(self.train_loader), initial=tally.batches, desc=f"epoch {e + 1}/{cfg.epochs}",
                        unit="batch", disable=not (self.progress and self.main), leave=False, file=sys.stderr,
                        dynamic_ncols=True,
                    )  # fmt: skip
                    try:
                        finished = run_epoch(
                            ctx, self.train_loader, tally, stop, stop_at_step=stop_after_steps, bar=bar
                        )
                    finally:
                        bar.close()
                    if not finished:
                        status = "stopped"
                        self._save(e, tally, "stopped")
                        self.say(f"{stop.reason}: resumable state saved; `headreg train --resume {self.run_dir}`")
                        break
                    last = e == cfg.epochs - 1
                    _, emb, labels = self._end_epoch(e, tally, keep=last)
                    self.epoch, self._tally = e + 1, None
                    self._save(self.epoch, None, "running")
            except KeyboardInterrupt:
                _restore_head(ctx)
                if ctx.in_step:
                    self.say("interrupted inside a step: the last saved resumable state is kept")
                else:
                    self._save(self.epoch, self._tally, "stopped")
                    self.say("interrupted: resumable state saved")
                raise
        _restore_head(ctx)  # the configured scale/margin, not a warm-up value, from here on
        final: dict[str, Any] = {}
        if status == "completed":
            final, emb, labels = self._final_eval(emb, labels)
            if self.info.is_distributed:
                self.extra_record["replica_max_abs_diff"] = self._replica_difference()
            self._write_run_record("completed")
        train_seconds = sum(h["time"] for h in self.history)
        return TrainResult(
            run_dir=self.run_dir, status=status, epochs_done=self.epoch, global_step=ctx.global_step,
            history=list(self.history), eval=final, train_seconds=train_seconds, model=self.model,
            embeddings=emb, labels=labels,
        )  # fmt: skip

    def _end_epoch(
        self, e: int, tally: EpochTally, *, keep: bool
    ) -> tuple[dict[str, Any], Tensor | None, Tensor | None]:
        from ._loop import check_finite

        t0 = time.perf_counter()
        correct, count, emb, labels = evaluate_split(
            self.model, self.test_loader, self.test_tf, self.device, self.autocast_dtype, keep_embeddings=keep
        )
        sums = torch.stack([tally.loss_sum, tally.correct, tally.seen, correct, count]).double()
        seconds = torch.tensor([tally.seconds], dtype=torch.float64, device=self.device)
        if self.info.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(sums)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        loss_sum, tr_correct, seen, te_correct, te_count = sums.tolist()
        check_finite(loss_sum / max(seen, 1.0), self.ctx.global_step)
        step_time = float(seconds.item())
        record = {
            "epoch": e + 1,
            "step": self.ctx.global_step,
            "loss": loss_sum / max(seen, 1.0),
            "train_accuracy": tr_correct / max(seen, 1.0),
            "test_accuracy": te_correct / max(te_count, 1.0),
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": step_time,
            "eval_time": time.perf_counter() - t0,
            "images_per_s": seen / max(step_time, 1e-9),
        }
        self.history.append(record)
        if self.main:
            with open(self.run_dir / ckpt.METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        self.say(
            f"epoch {e + 1}/{self.config.epochs}: loss {record['loss']:.4f}  train acc {record['train_accuracy']:.4f}"
            f"  test acc {record['test_accuracy']:.4f}  {step_time:.1f}s  {record['images_per_s']:.0f} img/s"
        )
        if keep:
            emb, labels = self._gather(emb, labels)
        return record, emb, labels

    def _metrics(self, emb: Tensor, labels: Tensor) -> tuple[dict[str, Any], list[str]]:
        from .evaluate import evaluate_embeddings

        cfg = self.config
        if not cfg.eval_metrics:
            return {}, []
        if cfg.eval_limit is not None and cfg.eval_limit < labels.numel():
            pick = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.eval_limit]
            emb, labels = emb[pick], labels[pick]
        return evaluate_embeddings(emb, labels, metrics=cfg.eval_metrics)

    def _replica_difference(self) -> float:
        """Largest difference of any weight or buffer between ranks (0.0 when DDP kept them in step)."""
        import torch.distributed as dist

        flat = torch.cat([t.detach().double().flatten() for t in self.model.state_dict().values()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).max()) if flat.numel() else 0.0

    def _gather(self, emb: Tensor | None, labels: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        from .runtime import all_gather_variable

        if not self.info.is_distributed or emb is None:
            return emb, labels
        comm = self.device if self.device.type == "cuda" else torch.device("cpu")
        return all_gather_variable(emb.to(comm)).cpu(), all_gather_variable(labels.to(comm)).cpu()

    def _final_eval(self, emb: Tensor | None, labels: Tensor | None) -> tuple[dict[str, Any], Tensor, Tensor]:
        if emb is None:  # resumed after the last epoch: one more pass for the embeddings
            correct, count, emb, labels = evaluate_split(
                self.model, self.test_loader, self.test_tf, self.device, self.autocast_dtype, keep_embeddings=True
            )
            emb, labels = self._gather(emb, labels)
        result: dict[str, Any] = {}
        if self.main:
            metrics, notes = self._metrics(emb, labels)
            acc = self.history[-1]["test_accuracy"] if self.history else None
            result = {
                "dataset": self.config.dataset,
                "split": "test",
                "samples": int(labels.numel()),
                "metric_samples": min(int(labels.numel()), self.config.eval_limit or int(labels.numel())),
                "test_accuracy": acc,
                "metrics": {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()},
                "warnings": notes,
            }
            ckpt.write_json(self.run_dir / ckpt.EVAL, result)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self.say(f"final test evaluation: accuracy {acc:.4f}, {shown}")
        return result, emb, labels

    # ------------------------------------------------------------------------------------------ saving
    def _save(self, epoch: int, tally: EpochTally | None, status: str) -> None:
        from ..models import save_model

        rank_states = [ckpt.capture_rng(), self.train_tf.generator.get_state()]
        if self.info.is_distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(gathered, rank_states)
        else:
            gathered = [rank_states]
        if not self.main:
            return
        last = self.history[-1] if self.history else {}
        save_model(self.model, self.run_dir, metadata={"epoch": len(self.history), **{
            k: last[k] for k in ("loss", "test_accuracy") if k in last}})  # fmt: skip
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "rng": [g[0] for g in gathered],
            "transform_rng": [g[1] for g in gathered],
            "progress": {
                "epoch": epoch,
                "global_step": self.ctx.global_step,
                "steps_per_epoch": len(self.train_loader),
                "world_size": self.info.world_size,
                "tally": tally.to_state() if tally is not None else None,
            },
        }
        ckpt.save_resume(self.run_dir, state)
        self._write_run_record(status)

    def _write_run_record(self, status: str) -> None:
        if not self.main:
            return
        from .. import __version__

        ckpt.write_json(
            self.run_dir / ckpt.RUN_CONFIG,
            {
                "format": RUN_FORMAT,
                "config": self.config.to_dict(),
                "status": status,
                "epochs_done": self.epoch if hasattr(self, "epoch") else 0,
                "global_step": self.ctx.global_step,
                "world_size": self.info.world_size,
                "device": str(self.device),
                "amp": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
                "num_classes": self.num_classes,
                "headreg_version": __version__,
                "torch_version": torch.__version__,
                **self.extra_record,
            },
        )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def _check_head_warmup(head: Any, head_name: str, warmup: dict[str, list[float]]) -> dict[str, float]:
    """The configured value of each attribute in ``warmup``; checks the head allows it and the start is valid."""
    allowed = tuple(getattr(head, "warmup_attributes", ()))
    targets: dict[str, float] = {}
    for name, (start, _) in warmup.items():
        if name not in allowed:
            raise InvalidValueError(
                f"head {head_name!r} cannot warm up {name!r}; it allows "
                + (", ".join(repr(a) for a in allowed) if allowed else "no warm-up")
            )
        targets[name] = float(getattr(head, name))
        setattr(head, name, start)  # the head's setter validates the start value
        setattr(head, name, targets[name])
    return targets


def _restore_head(ctx: StepContext) -> None:
    for name, value in ctx.head_targets.items():
        setattr(ctx.head, name, value)


def _amp_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    use = amp if amp is not None else device.type == "cuda"
    if not use:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16
