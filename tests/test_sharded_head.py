"""The class-sharded head (Partial FC) against the whole head in one process, on 2 and 3 gloo processes.

Each worker holds a block of C = 7 classes (uneven: 4 + 3, 3 + 2 + 2) and its part of a global batch; the
loss, the embeddings' gradient and each rank's rows of the weight gradient must equal the unsharded head's
(float64, every registered head that declares itself shardable, plugins included). Also: a bad label on one
rank is an error on every rank (no hang), and sampling keeps the batch's classes, scores the softmax over
the kept classes only and leaves the other rows untouched by SGD and AdamW.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import headreg
from headreg.errors import InvalidInputError, InvalidValueError
from headreg.heads._sharded import ShardedHead, head_shard_refusal, shard_bounds
from headreg.heads.functional import margin_logits
from headreg.metrics.classification import label_rank
from headreg.registry import create_head, list_heads

C, D, B = 7, 5, 12


#: Heads checked with options besides their defaults: "name+variant" -> (name, options).
VARIANTS = {"normface+learned_s": ("normface", {"learn_scale": True})}


def _shardable_heads() -> list[str]:
    return [n for n in list_heads() if not head_shard_refusal(create_head(n, D, C))]


def _spec(key: str) -> tuple[str, dict[str, object]]:
    return VARIANTS.get(key, (key, {}))


def _sharded(key: str, sample_rate: float = 1.0) -> ShardedHead:
    name, options = _spec(key)
    torch.manual_seed(1)  # the same initial rows as the whole head built after the same seed
    return ShardedHead(lambda n: create_head(name, D, n, **options), name, D, C, sample_rate=sample_rate).double()


def _whole(key: str) -> torch.nn.Module:
    name, options = _spec(key)
    torch.manual_seed(1)
    return create_head(name, D, C, **options).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, D, dtype=torch.float64, generator=g) * 3, torch.randint(0, C, (B,), generator=g)


def _references() -> dict[str, dict[str, object]]:
    """The whole heads' results, computed before the process group exists (so nothing is all-reduced)."""
    x, y = _batch()
    refs = {}
    for name in [*_shardable_heads(), *VARIANTS]:
        whole = _whole(name)
        xw = x.clone().requires_grad_()
        out = whole(xw, y)
        out.loss.backward()
        whole.eval()
        with torch.no_grad():
            logits = whole(x)
        refs[name] = {
            "loss": out.loss.detach(), "x_grad": xw.grad, "logits": logits, "label_rank": label_rank(logits, y),
            "grads": {n: p.grad for n, p in whole.named_parameters()}, "buffers": dict(whole.named_buffers()),
        }  # fmt: skip
    return refs


def _check_exact(rank: int, world: int, refs: dict[str, dict[str, object]]) -> None:
    x, y = _batch()
    part = slice(rank * B // world, (rank + 1) * B // world)
    for name, ref in refs.items():
        sharded = _sharded(name)
        xs = x[part].clone().requires_grad_()
        out = sharded(xs, y[part])
        out.loss.backward()
        torch.testing.assert_close(out.loss, ref["loss"], msg=f"{name}: loss")
        # The gathered rows' gradient is W times the true one: DDP averages the backbone's over the ranks.
        torch.testing.assert_close(xs.grad / world, ref["x_grad"][part], msg=f"{name}: embeddings' gradient")
        for kind, mine in (("grads", {n: p.grad for n, p in sharded.inner.named_parameters()}),
                           ("buffers", dict(sharded.inner.named_buffers()))):  # fmt: skip
            for key, t in mine.items():  # weights' gradients; centres, norm statistics, step counters
                full = ref[kind][key]
                if t.ndim:
                    per = full.shape[0] // C
                    full = full[sharded.lo * per : sharded.hi * per]
                torch.testing.assert_close(t, full, msg=f"{name} {kind} {key}")
        sharded.eval()
        torch.testing.assert_close(sharded(x[part]), ref["logits"][part], msg=f"{name}: inference logits")
        assert torch.equal(sharded.label_rank(x[part], y[part], block=2), ref["label_rank"][part]), name


def _check_bad_label(rank: int, world: int) -> None:
    x, y = _batch()
    part = slice(rank * B // world, (rank + 1) * B // world)
    labels = y[part].clone()
    if rank == 1:
        labels[0] = C  # one rank only
    sharded = _sharded("arcface")
    with pytest.raises(InvalidInputError) as info:
        sharded(x[part], labels)
    assert "rank 1" in str(info.value)
    if rank == 1:
        assert f"labels must lie in [0, {C})" in str(info.value)


def _check_sampling(rank: int, world: int) -> None:
    from headreg.engine._shard_head import wrap_for_training

    x, y = _batch()
    part = slice(rank * B // world, (rank + 1) * B // world)
    for opt_name in ("sgd", "adamw"):
        torch.manual_seed(11 + rank)
        sharded = _sharded("cosface", sample_rate=0.5).train()
        torch.manual_seed(11 + rank)
        p = sharded.inner.weight
        opt = (
            torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
            if opt_name == "sgd"
            else torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
        )
        model = torch.nn.Module()
        model.head, model.backbone, model.neck, model.embed = sharded, None, None, None
        wrap_for_training(model, lambda m: m, opt)
        history = []
        for _step in range(3):
            before = p.detach().clone()
            state_before = {k: v.clone() for k, v in opt.state[p].items()} if opt.state[p] else {}
            out = sharded(x[part], y[part])
            kept = sharded.kept
            local = y - sharded.lo
            positives = torch.unique(local[(local >= 0) & (local < sharded.hi - sharded.lo)])
            assert set(positives.tolist()) <= set(kept.tolist())  # every class of the global batch is kept
            assert kept.numel() == max(math.ceil(0.5 * (sharded.hi - sharded.lo)), positives.numel())
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            dropped = torch.ones(p.shape[0], dtype=torch.bool)
            dropped[kept] = False
            assert torch.equal(p.detach()[dropped], before[dropped]), opt_name  # no update at all
            for k, v in state_before.items():
                if v.shape == p.shape:
                    assert torch.equal(opt.state[p][k][dropped], v[dropped]), (opt_name, k)
            assert not torch.equal(p.detach()[kept], before[kept])
            history.append(kept.clone())
            # The loss is the softmax over the kept classes of every rank only.
            kept_all = [torch.empty(0)] * world
            dist.all_gather_object(kept_all, (kept + sharded.lo).tolist())
            cols = torch.tensor(sorted(c for ks in kept_all for c in ks))
            whole, pos = _whole("cosface"), torch.searchsorted(cols, y)
            with torch.no_grad():
                whole.weight.copy_(_gather_weight(before, world))
                logits = margin_logits(whole.fused_terms(x), whole.weight[cols], pos)
            ref = torch.nn.functional.cross_entropy(logits, pos)
            torch.testing.assert_close(out.loss.detach(), ref)
        # Seeded: the same seed draws the same classes.
        again = _sharded("cosface", sample_rate=0.5).train()
        torch.manual_seed(11 + rank)
        for kept in history:
            again(x[part], y[part])
            assert torch.equal(again.kept, kept)


def _check_create_model(rank: int, world: int) -> None:
    """``create_model(..., shard_head=True, sample_rate=0.3)`` from Python under an initialised process group."""
    torch.manual_seed(0)
    model = headreg.create_model(
        "lenetpp", head="arcface", num_classes=C, embedding_dim=D, shard_head=True, sample_rate=0.3
    ).train()
    head = model.head
    assert isinstance(head, ShardedHead) and head.sample_rate == 0.3 and head.world_size == world
    lo, hi = shard_bounds(C, world, rank)
    assert (head.lo, head.hi) == (lo, hi) and head.inner.weight.shape == (hi - lo, D)
    g = torch.Generator().manual_seed(rank)
    images, labels = torch.randn(3, 1, 28, 28, generator=g), torch.randint(0, C, (3,), generator=g)
    out = model(images, labels)
    out.loss.backward()
    losses = [None] * world
    dist.all_gather_object(losses, float(out.loss))
    assert len(set(losses)) == 1, losses  # one loss over the global batch, the same on every rank
    assert head.kept is not None and head.kept.numel() <= hi - lo
    assert head.inner.weight.grad is not None and model.embed(images).shape == (3, D)


def _gather_weight(w: torch.Tensor, world: int) -> torch.Tensor:
    parts = [None] * world
    dist.all_gather_object(parts, w)
    return torch.cat(parts)


def _worker(rank: int, world: int, init: str, failures: Any) -> None:
    refs = _references()
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _check_exact(rank, world, refs)
        _check_bad_label(rank, world)
        _check_sampling(rank, world)
        _check_create_model(rank, world)
        failures.put("ok")
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_head_on_gloo(tmp_path, world):
    ctx = mp.get_context("spawn")
    failures = ctx.SimpleQueue()
    procs = [
        ctx.Process(target=_worker, args=(r, world, f"file://{tmp_path / 'store'}", failures)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    reports = []
    while not failures.empty():
        reports.append(failures.get())
    assert not alive, "a rank hung"
    errors = [r for r in reports if r != "ok"]
    # Every rank reports its checks passed (an exit code alone would also count a crash in gloo's teardown).
    assert not errors and reports.count("ok") == world, "\n".join(errors) or f"exit codes {[p.exitcode for p in procs]}"


# ---------------------------------------------------------------------------------------------- one process
def test_shard_bounds_are_contiguous_and_uneven():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(4, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_world_of_one_equals_the_whole_head():
    x, y = _batch()
    for name in [*_shardable_heads(), *VARIANTS]:
        whole, sharded = _whole(name), _sharded(name)
        torch.testing.assert_close(sharded(x, y).loss, whole(x, y).loss, msg=name)


def test_a_head_that_cannot_shard_says_why():
    with pytest.raises(InvalidValueError, match=r"head 'sphereface' cannot be class-sharded.*focal"):
        headreg.create_model("lenetpp", "sphereface", num_classes=4, head_options={"focal_gamma": 2.0}, shard_head=True)
    if "subcenter_arcface" in list_heads():
        with pytest.raises(InvalidValueError, match=r"cannot be class-sharded.*sub-centres"):
            headreg.create_model("lenetpp", "subcenter_arcface", num_classes=4, shard_head=True)
    if "curricularface" in list_heads():
        with pytest.raises(InvalidValueError, match=r"head 'curricularface' cannot be class-sharded.*target cosine"):
            headreg.create_model("lenetpp", "curricularface", num_classes=4, shard_head=True)
    with pytest.raises(InvalidValueError, match="sample_rate=0.5 .* add shard_head=True"):
        headreg.create_model("lenetpp", "arcface", num_classes=4, sample_rate=0.5)
    with pytest.raises(InvalidValueError, match="sample_rate must be"):
        headreg.create_model("lenetpp", "arcface", num_classes=4, shard_head=True, sample_rate=0.0)


def test_a_plugin_head_declaring_shardable_needs_fused_terms():
    class Claims(torch.nn.Module):
        shardable = True

        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(n, D))

    with pytest.raises(InvalidValueError, match=r"head 'claims' cannot be class-sharded.*lacks fused_terms"):
        ShardedHead(Claims, "claims", D, C)

    class Opts(type(create_head("arcface", D, C))):  # a subclass of a shardable head that says it is not
        shardable = False

    assert "does not declare itself shardable" in head_shard_refusal(Opts(D, C))


def test_warmup_attributes_reach_the_wrapped_head():
    sharded = _sharded("arcface")
    assert "margin" in sharded.warmup_attributes and sharded.margin == sharded.inner.margin
    sharded.margin = 0.125  # what headreg train --head-warmup margin=START:FRACTION does each step
    assert sharded.inner.margin == 0.125 and sharded.margin == 0.125 and "margin" not in sharded.__dict__
    with pytest.raises(InvalidValueError, match="margin"):
        sharded.margin = -1.0  # the head's own setter checks it


def test_sampling_refuses_gradient_accumulation():
    from headreg.engine._config import TrainConfig

    with pytest.raises(InvalidValueError, match=r"accumulate=2 with sample_rate=0.5.*one forward pass"):
        TrainConfig(model="lenetpp", head="arcface", dataset="fake", shard_head=True, sample_rate=0.5, accumulate=2)
    TrainConfig(model="lenetpp", head="arcface", dataset="fake", shard_head=True, accumulate=2)  # r = 1: exact


def test_every_builtin_head_declares_itself_shardable():
    builtin = ["softmax", "modified_softmax", "normface", "sphereface", "arcface", "cosface", "combined", "center"]
    for name in builtin:
        assert name in _shardable_heads(), name


def test_a_large_head_draws_each_block_alone(monkeypatch):
    """Past EXACT_INIT_MAX no rank builds the whole (C, D) head: its block is drawn under a seed of its own."""
    from headreg.heads import _sharded

    monkeypatch.setattr(_sharded, "EXACT_INIT_MAX", C * D - 1)

    def block(lo: int, hi: int) -> torch.Tensor:
        torch.manual_seed(5)
        built = []
        head = _sharded._rows_of(lambda n: built.append(n) or create_head("arcface", D, n), C, D, lo, hi)
        assert built == [hi - lo]  # never the whole head
        return head.weight.detach()

    first = block(0, 3)
    assert torch.equal(first, block(0, 3))  # reproducible
    assert not torch.equal(first, block(3, 6))  # each block its own rows
    monkeypatch.setattr(_sharded, "EXACT_INIT_MAX", C * D)
    torch.manual_seed(5)
    whole = create_head("arcface", D, C)
    torch.manual_seed(5)
    assert torch.equal(_sharded._rows_of(lambda n: create_head("arcface", D, n), C, D, 3, 6).weight, whole.weight[3:6])
