"""The IJB-B / IJB-C benchmarks as insightface's `eval_ijbc.py` reads and scores them: the release layout
(`meta/{kind}_face_tid_mid.txt`, `meta/{kind}_name_5pts_score.txt`, `meta/{kind}_template_pair_label.txt`, images in
`loose_crop/`), each image aligned by its five landmarks, and the template pooling that turns per-image features into
one score per template pair (faceness weighting, media mean, template sum, L2, cosine). The readers check every line
(IJB-C: 469,375 images, 23,124 templates, 15,658,489 pairs) and name the file and line of anything malformed;
`ijb_template_scores` is the vectorised form of insightface's per-template loops.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport.data.align import align_face, read_rgb
from bnport.data.ijb_1n import IdentificationProtocol, read_identification
from bnport.errors import BnportError

KINDS = ("ijbc", "ijbb")
_BLOCK_BYTES = 16 << 20  # the pair file is parsed in blocks of about this size (bounded temporary memory)
_HINT_RELEASE = ("restore the file from the IJB release (the layout insightface's eval_ijbc.py reads: meta/ and "
                 "loose_crop/ side by side)")


def meta_file_names(kind: str) -> dict[str, str]:
    """The three meta files of a release of `kind` ("ijbc" or "ijbb"), by role: faces, landmarks, pairs."""
    return {"faces": f"{kind}_face_tid_mid.txt", "landmarks": f"{kind}_name_5pts_score.txt",
            "pairs": f"{kind}_template_pair_label.txt"}


@dataclass(eq=False)
class IjbImages:
    """The images of a release and their landmarks: all a decode worker needs (small to pickle: no pair list)."""

    folder: Path
    names: list[str]
    landmarks: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        """Image i's file path."""
        return str(self.folder / self.names[i])

    def load_aligned(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Image i aligned to the ArcFace template at `size` = (height, width): decoded with `cv2.imdecode` (as
        insightface's `cv2.imread`), converted to RGB, warped by its five landmarks (`align.align_face`). Returns an
        RGB uint8 height x width x 3 array. A missing, unreadable or undecodable file, or landmarks that all
        coincide, is a BnportError naming the image."""
        path = self.folder / self.names[i]
        rgb = read_rgb(path, "IJB image", read_hint=f"the names in the meta files are relative to {self.folder}; "
                       f"{_HINT_RELEASE}", decode_hint="the file is corrupt or truncated: restore it from the release")
        try:
            return align_face(rgb, self.landmarks[i], size)
        except ValueError as exc:
            raise BnportError(f"cannot align IJB image {path}: {exc}",
                              "its five landmarks in the 5pts file are unusable: restore the release's file") from None


@dataclass(eq=False)
class IjbRelease:
    """An IJB-B or IJB-C release: per image (rows of the meta files, in file order) its file name relative to
    `root/loose_crop`, five landmarks (N x 5 x 2 float32, (x, y) pixels), faceness score (detector confidence,
    float32), template id and media id (int64); the template pairs to score (P x 2 int64 template ids) and their
    labels (P bool, True = same subject). `meta_sha256` holds the sha256 of each meta file as read;
    `identification` the 1:N protocol when the release has its CSVs (bnport.data.ijb_1n), else None."""

    root: Path
    kind: str
    names: list[str]
    landmarks: np.ndarray
    faceness: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    meta_sha256: dict[str, str] = field(default_factory=dict)
    identification: IdentificationProtocol | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def images(self) -> IjbImages:
        """The images and landmarks alone, to hand to decode workers (pickling the release itself also copies the
        pair list: 250 MB for IJB-C)."""
        return IjbImages(self.root / "loose_crop", self.names, self.landmarks)

    def describe(self, i: int) -> str:
        """Image i's file path."""
        return str(self.root / "loose_crop" / self.names[i])

    def load_aligned(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Image i aligned at `size` = (height, width), RGB uint8; see `IjbImages.load_aligned`."""
        return self.images.load_aligned(i, size)

    def fingerprint(self) -> dict:
        """What identifies this benchmark for caches and run records: kind, path, counts, the sha256 of each meta
        file and one sha256 over all three. Images are not read or stat-ed (IJB-C has 469k): a changed image file
        under an unchanged meta folder is not noticed."""
        digest = hashlib.sha256()
        for name in sorted(self.meta_sha256):
            digest.update(f"{name}\t{self.meta_sha256[name]}\n".encode())
        return {"kind": self.kind, "path": str(Path(self.root).resolve()), "count": len(self.names),
                "templates": int(np.unique(self.templates).size), "pairs": int(len(self.pairs)),
                "sha256": digest.hexdigest(), "files": dict(self.meta_sha256)}


def read_ijb(root: str | Path, kind: str) -> IjbRelease:
    """Read an IJB release folder: `root/meta/{kind}_*.txt` and the image names under `root/loose_crop`, `kind` being
    "ijbc" or "ijbb". The face/template/media file and the 5pts file are matched row by row, as insightface does;
    their names must agree on every row. Every line is checked (field count, numbers, labels 0/1, finite
    landmarks), and every template named by a pair must have images. Any problem is a BnportError naming the file and
    line. Images are not opened here (see `IjbRelease.load_aligned`)."""
    kind = str(kind).lower()
    if kind not in KINDS:
        raise BnportError(f"unknown IJB benchmark kind {kind!r}", "use ijbc:DIR or ijbb:DIR")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise BnportError(f"IJB folder not found: {root}",
                          f"give the folder that holds meta/ and loose_crop/ ({kind}:DIR)")
    if not (root / "loose_crop").is_dir():
        raise BnportError(f"no loose_crop/ folder in {root}", f"{_HINT_RELEASE}; give the folder that holds both")
    files = {role: root / "meta" / name for role, name in meta_file_names(kind).items()}
    contents, sha = {}, {}
    for role, path in files.items():
        try:
            contents[role] = path.read_bytes()
        except FileNotFoundError:
            raise BnportError(f"IJB meta file not found: {path}", _HINT_RELEASE) from None
        except OSError as exc:
            raise BnportError(f"cannot read IJB meta file {path}: {exc.strerror or exc}", _HINT_RELEASE) from None
        sha[path.name] = hashlib.sha256(contents[role]).hexdigest()

    faces = _read_table(files["faces"], contents["faces"], 3, "name template_id media_id")
    templates = _int_column(faces, 1, "template id")
    medias = _int_column(faces, 2, "media id")
    points = _read_table(files["landmarks"], contents["landmarks"], 12, "name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 faceness")
    numbers = _float_columns(points, slice(1, 12), "landmark or faceness")
    _check_rows_match(faces, points)
    pairs, labels = _read_pairs(files["pairs"], contents["pairs"])
    _check_pair_templates(files["pairs"], contents["pairs"], pairs, templates)
    return IjbRelease(root=root, kind=kind, names=faces.cells[:, 0].tolist(),
                      landmarks=numbers[:, :10].reshape(-1, 5, 2).astype(np.float32),
                      faceness=numbers[:, 10].astype(np.float32), templates=templates, medias=medias,
                      pairs=pairs, labels=labels, meta_sha256=sha,
                      identification=read_identification(root, kind, templates))


@dataclass
class _Table:
    """A meta file's rows: `cells` rows x fields (str objects), `lines` each row's 1-based line number."""

    path: Path
    cells: np.ndarray
    lines: np.ndarray


def _without_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BnportError(f"{path} is not a text file (byte {exc.start} is not UTF-8)", _HINT_RELEASE) from None


def _tokens_per_line(data: bytes) -> np.ndarray:
    """The number of whitespace-separated fields on each line of `data` (split at \\n; blanks are space, tab, CR),
    counted on the bytes without making a Python string per line."""
    chars = np.frombuffer(data, dtype=np.uint8)
    newline = chars == 10
    space = newline | (chars == 32) | (chars == 9) | (chars == 13)
    token_start = ~space
    token_start[1:] &= space[:-1]
    line_ends = np.flatnonzero(newline)
    if not data.endswith(b"\n"):
        line_ends = np.append(line_ends, len(chars) - 1)
    if not len(line_ends):
        return np.zeros(0, dtype=np.int64)
    # uint8 -> int32 is several times faster than numpy's bool -> int64 cumsum; a block holds < 2**31 fields
    tokens_before = np.cumsum(token_start.view(np.uint8), dtype=np.int32)[line_ends]
    return np.diff(tokens_before, prepend=0).astype(np.int64)


def _read_table(path: Path, data: bytes, fields: int, layout: str) -> _Table:
    """Whitespace-separated rows of exactly `fields` fields, blank lines skipped. Checked on the bytes first; when
    anything is off, the file is re-read line by line to name the first bad line."""
    text = _text(path, data)
    per_line = _tokens_per_line(_without_bom(data))
    rows = np.flatnonzero(per_line)
    tokens = text.split()
    if np.all((per_line == 0) | (per_line == fields)) and len(tokens) == fields * len(rows):
        cells = np.array(tokens, dtype=object).reshape(-1, fields)
        lines = rows + 1
    else:  # Python splits at more kinds of blank than the byte count: Python's reading decides
        parts_lines = []
        for number, line in enumerate(text.split("\n"), 1):
            parts = line.split()
            if parts and len(parts) != fields:
                raise BnportError(f"{path} line {number}: {len(parts)} fields, expected {fields} ({layout}): "
                                  f"{line[:80]!r}", _HINT_RELEASE)
            if parts:
                parts_lines.append((parts, number))
        cells = np.array([parts for parts, _ in parts_lines], dtype=object).reshape(-1, fields)
        lines = np.array([number for _, number in parts_lines], dtype=np.int64)
    if not len(cells):
        raise BnportError(f"{path} is empty (no rows)", _HINT_RELEASE)
    return _Table(path, cells, lines)


def _int_column(table: _Table, column: int, what: str) -> np.ndarray:
    try:
        return table.cells[:, column].astype(np.int64)
    except (ValueError, OverflowError):
        pass
    values = np.empty(len(table.cells), dtype=np.int64)
    for k, (text, number) in enumerate(zip(table.cells[:, column], table.lines)):
        try:
            values[k] = int(text)
        except (ValueError, OverflowError):
            raise BnportError(f"{table.path} line {number}: {what} {text!r} is not an integer (64-bit)",
                              _HINT_RELEASE) from None
    return values


def _float_columns(table: _Table, columns: slice, what: str) -> np.ndarray:
    cells = table.cells[:, columns]
    try:
        values = cells.astype(np.float64)
    except ValueError:
        values = None
    if values is not None and np.isfinite(values).all():
        return values
    values = np.empty(cells.shape)
    for k, (row, number) in enumerate(zip(cells, table.lines)):
        for j, text in enumerate(row):
            try:
                values[k, j] = float(text)
            except ValueError:
                values[k, j] = np.nan
            if not np.isfinite(values[k, j]):
                raise BnportError(f"{table.path} line {number}: {what} {text!r} is not a finite number",
                                  _HINT_RELEASE)
    return values


def _check_rows_match(faces: _Table, points: _Table) -> None:
    hint = ("the two files are matched row by row, as insightface's eval_ijbc.py does: restore both from the "
            "release, in the same order")
    common = min(len(faces.cells), len(points.cells))
    differ = np.flatnonzero(faces.cells[:common, 0] != points.cells[:common, 0])
    if differ.size:
        k = int(differ[0])
        raise BnportError(f"row {k + 1} names {faces.cells[k, 0]!r} in {faces.path} (line {faces.lines[k]}) but "
                          f"{points.cells[k, 0]!r} in {points.path} (line {points.lines[k]})", hint)
    if len(faces.cells) != len(points.cells):
        longer = faces if len(faces.cells) > len(points.cells) else points
        raise BnportError(f"{faces.path} has {len(faces.cells)} rows but {points.path} has {len(points.cells)}: "
                          f"{longer.path} line {longer.lines[common]} ({longer.cells[common, 0]!r}) has no partner "
                          "row", hint)


def _read_pairs(path: Path, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The pair file `t1 t2 label` (IJB-C: 15.6M lines), checked and parsed in vectorised blocks; a block with any
    problem is re-read line by line to name the line."""
    data = _without_bom(data)
    blocks, start, first_line = [], 0, 1
    while start < len(data):
        end = len(data)
        if start + _BLOCK_BYTES < len(data):
            cut = data.rfind(b"\n", start, start + _BLOCK_BYTES)
            end = cut + 1 if cut >= start else (data.find(b"\n", start + _BLOCK_BYTES) + 1 or len(data))
        block = data[start:end]
        values = _parse_int_block(block)
        if values is None:
            values = _parse_block_lines(path, block, first_line)
        blocks.append(values)
        first_line += block.count(b"\n")
        start = end
    values = np.concatenate(blocks) if blocks else np.empty((0, 3), np.int64)
    if not len(values):
        raise BnportError(f"{path} is empty (no pairs)", _HINT_RELEASE)
    bad = np.flatnonzero((values[:, 2] != 0) & (values[:, 2] != 1))
    if bad.size:
        line = _line_of_row(data, int(bad[0]))
        raise BnportError(f"{path} line {line}: label {int(values[bad[0], 2])} is not 0 or 1", _HINT_RELEASE)
    return np.ascontiguousarray(values[:, :2]), values[:, 2].astype(bool)


def _parse_int_block(block: bytes) -> np.ndarray | None:
    """A block of whole lines -> (rows, 3) int64, or None if any non-blank line is not three integers."""
    per_line = _tokens_per_line(block)
    if np.any((per_line != 0) & (per_line != 3)):
        return None
    total = int(per_line.sum())
    if total == 0:
        return np.empty((0, 3), dtype=np.int64)
    try:
        text = block.decode("ascii")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (future: raises) when it stops at a non-integer
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except (UnicodeDecodeError, ValueError, DeprecationWarning):
        return None
    if values.size != total:
        return None
    return values.reshape(-1, 3)


def _parse_block_lines(path: Path, block: bytes, first_line: int) -> np.ndarray:
    """The slow path: parse line by line and name the first bad line."""
    rows = []
    for number, line in enumerate(_text(path, block).split("\n"), first_line):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise BnportError(f"{path} line {number}: {len(parts)} fields, expected 3 (template_id template_id label):"
                              f" {line[:80]!r}", _HINT_RELEASE)
        try:
            rows.append([int(p) for p in parts])
        except ValueError:
            raise BnportError(f"{path} line {number}: not three integers (template_id template_id label): "
                              f"{line[:80]!r}", _HINT_RELEASE) from None
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _line_of_row(data: bytes, row: int) -> int:
    """The 1-based line number of the `row`-th (0-based) non-blank line."""
    return int(np.flatnonzero(_tokens_per_line(_without_bom(data)))[row]) + 1


def _check_pair_templates(path: Path, data: bytes, pairs: np.ndarray, templates: np.ndarray) -> None:
    known = np.unique(templates)
    missing = ~np.isin(pairs, known)
    if missing.any():
        row, col = (int(v[0]) for v in np.nonzero(missing))
        raise BnportError(f"{path} line {_line_of_row(data, row)}: template {int(pairs[row, col])} has no images in "
                          "the face/template/media file", "the meta files come from different releases or one is "
                          f"cut short; {_HINT_RELEASE}")


def ijb_template_scores(release: IjbRelease, features: np.ndarray, *, norm: bool = True, faceness: bool = True,
                        chunk: int | None = None) -> np.ndarray:
    """One cosine score per template pair (float64, in `release.pairs` order), exactly as insightface's
    eval_ijbc.py computes it from per-image features (N x D, rows in release order; pass the image+flip sum for
    its flip test, or plain features):

    1. with `norm` False, each image feature is L2-normalised first (eval_ijbc's use_norm_score=False; the default
       True keeps the feature norm as a quality weight);
    2. with `faceness` (default True), each is multiplied by the image's faceness score (use_detector_score);
    3. per template: the mean over the images of each media (a video's frames, or one still) inside the template,
       then the sum over the template's medias, then L2 normalisation (a zero vector stays zero, as sklearn's
       `normalize` leaves it);
    4. the dot product of the two templates' vectors.

    Computed in float64 by grouped sums (`pool_templates`), not per-template loops; the pairs, each put
    lower-template-first (the cosine is symmetric), are scored in blocks of `chunk` distinct first templates
    (default 512), each one matrix product against the second templates the block needs (memory at most
    chunk x templates x 8 bytes: 95 MB for IJB-C). The scores equal eval_ijbc.py's to rounding (~1e-16; its
    float32 media means differ from float64 by ~1e-7). An image feature of norm zero counts as zero in step 1
    (insightface would divide by zero). Features with NaN or Inf are a BnportError naming the first such image;
    a wrong feature shape, or a pair naming a template without images, a ValueError."""
    chunk = 512 if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    template_vectors, template_ids = release_template_vectors(release, features, norm=norm, faceness=faceness)
    return pair_cosines(template_vectors, template_ids, release.pairs, chunk)


def release_template_vectors(release: IjbRelease, features: np.ndarray, *, norm: bool = True,
                             faceness: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 of `ijb_template_scores` on a release's images: (template vectors, template ids); features with
    NaN or Inf are a BnportError naming the first such image."""
    feats = np.asarray(features)
    count = len(release.templates)
    if feats.ndim != 2 or feats.shape[0] != count:
        raise ValueError(f"expected features of shape ({count}, D) for {count} images, got {feats.shape}")
    finite = np.isfinite(np.add.reduce(feats, axis=1, dtype=np.float64))  # NaN/Inf survive the sum; no N x D mask
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise BnportError(f"{int((~finite).sum())} image features contain NaN or Inf, first {release.describe(first)}",
                          "the model produces non-finite outputs: check its weights and BN statistics")
    return pool_templates(feats, release.templates, release.medias, release.faceness if faceness else None,
                          norm=norm)


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, faceness: np.ndarray | None,
                   *, norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 of `ijb_template_scores`: per-image features -> (L2-normalised template vectors T x D float64,
    the sorted unique template ids T). `faceness` None = no faceness weighting."""
    feats = np.asarray(features)
    template_ids, template_index = np.unique(templates, return_inverse=True)
    _, media_index = np.unique(medias, return_inverse=True)
    # a media id is pooled per template (insightface groups medias inside each template)
    group_key = template_index.astype(np.int64) * (int(media_index.max()) + 1) + media_index
    _, group, group_size = np.unique(group_key, return_inverse=True, return_counts=True)
    # each image's share of its template vector: 1 / (images in its media) x faceness [x 1 / |feature|]
    weight = 1.0 / group_size[group]
    if faceness is not None:
        weight = weight * np.asarray(faceness, dtype=np.float64)
    if not norm:
        lengths = np.sqrt(np.einsum("ij,ij->i", feats, feats, dtype=np.float64))
        weight = np.divide(weight, lengths, out=np.zeros_like(weight), where=lengths > 0)
    vectors = np.zeros((len(template_ids), feats.shape[1]))
    order = np.argsort(template_index, kind="stable")
    # small blocks keep the float64 temporaries in cache: on IJB-C, 256 rows ran 4x faster than 16384 (and np.add.at
    # or a bincount per column were slower still)
    rows = 256
    for start in range(0, len(order), rows):
        index = order[start:start + rows]
        owner = template_index[index]
        block = feats[index].astype(np.float64) * weight[index, None]
        firsts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        vectors[owner[firsts]] += np.add.reduceat(block, firsts, axis=0)  # owners within a block are distinct
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, lengths, out=vectors, where=lengths > 0)
    return vectors, template_ids


def pair_cosines(vectors: np.ndarray, template_ids: np.ndarray, pairs: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Step 4 of `ijb_template_scores`: the cosine of each template pair, from L2-normalised template vectors."""
    pairs = np.asarray(pairs)
    first, second = _rows_of(template_ids, pairs[:, 0]), _rows_of(template_ids, pairs[:, 1])
    # cosine is symmetric: putting the smaller row first means a block of rows only meets columns at or after
    # its own, which halves the products computed on a dense pair list such as IJB-C's
    first, second = np.minimum(first, second), np.maximum(first, second)
    scores = np.empty(len(pairs))
    # numpy's stable sort is a radix sort for 16-bit keys: several times faster on IJB-C's 15.6M pairs
    order = np.argsort(first.astype(np.uint16) if len(template_ids) <= 1 << 16 else first, kind="stable")
    first_sorted = first[order]
    block_starts = np.flatnonzero(np.r_[True, first_sorted[1:] != first_sorted[:-1]])[::chunk]
    bounds = np.r_[block_starts, len(order)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        index = order[start:end]
        rows, row_of = np.unique(first_sorted[start:end], return_inverse=True)
        cols, col_of = np.unique(second[index], return_inverse=True)
        products = vectors[rows] @ vectors[cols].T
        scores[index] = products[row_of, col_of]
    return scores


def _rows_of(template_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The row of each id in the sorted `template_ids` (a lookup table when the ids span < 16M values; binary search
    otherwise). Raises ValueError for an id that is not there."""
    low, span = int(template_ids[0]), int(template_ids[-1] - template_ids[0])
    if span < 1 << 24:
        table = np.zeros(span + 1, dtype=np.int32)
        table[template_ids - low] = np.arange(len(template_ids), dtype=np.int32)
        rows = table[np.clip(ids - low, 0, span)]
    else:
        rows = np.searchsorted(template_ids, ids).clip(max=len(template_ids) - 1)
    if not np.array_equal(template_ids[rows], ids):
        raise ValueError("a pair names a template that has no images")
    return rows
