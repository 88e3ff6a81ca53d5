"""Five-point alignment against insightface's own procedure (scikit-image's SimilarityTransform + cv2.warpAffine)
on real image files, and against known transforms."""
import math

import cv2
import numpy as np
import pytest

from bnport.data.align import ARCFACE_TEMPLATE_112, align_face, arcface_template, decode_bgr, similarity_transform

SIZES = [(112, 112), (128, 128), (112, 96), (96, 112), (160, 128)]


def skimage_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    from skimage import transform

    if hasattr(transform.SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26
        tform = transform.SimilarityTransform.from_estimate(src, dst)
    else:
        tform = transform.SimilarityTransform()
        tform.estimate(src, dst)
    return np.asarray(tform.params[0:2, :])


def random_pose(rng: np.random.Generator, image_hw: tuple[int, int]) -> np.ndarray:
    """Landmarks of a face somewhere in an image: the template under a random similarity, plus a few px of noise."""
    angle = math.radians(rng.uniform(-35, 35))
    scale = rng.uniform(0.8, 2.2)
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    points = (ARCFACE_TEMPLATE_112 - 56.0) @ rot.T
    h, w = image_hw
    centre = rng.uniform([0.35 * w, 0.35 * h], [0.65 * w, 0.65 * h])
    return (points + centre + rng.normal(0, 2.0, points.shape)).astype(np.float32)


def write_photo(path, rng: np.random.Generator, h: int, w: int) -> None:
    """A textured colour picture (gradients, shapes, noise) saved as a real JPEG."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 3) % 256], axis=-1)
    image = image.astype(np.uint8)
    for _ in range(12):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(5, w // 4)), int(rng.integers(5, h // 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    noisy = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    assert cv2.imwrite(str(path), noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])


def test_template_is_insightfaces_and_scales():
    sphereface_96x112 = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                                  [33.5493, 92.3655], [62.7299, 92.2041]])
    np.testing.assert_allclose(arcface_template((112, 112)), sphereface_96x112 + [8.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(arcface_template((112, 96)), sphereface_96x112, atol=1e-12)
    np.testing.assert_allclose(arcface_template((224, 224)), 2 * arcface_template((112, 112)), atol=1e-12)
    np.testing.assert_allclose(arcface_template((128, 128)), arcface_template((112, 112)) * 128 / 112, atol=1e-12)
    # a wider crop keeps the face's scale and centres it
    wide = arcface_template((112, 150))
    np.testing.assert_allclose(wide - arcface_template((112, 112)), np.tile([19.0, 0.0], (5, 1)), atol=1e-12)
    with pytest.raises(ValueError):
        arcface_template((0, 112))


@pytest.mark.parametrize("size", SIZES)
def test_matrix_equals_skimage(size):
    rng = np.random.default_rng(sum(size))
    dst = arcface_template(size)
    for _ in range(50):
        src = random_pose(rng, (400, 300)).astype(np.float64)
        np.testing.assert_allclose(similarity_transform(src, dst), skimage_matrix(src, dst), rtol=0, atol=1e-9)
    # also with a reflected point set: the answer stays a rotation (no reflection), as scikit-image's
    mirrored = dst * [-1.0, 1.0] + rng.normal(0, 1, dst.shape)
    matrix = similarity_transform(mirrored, dst)
    np.testing.assert_allclose(matrix, skimage_matrix(mirrored, dst), rtol=0, atol=1e-9)
    assert np.linalg.det(matrix[:, :2]) >= 0


def test_known_transform_is_recovered_exactly():
    angle, scale, shift = math.radians(23.0), 0.37, np.array([-12.5, 40.25])
    forward = np.array([[scale * math.cos(angle), -scale * math.sin(angle), shift[0]],
                        [scale * math.sin(angle), scale * math.cos(angle), shift[1]]])
    template = arcface_template((112, 112))
    # landmarks in a large image that `forward` maps exactly onto the template
    inverse = cv2.invertAffineTransform(forward)
    landmarks = template @ inverse[:, :2].T + inverse[:, 2]
    np.testing.assert_allclose(similarity_transform(landmarks, template), forward, rtol=0, atol=1e-12)
    np.testing.assert_allclose(similarity_transform(template, landmarks), inverse, rtol=0, atol=1e-12)


def test_degenerate_and_malformed_points_are_refused():
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), arcface_template((112, 112)))
    with pytest.raises(ValueError, match="finite"):
        similarity_transform(np.full((5, 2), np.nan), arcface_template((112, 112)))
    with pytest.raises(ValueError, match="shape"):
        similarity_transform(np.ones((5, 2)), np.ones((4, 2)))
    image = np.zeros((50, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="5x2"):
        align_face(image, np.ones((4, 2)), (112, 112))
    with pytest.raises(ValueError, match="uint8"):
        align_face(image.astype(np.float32), np.ones((5, 2)), (112, 112))


@pytest.mark.parametrize("size", SIZES)
def test_crops_match_insightface_procedure_on_real_files(tmp_path, size):
    rng = np.random.default_rng(7 * size[0] + size[1])
    height, width = size
    template32 = arcface_template(size).astype(np.float32)  # insightface keeps its template in float32
    for k, (h, w) in enumerate([(250, 250), (360, 270), (200, 330)]):
        path = tmp_path / f"photo{k}.jpg"
        write_photo(path, rng, h, w)
        for _ in range(3):
            landmarks = random_pose(rng, (h, w))
            # insightface (eval_ijbc.py): BGR from cv2.imread, skimage similarity, warp, then BGR -> RGB
            bgr = cv2.imread(str(path))
            expected = cv2.cvtColor(cv2.warpAffine(bgr, skimage_matrix(landmarks, template32), (width, height),
                                                   borderValue=0.0), cv2.COLOR_BGR2RGB)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            crop = align_face(rgb, landmarks, size)
            assert crop.shape == (height, width, 3) and crop.dtype == np.uint8
            diff = np.abs(crop.astype(np.int16) - expected.astype(np.int16))
            assert diff.max() <= 1
            assert (diff > 0).mean() < 0.01
            assert crop.std() > 20  # a real piece of the picture, not an empty border


@pytest.mark.parametrize("size", [(112, 112), (128, 128), (112, 96)])
def test_landmarks_land_on_the_template(size):
    """Five bright dots drawn at a face's landmarks end up at the template points of the crop."""
    rng = np.random.default_rng(3)
    image = np.zeros((400, 400, 3), np.uint8)
    angle, scale = math.radians(-17.0), 2.4
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_112 - 56.0) @ rot.T + [190.0, 215.0]
    for x, y in landmarks:
        # sub-pixel disc centres (shift=4: coordinates in 1/16 px)
        cv2.circle(image, (int(round(x * 16)), int(round(y * 16))), 5 * 16, (255, 255, 255), -1, cv2.LINE_AA, 4)
    crop = align_face(image, landmarks + rng.normal(0, 1e-3, landmarks.shape), size).astype(np.float64)[:, :, 0]
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for x, y in arcface_template(size):
        near = (xx - x) ** 2 + (yy - y) ** 2 < 6 ** 2
        weight = crop * near
        centroid = np.array([(weight * xx).sum(), (weight * yy).sum()]) / weight.sum()
        assert np.hypot(*(centroid - [x, y])) < 0.3


def test_decode_bgr_equals_cv2_imread(tmp_path):
    """EXIF orientation, grey and alpha images: decoded bytes equal what insightface's cv2.imread gives."""
    from PIL import Image

    rng = np.random.default_rng(11)
    rotated = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    Image.fromarray(rng.integers(0, 256, (30, 25), dtype=np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(rng.integers(0, 256, (30, 25, 4), dtype=np.uint8)).save(tmp_path / "alpha.png")
    for name in ("exif.jpg", "grey.png", "alpha.png"):
        decoded = decode_bgr((tmp_path / name).read_bytes())
        assert decoded.shape[2] == 3 and decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, cv2.imread(str(tmp_path / name)))
    assert decode_bgr((tmp_path / "exif.jpg").read_bytes()).shape[:2] == (40, 20)
    assert decode_bgr(b"") is None
    assert decode_bgr(b"GIF89a not really") is None
