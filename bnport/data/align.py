"""Benchmark images as insightface prepares them: OpenCV decoding (as its `cv2.imread`), the ArcFace five-point
landmark template, the least-squares similarity transform that maps a face's landmarks (eye centres, nose tip, mouth
corners) onto it, and the OpenCV warp that cuts the aligned crop. `bnport score` aligns every IJB-B/C image with this
before the crop goes into the uint8 cache, so its crops match insightface's `eval_ijbc.py` to within one grey level.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bnport.errors import BnportError

#: insightface's `arcface_src`: the 96x112 (width x height) SphereFace template points moved 8 px right, i.e. the
#: same face with 8 px more margin on each side of a 112x112 crop. Order: left eye, right eye, nose tip, left and
#: right mouth corner, as (x, y) in pixels.
ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041]], dtype=np.float64)


def decode_bgr(data: bytes) -> np.ndarray | None:
    """Encoded image bytes -> HxWx3 BGR uint8 exactly as `cv2.imread(path)` gives it (`cv2.imdecode` with
    IMREAD_COLOR: EXIF orientation applied, grey and alpha images converted to three channels, 16-bit scaled to
    8), or None when OpenCV cannot decode them (empty, corrupt, unknown format)."""
    import cv2

    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None


def decode_rgb(data: bytes, what: str, hint: str) -> np.ndarray:
    """Encoded image bytes -> HxWx3 RGB uint8 (`decode_bgr`, then BGR -> RGB); bytes OpenCV cannot decode are a
    BnportError naming `what`, with `hint`."""
    import cv2

    bgr = decode_bgr(data)
    if bgr is None:
        raise BnportError(f"cannot decode {what} ({len(data)} bytes; not an image OpenCV can read)", hint)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with `cv2.resize` INTER_LINEAR (no antialiasing when shrinking) to `size` = (height, width);
    unchanged when it already fits."""
    import cv2

    height, width = (int(v) for v in size)
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def read_rgb(path: Path, what: str, *, read_hint: str, decode_hint: str) -> np.ndarray:
    """An image file as HxWx3 RGB uint8; a file that cannot be read or decoded is a BnportError naming
    `what` and the path."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BnportError(f"cannot read {what} {path}: {exc.strerror or exc}", read_hint) from None
    return decode_rgb(data, f"{what} {path}", decode_hint)


def arcface_template(size: tuple[int, int]) -> np.ndarray:
    """The ArcFace template for a crop of `size` = (height, width), as a 5x2 float64 array of (x, y).

    The face scales with the height: points are multiplied by height / 112, and the width only changes the
    horizontal margin, equally on both sides (x is shifted by (width - height) / 2). So a square
    HxH crop is the 112x112 template scaled by H / 112 (128x128: x 8/7), and 112 high x 96 wide gives back the
    original SphereFace 96x112 points (the ArcFace template minus the 8 px margin). Note insightface's own
    `face_align.estimate_norm` treats 128 differently (the 112 template unscaled, shifted 8 px right); bnport
    scales, so a model's input always holds the face it was trained on at 112, enlarged."""
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"crop size must be positive, got {height}x{width}")
    scale = height / 112.0
    template = ARCFACE_TEMPLATE_112 * scale
    template[:, 0] += (width - 112.0 * scale) / 2.0
    return template


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the similarity (rotation, uniform scale, translation; no reflection) that maps the points
    `src` (Nx2) onto `dst` (Nx2) with the least squared error: the transform scikit-image's
    `SimilarityTransform.estimate` computes by Umeyama's method, which insightface uses for alignment.

    Hand-written because neither library that could give it fits: OpenCV's `estimateAffinePartial2D` is a robust
    (RANSAC/LMEDS) estimator with a refinement step and does not return the plain least-squares answer, and
    scikit-image is a heavy dependency for one small function. In 2-D the least-squares similarity has a closed
    form: with the points centred and read as complex numbers s and d, the rotation-and-scale z = a + ib minimising
    sum |d - z s|^2 is sum(conj(s) d) / sum |s|^2 (the same optimum Umeyama's SVD solution reaches, as every
    rotation with a scale >= 0 is such a z). Computed in float64. Raises ValueError when all `src` points
    coincide (no transform is defined; scikit-image returns NaNs there)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"expected two Nx2 point arrays of the same shape, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("the points must be finite")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - src_mean, dst - dst_mean
    spread = float(np.sum(s * s))
    if spread == 0.0:
        raise ValueError("the source points coincide: no similarity transform is defined")
    a = float(np.sum(s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1])) / spread
    b = float(np.sum(s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0])) / spread
    rotation = np.array([[a, -b], [b, a]])
    shift = dst_mean - rotation @ src_mean
    return np.hstack([rotation, shift[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Cut the aligned face crop of `size` = (height, width) out of `image` (HxWx3 uint8) given its five landmarks
    (5x2, (x, y) in the image's pixels, in the template's order): the similarity that maps the landmarks onto
    `arcface_template(size)`, applied with `cv2.warpAffine` (bilinear, border filled with 0) exactly as insightface
    does. The warp treats channels alike, so the crop has the channel order of the input: insightface warps the BGR
    image `cv2.imread` gives and converts to RGB after; bnport's readers convert to RGB first and pass RGB here,
    which gives the same pixels. Returns a new height x width x 3 uint8 array."""
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {image.shape} dtype {image.dtype}")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"expected 5x2 landmarks, got shape {landmarks.shape}")
    height, width = (int(v) for v in size)
    matrix = similarity_transform(landmarks, arcface_template((height, width)))
    return cv2.warpAffine(image, matrix, (width, height), borderValue=0.0)
