"""The metric-learning retrieval benchmarks, read from the layouts they are distributed in (docs/protocols.md).

``cub200`` (CUB-200-2011), ``cars196`` (Stanford Cars), ``sop`` (Stanford Online Products), ``inshop`` (DeepFashion
In-shop) and ``csv:PATH`` (open-metric-learning's CSV format). The split is the metric-learning one (Musgrave et
al., "A Metric Learning Reality Check", 2020): train on half of the classes, evaluate on the other, unseen half.
Labels are renumbered ``0..C-1`` within each split in the order of the benchmark's own class ids, which
``classes`` keeps. Every parse error names the file and line; images are only listed here, never decoded.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from headreg.data._files import ImageListDataset
from headreg.errors import DataFileError, DatasetNotFoundError, InvalidValueError

__all__ = ["RETRIEVAL_SETS", "read_retrieval_set"]

#: The k of Recall@K each benchmark's papers report.
RECALL_K = {
    "cub200": (1, 2, 4, 8),
    "cars196": (1, 2, 4, 8),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}

#: name -> (the file that marks its folder, the folders tried under the data dir, where it comes from).
RETRIEVAL_SETS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "cub200": (
        "images.txt",
        ("CUB_200_2011", "cub200/CUB_200_2011", "cub200"),
        "CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ (extract it: CUB_200_2011/)",
    ),
    "cars196": (
        "cars_annos.mat",
        ("cars196", "."),
        "car_ims.tgz and cars_annos.mat of Stanford Cars (Krause et al. 2013), both in one folder",
    ),
    "sop": (
        "Ebay_train.txt",
        ("Stanford_Online_Products", "sop/Stanford_Online_Products", "sop"),
        "Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/",
    ),
    "inshop": (
        "list_eval_partition.txt",
        ("inshop", "inshop/Eval", "Eval", "."),
        "DeepFashion In-shop Clothes Retrieval: Eval/list_eval_partition.txt and Img/img.zip (extracted: img/)",
    ),
}


def read_retrieval_set(key: str, split: str, folder: Path | None, data_root: Path, where: str) -> ImageListDataset:
    """One split of a retrieval benchmark.

    Args:
        key: ``cub200``, ``cars196``, ``sop``, ``inshop`` or ``csv``.
        split: ``train`` or ``test``.
        folder: The folder (or, for ``csv``, the file) of ``NAME:PATH``; None: look under ``data_root``.
        data_root: The data directory.
        where: How ``data_root`` was chosen, for the not-found message.

    Raises:
        DatasetNotFoundError: the files are not where they were looked for, or listed images are missing.
        DataFileError: a list file does not parse.
    """
    if key == "csv":
        assert folder is not None
        return _read_csv(folder.expanduser().resolve(), split)
    marker, homes, origin = RETRIEVAL_SETS[key]
    tried = [folder.expanduser().resolve()] if folder is not None else [(data_root / h).resolve() for h in homes]
    if folder is not None:
        tried += [(tried[0] / h).resolve() for h in homes]
    tried = list(dict.fromkeys(tried))  # "." repeats the folder itself
    home = next((p for p in tried if (p / marker).is_file()), None)
    if home is None:
        source = "the folder given" if folder is not None else f"data dir {data_root}, {where}"
        raise DatasetNotFoundError(
            f"dataset '{key}' not found: no {marker} in {', '.join(str(p) for p in tried)} ({source}). "
            f"It comes from {origin}; put it under the data dir (--data-dir DIR or HEADREG_DATA_DIR) "
            f"or name its folder: --dataset {key}:DIR"
        )
    reader: Callable[[Path, str], ImageListDataset] = {
        "cub200": _read_cub,
        "cars196": _read_cars,
        "sop": _read_sop,
        "inshop": _read_inshop,
    }[key]
    return reader(home, split)


# ------------------------------------------------------------------------------------------------ helpers
def _lines(path: Path, fields: int, skip: int = 0) -> list[tuple[int, list[str]]]:
    """``(line number, whitespace-split fields)`` of each non-empty line after ``skip``; a short line is an error."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if number <= skip or not line.strip():
                continue
            parts = line.split()
            if len(parts) < fields:
                raise DataFileError(f"{path}:{number}: expected {fields} fields, got {line.strip()!r}")
            out.append((number, parts))
    return out


def _int(value: str, path: Path, number: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFileError(f"{path}:{number}: {what} must be an integer, got {value!r}") from None


def _check_exist(name: str, paths: Sequence[str], listed_in: Path) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"dataset '{name}': {len(missing)} of {len(paths)} images listed in {listed_in} are missing "
            f"(e.g. {missing[0]}); extract the images next to the list as the dataset is distributed"
        )


def _build(
    name: str,
    root: Path,
    listed_in: Path,
    rows: Sequence[tuple[str, str]],
    *,
    recall_k: tuple[int, ...] | None,
    unseen_classes: bool,
    sort_key: Callable[[str], object] = str,
    is_query: Sequence[bool] | None = None,
    is_gallery: Sequence[bool] | None = None,
    categories: Sequence[str] | None = None,
) -> ImageListDataset:
    """Renumber the split's class ids ``0..C-1`` (in ``sort_key`` order) and build the dataset."""
    if not rows:
        raise DatasetNotFoundError(f"dataset '{name}': {listed_in} lists no image for this split")
    paths = [p for p, _ in rows]
    _check_exist(name, paths, listed_in)
    classes = sorted({c for _, c in rows}, key=sort_key)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for _, c in rows], dtype=torch.long)

    def mask(values: Sequence[bool] | None) -> torch.Tensor | None:
        return None if values is None else torch.tensor(list(values), dtype=torch.bool)

    return ImageListDataset(
        paths, labels, classes, name=name, root=root, is_query=mask(is_query), is_gallery=mask(is_gallery),
        categories=categories, recall_k=recall_k, unseen_classes=unseen_classes,
    )  # fmt: skip


def _half(split: str, class_id: int, first_test: int) -> bool:
    """Whether a class belongs to ``split`` when classes ``>= first_test`` are the test half."""
    return (class_id >= first_test) == (split == "test")


# ------------------------------------------------------------------------------------------------ readers
def _read_cub(home: Path, split: str) -> ImageListDataset:
    """``images.txt`` (``id path``) + ``image_class_labels.txt`` (``id class``); classes 1-100 train, 101-200 test."""
    images, labels_file = home / "images.txt", home / "image_class_labels.txt"
    if not labels_file.is_file():
        raise DatasetNotFoundError(f"dataset 'cub200': {labels_file} is missing (it ships next to images.txt)")
    cls = {p[0]: _int(p[1], labels_file, n, "the class id") for n, p in _lines(labels_file, 2)}
    rows = []
    for number, (image_id, rel, *_) in _lines(images, 2):
        if image_id not in cls:
            raise DataFileError(f"{images}:{number}: image id {image_id} has no class in {labels_file}")
        c = cls[image_id]
        if _half(split, c, 101):
            rows.append((str(home / "images" / rel), rel.split("/")[0] if "/" in rel else str(c)))
    return _build("cub200", home, images, rows, recall_k=RECALL_K["cub200"], unseen_classes=True)


def _read_cars(home: Path, split: str) -> ImageListDataset:
    """``cars_annos.mat``'s ``annotations`` (``relative_im_path``, ``class`` 1-196); classes 1-98 train, 99-196 test.

    The file's own ``test`` flag (the classification split) is not the metric-learning split and is not used;
    nor are the bounding boxes (the protocol uses whole images).
    """
    import scipy.io

    mat = home / "cars_annos.mat"
    try:
        content = scipy.io.loadmat(str(mat), squeeze_me=True)
        annos = content["annotations"]
        paths = [str(p) for p in annos["relative_im_path"].ravel()]
        ids = [int(c) for c in annos["class"].ravel()]
    except (ValueError, KeyError, TypeError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as exc:
        raise DataFileError(
            f"{mat}: not Stanford Cars' annotation file ({type(exc).__name__}: {exc}); expected a MATLAB file "
            "with an 'annotations' struct array holding 'relative_im_path' and 'class'"
        ) from None
    names = [str(n) for n in content["class_names"].ravel()] if "class_names" in content else []
    bad = [c for c in ids if not 1 <= c <= 196]
    if bad:
        raise DataFileError(f"{mat}: class ids must lie in 1..196, got {bad[0]}")
    rows = [
        (str(home / p), f"{c:03d}" + (f" {names[c - 1]}" if len(names) >= c else ""))
        for p, c in zip(paths, ids, strict=True)
        if _half(split, c, 99)
    ]
    return _build("cars196", home, mat, rows, recall_k=RECALL_K["cars196"], unseen_classes=True)


def _read_sop(home: Path, split: str) -> ImageListDataset:
    """``Ebay_train.txt`` / ``Ebay_test.txt`` (``image_id class_id super_class_id path``), one header line.

    The super-class folder (``bicycle_final`` -> ``bicycle``) is each image's category.
    """
    listed = home / ("Ebay_train.txt" if split == "train" else "Ebay_test.txt")
    if not listed.is_file():
        raise DatasetNotFoundError(f"dataset 'sop': {listed} is missing (it ships next to Ebay_train.txt)")
    rows, categories = [], []
    for number, (_, class_id, _, rel, *_) in _lines(listed, 4, skip=1):
        _int(class_id, listed, number, "class_id")
        rows.append((str(home / rel), class_id))
        categories.append(rel.split("/")[0].removesuffix("_final"))
    return _build(
        "sop", home, listed, rows, recall_k=RECALL_K["sop"], unseen_classes=True, sort_key=int, categories=categories
    )


def _read_inshop(home: Path, split: str) -> ImageListDataset:
    """``list_eval_partition.txt``: a count line, a header, then ``image_name item_id evaluation_status``.

    ``train`` rows form the train split; the test split is the ``query`` and ``gallery`` rows, evaluated query ->
    gallery. Image paths (``img/...``) are relative to the folder holding ``img/`` (the list's own folder, its
    parent for the distributed ``Eval/`` layout, or ``Img/`` beside them).
    """
    listed = home / "list_eval_partition.txt"
    base = next((b for b in (home, home.parent, home / "Img", home.parent / "Img") if (b / "img").is_dir()), home)
    rows, roles = [], []
    for number, (rel, item, status, *_) in _lines(listed, 3, skip=2):
        if status not in ("train", "query", "gallery"):
            raise DataFileError(f"{listed}:{number}: evaluation_status must be train, query or gallery, got {status!r}")
        if (status == "train") == (split == "train"):
            rows.append((str(base / rel), item))
            roles.append(status)
    if split == "train":
        return _build("inshop", home, listed, rows, recall_k=RECALL_K["inshop"], unseen_classes=True)
    return _build(
        "inshop", home, listed, rows, recall_k=RECALL_K["inshop"], unseen_classes=True,
        is_query=[r == "query" for r in roles], is_gallery=[r == "gallery" for r in roles],
    )  # fmt: skip


_TRUE, _FALSE = ("1", "true", "yes", "t", "y"), ("0", "false", "no", "f", "n", "")
_SPLIT_NAMES = {"train": ("train",), "test": ("validation", "test", "val")}


def _flag(value: str, path: Path, number: int, column: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE or v == "1.0":
        return True
    if v in _FALSE or v == "0.0":
        return False
    raise DataFileError(f"{path}:{number}: column {column} must be true or false (1 or 0), got {value!r}")


def _read_csv(path: Path, split: str) -> ImageListDataset:
    """open-metric-learning's CSV: ``label,path`` and optional ``split`` (train / validation), ``is_query``,
    ``is_gallery``, ``category``. Relative paths are taken from the CSV's folder."""
    if not path.is_file():
        raise DatasetNotFoundError(f"dataset 'csv:{path}': no such file; expected a CSV with columns label,path")
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("label", "path") if c not in columns]
        if missing:
            raise DataFileError(f"{path}:1: missing column(s) {', '.join(missing)}; the header has {columns}")
        reader.fieldnames = columns
        records = [(n, row) for n, row in enumerate(reader, 2)]
    has = {c: c in columns for c in ("split", "is_query", "is_gallery", "category")}
    wanted = _SPLIT_NAMES.get(split)
    if wanted is None:
        raise InvalidValueError(f"split for dataset 'csv:{path}' must be train or test, got {split!r}")
    splits = {str(r.get("split") or "").strip().lower() for _, r in records}
    if has["split"] and not splits <= {"train", "validation", "test", "val"}:
        raise DataFileError(f"{path}: column split must hold train or validation, got {sorted(splits)}")
    rows, query, gallery, categories = [], [], [], []
    label_sets: dict[bool, set[str]] = {True: set(), False: set()}
    for number, row in records:
        label, rel = (row.get("label") or "").strip(), (row.get("path") or "").strip()  # None: a short row
        if not label or not rel:
            raise DataFileError(f"{path}:{number}: label and path must not be empty")
        row_split = (row.get("split") or "").strip().lower()
        is_train = not has["split"] or row_split == "train"
        label_sets[is_train].add(label)
        if has["split"] and row_split not in wanted:
            continue
        p = Path(rel).expanduser()
        rows.append((str(p if p.is_absolute() else path.parent / p), label))
        query.append(_flag(row["is_query"] or "", path, number, "is_query") if has["is_query"] else True)
        gallery.append(_flag(row["is_gallery"] or "", path, number, "is_gallery") if has["is_gallery"] else True)
        categories.append((row.get("category") or "").strip() or "none")
    roles = (has["is_query"] or has["is_gallery"]) and split == "test"  # roles only mean something in evaluation
    numeric = all(lab.lstrip("-").isdigit() for _, lab in rows)
    return _build(
        f"csv:{path}", path.parent, path, rows, recall_k=None,
        unseen_classes=has["split"] and not (label_sets[True] & label_sets[False]),
        sort_key=int if numeric else str, is_query=query if roles else None, is_gallery=gallery if roles else None,
        categories=categories if has["category"] else None,
    )  # fmt: skip
