"""Face alignment from five landmarks: a similarity transform to insightface's ArcFace template, then a warp.

* :func:`similarity_transform` estimates the least-squares similarity (rotation, uniform scale, translation)
  mapping one point set onto another, by Umeyama's closed form (Umeyama 1991, "Least-squares estimation of
  transformation parameters between two point patterns", eq. 40-42): the SVD of the cross-covariance, a sign
  flip of the last singular direction when the best orthogonal map would be a reflection, then the scale and
  the translation. It is the estimate insightface takes from ``skimage.transform.SimilarityTransform``.
* :data:`ARCFACE_TEMPLATE` is the five points (eye centres, nose tip, mouth corners) of insightface's
  112x112 crop: its 96x112 template shifted right by 8 pixels (``eval_ijbc.py``, ``face_align.py``).
* :func:`warp_affine` resamples an image under a 2x3 affine map with ``torch.nn.functional.grid_sample``
  (bilinear, zeros outside), in the pixel-centre convention of OpenCV's ``warpAffine`` that insightface calls:
  integer coordinates are pixel centres, output pixel ``(x, y)`` reads the input at ``M^-1 (x, y)``. torch rather
  than PIL because PIL's affine transform puts pixel centres at half-integers (a half-pixel shift to undo) and
  rounds through 8 bits per step; grid_sample interpolates in float, and needs no OpenCV.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from headreg.errors import InvalidInputError

__all__ = ["ALIGNED_SIZE", "ARCFACE_TEMPLATE", "align_face", "similarity_transform", "warp_affine"]

#: The side of an aligned face crop, in pixels.
ALIGNED_SIZE = 112
#: insightface's ArcFace template for 112x112 crops, ``(5, 2)`` ``(x, y)``: left eye, right eye, nose, mouth left,
#: mouth right (the 96x112 template with 8 added to every x).
ARCFACE_TEMPLATE = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32,
) + np.array([8.0, 0.0], dtype=np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity transform taking the points ``src`` onto ``dst`` (Umeyama), as a 3x3 matrix.

    Args:
        src: ``(N, 2)`` points, ``N >= 2``.
        dst: ``(N, 2)`` points, paired with ``src`` row by row.

    Returns:
        ``(3, 3)`` float64 ``T`` with ``dst ~ T[:2, :2] @ src + T[:2, 2]`` in the least-squares sense.

    Raises:
        InvalidInputError: shapes that disagree, non-finite points, or ``src`` points that all coincide.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise InvalidInputError(f"src and dst must both be (N, 2) with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise InvalidInputError("landmarks must be finite numbers")
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    variance = (src_c**2).sum() / n  # the total variance of src: its spread about the mean
    if variance == 0.0:
        raise InvalidInputError("the landmarks all coincide: no similarity transform maps them onto the template")
    cov = dst_c.T @ src_c / n
    u, sigma, vt = np.linalg.svd(cov)
    signs = np.ones(dim)
    # A reflection would fit better than any rotation: flip the direction of the smallest singular value.
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[-1] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float(sigma @ signs) / variance
    out = np.eye(dim + 1)
    out[:dim, :dim] = scale * rotation
    out[:dim, dim] = dst_mean - scale * rotation @ src_mean
    return out


def warp_affine(image: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resample ``image`` under the affine map ``matrix`` (input pixel -> output pixel), bilinearly, zeros outside.

    Args:
        image: ``(C, H, W)`` float or uint8.
        matrix: ``(2, 3)`` or ``(3, 3)``: output ``(x, y)`` = ``matrix[:2, :2] @ input (x, y) + matrix[:2, 2]``,
            pixel centres at integer coordinates (OpenCV's ``warpAffine`` convention).
        size: ``(height, width)`` of the output.

    Returns:
        ``(C, height, width)`` float32, not rounded.
    """
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    inverse = np.linalg.inv(m)[:2]  # output pixel -> input pixel
    height, width = size
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    u = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    v = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    in_h, in_w = image.shape[-2:]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels, so pixel i sits at i exactly.
    gx = 2.0 * u / max(in_w - 1, 1) - 1.0
    gy = 2.0 * v / max(in_h - 1, 1) - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1)).to(torch.float32).unsqueeze(0)
    x = image.to(torch.float32).unsqueeze(0)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def align_face(image: torch.Tensor, landmarks: np.ndarray) -> torch.Tensor:
    """Align a face to the 112x112 ArcFace crop from its five landmarks.

    Args:
        image: ``(3, H, W)`` uint8 RGB.
        landmarks: ``(5, 2)`` ``(x, y)`` in ``image``'s pixels, in :data:`ARCFACE_TEMPLATE`'s order.

    Returns:
        ``(3, 112, 112)`` uint8, rounded to the nearest level as OpenCV's ``warpAffine`` stores uint8.
    """
    matrix = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    warped = warp_affine(image, matrix, (ALIGNED_SIZE, ALIGNED_SIZE))
    return warped.round_().clamp_(0, 255).to(torch.uint8)
