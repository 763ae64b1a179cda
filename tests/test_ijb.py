"""IJB-B / IJB-C 1:1 verification: alignment, the meta files, the protocol against ijb_11.py's steps, the CLI.

The reference (:func:`_reference`) restates insightface's ``eval_ijbc.py`` / ``ijb_11.py`` in numpy with
scikit-learn's ``roc_curve``, loop by loop as they write it, in float64; headreg's vectorised, blocked code must
give the same TAR@FAR to 1e-9 on tiny synthetic layouts written here in the native format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import invoke
from PIL import Image
from sklearn.metrics import auc, roc_curve
from timm.data import resolve_data_config

import headreg
from headreg.data import TensorImageDataset, create_dataset, resolve_transform
from headreg.data._align import ARCFACE_TEMPLATE, align_face, similarity_transform, warp_affine
from headreg.data._ijb import read_ijb_meta
from headreg.data.transforms import FACE_INPUT, face_data_config
from headreg.engine._ijb import evaluate_ijb_embeddings
from headreg.engine.extract import extract_dataset, extract_embeddings, iter_batches
from headreg.errors import DataFileError, DatasetNotFoundError
from headreg.metrics.ijb import IJB_FAR_TARGETS, score_template_pairs, template_features

FARS = [10**-6, 10**-5, 10**-4, 10**-3, 10**-2, 10**-1]  # insightface's x_labels
KEYS = [
    "tar_at_far_1e-6",
    "tar_at_far_1e-5",
    "tar_at_far_1e-4",
    "tar_at_far_1e-3",
    "tar_at_far_1e-2",
    "tar_at_far_1e-1",
]


def _reference(feats, faceness, templates, medias, p1, p2, label, detector_score=True):
    """insightface's steps: D1 weighting, image2template_feature, verification, the TPR@FPR table."""
    img_input_feats = feats * faceness[:, np.newaxis] if detector_score else feats
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_input_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_input_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts, strict=True):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    norms = np.sqrt((template_feats**2).sum(1, keepdims=True))
    template_norm_feats = template_feats / np.where(norms == 0, 1, norms)  # sklearn's normalize
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.sum(template_norm_feats[template2id[p1]] * template_norm_feats[template2id[p2]], -1).flatten()
    fpr, tpr, _ = roc_curve(label, score)
    roc_auc = auc(fpr, tpr)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    row = []
    for x in FARS:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)), strict=True)))
        row.append(tpr[min_index])
    return row, roc_auc, score


def _synthetic(seed: int, faces: int = 400, num_templates: int = 60, dim: int = 8, ties: bool = False):
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(5, 10 * num_templates), num_templates, replace=False)  # sparse, unsorted ids
    subject = rng.integers(0, num_templates // 3, num_templates)
    centres = rng.normal(size=(num_templates // 3, dim))
    templates = np.concatenate([ids, rng.choice(ids, faces - num_templates)])  # every template owns a face
    medias = rng.integers(0, 6, faces) + 100 * rng.integers(0, 2, faces)
    owner = {t: s for t, s in zip(ids, subject, strict=True)}
    feats = np.stack([centres[owner[t]] for t in templates]) + rng.normal(scale=1.5, size=(faces, dim))
    if ties:
        feats = np.round(feats)  # few distinct template features: tied scores, collinear ROC points
    faceness = rng.uniform(0.2, 1.0, faces).astype(np.float32)
    pairs = rng.choice(ids, size=(3000, 2))
    label = np.array([owner[a] == owner[b] for a, b in pairs]).astype(int)
    return feats, faceness, templates, medias, pairs, label


@pytest.mark.parametrize("seed,ties,detector", [(0, False, True), (1, True, True), (2, False, False)])
def test_metrics_equal_insightface_steps(seed: int, ties: bool, detector: bool) -> None:
    feats, faceness, templates, medias, pairs, label = _synthetic(seed, ties=ties)
    row, roc_auc, score = _reference(feats, faceness, templates, medias, pairs[:, 0], pairs[:, 1], label, detector)
    from headreg.metrics.ijb import ijb_metrics

    t = torch.from_numpy
    out = ijb_metrics(
        t(feats), t(templates), t(medias), t(pairs), t(label.astype(bool)), scores=t(faceness) if detector else None
    )
    assert [out[k] for k in KEYS] == pytest.approx(row, abs=1e-9, rel=0)
    assert out["roc_auc"] == pytest.approx(roc_auc, abs=1e-9)
    assert out["num_pairs"] == 3000 and out["num_templates"] == len(np.unique(templates))
    assert list(IJB_FAR_TARGETS) == FARS
    # Both block strategies (one product per block of templates; gathered rows) give the reference scores.
    ids, unit = template_features(t(feats), t(templates), t(medias), t(faceness) if detector else None)
    for block, strategy in ((1 << 23, "auto"), (64, "dense"), (1 << 23, "gather"), (64, "gather")):
        got = score_template_pairs(ids, unit, t(pairs), block_elements=block, strategy=strategy).numpy()
        np.testing.assert_allclose(got, score, rtol=0, atol=1e-12)


def test_similarity_transform_umeyama() -> None:
    rng = np.random.default_rng(0)
    src = ARCFACE_TEMPLATE.astype(np.float64)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:2, :2], scale * rot, atol=1e-12)
    np.testing.assert_allclose(m[:2, 2], shift, atol=1e-10)
    # Noisy points: the least-squares optimum over x' = a x - b y + tx, y' = b x + a y + ty, solved linearly.
    noisy = dst + rng.normal(scale=2.0, size=dst.shape)
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), np.concatenate([noisy[:, 0], noisy[:, 1]]), rcond=None)
    np.testing.assert_allclose(similarity_transform(src, noisy)[:2], [[a, -b, tx], [b, a, ty]], atol=1e-9)
    # Mirrored landmarks: the best rotation, never a reflection.
    assert np.linalg.det(similarity_transform(src, src * [-1, 1])[:2, :2]) > 0


def test_warp_is_bilinear_with_pixel_centres() -> None:
    # Bilinear interpolation reproduces a linear image exactly: output (x, y) = a u + b v + c at M^-1 (x, y).
    h, w = 130, 120
    vs, us = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    image = torch.from_numpy(0.5 * us + 0.25 * vs + 3.0)[None]
    m = similarity_transform(ARCFACE_TEMPLATE + [5.0, 3.0], (ARCFACE_TEMPLATE - 56) * 1.25 + 56)
    out = warp_affine(image, m, (112, 112))[0].double().numpy()
    inv = np.linalg.inv(m)
    ys, xs = np.meshgrid(np.arange(112.0), np.arange(112.0), indexing="ij")
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(out[inside], (0.5 * u + 0.25 * v + 3.0)[inside], atol=1e-3)
    # Beyond a pixel of the input's edge the output is 0 (OpenCV's borderValue=0): cut the input to 60 rows.
    out = warp_affine(image[:, :60], m, (112, 112))[0].double().numpy()
    outside = v > 60
    assert outside.mean() > 0.3 and (out[outside] == 0).all()
    # A face whose landmarks sit on the template, shifted by whole pixels, is cut out exactly.
    crop = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)
    big = torch.zeros(3, 130, 125, dtype=torch.uint8)
    big[:, 11:123, 7:119] = crop
    torch.testing.assert_close(align_face(big, ARCFACE_TEMPLATE + [7.0, 11.0]), crop)


def _write_layout(root: Path, kind: str, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """A tiny IJB layout: 12 templates of 1-3 medias, faces pasted at whole-pixel offsets, all pairs listed."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    crops, faces, tid_mid = [], [], []
    for t in range(12):
        for f in range(int(rng.integers(1, 4))):
            crop = torch.from_numpy(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
            crop[:, :, t % 3] = 40 * (t // 3)  # the subject, t // 3, shows in one channel: a little structure
            dx, dy = (int(v) for v in rng.integers(0, 20, 2))
            big = np.zeros((112 + dy + 9, 112 + dx + 6, 3), dtype=np.uint8)
            big[dy : dy + 112, dx : dx + 112] = crop.numpy()
            name = f"{t}_{f}.png"
            Image.fromarray(big).save(root / "loose_crop" / name)
            points = " ".join(f"{x + dx:.4f} {y + dy:.4f}" for x, y in ARCFACE_TEMPLATE.astype(np.float64))
            faces.append(f"{name} {points} {rng.uniform(0.5, 1.0):.3f}")
            tid_mid.append(f"{name} {t + 1} {100 + t * 10 + f // 2}")
            crops.append(crop.permute(2, 0, 1))
    pairs = [f"{a + 1} {b + 1} {int(a // 3 == b // 3)}" for a in range(12) for b in range(a + 1, 12)]
    (root / "meta" / f"{kind}_name_5pts_score.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{kind}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / f"{kind}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return crops, {"faces": faces, "tid_mid": tid_mid, "pairs": pairs}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = headreg.create_model("lenetpp", head="arcface", num_classes=10)
    return headreg.save_model(model, tmp_path_factory.mktemp("run") / "run").parent


def test_ijbc_through_the_cli(ckpt: Path, tmp_path: Path) -> None:
    crops, files = _write_layout(tmp_path / "IJBC", "ijbc")
    ds = create_dataset(f"ijbc:{tmp_path / 'IJBC'}")
    assert len(ds) == len(crops)
    for i in (0, len(crops) - 1):  # aligned from the loose crops: exactly the faces pasted in them
        torch.testing.assert_close(ds[i][0], crops[i])
    args = ("--checkpoint", ckpt, "--dataset", f"ijbc:{tmp_path / 'IJBC'}", "--input-size", "28", "--workers", "0")
    out = json.loads(invoke(*args, "--json").stdout)
    info = out["info"]
    assert info["protocol"] == "ijb" and info["tta"] == "flip-sum" and info["detector_score"] is True
    assert info["num_pairs"] == 66 and info["num_templates"] == 12 and info["num_samples"] == len(crops)
    assert {"num_queries", "num_gallery", "warnings"} <= set(info) | set(out)
    # The reference: the pasted crops through the one inference pass (flip-sum), then insightface's steps.
    model = headreg.load_model(ckpt)
    images, zeros = torch.stack(crops), torch.zeros(len(crops), dtype=torch.long)
    config = resolve_data_config(model=model)
    transform = resolve_transform(config, TensorImageDataset(images, zeros), train=False, input_size=28)
    batches = iter_batches(images, zeros, 8)
    ext = extract_embeddings(model, batches, device="cpu", transform=transform, tta="flip-sum", progress=False)
    emb = ext.embeddings.double().numpy()
    meta = read_ijb_meta(tmp_path / "IJBC", "ijbc")
    p = meta.pair_templates
    for flag, extra in ((True, ()), (False, ("--no-detector-score",))):
        row, roc_auc, _ = _reference(
            emb, meta.scores, meta.templates, meta.medias, p[:, 0], p[:, 1], meta.pair_labels.astype(int), flag
        )
        got = out if not extra else json.loads(invoke(*args, *extra, "--json").stdout)
        assert [got["metrics"][k] for k in KEYS] == pytest.approx(row, abs=1e-6)
        assert got["metrics"]["roc_auc"] == pytest.approx(roc_auc, abs=1e-6)
    human = invoke(*args).output
    assert "tar_at_far_1e-4" in human
    # 54 different pairs: FARs below 1/54 are not resolved, which a warning says (the values stay insightface's).
    assert out["warnings"] == [
        "54 different pairs cannot resolve FAR 1e-06, 1e-05, 1e-04, 1e-03, 1e-02 (fewer than one false accept); "
        "those TARs are read at the ROC point nearest each, as insightface reads them"
    ]


def test_meta_errors_name_the_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "IJBB"
    _, files = _write_layout(root, "ijbb")
    meta = root / "meta"
    with pytest.raises(DatasetNotFoundError, match="ijbc_name_5pts_score.txt"):
        read_ijb_meta(root, "ijbc")

    def broken(name: str, lines: list[str], pattern: str) -> None:
        path = meta / f"ijbb_{name}.txt"
        old = path.read_text()
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataFileError, match=pattern):
            read_ijb_meta(root, "ijbb")
        path.write_text(old)

    faces, tid_mid, pairs = files["faces"], files["tid_mid"], files["pairs"]
    broken("name_5pts_score", [*faces[:2], faces[2].rsplit(" ", 1)[0], *faces[3:]], r"5pts_score.txt:3: expected 12")
    broken("face_tid_mid", [tid_mid[1], tid_mid[0], *tid_mid[2:]], r"tid_mid.txt:1: names .* same order")
    broken("template_pair_label", [*pairs[:4], "1 99 0", *pairs[5:]], r"pair_label.txt:5: template 99 has no face")
    broken("template_pair_label", [*pairs[:1], "1 2 2", *pairs[2:]], r"pair_label.txt:2: the label must be 1")
    broken("template_pair_label", [*pairs[:6], "1 x 0", *pairs[7:]], r"pair_label.txt:7: expected integers")
    broken("template_pair_label", [p[:-1] + "0" for p in pairs], "every pair is labelled 0")
    res = invoke("--model", "lenetpp", "--dataset", f"ijbb:{tmp_path / 'nowhere'}", ok=False)
    assert "insightface's IJB layout" in res.output
    res = invoke("--model", "lenetpp", "--dataset", f"ijbb:{root}", "--limit", "3", "--input-size", "28", ok=False)
    assert "--limit" in res.output
    (root / "loose_crop" / files["faces"][3].split()[0]).unlink()
    res = invoke("--model", "lenetpp", "--dataset", f"ijbb:{root}", "--input-size", "28", "--workers", "1", ok=False)
    assert "image not found" in res.output and "line 4 of the 5-point file" in res.output
    assert "Traceback" not in res.output
    res = invoke("--model", "lenetpp", "--dataset", "fake", "--no-detector-score", ok=False)
    assert "applies to IJB" in res.output


def test_ijb_names_are_pairs_protocols_that_train_refuses(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from headreg.cli import main
    from headreg.data import is_pairs_dataset, list_datasets

    assert {"ijbb", "ijbc"} <= set(list_datasets()) and is_pairs_dataset("ijbb:x") and is_pairs_dataset("IJBC:x")
    args = [
        "train",
        "--model",
        "lenetpp",
        "--head",
        "softmax",
        "--dataset",
        f"ijbc:{tmp_path}",
        "--out",
        tmp_path / "r",
    ]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 1 and "holds verification pairs, not labelled classes" in r.output, r.output


def test_face_input_defaults() -> None:
    imagenet = resolve_data_config(model=torch.nn.Linear(2, 2))  # a module that says nothing: ImageNet's
    assert face_data_config(imagenet, None) == {**imagenet, **FACE_INPUT}
    declared = {"input_size": (3, 224, 224), "mean": (0.1, 0.2, 0.3), "std": (0.2, 0.2, 0.2)}
    assert face_data_config(imagenet, declared) == imagenet  # the backbone's own values win
    face = resolve_data_config(model=headreg.create_model("iresnet18"))
    assert (face["input_size"], face["mean"], face["std"]) == ((3, 112, 112), (0.5,) * 3, (0.5,) * 3)


class _MeanPixel(torch.nn.Module):
    """A backbone that says nothing of its input (no pretrained_cfg): its embedding is the mean input pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), torch.tensor(x.shape[2:], dtype=x.dtype).expand(x.shape[0], 2)], 1)


def test_faces_go_in_at_112_with_mean_std_half(tmp_path: Path) -> None:
    crops, _ = _write_layout(tmp_path / "IJBB", "ijbb")
    ds = create_dataset(f"ijbb:{tmp_path / 'IJBB'}")
    ext = extract_dataset(_MeanPixel(), ds, device="cpu", batch_size=8, workers=0, progress=False)
    pixels = torch.stack(crops).double().div(255).sub(0.5).div(0.5).mean((2, 3))
    torch.testing.assert_close(ext.embeddings[:, :3].double(), pixels, atol=1e-5, rtol=0)
    assert (ext.embeddings[:, 3:] == 112).all()
    # A backbone that names its statistics keeps them (LeNet++: MNIST's), at the aligned size.
    lenet = headreg.create_model("lenetpp")
    config = face_data_config(resolve_data_config(model=lenet), lenet.pretrained_cfg)
    assert config["mean"] == lenet.pretrained_cfg["mean"] and config["input_size"] == (1, 28, 28)


def test_embeddings_check(tmp_path: Path) -> None:
    _write_layout(tmp_path / "IJBB", "ijbb")
    meta = read_ijb_meta(tmp_path / "IJBB", "ijbb")
    with pytest.raises(headreg.errors.InvalidInputError, match="one row per face"):
        evaluate_ijb_embeddings(torch.zeros(3, 4), meta)
