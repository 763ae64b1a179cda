"""Pairs from image files: LFW's ``pairs.txt`` layout (``lfw:DIR``) and CSV pair lists (``pairs:LIST.csv``).

Each layout is built tiny in the test, and the same JPEG bytes in the same pair order are also written as an
insightface ``.bin``: both must give the ``bin:PATH`` dataset's images and the CLI's metrics exactly.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from _cli import invoke
from test_pairs_data import jpeg

import headreg
from headreg.data import create_dataset, is_pairs_dataset, list_datasets
from headreg.data._pair_lists import read_lfw_pairs, read_pairs_csv
from headreg.data._pairs import PairsDataset
from headreg.errors import DataFileError, DatasetNotFoundError

SMALL = ("--input-size", "28")
NAMES = ("Ann_A", "Bob_B", "Cid_C", "Dee_D")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def _images(root: Path, tree: str = "lfw") -> dict[tuple[str, int], bytes]:
    """Three 32x32 JPEGs per name under ``root/tree/<name>/<name>_000n.jpg``; returns their bytes."""
    blobs = {}
    for k, name in enumerate(NAMES):
        (root / tree / name).mkdir(parents=True)
        for n in (1, 2, 3):
            blobs[name, n] = jpeg(10 * k + n, size=32)
            (root / tree / name / f"{name}_{n:04d}.jpg").write_bytes(blobs[name, n])
    return blobs


def _lfw_lines(sets: int, per_set: int) -> list[tuple[tuple[str, int], tuple[str, int], bool]]:
    """Each set: ``per_set`` matched pairs, then ``per_set`` mismatched ones, as LFW's view 2 orders them."""
    pairs = []
    for s in range(sets):
        for i in range(per_set):
            name = NAMES[(s + i) % len(NAMES)]
            pairs.append(((name, 1 + (s + i) % 3), (name, 1 + (s + i + 1) % 3), True))
        for i in range(per_set):
            a, b = NAMES[(s + i) % len(NAMES)], NAMES[(s + i + 1) % len(NAMES)]
            pairs.append(((a, 1 + s % 3), (b, 1 + (s + 1) % 3), False))
    return pairs


def write_lfw(root: Path, sets: int = 10, per_set: int = 1, tree: str = "lfw") -> list:
    blobs = _images(root, tree)
    pairs = _lfw_lines(sets, per_set)
    lines = [f"{sets}\t{per_set}"]
    for (a, n1), (b, n2), same in pairs:
        lines.append(f"{a}\t{n1}\t{n2}" if same else f"{a}\t{n1}\t{b}\t{n2}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return [(blobs[x], blobs[y], same) for x, y, same in pairs]


def write_bin_of(path: Path, pairs: list) -> Path:
    images = [blob for a, b, _ in pairs for blob in (a, b)]
    path.write_bytes(pickle.dumps((images, [same for _, _, same in pairs]), protocol=4))
    return path


def write_csv(folder: Path, num_pairs: int = 20) -> tuple[Path, list]:
    """``num_pairs`` rows over images in ``folder/img/``, same and different alternating (every fold holds both)."""
    (folder / "img").mkdir(parents=True)
    rows, pairs = ["path1,path2,issame"], []
    for p in range(num_pairs):
        a, b = jpeg(100 + 2 * p, size=32), jpeg(101 + 2 * p, size=32)
        (folder / "img" / f"{p}a.jpg").write_bytes(a)
        (folder / "img" / f"{p}b.jpg").write_bytes(b)
        same = p % 2 == 0
        flag = ("1", "true", "TRUE") if same else ("0", "false", "False")  # every spelling the list may use
        rows.append(f"img/{p}a.jpg,img/{p}b.jpg,{flag[p // 2 % 3]}")
        pairs.append((a, b, same))
    path = folder / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path, pairs


def test_lfw_layout_is_the_bin_of_the_same_images(tmp_path: Path) -> None:
    pairs = write_lfw(tmp_path / "LFW", sets=2, per_set=3)
    paths, issame = read_lfw_pairs(tmp_path / "LFW")
    assert issame == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3  # LFW's order, kept
    assert paths[0] == tmp_path / "LFW" / "lfw" / "Ann_A" / "Ann_A_0001.jpg" and len(paths) == 24
    ds = create_dataset(f"lfw:{tmp_path / 'LFW'}", "test")
    ref = create_dataset(f"bin:{write_bin_of(tmp_path / 'lfw.bin', pairs)}")
    assert isinstance(ds, PairsDataset) and ds.protocol == "pairs" and ds.images.shape == (24, 3, 32, 32)
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.issame, ref.issame)
    assert {"lfw", "pairs"} <= set(list_datasets()) and is_pairs_dataset("lfw:x") and is_pairs_dataset("pairs:x")
    # The deep-funneled tree is found the same way.
    write_lfw(tmp_path / "deep", sets=2, per_set=3, tree="lfw-deepfunneled")
    assert torch.equal(create_dataset(f"lfw:{tmp_path / 'deep'}").images, ref.images)


def test_csv_list_is_the_bin_of_the_same_images(tmp_path: Path) -> None:
    path, pairs = write_csv(tmp_path / "list", 10)
    ds = create_dataset(f"pairs:{path}")
    ref = create_dataset(f"bin:{write_bin_of(tmp_path / 'ref.bin', pairs)}")
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.issame, ref.issame)
    # A blank line holds no pair, and an absolute path is taken as written.
    absolute = tmp_path / "list" / "img" / "0a.jpg"
    text = path.read_text().replace("img/0a.jpg", str(absolute), 1)
    path.write_text(text.replace("\n", "\n\n", 3))
    assert torch.equal(create_dataset(f"pairs:{path}").images, ref.images)


def test_both_through_the_cli_equal_the_bin(ckpt: Path, tmp_path: Path) -> None:
    pairs = write_lfw(tmp_path / "LFW")  # 10 sets of 1 + 1 pairs: the 10 folds are the 10 sets
    ref = json.loads(
        invoke(
            "--checkpoint", ckpt, "--dataset", f"bin:{write_bin_of(tmp_path / 'l.bin', pairs)}", *SMALL, "--json"
        ).stdout
    )
    out = json.loads(invoke("--checkpoint", ckpt, "--dataset", f"lfw:{tmp_path / 'LFW'}", *SMALL, "--json").stdout)
    assert out["metrics"] == ref["metrics"] and out["info"]["num_pairs"] == 20 and out["info"]["tta"] == "flip-sum"
    # Photos go in at the backbone's input size (LeNet++: 28x28) when --input-size is not given.
    plain = json.loads(invoke("--checkpoint", ckpt, "--dataset", f"lfw:{tmp_path / 'LFW'}", "--json").stdout)
    assert plain["metrics"] == out["metrics"]
    path, pairs = write_csv(tmp_path / "list")
    ref = json.loads(
        invoke(
            "--checkpoint", ckpt, "--dataset", f"bin:{write_bin_of(tmp_path / 'c.bin', pairs)}", *SMALL, "--json"
        ).stdout
    )
    out = json.loads(invoke("--checkpoint", ckpt, "--dataset", f"pairs:{path}", *SMALL, "--json").stdout)
    assert out["metrics"] == ref["metrics"] and out["info"]["protocol"] == "pairs"
    r = invoke("--checkpoint", ckpt, "--dataset", f"lfw:{tmp_path / 'nowhere'}", *SMALL, ok=False)
    assert "pairs.txt not found" in r.output
    assert "needs a folder: use 'lfw:DIR'" in invoke("--checkpoint", ckpt, "--dataset", "lfw:", ok=False).output
    assert "use 'pairs:LIST.csv'" in invoke("--checkpoint", ckpt, "--dataset", "pairs:", ok=False).output


def _lfw_error(root: Path, edit, error: type[Exception] = DataFileError) -> str:
    text = (root / "pairs.txt").read_text().splitlines()
    (root / "pairs.txt").write_text("\n".join(edit(list(text))) + "\n")
    with pytest.raises(error) as info:
        read_lfw_pairs(root)
    return str(info.value)


def test_lfw_errors_name_the_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "LFW"
    write_lfw(root, sets=2, per_set=2)
    good = (root / "pairs.txt").read_text()

    def swap(lines: list[str]) -> list[str]:  # a mismatched line where a matched one belongs
        lines[2], lines[3] = lines[3], lines[2]
        return lines

    assert "pairs.txt:3: expected a matched pair" in _lfw_error(root, swap)
    (root / "pairs.txt").write_text(good)
    assert "pairs.txt:1: expected 'SETS PAIRS'" in _lfw_error(root, lambda ls: ["10", *ls[1:]])
    (root / "pairs.txt").write_text(good)
    assert "SETS must be a positive integer" in _lfw_error(root, lambda ls: ["x 2", *ls[1:]])
    (root / "pairs.txt").write_text(good)
    assert "so 9 lines; the file has 8" in _lfw_error(root, lambda ls: ls[:-1])
    (root / "pairs.txt").write_text(good)
    assert "pairs.txt:2: an image number must be a positive" in _lfw_error(
        root, lambda ls: [ls[0], "Ann_A 1 x", *ls[2:]]
    )
    (root / "pairs.txt").write_text(good)
    msg = _lfw_error(root, lambda ls: [ls[0], "../etc 1 2", *ls[2:]])
    assert "pairs.txt:2" in msg and "is not an LFW name" in msg
    (root / "pairs.txt").write_text(good)
    msg = _lfw_error(root, lambda ls: [ls[0], "Ann_A 1 7", *ls[2:]], DatasetNotFoundError)
    assert "pairs.txt:2: image not found" in msg and "Ann_A_0007.jpg" in msg
    (root / "pairs.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="pairs.txt not found"):
        read_lfw_pairs(root)
    (root / "pairs.txt").write_text(good)
    (root / "lfw").rename(root / "elsewhere")
    with pytest.raises(DatasetNotFoundError, match="no image tree"):
        read_lfw_pairs(root)


def test_csv_errors_name_the_file_and_line(tmp_path: Path) -> None:
    path, _ = write_csv(tmp_path, 4)
    good = path.read_text().splitlines()

    def error(lines: list[str], kind: type[Exception] = DataFileError) -> str:
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(kind) as info:
            read_pairs_csv(path)
        return str(info.value)

    assert "pairs.csv:1: expected the header path1,path2,issame" in error(["a,b,c", *good[1:]])
    assert "pairs.csv:3: issame must be one of 0, 1, true, false; got 'yes'" in error(
        [*good[:2], "img/1a.jpg,img/1b.jpg,yes", *good[3:]]
    )
    assert "pairs.csv:2: expected 3 fields" in error([good[0], "img/0a.jpg,1", *good[2:]])
    assert "pairs.csv:2: an image path is empty" in error([good[0], ",img/0a.jpg,1", *good[2:]])
    msg = error([*good, "img/0a.jpg,img/nope.jpg,1"], DatasetNotFoundError)
    assert "pairs.csv:6: image not found" in msg and "nope.jpg" in msg
    assert "holds a header and no pair" in error(good[:1])
    with pytest.raises(DatasetNotFoundError, match="pairs list not found"):
        read_pairs_csv(tmp_path / "missing.csv")


def test_images_of_two_sizes_or_undecodable_are_refused(tmp_path: Path) -> None:
    path, _ = write_csv(tmp_path, 2)
    (tmp_path / "img" / "1b.jpg").write_bytes(jpeg(0, size=40))
    with pytest.raises(DataFileError, match=r"1b.jpg is 40x40 pixels, .*0a.jpg 32x32; .* must share one size"):
        create_dataset(f"pairs:{path}")
    (tmp_path / "img" / "1b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataFileError, match=r"the image .*1b.jpg cannot be decoded"):
        create_dataset(f"pairs:{path}")
