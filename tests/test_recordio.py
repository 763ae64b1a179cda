"""`--dataset rec:DIR`: insightface's MXNet RecordIO read without mxnet, sharded, in DataLoader workers, trained on.

The test writes its own `.rec` + `.idx` from the format's description (dmlc-core's record framing, mxnet's
`IRHeader`), independently of the reader: the header record 0 with the image and identity key ranges, the
identity records, one image with a multi-float label, and one whose header holds the magic number at an
aligned position, which dmlc's writer splits into continuation parts.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from headreg.data import create_dataset, create_loader
from headreg.data._recordio import MAGIC, RecordDataset
from headreg.errors import DataFileError, DatasetNotFoundError

COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]  # class c: a flat colour, so decoding can be checked


def _frame(data: bytes) -> bytes:
    """dmlc RecordIOWriter::WriteRecord: split where the magic sits at a 4-byte-aligned offset."""
    magic = struct.pack("<I", MAGIC)
    parts, start = [], 0
    for i in range(0, len(data) - len(data) % 4, 4):
        if data[i : i + 4] == magic:
            parts.append(data[start:i])
            start = i + 4
    parts.append(data[start:])
    out = b""
    for n, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if n == 0 else (3 if n == len(parts) - 1 else 2))
        out += magic + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)
    return out


def _pack(label: float | list[float], payload: bytes = b"", ident: int = 0) -> bytes:
    """mxnet.recordio.pack: IRHeader 'IfQQ', then the label floats when flag > 0, then the payload."""
    if isinstance(label, list):
        return struct.pack("<IfQQ", len(label), 0.0, ident, 0) + struct.pack(f"<{len(label)}f", *label) + payload
    return struct.pack("<IfQQ", 0, label, ident, 0) + payload


def _jpeg(colour: tuple[int, int, int], size: int = 20) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_rec(folder: Path, labels: list[int], split: str = "train") -> None:
    """insightface's layout: record 0 = header, images at keys 1..N, identity records after them."""
    n, classes = len(labels), max(labels) + 1
    records = {0: _pack([float(n + 1), float(n + 1 + classes)])}
    for i, y in enumerate(labels, 1):
        label: float | list[float] = float(y)
        ident = i
        if i == 2:
            label = [float(y), 7.0]  # a multi-float label: the class is the first value
        if i == 3:
            ident = MAGIC  # the id's low word is the magic at data offset 8: a record in parts
        records[i] = _pack(label, _jpeg(COLOURS[y]), ident)
    for c in range(classes):
        first = 1 + labels.index(c)
        records[n + 1 + c] = _pack([float(first), float(first + labels.count(c))])
    blob, index = b"", []
    for key, data in records.items():
        index.append(f"{key}\t{len(blob)}")
        blob += _frame(data)
    (folder / f"{split}.rec").write_bytes(blob)
    (folder / f"{split}.idx").write_text("\n".join(index) + "\n")


LABELS = [i % 3 for i in range(24)]


@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    write_rec(tmp_path, LABELS)
    return tmp_path


def test_reads_labels_images_and_the_header_record(rec_dir: Path) -> None:
    blob = (rec_dir / "train.rec").read_bytes()
    offsets = [int(line.split("\t")[1]) for line in (rec_dir / "train.idx").read_text().splitlines()]
    assert [struct.unpack_from("<I", blob, off + 4)[0] >> 29 for off in offsets].count(1) == 1  # one record in parts
    ds = create_dataset(f"rec:{rec_dir}", "train")
    assert isinstance(ds, RecordDataset)
    assert len(ds) == 24 and ds.targets.tolist() == LABELS and ds.num_classes == 3
    assert ds.identity_range == (25, 28)
    for i in (0, 1, 2, 5):  # 1: the multi-float label, 2: the record written in parts
        image, target = ds[i]
        assert target == LABELS[i] and image.shape == (3, 20, 20) and image.dtype == torch.uint8
        colour = torch.tensor(COLOURS[target], dtype=torch.float32)
        assert (image.float().mean(dim=(1, 2)) - colour).abs().max() < 8  # JPEG: close to the flat colour


def test_shards_over_ranks_in_dataloader_workers(rec_dir: Path) -> None:
    from headreg._runtime import DistInfo

    ds = create_dataset(f"rec:{rec_dir}", "train")
    seen = []
    for rank in range(2):
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, is_distributed=True)
        loader = create_loader(ds, batch_size=4, shuffle=True, seed=1, num_workers=2, distributed=info)
        labels = torch.cat([y for _, y in loader])
        assert len(labels) == 12
        seen.append(loader.sample_indices().tolist())
    assert sorted(seen[0] + seen[1]) == list(range(24))  # disjoint shards that cover every record


def test_headreg_train_on_a_rec_folder(rec_dir: Path) -> None:
    from headreg.cli import main

    out = rec_dir / "run"
    args = ["train", "--model", "lenetpp", "--model-option", "widths=[4,8,8]", "--head", "arcface",
            "--dataset", f"rec:{rec_dir}", "--epochs", "1", "--batch-size", "8",
            "--test-limit", "12", "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="has no test.rec; the test pass reads train.rec"):
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dataset"] == f"rec:{rec_dir}"
    assert (out / "model.safetensors").is_file()
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 1 and epochs[0]["epoch"] == 1


def test_faults_are_named(tmp_path: Path, rec_dir: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"train.idx does not exist; expected insightface's RecordIO"):
        (tmp_path / "only").mkdir()
        write_rec(tmp_path / "only", LABELS)
        (tmp_path / "only" / "train.idx").unlink()
        create_dataset(f"rec:{tmp_path / 'only'}", "train")
    idx = rec_dir / "train.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:5] + [lines[5].split("\t")[0] + "\t3"] + lines[6:]) + "\n")
    with pytest.raises(DataFileError, match=r"no record at byte 3 \(record 5\); the .idx does not match the .rec"):
        create_dataset(f"rec:{rec_dir}", "train")
    idx.write_text("0\tzero\n")
    with pytest.raises(DataFileError, match=r"line 1: expected 'key<TAB>offset'"):
        create_dataset(f"rec:{rec_dir}", "train")
