"""One execution of a training run (fresh or resumed): the epoch loop, the test evaluation and saving.

Private: :func:`headreg.engine.train.train` and :func:`~headreg.engine.train.resume` are the entry points,
both through :func:`run_training`. The pieces it puts together live in their own modules: the run
directory (:mod:`._rundir`), the distributed set-up (:mod:`._distributed`), the set-up of data, model and
optimiser (:mod:`._setup`), the step loop (:mod:`._loop`) and epoch logging (:mod:`._epochlog`). The test
evaluation is headreg's one inference pass, :func:`headreg.engine.extract.extract_embeddings`, so the
``test_accuracy`` of a run is the ``top1_accuracy`` that ``headreg eval`` reports for its checkpoint. A test split
of classes the head never saw (``unseen_classes``: the retrieval benchmarks, ``cub200``...) has no top-1 accuracy;
each epoch then records the retrieval metrics ``headreg eval`` reports for it, as ``test_recall_at_1``...
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidValueError
from ._checkpoint import capture_rng, restore_rng
from ._config import TrainConfig, TrainResult
from ._distributed import Ranks
from ._epochlog import EpochLog
from ._final_eval import evaluate_split, final_evaluation
from ._guard import NonFiniteStop
from ._loop import EpochTally, StopFlag, run_epoch
from ._rundir import RunDir
from ._setup import Session, build_session
from ._shard_head import is_sharded, load_train_state, train_state
from ._tensorboard import Board, require_tensorboard
from ._validate import Validator
from .extract import Extraction, extract_embeddings, gather_extraction
from .runtime import run_on_main

__all__ = ["Run", "run_training"]


def run_training(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    stop_after_steps: int | None,
    on_step: Callable[[int], None] | None,
    progress: bool,
    log: Callable[[str], None] | None,
    verify: bool = True,
) -> TrainResult:
    """Set up a fresh (or resumed) run in ``run_dir`` and train it to the end or to a stop.

    ``verify=False`` resumes from a state whose recorded SHA-256 does not match (``--no-verify``).
    """
    if config.tensorboard:
        require_tensorboard()  # the missing extra is named before anything starts
    ranks = Ranks.join(config.device, config.batch_size)
    directory = RunDir(run_dir)
    # Only rank 0 touches the directory, and holds its lock for the whole run; the others learn whether
    # that worked, then read the state themselves.
    where = {"rank": ranks.info.rank, "world_size": ranks.info.world_size}  # a sharded head's rows to read
    work = functools.partial(_open, directory, config, resume=resume, overwrite=overwrite, verify=verify, **where)
    try:
        state = run_on_main(work, share=False)
        if resume and not ranks.main and directory.has_state():
            state = directory.load_state(verify=verify, **where)
        # A resumed state holds the weights: the backbone's pretrained ones are not read again.
        session = build_session(dataclasses.replace(config, pretrained=False) if state else config, ranks)
        run = Run(config, directory, ranks, session, progress=progress, log=log)
        if state is not None:
            run.restore(state)
        elif resume:
            run.start_over()
        return run.execute(stop_after_steps=stop_after_steps, on_step=on_step)
    finally:
        directory.lock.release()


def _open(
    directory: RunDir, config: TrainConfig, *, resume: bool, overwrite: bool, verify: bool, rank: int, world_size: int
) -> dict[str, Any] | None:
    """Lock the run directory (claiming it for a new run); a resumed run's committed state, if it has one."""
    if not resume:
        directory.claim(config.to_dict(), overwrite=overwrite, lock=True)
        return None
    directory.lock.acquire()
    directory.clear_leftovers()
    return directory.load_state(verify=verify, rank=rank, world_size=world_size) if directory.has_state() else None


class Run:
    """A run being trained: the session set-up built, its progress, and what it writes.

    Args:
        config: the run's config.
        run_dir: its directory.
        ranks: this process's place in the run.
        session: data, model, optimiser and step context from :func:`~headreg.engine._setup.build_session`.
        progress: tqdm bars per epoch (rank 0).
        log: where lines go instead of stderr.
    """

    def __init__(
        self,
        config: TrainConfig,
        run_dir: RunDir,
        ranks: Ranks,
        session: Session,
        *,
        progress: bool,
        log: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.ranks = ranks
        self.session = session
        self.model = session.model
        self.ctx = session.ctx
        self.log = EpochLog(run_dir, config.epochs, main=ranks.main, progress=progress, log=log)
        self.epoch = 0  # epochs finished
        self.tally: EpochTally | None = None  # running sums of the epoch in progress (None between epochs)
        self.extra_record: dict[str, Any] = {}  # further run.json keys (the DDP replica check)
        self.committed: str | None = None  # the last resumable state, for messages
        if self.ctx.guard is not None:
            self.ctx.guard.log = self.log.say
        self.validator = Validator.build(config, run_dir, self.log, ranks)  # None without --val
        self.board = Board(run_dir.path, enabled=False)
        self.bar: Any = None
        self.val_seconds = 0.0  # validation time inside the current run_epoch call (not training time)

    def restore(self, state: dict[str, Any]) -> None:
        """Load a stopped run's state: weights, optimiser, scaler, every RNG, progress; check it still fits."""
        prog, world, s = state["progress"], self.ranks.info.world_size, self.session
        where = f"--resume {self.run_dir.path}"
        if prog["world_size"] != world and not is_sharded(self.model):
            raise InvalidValueError(
                f"{where}: the run was trained on {prog['world_size']} process(es), now {world}; "
                "resume with the same number of processes (the data shards depend on it)"
            )
        if prog["steps_per_epoch"] != len(s.train_loader):
            raise InvalidValueError(
                f"{where}: {len(s.train_loader)} steps per epoch now, {prog['steps_per_epoch']} "
                "when the run was stopped; the data or the batch size changed"
            )
        load_train_state(self.model, s.optimizer, state["model"], state["optimizer"], self.ranks.device)
        if self.ctx.scaler is not None and state.get("scaler"):
            self.ctx.scaler.load_state_dict(state["scaler"])
        # On another world size (a sharded head's run) rank r takes saved rank r mod W_saved's streams: the
        # global batches are the same (docs/scale.md), the augmentation's and the sampling's draws are not.
        rank = self.ranks.info.rank % len(state["rng"])
        restore_rng(state["rng"][rank])
        s.train_transform.generator.set_state(state["transform_rng"][rank])
        self.ctx.global_step = int(prog["global_step"])
        self.epoch = int(prog["epoch"])
        if prog["tally"]:
            self.tally = EpochTally.from_state(prog["tally"], self.ranks.device)
        self.committed = f"epoch {self.epoch}, step {self.ctx.global_step}"
        if self.validator is not None:
            self.validator.restore(state.get("validation"))
        self.log.resume_at(self.epoch, self.ctx.global_step)
        self.log.say(f"resuming {self.run_dir.path} at epoch {self.epoch + 1}, step {self.ctx.global_step}")

    def start_over(self) -> None:
        """Resume a run killed before it committed its first state: from the beginning, as a fresh run."""
        self.log.resume_at(0)
        self.log.say(f"resuming {self.run_dir.path}: no resumable state was saved yet; starting from the beginning")

    # ------------------------------------------------------------------------------------------ the epochs
    def execute(self, *, stop_after_steps: int | None, on_step: Callable[[int], None] | None) -> TrainResult:
        """Train the remaining epochs (or until a stop), evaluate and save; returns the result on every rank."""
        cfg, ctx, v = self.config, self.ctx, self.validator
        stop = StopFlag()
        ctx.on_step = self._step_hook(on_step, stop)
        # A resumed run hides the events the stopped one wrote after its committed step.
        purge = ctx.global_step + 1 if ctx.global_step else None
        self.board = Board(self.run_dir.path, enabled=cfg.tensorboard and self.ranks.main, purge_step=purge)
        self._write_record("running")
        last: Extraction | None = None  # the final epoch's test pass, for the final evaluation
        status = "completed"
        if v is not None and v.ended:
            self.log.say(f"the run ended early ({v.ended}); nothing left to train")
        with stop.catch_sigint():
            try:
                while self.epoch < cfg.epochs and not (v is not None and v.ended):
                    e = self.epoch
                    tally = self.tally = self.tally or EpochTally.zeros(self.ranks.device)
                    loader = self.session.train_loader
                    loader.set_epoch(e)
                    self.session.freeze.enter(
                        e, ctx, wrap=self.ranks.wrap if self.ranks.distributed else None, say=self.log.say
                    )
                    bar = self.bar = self.log.bar(e, len(loader), tally.batches, v.summary if v else "")
                    self.val_seconds = 0.0
                    try:
                        finished = run_epoch(ctx, loader, tally, stop, stop_at_step=stop_after_steps, bar=bar)
                    finally:
                        bar.close()
                        self.bar = None
                    tally.seconds -= self.val_seconds  # validations inside the epoch are no training time
                    if not finished and not (v is not None and v.ended):
                        status = "stopped"
                        self._save(e, tally, "stopped")
                        resume_cmd = f"`headreg train --resume {self.run_dir.path}`"
                        self.log.say(f"{stop.reason}: resumable state saved; {resume_cmd}")
                        break
                    last = self._end_epoch(e, tally)
                    self.epoch, self.tally = e + 1, None
                    if v is not None and v.due_at_epoch_end(self.epoch, ctx.global_step, last=self.epoch == cfg.epochs):
                        self._validate(self.epoch, ctx.global_step)
                    self._save(self.epoch, None, "running")
                    if v is not None and v.ended:
                        self.log.say(f"{v.ended}; the best model is in {self.run_dir.path / 'best'}")
            except NonFiniteStop as exc:
                ctx.restore_head()
                self._write_record("stopped")
                raise exc.resumable_from(self.committed, self.run_dir.path) from None
            except KeyboardInterrupt:
                ctx.restore_head()
                if ctx.in_step:
                    self.log.say("interrupted inside a step: the last saved resumable state is kept")
                else:
                    self._save(self.epoch, self.tally, "stopped")
                    self.log.say("interrupted: resumable state saved")
                raise
            finally:
                self.board.close()
        ctx.restore_head()  # the configured scale/margin, not a warm-up value, from here on
        final: dict[str, Any] = {}
        emb = labels = None
        if status == "completed":
            final, emb, labels = self._final_eval(last)
            if self.ranks.distributed:
                self.extra_record["replica_max_abs_diff"] = self.ranks.replica_difference(self.model)
            self._write_record("completed")
        return TrainResult(
            run_dir=self.run_dir.path, status=status, epochs_done=self.epoch, global_step=ctx.global_step,
            history=list(self.log.history), eval=final, train_seconds=self.log.train_seconds, model=self.model,
            embeddings=emb, labels=labels, validations=list(self.log.validations), early_stop=v.ended if v else None,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ validation
    def _step_hook(self, user: Callable[[int], None] | None, stop: StopFlag) -> Callable[[int], None]:
        """What runs after every step: TensorBoard, a step-counted validation (which may end the run), ``on_step``."""

        def hook(step: int) -> None:
            self.board.step(step, self.ctx, self.tally)
            v = self.validator
            if v is not None and v.due_after_step(step):
                t0 = time.perf_counter()
                self._validate(self.epoch + 1, step)
                self.val_seconds += time.perf_counter() - t0
                if self.bar is not None:
                    self.bar.set_description(self.log.describe(self.epoch, v.summary), refresh=False)
                if v.ended:
                    stop.request(v.ended)
            if user is not None:
                user(step)

        return hook

    def _validate(self, epoch: int, step: int) -> None:
        assert self.validator is not None
        record, results = self.validator.run(self.model, epoch, step)
        self.board.validation(record, results)

    def _test_pass(self) -> Extraction:
        """This rank's shard of the test split through the model: embeddings, labels, label ranks under the head.

        At the training's precision, as ``headreg eval --amp`` (or ``--no-amp``) runs it on the checkpoint, so
        both report the same accuracy; float16 stays float16 where the run trains in it.
        """
        s, dev = self.session, self.ranks.device
        low = s.autocast_dtype
        ext = extract_embeddings(
            self.model, s.test_loader, device=dev, transform=s.test_transform, amp=low is not None,
            amp_dtype=low or torch.bfloat16, progress=False, desc="test",
        )  # fmt: skip
        if ext.channels_last:
            # Back to the layout the optimiser and DDP know, so the steps that follow are those of a run
            # that never evaluated (values are unchanged; only the memory layout was).
            self.model.to(memory_format=torch.contiguous_format)
        return ext

    def _end_epoch(self, e: int, tally: EpochTally) -> Extraction:
        """Evaluate on the test split, combine the epoch's sums over the ranks and record the epoch."""
        t0 = time.perf_counter()
        ext = self._test_pass()
        assert ext.label_rank is not None  # a training model always has a head with classes
        retrieval = None
        if self.unseen:
            whole = gather_extraction(ext)  # a collective: every rank, before rank 0 computes
            retrieval = run_on_main(lambda: evaluate_split(whole, self.session.test_loader.dataset, ("retrieval",))[0])
        test_correct = (ext.label_rank == 0).sum().double()
        test_count = torch.tensor(float(ext.images), dtype=torch.float64, device=test_correct.device)
        dev = self.ranks.device
        sums = torch.stack([tally.loss_sum, tally.correct, tally.seen, test_correct.to(dev), test_count.to(dev)])
        seconds = torch.tensor([tally.seconds], dtype=torch.float64, device=dev)
        self.ranks.sum_(sums)
        self.ranks.max_(seconds)
        record = self.log.record(
            e, self.ctx.global_step, sums.tolist(), lr=self.session.optimizer.param_groups[0]["lr"],
            step_time=float(seconds.item()), eval_time=time.perf_counter() - t0, retrieval=retrieval,
            skipped_steps=tally.skipped,
            loss_scale=self.ctx.scaler.get_scale() if self.ctx.scaler is not None else None,
        )  # fmt: skip
        self.board.epoch(record)
        return ext

    @property
    def unseen(self) -> bool:
        """Whether the test split's classes are unseen in training (retrieval, not accuracy, measures them)."""
        return bool(getattr(self.session.test_loader.dataset, "unseen_classes", False))

    # ------------------------------------------------------------------------------------------ the end
    def _final_eval(self, last: Extraction | None) -> tuple[dict[str, Any], Tensor, Tensor]:
        """Gather the last test pass, compute the metrics on rank 0 and write ``eval.json``."""
        return final_evaluation(self, last if last is not None else self._test_pass())

    # ------------------------------------------------------------------------------------------ saving
    def _save(self, epoch: int, tally: EpochTally | None, status: str) -> None:
        """Write the model, the resumable state at ``epoch`` (+ ``tally`` mid-epoch) and the run record."""
        s = self.session
        gathered = self.ranks.gather_objects([capture_rng(), s.train_transform.generator.get_state()])
        # Under a sharded head every rank writes its own rows (split says which); otherwise rank 0 writes.
        model_state, optimizer_state, split = train_state(self.model, s.optimizer)
        if not self.ranks.main and split is None:
            return
        last = self.log.history[-1] if self.log.history else {}
        meta = {"epoch": len(self.log.history), **{k: last[k] for k in ("loss", "test_accuracy") if k in last}}
        self.run_dir.save_model(self.model, meta)
        if not self.ranks.main:  # its rows of the model's and the optimiser's state: the rest is rank 0's
            self.run_dir.save_state({"model": model_state, "optimizer": optimizer_state}, split)
            return
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
            "rng": [g[0] for g in gathered],
            "transform_rng": [g[1] for g in gathered],
            "progress": {
                "epoch": epoch,
                "global_step": self.ctx.global_step,
                "steps_per_epoch": len(s.train_loader),
                "world_size": self.ranks.info.world_size,
                "tally": tally.to_state() if tally is not None else None,
            },
            "validation": self.validator.state() if self.validator is not None else None,
        }
        self.run_dir.save_state(state, split)
        self.committed = f"epoch {epoch}, step {self.ctx.global_step}"
        self._write_record(status)

    def _write_record(self, status: str) -> None:
        if not self.ranks.main:
            return
        from .._version import __version__

        low = self.session.autocast_dtype
        self.run_dir.write_record(
            {
                "config": self.config.to_dict(),
                "status": status,
                "epochs_done": self.epoch,
                "global_step": self.ctx.global_step,
                "world_size": self.ranks.info.world_size,
                "device": str(self.ranks.device),
                "amp": str(low).replace("torch.", "") if low else None,
                "num_classes": self.session.num_classes,
                "headreg_version": __version__,
                "torch_version": torch.__version__,
                **({"early_stop": self.validator.ended} if self.validator is not None and self.validator.ended else {}),
                **self.extra_record,
            }
        )
