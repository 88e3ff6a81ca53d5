"""A tiny IJB-B/C release laid out like the real one (`make_release`: real JPEG loose crops with drawn faces, the
meta/ files with landmarks, faceness, templates, medias and pairs), and insightface's own procedure re-done directly
(`skimage_crop_rgb`: eval_ijbc.py's alignment; `insightface_scores`: its per-template loops), for the IJB, score and
README tests."""
from __future__ import annotations

import math

import cv2
import numpy as np

from bnport.data.align import ARCFACE_TEMPLATE_112, arcface_template

TEMPLATES = [101, 101, 101, 102, 102, 103, 103, 103, 104, 105]
MEDIAS = [5, 5, 6, 7, 8, 9, 9, 9, 5, 10]  # media 5 appears in templates 101 and 104: pooled per template
PAIRS = [(101, 102, 1), (101, 103, 0), (102, 104, 0), (103, 105, 1), (104, 105, 0), (101, 101, 1)]


def draw_face(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A BGR picture with a face drawn as shapes at a random pose, and its five landmarks (eye centres, nose tip,
    mouth corners)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 7) % 256, (yy * 5) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    angle = math.radians(rng.uniform(-30, 30))
    scale = rng.uniform(0.9, 1.8) * min(h, w) / 250
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    centre = np.array([w / 2, h / 2]) + rng.uniform(-20, 20, 2)
    points = (ARCFACE_TEMPLATE_112 - 56.0) @ rot.T + centre
    face_axes = (int(48 * scale), int(62 * scale))
    cv2.ellipse(image, tuple(int(v) for v in centre), face_axes, math.degrees(angle), 0, 360, (120, 160, 220), -1)
    for eye in points[:2]:
        cv2.circle(image, tuple(int(round(v)) for v in eye), max(2, int(6 * scale)), (40, 30, 20), -1)
    cv2.circle(image, tuple(int(round(v)) for v in points[2]), max(2, int(4 * scale)), (60, 90, 160), -1)
    cv2.line(image, tuple(int(round(v)) for v in points[3]), tuple(int(round(v)) for v in points[4]),
             (30, 30, 180), max(1, int(3 * scale)))
    noisy = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    return noisy, (points + rng.normal(0, 1.0, points.shape)).astype(np.float32)


def make_release(root, kind: str = "ijbc", seed: int = 0) -> dict:
    """Write a tiny IJB release in the real layout; return what was written."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    names, landmarks, faceness = [], [], []
    for k in range(len(TEMPLATES)):
        h, w = int(rng.integers(220, 380)), int(rng.integers(220, 380))
        image, points = draw_face(rng, h, w)
        name = f"{k + 1}.jpg"
        assert cv2.imwrite(str(root / "loose_crop" / name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        names.append(name)
        landmarks.append(points)
        faceness.append(float(rng.uniform(0.3, 1.0)))
    meta = root / "meta"
    (meta / f"{kind}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, TEMPLATES, MEDIAS)))
    (meta / f"{kind}_name_5pts_score.txt").write_text("".join(
        f"{n} {' '.join(f'{v:.3f}' for v in p.ravel())} {s:.4f}\n" for n, p, s in zip(names, landmarks, faceness)))
    (meta / f"{kind}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in PAIRS))
    return {"names": names, "landmarks": np.round(np.array(landmarks, dtype=np.float64), 3),
            "faceness": np.round(np.array(faceness), 4)}


def skimage_crop_rgb(path, landmarks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """insightface's eval_ijbc.py alignment: cv2.imread (BGR), skimage similarity to the float32 template, warp,
    BGR -> RGB."""
    from skimage import transform

    template = arcface_template(size).astype(np.float32)
    if hasattr(transform.SimilarityTransform, "from_estimate"):
        matrix = transform.SimilarityTransform.from_estimate(landmarks, template).params[0:2, :]
    else:
        tform = transform.SimilarityTransform()
        tform.estimate(landmarks, template)
        matrix = tform.params[0:2, :]
    warped = cv2.warpAffine(cv2.imread(str(path)), matrix, (size[1], size[0]), borderValue=0.0)
    return cv2.cvtColor(warped, cv2.COLOR_BGR2RGB)


def insightface_scores(feats, faceness, templates, medias, pairs, *, use_norm_score=True, use_detector_score=True):
    """A direct re-implementation of eval_ijbc.py's steps: normalise / faceness, `image2template_feature` (per
    template, per media: one image as is, several averaged; sum over medias; sklearn normalize), then
    `verification` (template id -> row, row-wise dot products in batches)."""
    from sklearn.preprocessing import normalize

    x = feats
    if not use_norm_score:
        x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
    if use_detector_score:
        x = x * faceness[:, np.newaxis]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), x.shape[1]))
    for count, template in enumerate(unique_templates):
        (in_template,) = np.where(templates == template)
        face_feats, face_medias = x[in_template], medias[in_template]
        unique_medias, media_counts = np.unique(face_medias, return_counts=True)
        media_feats = []
        for media, n in zip(unique_medias, media_counts):
            (in_media,) = np.where(face_medias == media)
            media_feats.append(face_feats[in_media] if n == 1
                               else np.mean(face_feats[in_media], axis=0, keepdims=True))
        template_feats[count] = np.sum(np.array(media_feats), axis=0)
    template_norm = normalize(template_feats)
    template_row = {template: count for count, template in enumerate(unique_templates)}  # eval_ijbc: template2id
    scores = np.zeros(len(pairs))
    for start in range(0, len(pairs), 50):
        batch = np.arange(start, min(start + 50, len(pairs)))
        f1 = template_norm[[template_row[t] for t in pairs[batch, 0]]]
        f2 = template_norm[[template_row[t] for t in pairs[batch, 1]]]
        scores[batch] = np.sum(f1 * f2, -1)
    return scores


# the tiny release's 1:N protocol: gallery G1 holds subjects 1 and 2 (templates 101, 102), G2 subject 3 (103) and
# subject 1 again through template 105; probes 104 (subject 1: mated in both) and 103/105 where not in the gallery
GALLERIES = {"G1": [(101, 1), (102, 2)], "G2": [(103, 3), (105, 1)]}
PROBES = [(104, 1), (103, 3), (105, 1)]


def write_identification(root, kind: str = "ijbc", galleries=None, probes=None) -> None:
    """The 1:N CSVs of `make_release`'s release in the real format: a header, one row per image of each template
    (TEMPLATE_ID, SUBJECT_ID, FILENAME, then more columns)."""
    galleries = GALLERIES if galleries is None else galleries
    probes = PROBES if probes is None else probes
    images = {}
    for k, template in enumerate(TEMPLATES):
        images.setdefault(template, []).append(f"{k + 1}.jpg")

    def write(name: str, rows) -> None:
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"]
        lines += [f"{t},{s},img/{n},{i},0,0,10,10" for t, s in rows for i, n in enumerate(images.get(t, ["x.jpg"]))]
        (root / "meta" / name).write_text("\n".join(lines) + "\n")

    names = {"ijbc": ("G1", "G2"), "ijbb": ("S1", "S2")}[kind]
    for (gallery, rows), name in zip(galleries.items(), names):
        write(f"{kind}_1N_gallery_{name}.csv", rows)
    write(f"{kind}_1N_probe_mixed.csv", probes)
