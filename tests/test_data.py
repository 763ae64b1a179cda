"""headreg.data: datasets (against the real MNIST files), batch transforms, loaders and embedding files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headreg.data import (
    BatchTransform,
    ImageFolderDataset,
    TensorImageDataset,
    create_dataset,
    create_loader,
    list_datasets,
    load_embeddings,
    resolve_data_dir,
    resolve_transform,
    save_embeddings,
)
from headreg.engine.runtime import DistInfo
from headreg.errors import DatasetNotFoundError, InvalidInputError, InvalidValueError, UnknownDatasetError

DATA_ROOT = Path(os.environ.get("HEADREG_DATA_DIR", "/work/shared/data"))
needs_mnist = pytest.mark.skipif(
    not (DATA_ROOT / "MNIST" / "raw").is_dir(), reason=f"MNIST not found under {DATA_ROOT} (set HEADREG_DATA_DIR)"
)

MNIST_CFG = {"input_size": (1, 28, 28), "mean": (0.1307,), "std": (0.3081,), "interpolation": "bilinear"}
IMAGENET_CFG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


@pytest.fixture(scope="module")
def mnist() -> dict[str, TensorImageDataset]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADREG_DATA_DIR", str(DATA_ROOT))
        return {split: create_dataset("mnist", split) for split in ("train", "test")}


def _fake(n: int = 50, **kw) -> TensorImageDataset:
    return create_dataset("fake", num_samples=n, num_classes=5, image_size=8, **kw)


# ---------------------------------------------------------------- data dir


def test_resolve_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HEADREG_DATA_DIR", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "headreg" / "data"
    monkeypatch.setenv("HEADREG_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


# ---------------------------------------------------------------- MNIST


@needs_mnist
def test_mnist_sizes_labels_and_counts(mnist: dict[str, TensorImageDataset]) -> None:
    train, test = mnist["train"], mnist["test"]
    assert (len(train), len(test)) == (60000, 10000)
    assert int(train.targets[0]) == 5 and int(test.targets[0]) == 7
    assert torch.bincount(train.targets).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.targets.dtype == torch.long and train.images.dtype == torch.uint8
    assert train.images.shape == (60000, 1, 28, 28)
    assert (train.num_classes, train.channels, train.image_size) == (10, 1, (28, 28))
    assert len(train.classes) == 10 and train.classes[0].startswith("0")
    assert train.hflip is False  # digits must not be mirrored


@needs_mnist
def test_mnist_batch_indexing(mnist: dict[str, TensorImageDataset]) -> None:
    ds = mnist["test"]
    images, labels = ds.__getitems__([0, 1, 2, 9999])
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.long and labels.tolist()[0] == 7
    assert torch.equal(images[3], ds.images[9999])
    same, _ = ds[torch.tensor([0, 1, 2, 9999])]
    assert torch.equal(same, images)
    # Works in a plain DataLoader too, with the pass-through collate.
    dl = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=TensorImageDataset.collate)
    x, y = next(iter(dl))
    assert x.shape == (16, 1, 28, 28) and torch.equal(y, ds.targets[:16])


@needs_mnist
def test_mnist_transform_matches_hand_computation(mnist: dict[str, TensorImageDataset]) -> None:
    tf = resolve_transform(MNIST_CFG, mnist["test"], train=False)
    assert not tf.training and tf.size == (28, 28)
    x, _ = mnist["test"].get_batch([0, 1])
    out = tf(x)
    assert out.shape == (2, 1, 28, 28) and out.dtype == torch.float32
    expected = (x.double() / 255.0 - 0.1307) / 0.3081
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    assert x.max() == 255  # so the next line checks the top of the range on real data
    assert out.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)  # 2.8215
    assert out.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert x.dtype == torch.uint8 and x.max() == 255  # the input was not modified


# ---------------------------------------------------------------- BatchTransform


def test_batch_transform_gray_to_rgb() -> None:
    tf = BatchTransform(IMAGENET_CFG["mean"], IMAGENET_CFG["std"], in_chans=3)
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = tf(x)
    assert out.shape == (2, 3, 4, 4)
    for c, (m, s) in enumerate(zip(IMAGENET_CFG["mean"], IMAGENET_CFG["std"], strict=True)):
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], (1 - m) / s))


@pytest.mark.parametrize("size", [None, (6, 6)])
def test_batch_transform_writes_the_requested_memory_format(size) -> None:
    # channels_last straight from the transform equals the contiguous result, bit for bit,
    # on the fast path (no resize) and the general one (resize).
    tf = BatchTransform(IMAGENET_CFG["mean"], IMAGENET_CFG["std"], in_chans=3, size=size)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = tf(x)
    cl = tf(x, memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(cl, plain)
    assert tf(plain, memory_format=torch.channels_last).is_contiguous(memory_format=torch.channels_last)


def test_batch_transform_rgb_to_gray_uses_luminance() -> None:
    tf = BatchTransform((0.5,), (0.25,), in_chans=1)
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, 0] = 255  # pure red
    x[:, 2, 0, 0] = 255  # plus blue in one pixel
    out = tf(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 1, 1].item() == pytest.approx((0.299 - 0.5) / 0.25, abs=1e-5)
    assert out[0, 0, 0, 0].item() == pytest.approx((0.299 + 0.114 - 0.5) / 0.25, abs=1e-5)


def test_batch_transform_rgb_stats_collapse_for_one_channel() -> None:
    tf = BatchTransform(IMAGENET_CFG["mean"], IMAGENET_CFG["std"], in_chans=1)
    assert tf.mean.flatten().item() == pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)
    with pytest.raises(InvalidValueError, match="mean"):
        BatchTransform((0.1, 0.2), (0.3,), in_chans=3)


def test_batch_transform_resize_antialiased() -> None:
    tf = BatchTransform((0.0,), (1.0,), in_chans=1, size=56)
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    out = tf(x)
    assert out.shape == (3, 1, 56, 56)
    ref = F.interpolate(x.float() / 255, size=(56, 56), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref)
    down = BatchTransform((0.0,), (1.0,), in_chans=1, size=(7, 14))(torch.full((1, 1, 28, 28), 51, dtype=torch.uint8))
    assert down.shape == (1, 1, 7, 14)
    torch.testing.assert_close(down, torch.full_like(down, 0.2))  # a constant image stays constant


def test_batch_transform_rejects_bad_input() -> None:
    tf = BatchTransform((0.5,), (0.5,), in_chans=3)
    with pytest.raises(InvalidInputError, match="channels"):
        tf(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match=r"\(B, C, H, W\)"):
        tf(torch.zeros(4, 4, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match="uint8"):
        tf(torch.zeros(1, 1, 4, 4, dtype=torch.int32))
    already = torch.randn(2, 3, 4, 4)
    assert tf(already) is already  # float batches were transformed per sample already


def test_batch_augmentation_is_seeded_and_only_translates() -> None:
    x = torch.randint(1, 256, (16, 1, 12, 12), dtype=torch.uint8)  # no zeros, so padding is recognisable
    make = lambda seed: BatchTransform((0.0,), (1.0,), in_chans=1, translate=2, seed=seed).train()  # noqa: E731
    a, b, c = make(3)(x), make(3)(x), make(4)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    padded = F.pad(x.float() / 255, (2, 2, 2, 2))
    for i in range(16):  # every output is one 12x12 window of the zero-padded input
        windows = [padded[i, :, r : r + 12, q : q + 12] for r in range(5) for q in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)
    assert len({a[i].sum().item() for i in range(16)}) > 1
    # eval mode never augments
    ev = make(3).eval()
    torch.testing.assert_close(ev(x), x.float() / 255)


def test_hflip_only_where_label_preserving() -> None:
    digits = resolve_transform(MNIST_CFG, _fake(), train=True)
    assert digits.training and digits.translate == 1 and digits.hflip == 0.0
    flippable = _fake()
    flippable.hflip = True
    assert resolve_transform(MNIST_CFG, flippable, train=True).hflip == 0.5
    assert resolve_transform(MNIST_CFG, flippable, train=True, augment=False).hflip == 0.0
    x = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).repeat(64, 1, 1, 1)
    out = BatchTransform((0.0,), (1.0,), in_chans=1, hflip=0.5).train()(x)
    plain = x.float() / 255
    is_flipped = (out == plain.flip(-1)).flatten(1).all(1)
    assert torch.all(is_flipped | (out == plain).flatten(1).all(1))  # each image is itself or its mirror
    assert 0 < int(is_flipped.sum()) < 64


def test_resolve_transform_sizes_and_channels() -> None:
    ds = _fake(channels=1)  # native 8x8, one channel
    tf = resolve_transform(IMAGENET_CFG, ds, train=False)
    assert tf.size == (8, 8) and tf.in_chans == 3  # native size by default, channels from the config
    assert tf(ds.get_batch([0, 1])[0]).shape == (2, 3, 8, 8)
    tf = resolve_transform(IMAGENET_CFG, ds, train=False, input_size=(3, 32, 32))
    assert tf(ds.get_batch([0])[0]).shape == (1, 3, 32, 32)
    with pytest.raises(InvalidValueError, match="data_config"):
        resolve_transform({"mean": (0.5,)}, ds, train=False)


# ---------------------------------------------------------------- errors for names and missing files


def test_missing_dataset_names_the_path_and_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADREG_DATA_DIR", str(tmp_path))
    for name, folder in [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("cifar10", "cifar-10-batches-py")]:
        with pytest.raises(DatasetNotFoundError) as info:
            create_dataset(name, "test")
        msg = str(info.value)
        assert str(tmp_path / folder) in msg and "HEADREG_DATA_DIR" in msg and "--data-dir" in msg
        assert "download=True" in msg
        assert isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # nothing was created, nothing downloaded
    # A folder with partial files: torchvision's own error becomes ours.
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"junk")
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        create_dataset("mnist", data_dir=tmp_path)


def test_unknown_dataset_suggests_close_names() -> None:
    with pytest.raises(UnknownDatasetError, match="did you mean 'mnist'") as info:
        create_dataset("mnsit")
    assert isinstance(info.value, LookupError)
    with pytest.raises(UnknownDatasetError, match="cifar10"):
        create_dataset("cifar-10")
    assert {"mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "fake"} <= set(list_datasets())


def test_bad_split_and_options() -> None:
    with pytest.raises(InvalidValueError, match="split"):
        create_dataset("fake", "validation")
    with pytest.raises(InvalidValueError, match="num_samples"):
        create_dataset("fake", num_samples=0)
    with pytest.raises(InvalidValueError, match="no options"):
        create_dataset("mnist", num_samples=3)
    with pytest.raises(TypeError):
        create_dataset("fake", colour="red")


# ---------------------------------------------------------------- imagefolder


def _write_pngs(root: Path, classes: dict[str, int], size: tuple[int, int] = (10, 12)) -> None:
    from PIL import Image

    for k, (cls, count) in enumerate(classes.items()):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", size, (40 * k, 10 * i, 200)).save(root / cls / f"{i}.png")


def test_imagefolder_splits_and_transforms(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "train", {"cat": 3, "dog": 2})
    _write_pngs(tmp_path / "test", {"cat": 1, "dog": 1})
    ds = create_dataset(f"imagefolder:{tmp_path}", "train")
    assert isinstance(ds, ImageFolderDataset)
    assert (len(ds), ds.num_classes, ds.classes) == (5, 2, ["cat", "dog"])
    assert ds.targets.tolist() == [0, 0, 0, 1, 1] and ds.targets.dtype == torch.long
    assert len(create_dataset(f"imagefolder:{tmp_path}", "test")) == 2
    raw, label = ds[0]
    assert raw.shape == (3, 12, 10) and raw.dtype == torch.uint8 and label == 0
    with pytest.raises(DatasetNotFoundError, match="splits present: test, train"):
        create_dataset(f"imagefolder:{tmp_path}", "val")

    cfg = {**IMAGENET_CFG, "input_size": (3, 32, 32)}
    tf = resolve_transform(cfg, ds, train=False)
    loader = create_loader(ds, batch_size=4, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.tolist() == [0, 0, 0, 1]
    assert tf(images) is images  # already normalised per sample by timm's transform
    assert len(loader) == 2 and sum(x.shape[0] for x, _ in loader) == 5
    # Worker processes decode the same samples, in the same seeded order.
    shuffled = create_loader(ds, batch_size=2, shuffle=True, seed=1, num_workers=1)
    order = torch.cat([y for _, y in shuffled])
    assert sorted(order.tolist()) == [0, 0, 0, 1, 1]
    assert torch.equal(order, ds.targets[shuffled.sample_indices()])

    gray = create_dataset(f"imagefolder:{tmp_path}", "test")
    resolve_transform({**MNIST_CFG, "input_size": (1, 16, 16)}, gray, train=True)
    x, _ = gray[0]
    assert x.shape == (1, 16, 16)


def test_imagefolder_without_splits_and_empty(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "flat", {"a": 1, "b": 1, "c": 1})
    ds = create_dataset(f"imagefolder:{tmp_path / 'flat'}", "test")  # no test/ subfolder: the folder itself
    assert ds.num_classes == 3
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images found"):
        create_dataset(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        create_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(InvalidValueError, match="imagefolder:PATH"):
        create_dataset("imagefolder")


# ---------------------------------------------------------------- fake


def test_fake_is_seeded_and_learnable() -> None:
    a = create_dataset("fake", num_samples=400, num_classes=4, image_size=16, channels=3, seed=1)
    b = create_dataset("fake", num_samples=400, num_classes=4, image_size=16, channels=3, seed=1)
    c = create_dataset("fake", num_samples=400, num_classes=4, image_size=16, channels=3, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (400, 3, 16, 16) and a.num_classes == 4 and a.channels == 3
    assert torch.bincount(a.targets).tolist() == [100] * 4
    test = create_dataset("fake", "test", num_samples=200, num_classes=4, image_size=16, channels=3, seed=1)
    assert not torch.equal(test.images[:10], a.images[:10])
    # Class structure: a nearest-class-mean classifier fit on train generalises to test.
    x, xt = a.images.flatten(1).float(), test.images.flatten(1).float()
    means = torch.stack([x[a.targets == k].mean(0) for k in range(4)])
    pred = torch.cdist(xt, means).argmin(1)
    assert (pred == test.targets).float().mean() > 0.9


# ---------------------------------------------------------------- loaders


def _indexed(n: int) -> TensorImageDataset:
    """A dataset whose label is the sample index, so batches show which samples they hold."""
    return TensorImageDataset(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n), num_classes=n)


def _epoch(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_batches_and_eval_order() -> None:
    ds = _indexed(103)
    loader = create_loader(ds, batch_size=10, shuffle=False, distributed=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 11 and batches[-1][0].shape == (3, 1, 2, 2)
    assert batches[0][0].dtype == torch.uint8 and batches[0][1].dtype == torch.long
    assert _epoch(loader) == list(range(103))
    dropped = create_loader(ds, batch_size=10, shuffle=False, drop_last=True, distributed=False)
    assert len(dropped) == 10 and _epoch(dropped) == list(range(100)) and dropped.num_samples == 100


def test_loader_is_deterministic_and_set_epoch_reshuffles() -> None:
    ds = _indexed(100)
    a = create_loader(ds, batch_size=16, shuffle=True, seed=5)
    b = create_loader(ds, batch_size=16, shuffle=True, seed=5)
    first = _epoch(a)
    assert first == _epoch(b) == _epoch(a)  # same seed and epoch: same order, every time
    assert sorted(first) == list(range(100)) and first != list(range(100))
    a.set_epoch(1)
    second = _epoch(a)
    assert second != first and sorted(second) == list(range(100))
    b.set_epoch(1)
    assert _epoch(b) == second
    assert _epoch(create_loader(ds, batch_size=16, shuffle=True, seed=6)) != first


def test_loader_limit() -> None:
    ds = _indexed(1000)
    ev = create_loader(ds, batch_size=64, shuffle=False, limit=50)
    seen = _epoch(ev)
    assert len(seen) == 50 == ev.num_samples and seen == sorted(seen) and len(set(seen)) == 50
    assert seen[-1] > 100  # a subset drawn from the whole set, not the first 50 (folders are sorted by class)
    tr = create_loader(ds, batch_size=64, shuffle=True, limit=50)
    assert sorted(_epoch(tr)) == seen  # the same subset, shuffled
    tr.set_epoch(3)
    assert sorted(_epoch(tr)) == seen
    assert _epoch(create_loader(ds, batch_size=64, shuffle=False, limit=5000)) == list(range(1000))
    with pytest.raises(InvalidValueError, match="limit"):
        create_loader(ds, batch_size=64, shuffle=False, limit=0)


@pytest.mark.parametrize("n", [100, 101, 7])
def test_loader_shards_cover_every_sample(n: int) -> None:
    ds = _indexed(n)
    world = 3
    ranks = [DistInfo(rank=r, world_size=world, local_rank=r, is_distributed=True) for r in range(world)]
    shards = [_epoch(create_loader(ds, batch_size=4, shuffle=False, distributed=info)) for info in ranks]
    assert sum(shards, []) == list(range(n))  # eval: each sample exactly once, rank order = dataset order
    loaders = [create_loader(ds, batch_size=4, shuffle=True, seed=9, distributed=info) for info in ranks]
    train = [_epoch(loader) for loader in loaders]
    assert len({len(s) for s in train}) == 1  # equal counts so DDP ranks step together
    assert set(sum(train, [])) == set(range(n)) and len(sum(train, [])) == -(-n // world) * world
    for loader in loaders:
        loader.set_epoch(1)
    assert [_epoch(loader) for loader in loaders] != train


def test_loader_arguments_and_distributed_flag() -> None:
    ds = _indexed(10)
    with pytest.raises(InvalidValueError, match="batch_size"):
        create_loader(ds, batch_size=0, shuffle=False)
    with pytest.raises(InvalidValueError, match="distributed=True"):
        create_loader(ds, batch_size=2, shuffle=False, distributed=True)
    loader = create_loader(ds, batch_size=4, shuffle=False, device="cpu")
    assert loader.sample_indices().tolist() == list(range(10)) and loader.pin_memory is False


# ---------------------------------------------------------------- embedding files


def test_embeddings_round_trip(tmp_path: Path) -> None:
    emb = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 2, 2], dtype=torch.int32)
    q = torch.tensor([True, False, True, False, True, False])
    path = save_embeddings(
        tmp_path / "sub" / "e.safetensors", emb, labels, is_query=q, is_gallery=~q, metadata={"head": "arcface"}
    )
    out = load_embeddings(path)
    assert torch.equal(out["embeddings"], emb) and out["embeddings"].dtype == torch.float64
    assert torch.equal(out["labels"], labels.long()) and out["labels"].dtype == torch.long
    assert torch.equal(out["is_query"], q) and torch.equal(out["is_gallery"], ~q)
    assert out["metadata"] == {"head": "arcface"}
    plain = load_embeddings(save_embeddings(tmp_path / "p.safetensors", emb.float(), labels))
    assert set(plain) == {"embeddings", "labels", "metadata"} and plain["metadata"] == {}


def test_embeddings_save_rejects_bad_values(tmp_path: Path) -> None:
    emb, labels = torch.randn(4, 2), torch.arange(4)
    # The wording of headreg._checks, the same for every entry point.
    with pytest.raises(InvalidValueError, match="embeddings must be a floating-point tensor, got dtype torch.int64"):
        save_embeddings(tmp_path / "x", emb.long(), labels)
    with pytest.raises(InvalidValueError, match=r"labels must have shape \(4,\), got \(3,\)"):
        save_embeddings(tmp_path / "x", emb, labels[:3])
    with pytest.raises(InvalidValueError, match="is_query must be a bool"):
        save_embeddings(tmp_path / "x", emb, labels, is_query=torch.ones(4))
    with pytest.raises(InvalidValueError, match="metadata"):
        save_embeddings(tmp_path / "x", emb, labels, metadata={"epochs": 3})
    assert not (tmp_path / "x").exists()


def test_embeddings_load_rejects_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_embeddings(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(InvalidInputError, match="not a readable safetensors file"):
        load_embeddings(junk)
    cases = {
        "no_labels": ({"embeddings": torch.randn(3, 2)}, "lacks 'labels'"),
        "int_emb": ({"embeddings": torch.ones(3, 2, dtype=torch.int64), "labels": torch.arange(3)}, "float"),
        "float_labels": ({"embeddings": torch.randn(3, 2), "labels": torch.zeros(3)}, "integer"),
        "mismatch": ({"embeddings": torch.randn(3, 2), "labels": torch.arange(4)}, r"shape \(3,\)"),
        "flat_emb": ({"embeddings": torch.randn(3), "labels": torch.arange(3)}, r"\(N, D\)"),
        "bad_mask": (
            {"embeddings": torch.randn(3, 2), "labels": torch.arange(3), "is_gallery": torch.ones(2, dtype=torch.bool)},
            "is_gallery",
        ),
    }
    for name, (tensors, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(InvalidInputError, match=match):
            load_embeddings(path)
