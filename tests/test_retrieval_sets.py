"""The retrieval benchmarks from their native layouts: cub200, cars196, sop, inshop and csv:PATH.

Each layout is written tiny in the test (``_retrieval_layouts``); the readers must give the metric-learning split
(unseen test classes), In-shop's and the CSV's query/gallery roles, SOP's and the CSV's categories, the protocol's
transform, ``headreg eval``'s JSON and ``headreg train``'s per-epoch retrieval on the unseen classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import invoke
from _retrieval_layouts import write_cars, write_csv, write_cub, write_inshop, write_sop

from headreg.data import ImageListDataset, create_dataset, list_datasets, resolve_transform
from headreg.errors import DataFileError, DatasetNotFoundError, InvalidValueError

SMALL = ("--model", "lenetpp", "--in-chans", "3", "--input-size", "28", "--workers", "0", "--json")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("data")
    write_cub(base)
    write_cars(base)
    write_sop(base)
    write_inshop(base)
    write_csv(base / "oml")
    return base


# name -> (train samples, train classes, test samples, test classes, first test class id, recall_k)
EXPECTED = {
    "cub200": (9, 3, 9, 3, "101.Bird_101", (1, 2, 4, 8)),
    "cars196": (9, 3, 9, 3, "099 Make Model 99", (1, 2, 4, 8)),
    "sop": (12, 4, 18, 6, "5", (1, 10, 100, 1000)),
    "inshop": (9, 3, 13, 5, "id_00000004", (1, 10, 20, 30, 40, 50)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_native_layouts_give_the_unseen_class_split(root: Path, name: str) -> None:
    n_train, c_train, n_test, c_test, first_test, ks = EXPECTED[name]
    train = create_dataset(name, "train", data_dir=root)
    test = create_dataset(name, "test", data_dir=root)
    assert isinstance(test, ImageListDataset) and name in list_datasets()
    assert (len(train), train.num_classes, len(test), test.num_classes) == (n_train, c_train, n_test, c_test)
    assert test.classes[0] == first_test and not set(train.classes) & set(test.classes)
    assert train.targets.tolist() == sorted(train.targets.tolist()) and int(test.targets.max()) == c_test - 1
    assert test.recall_k == ks and test.unseen_classes
    image, label = test[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and label == 0


def test_roles_and_categories(root: Path) -> None:
    inshop = create_dataset("inshop", "test", data_dir=root)
    assert inshop.is_query.tolist() == [True, False, False] * 4 + [True]
    assert (inshop.is_query ^ inshop.is_gallery).all()  # In-shop's query and gallery are disjoint
    assert create_dataset("inshop", "train", data_dir=root).is_query is None
    sop = create_dataset("sop", "test", data_dir=root)
    assert sop.is_query is None and sop.categories[:4] == ["bicycle", "bicycle", "bicycle", "chair"]
    csv = create_dataset(f"csv:{root / 'oml' / 'oml.csv'}", "test")
    assert csv.classes == ["3", "4", "5", "6"] and csv.is_query.sum() == 4 and csv.is_gallery.sum() == 8
    assert csv.categories[0] == "shoes" and csv.unseen_classes and csv.recall_k is None
    train = create_dataset(f"csv:{root / 'oml' / 'oml.csv'}", "train")
    assert train.classes == ["0", "1", "2"] and train.is_query is None


def test_csv_without_split_or_roles(root: Path, tmp_path: Path) -> None:
    # A plain label,path list (a spreadsheet's byte-order mark included): every row in both splits, classes
    # seen in training (so no unseen-class protocol), leave-one-out; an empty category counts as "none".
    images = root / "oml" / "images"
    lines = [
        "label,path,category",
        *(f"{lab},{images}/{lab}_{k}.png,{'x' if lab else ''}" for lab in (0, 1) for k in (0, 1)),
    ]
    path = tmp_path / "plain.csv"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    train, test = create_dataset(f"csv:{path}", "train"), create_dataset(f"csv:{path}", "test")
    assert train.paths == test.paths and len(test) == 4 and test.is_query is None
    assert not test.unseen_classes and test.categories == ["none", "none", "x", "x"]


def test_name_colon_dir_and_not_found(root: Path, tmp_path: Path) -> None:
    a = create_dataset(f"cub200:{root}", "test")
    b = create_dataset(f"cub200:{root / 'CUB_200_2011'}", "test")
    assert a.paths == b.paths == create_dataset("cub200", "test", data_dir=root).paths
    with pytest.raises(DatasetNotFoundError, match=r"no images.txt in .*CUB_200_2011.*caltech.*cub200:DIR"):
        create_dataset("cub200", "test", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="no Ebay_train.txt"):
        create_dataset(f"sop:{tmp_path}", "train")
    with pytest.raises(InvalidValueError, match="csv:PATH"):
        create_dataset("csv", "test")


def test_inshop_as_distributed_eval_and_img_folders(tmp_path: Path) -> None:
    # DeepFashion ships Eval/list_eval_partition.txt and Img/img.zip: inshop:DIR on that folder reads it as is.
    home = write_inshop(tmp_path)
    bench = tmp_path / "In-shop Clothes Retrieval Benchmark"
    (bench / "Eval").mkdir(parents=True)
    (bench / "Img").mkdir()
    (home / "list_eval_partition.txt").rename(bench / "Eval" / "list_eval_partition.txt")
    (home / "img").rename(bench / "Img" / "img")
    ds = create_dataset(f"inshop:{bench}", "test")
    assert len(ds) == 13 and ds.paths[0].startswith(str(bench / "Img" / "img"))
    assert ds[0][0].shape == (3, 32, 32)


def test_file_errors_name_the_file_and_line(root: Path, tmp_path: Path) -> None:
    home = write_cub(tmp_path / "a")
    (home / "images.txt").write_text((home / "images.txt").read_text() + "99\n")
    with pytest.raises(DataFileError, match=r"images.txt:19: expected 2 fields"):
        create_dataset("cub200", "train", data_dir=tmp_path / "a")
    home = write_cub(tmp_path / "b")
    next((home / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 of 9 images listed in .*images.txt are missing"):
        create_dataset("cub200", "train", data_dir=tmp_path / "b")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,split\nx.png,train\n")
    with pytest.raises(DataFileError, match=r"bad.csv:1: missing column\(s\) label"):
        create_dataset(f"csv:{bad}", "train")
    flags = tmp_path / "flags.csv"
    (tmp_path / "x.png").write_bytes(b"")
    flags.write_text("label,path,split,is_query\n1,x.png,validation,maybe\n")
    with pytest.raises(DataFileError, match=r"flags.csv:2: column is_query must be true or false"):
        create_dataset(f"csv:{flags}", "test")
    cars = tmp_path / "cars196"
    cars.mkdir()
    (cars / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataFileError, match="not Stanford Cars' annotation file"):
        create_dataset("cars196", "train", data_dir=tmp_path)


def test_images_are_read_lazily(tmp_path: Path) -> None:
    home = write_cub(tmp_path)
    ds = create_dataset("cub200", "test", data_dir=tmp_path)
    Path(ds.paths[4]).write_bytes(b"truncated")  # after listing: only reading it finds out
    assert ds[3][0].shape == (3, 32, 32)
    with pytest.raises(DataFileError, match=r"cannot read the image .*Bird_102_0001.jpg"):
        ds[4]
    assert home.is_dir()


def _steps(transform) -> list[str]:
    return [repr(t) for t in transform.transforms]


def test_protocol_transform_resize_256_crop_224(root: Path) -> None:
    config = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.95}
    ds = create_dataset("cars196", "test", data_dir=root)
    resolve_transform(config, ds, train=False)
    steps = _steps(ds.transform)
    assert "size=256" in steps[0] and "CenterCrop(size=(224, 224))" in steps[1]  # not the backbone's 0.95
    assert ds[0][0].shape == (3, 224, 224)
    resolve_transform(config, ds, train=False, input_size=112)
    assert "size=128" in _steps(ds.transform)[0] and ds[0][0].shape == (3, 112, 112)
    resolve_transform(config, ds, train=True)
    steps = " ".join(_steps(ds.transform))
    assert "RandomResizedCropAndInterpolation(size=(224, 224)" in steps and "RandomHorizontalFlip" in steps
    assert "ColorJitter" not in steps


def _eval(*args: str) -> dict:
    return json.loads(invoke(*SMALL, *args).stdout)


@pytest.mark.parametrize("name", ["cub200", "cars196", "sop", "inshop", "csv"])
def test_eval_cli_json(root: Path, name: str) -> None:
    dataset = f"csv:{root / 'oml' / 'oml.csv'}" if name == "csv" else name
    out = _eval("--dataset", dataset, "--data-dir", str(root), "--metrics", "retrieval,clustering")
    assert set(out) == {"metrics", "info", "warnings"}
    info, metrics = out["info"], out["metrics"]
    ks = EXPECTED.get(name, (0, 0, 0, 0, "", (1, 2, 4, 8)))[5]
    assert [k for k in metrics if k.startswith("recall_at_")] == [f"recall_at_{k}" for k in ks]
    assert {"mean_average_precision_at_r", "r_precision", "precision_at_1", "nmi"} <= set(metrics)
    assert "top1_accuracy" not in metrics  # unseen classes: no head accuracy
    roles = name in ("inshop", "csv")
    assert info["protocol"] == ("query/gallery" if roles else "leave-one-out")
    assert info["num_queries"] + (info["num_gallery"] if roles else 0) == info["num_samples"]
    assert info["num_queries"] == {"inshop": 5, "csv": 4}.get(name, info["num_samples"])
    if name == "inshop":
        assert metrics["num_queries_without_positive"] == 1 and "1 of 5 queries" in out["warnings"][0]
    if name in ("sop", "csv"):
        cats = ("bicycle", "chair") if name == "sop" else ("bags", "shoes")
        assert sum(metrics[f"{c}/num_queries"] for c in cats) == metrics["num_queries"]


def test_eval_cli_recall_k_overrides_the_dataset(root: Path) -> None:
    out = _eval("--dataset", "sop", "--data-dir", str(root), "--metrics", "retrieval", "--recall-k", "1,3")
    assert [k for k in out["metrics"] if k.startswith("recall_at_")] == ["recall_at_1", "recall_at_3"]


def test_train_cub200_reports_retrieval_on_unseen_classes(root: Path, tmp_path: Path) -> None:
    from headreg.engine.train import TrainConfig, train

    cfg = TrainConfig(
        model="lenetpp", head="arcface", dataset="cub200", data_dir=str(root), model_options={"in_chans": 3},
        input_size=28, epochs=2, batch_size=4, device="cpu", amp=False,
    )  # fmt: skip
    result = train(cfg, tmp_path / "run")
    assert result.status == "completed" and result.test_accuracy is None
    for record in result.history:
        assert "test_accuracy" not in record
        assert {"test_recall_at_1", "test_recall_at_8", "test_mean_average_precision_at_r"} <= set(record)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    final = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert final["test_accuracy"] is None and final["metrics"]["num_samples"] == 9
    assert final["metrics"]["recall_at_1"] == pytest.approx(result.history[-1]["test_recall_at_1"])
    # The checkpoint evaluated by `headreg eval` gives the run's own numbers (one inference pass).
    out = json.loads(
        invoke(
            "--checkpoint", tmp_path / "run", "--dataset", "cub200", "--data-dir", root, "--input-size", "28",
            "--workers", "0", "--no-amp", "--metrics", "retrieval", "--json",
        ).stdout
    )  # fmt: skip
    for key in ("recall_at_1", "recall_at_2", "mean_average_precision_at_r"):
        assert out["metrics"][key] == pytest.approx(final["metrics"][key], abs=1e-6)


def test_eval_limit_keeps_roles_and_categories_of_the_rows_drawn(root: Path) -> None:
    sop = _eval("--dataset", "sop", "--data-dir", str(root), "--metrics", "retrieval", "--limit", "11")
    m = sop["metrics"]
    assert sop["info"]["num_samples"] == 11 == m["bicycle/num_queries"] + m["chair/num_queries"]
    full = create_dataset("inshop", "test", data_dir=root)
    inshop = _eval("--dataset", "inshop", "--data-dir", str(root), "--metrics", "retrieval", "--limit", "9")
    from headreg.data.loader import ShardSampler

    drawn = ShardSampler(len(full), shuffle=False, limit=9).indices()  # the subset eval's loader draws
    assert inshop["info"]["num_queries"] == int(full.is_query[drawn].sum())
    assert inshop["info"]["num_gallery"] == int(full.is_gallery[drawn].sum())
