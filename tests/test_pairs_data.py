"""insightface ``.bin`` pairs files: the restricted unpickler, the structure check, the ``bin:PATH`` dataset."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headreg.data import create_dataset, list_datasets
from headreg.data._pairs import PairsDataset, load_pair_embeddings, read_pairs_bin, save_pair_embeddings
from headreg.errors import DataFileError, DatasetNotFoundError, InvalidInputError, InvalidValueError


def jpeg(seed: int, size: int = 112) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's ``pickle.dump((images, issame), f, protocol=2)`` writes: its str (the JPEG bytes) as
    BINSTRING opcodes, which Python 3 reads as bytes only with ``encoding="bytes"``."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    out += [b"T" + len(blob).to_bytes(4, "little") + blob for blob in images]  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if v else b"\x89" for v in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def write_bin(path: Path, num_pairs: int = 20, *, python2: bool = False) -> Path:
    """A tiny insightface-layout .bin: (list of 2P JPEG bytes, list of P bools), same/different alternating."""
    images = [jpeg(i) for i in range(2 * num_pairs)]
    issame = [p % 2 == 0 for p in range(num_pairs)]
    data = python2_pickle(images, issame) if python2 else pickle.dumps((images, issame), protocol=4)
    path.write_bytes(data)
    return path


class _RunsCode:
    """A pickle payload that calls os.system when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_reads_the_layout_and_decodes(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "lfw.bin", 10, python2=True)
    assert read_pairs_bin(write_bin(tmp_path / "py3.bin", 10)) == read_pairs_bin(path)
    images, issame = read_pairs_bin(path)
    assert len(images) == 20 and issame == [p % 2 == 0 for p in range(10)]
    ds = create_dataset(f"bin:{path}", "test")
    assert isinstance(ds, PairsDataset) and ds.protocol == "pairs"
    assert ds.images.shape == (20, 3, 112, 112) and ds.images.dtype == torch.uint8
    assert ds.issame.tolist() == issame and ds.labels.tolist() == [i // 2 for i in range(20)]
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(images[3])).convert("RGB")))
    assert torch.equal(ds.images[3], decoded.permute(2, 0, 1))
    assert "bin" in list_datasets()


def test_crafted_pickle_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([_RunsCode(marker)], [True])))
    with pytest.raises(DataFileError, match="refusing to load the global"):
        read_pairs_bin(evil)
    with pytest.raises(DataFileError, match="refusing"):
        create_dataset(f"bin:{evil}")
    assert not marker.exists()
    # A global anywhere, even one that looks harmless, is refused too.
    harmless = tmp_path / "set.bin"
    harmless.write_bytes(pickle.dumps(({b"x"}, [True]), protocol=2))  # a set is built through builtins.set
    with pytest.raises(DataFileError, match=r"refusing to load the global (__builtin__|builtins)\.set"):
        read_pairs_bin(harmless)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([[b"a", b"b"], [True]], "2-tuple"),
        (([b"a", b"b"], [True], 1), "2-tuple"),
        (([b"a"], [True]), "2 x 1 = 2 entries"),
        (([b"a", b"b"], []), "issame is empty"),
        (([b"a", b"b"], [1]), r"issame\[0\] must be a bool"),
        (([b"a", "b"], [True]), r"images\[1\] must be the bytes"),
        (({"images": 1}, [True]), "images must be a list"),
        (([b"a", b"b"], [None]), r"issame\[0\] must be a bool"),
    ],
)
def test_structure_is_checked_as_data(tmp_path: Path, obj, match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(DataFileError, match=match):
        read_pairs_bin(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="pairs file not found"):
        create_dataset(f"bin:{tmp_path / 'nope.bin'}")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(DataFileError, match="not a readable pairs .bin"):
        read_pairs_bin(junk)
    not_jpeg = tmp_path / "notjpeg.bin"
    not_jpeg.write_bytes(pickle.dumps(([b"abc", b"def"], [True])))
    with pytest.raises(DataFileError, match=r"images\[0\] cannot be decoded"):
        create_dataset(f"bin:{not_jpeg}")
    sizes = tmp_path / "sizes.bin"
    sizes.write_bytes(pickle.dumps(([jpeg(0), jpeg(1, size=96)], [True])))
    with pytest.raises(DataFileError, match="one size"):
        create_dataset(f"bin:{sizes}")
    with pytest.raises(InvalidValueError, match="needs a file"):
        create_dataset("bin:")


def test_pair_embeddings_round_trip(tmp_path: Path) -> None:
    emb, same = torch.randn(8, 3), torch.tensor([True, False, True, False])
    path = save_pair_embeddings(tmp_path / "p.safetensors", emb, same, metadata={"tta": "flip-sum"})
    data = load_pair_embeddings(path)
    assert torch.equal(data["embeddings"], emb) and torch.equal(data["issame"], same)
    assert data["metadata"] == {"tta": "flip-sum"}
    with pytest.raises(InvalidInputError, match="2 x 4 = 8 rows"):
        save_pair_embeddings(tmp_path / "q.safetensors", emb[:6], same)
