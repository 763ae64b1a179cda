"""Tiny synthetic copies of the retrieval benchmarks' native layouts, written in the tests (nothing downloaded).

Each class gets a few 32x32 images of its own colour (plus noise), so a model can tell classes apart; the layouts
are those the real datasets ship in (docs/protocols.md).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def image_bytes(label: int, index: int, size: int = 32, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(1000 * label + index)
    base = np.array([(37 * label) % 256, (91 * label + 50) % 256, (53 * label + 100) % 256], dtype=np.float64)
    pixels = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _put(path: Path, label: int, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(label, index))


def write_cub(root: Path, classes: tuple[int, ...] = (1, 2, 3, 101, 102, 103), per_class: int = 3) -> Path:
    """``root/CUB_200_2011/{images.txt, image_class_labels.txt, images/NNN.Name/Name_000k.jpg}``."""
    home = root / "CUB_200_2011"
    images, labels = [], []
    n = 0
    for c in classes:
        for k in range(per_class):
            n += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k:04d}.jpg"
            _put(home / "images" / rel, c, k)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
    (home / "images.txt").write_text("\n".join(images) + "\n")
    (home / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return home


def write_cars(root: Path, classes: tuple[int, ...] = (1, 2, 3, 99, 100, 101), per_class: int = 3) -> Path:
    """``root/cars196/{cars_annos.mat, car_ims/NNNNNN.jpg}``, the .mat in Stanford Cars' own structure.

    ``annotations``: a 1 x N struct array with fields relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class,
    test (each a MATLAB array, as in the real file); ``class_names``: a 1 x 196 cell of strings.
    """
    import scipy.io

    home = root / "cars196"
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    entries = []
    n = 0
    for c in classes:
        for k in range(per_class):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            _put(home / rel, c, k)
            entries.append(
                (np.array([rel]), *(np.array([[v]], dtype=np.uint16) for v in (1, 2, 30, 31)),
                 np.array([[c]], dtype=np.uint8), np.array([[k % 2]], dtype=np.uint8))
            )  # fmt: skip
    annos = np.empty((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, e in enumerate(entries):
        annos[0, i] = e
    names = np.empty((1, 196), dtype=object)
    for i in range(196):
        names[0, i] = f"Make Model {i + 1}"
    scipy.io.savemat(str(home / "cars_annos.mat"), {"annotations": annos, "class_names": names})
    return home


SOP_SUPER = ("bicycle", "chair")


def write_sop(root: Path, per_class: int = 3) -> Path:
    """``root/Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, <super>_final/<id>_<k>.JPG}``.

    Train classes 1-4, test classes 5-10 (in the real files 1-11,318 and 11,319-22,634), super-classes alternating.
    """
    home = root / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    lines: dict[str, list[str]] = {"train": [header], "test": [header]}
    n = 0
    for c in range(1, 11):
        split = "train" if c <= 4 else "test"
        sup = (c - 1) % 2
        for k in range(per_class):
            n += 1
            rel = f"{SOP_SUPER[sup]}_final/{110000 + c}_{k}.JPG"
            _put(home / rel, c, k)
            lines[split].append(f"{n} {c} {sup + 1} {rel}")
    (home / "Ebay_train.txt").write_text("\n".join(lines["train"]) + "\n")
    (home / "Ebay_test.txt").write_text("\n".join(lines["test"]) + "\n")
    return home


def write_inshop(root: Path) -> Path:
    """``root/inshop/{list_eval_partition.txt, img/...}``: items 1-3 train; items 4-8 test, one query and two
    gallery images each (item 8: a query whose item has no gallery image)."""
    home = root / "inshop"
    rows = []
    for item in range(1, 9):
        statuses = ["train"] * 3 if item <= 3 else ["query", "gallery", "gallery"]
        if item == 8:
            statuses = ["query"]
        for k, status in enumerate(statuses):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{k + 1:02d}_1_front.jpg"
            _put(home / rel, item, k)
            rows.append(f"{rel}    id_{item:08d}    {status}")
    text = f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    (home / "list_eval_partition.txt").write_text(text)
    return home


def write_csv(root: Path) -> Path:
    """An OML-format CSV: labels 0-2 train, 3-6 validation with is_query/is_gallery and a category."""
    rows = ["label,path,split,is_query,is_gallery,category"]
    for label in range(7):
        split = "train" if label < 3 else "validation"
        for k in range(3):
            rel = f"images/{label}_{k}.png"
            _put(root / rel, label, k)
            q, g = (("True", "False") if k == 0 else ("False", "True")) if split == "validation" else ("", "")
            rows.append(f"{label},{rel},{split},{q},{g},{'shoes' if label % 2 else 'bags'}")
    path = root / "oml.csv"
    path.write_text("\n".join(rows) + "\n")
    return path
