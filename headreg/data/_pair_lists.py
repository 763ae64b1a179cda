"""Face-verification pairs from image files: LFW's own ``pairs.txt`` layout and a user's CSV pair list.

Both readers only parse and check their list, strictly, and return the ``2P`` image paths (pair ``p`` is paths
``2p`` and ``2p + 1``, in file order) with the ``P`` same/different flags; :meth:`PairsDataset.from_files
<headreg.data._pairs.PairsDataset.from_files>` decodes them into the one in-memory pairs dataset, so the protocol,
the flip TTA and the metrics are those of ``bin:PATH`` (docs/protocols.md).

* ``lfw:DIR``: ``DIR/pairs.txt`` (LFW's view 2: a first line ``S N``, then ``S`` sets of ``N`` matched lines
  ``name n1 n2`` followed by ``N`` mismatched lines ``name1 n1 name2 n2``) over ``DIR/lfw/<name>/<name>_NNNN.jpg``
  or the deep-funneled tree ``DIR/lfw-deepfunneled/``. The order is kept, so with ``10 300`` the protocol's 10
  contiguous folds of 600 pairs are LFW's 10 official sets, as in insightface's ``lfw.bin``.
* ``pairs:LIST.csv``: a header ``path1,path2,issame``, then one pair a row; paths relative to the CSV's folder
  (or absolute), ``issame`` one of ``0``, ``1``, ``true``, ``false`` (any case). The file is the user's own list,
  so a path may point anywhere; nothing else in it is interpreted.
"""

from __future__ import annotations

import csv
from pathlib import Path

from headreg.errors import DataFileError, DatasetNotFoundError

__all__ = ["LFW_TREES", "read_lfw_pairs", "read_pairs_csv"]

#: The image trees ``lfw:DIR`` looks for, in this order: the original images and the deep-funneled ones.
LFW_TREES = ("lfw", "lfw-deepfunneled")
_CSV_HEADER = ("path1", "path2", "issame")
_ISSAME = {"0": False, "1": True, "false": False, "true": True}


def _positive(token: str, where: str, what: str) -> int:
    if not token.isdigit() or int(token) < 1:
        raise DataFileError(f"{where}: {what} must be a positive integer, got {token!r}")
    return int(token)


def _lfw_name(token: str, where: str) -> str:
    # A name becomes a folder and a file name: refuse anything that would leave the image tree.
    if token.startswith(".") or "/" in token or "\\" in token:
        raise DataFileError(f"{where}: {token!r} is not an LFW name (a folder under lfw/, such as Aaron_Peirsol)")
    return token


def _lfw_tree(root: Path) -> Path:
    for tree in LFW_TREES:
        if (root / tree).is_dir():
            return root / tree
    raise DatasetNotFoundError(
        f"dataset 'lfw:{root}': no image tree in {root}; expected {root}/lfw/<name>/<name>_0001.jpg "
        "(or lfw-deepfunneled/) beside pairs.txt"
    )


def read_lfw_pairs(root: str | Path) -> tuple[list[Path], list[bool]]:
    """Parse ``root/pairs.txt`` (LFW view 2) and find every image it names.

    Args:
        root: The folder holding ``pairs.txt`` and ``lfw/`` (or ``lfw-deepfunneled/``).

    Returns:
        ``(paths, issame)``: ``2P`` image paths, pair ``p`` being ``paths[2p]`` and ``paths[2p + 1]``, in file
        order, and ``P`` bools.

    Raises:
        DatasetNotFoundError: no ``pairs.txt``, no image tree, or a missing image (its path and line named).
        DataFileError: a malformed line, named by file and line number.
    """
    root = Path(root)
    listing = root / "pairs.txt"
    if not listing.is_file():
        raise DatasetNotFoundError(
            f"dataset 'lfw:{root}': {listing} not found; expected LFW's pairs.txt (view 2) beside lfw/<name>/ "
            "(both from the LFW archive, lfw.tgz or lfw-deepfunneled.tgz, and pairs.txt)"
        )
    tree = _lfw_tree(root)
    lines = listing.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # a trailing newline or two, nothing else, may follow the last set
        lines.pop()
    if not lines:
        raise DataFileError(f"{listing}: empty; expected a first line 'SETS PAIRS', such as '10 300'")
    head = lines[0].split()
    if len(head) != 2:
        raise DataFileError(f"{listing}:1: expected 'SETS PAIRS' (such as '10 300'), got {lines[0]!r}")
    sets, per_set = (_positive(t, f"{listing}:1", w) for t, w in zip(head, ("SETS", "PAIRS"), strict=True))
    expected = 1 + sets * 2 * per_set
    if len(lines) != expected:
        raise DataFileError(
            f"{listing}: the first line announces {sets} sets of {per_set} matched and {per_set} mismatched pairs, "
            f"so {expected} lines; the file has {len(lines)}"
        )
    paths: list[Path] = []
    issame: list[bool] = []
    for number, line in enumerate(lines[1:], start=2):
        where = f"{listing}:{number}"
        same = (number - 2) % (2 * per_set) < per_set  # each set: its matched lines, then its mismatched ones
        fields = line.split()
        if same and len(fields) == 3:
            name = _lfw_name(fields[0], where)
            pair = ((name, fields[1]), (name, fields[2]))
        elif not same and len(fields) == 4:
            pair = ((_lfw_name(fields[0], where), fields[1]), (_lfw_name(fields[2], where), fields[3]))
        else:
            kind = "a matched pair 'name n1 n2'" if same else "a mismatched pair 'name1 n1 name2 n2'"
            raise DataFileError(f"{where}: expected {kind}, got {line!r}")
        for name, token in pair:
            image = tree / name / f"{name}_{_positive(token, where, 'an image number'):04d}.jpg"
            if not image.is_file():
                raise DatasetNotFoundError(f"{where}: image not found: {image}")
            paths.append(image)
        issame.append(same)
    return paths, issame


def read_pairs_csv(path: str | Path) -> tuple[list[Path], list[bool]]:
    """Parse a CSV pair list ``path1,path2,issame`` and check that every image exists.

    Args:
        path: The CSV file; relative image paths are taken from its folder.

    Returns:
        ``(paths, issame)``: ``2P`` image paths (pair ``p`` is row ``p``'s two) and ``P`` bools, in file order.

    Raises:
        DatasetNotFoundError: no file at ``path``, or a missing image (its path and line named).
        DataFileError: a bad header, a row without three fields, an empty path or an ``issame`` outside
            ``0, 1, true, false``, named by file and line number; a list without a pair.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"pairs list not found: {path}; expected a CSV with the header path1,path2,issame")
    folder = path.parent
    paths: list[Path] = []
    issame: list[bool] = []
    # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != _CSV_HEADER:
            got = ",".join(header) if header else "nothing"
            raise DataFileError(f"{path}:1: expected the header {','.join(_CSV_HEADER)}, got {got!r}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if not row or not "".join(row).strip():  # a blank line holds no pair
                continue
            if len(row) != 3:
                raise DataFileError(f"{where}: expected 3 fields path1,path2,issame, got {len(row)}: {row!r}")
            first, second, flag = (v.strip() for v in row)
            if flag.lower() not in _ISSAME:
                raise DataFileError(f"{where}: issame must be one of 0, 1, true, false; got {flag!r}")
            for value in (first, second):
                if not value:
                    raise DataFileError(f"{where}: an image path is empty")
                image = folder / value  # the list's own folder; an absolute path stays as written
                if not image.is_file():
                    raise DatasetNotFoundError(f"{where}: image not found: {image}")
                paths.append(image)
            issame.append(_ISSAME[flag.lower()])
    if not issame:
        raise DataFileError(f"{path}: holds a header and no pair")
    return paths, issame
