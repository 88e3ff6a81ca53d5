"""Benchmarks for `bnport score`: a --bench SPEC becomes a `Benchmark` that lists the images to decode (aligned and
sized for the model), and turns per-image features into per-pair scores.

Specs: `PATH.bin` (an insightface verification pack), `ijbc:DIR` / `ijbb:DIR` (the IJB release layout), `pairs:FILE.csv`
(`path_a,path_b,label`) and `folder:DIR` (one sub-folder per identity, every pair). Options follow the path after
commas: `flip=off` (every kind; insightface computes features of the image plus its horizontal flip, on by default),
and for IJB `norm=off` (L2-normalise each image feature before pooling, insightface's use_norm_score=False) and
`faceness=off` (no detector-score weighting). Decoding uses OpenCV, as insightface's tools do.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bnport.data.align import resize_rgb
from bnport.errors import BnportError

BENCH_HELP = ("PATH.bin | ijbc:DIR | ijbb:DIR | pairs:FILE.csv | folder:DIR, options after commas: flip=off; "
              "for IJB also norm=off, faceness=off")
ACCURACY_FOLDS = 10
_SWITCHES = {"on": True, "1": True, "true": True, "yes": True, "off": False, "0": False, "false": False, "no": False}


@dataclass
class PairScores:
    """Per-pair similarity (float64, higher = more alike, in the benchmark's pair order) and labels (True =
    genuine). `features_norm` is the mean L2 norm of the unflipped image features, as insightface prints it."""

    scores: np.ndarray
    labels: np.ndarray
    extra: dict = field(default_factory=dict)


class Benchmark(ABC):
    """One verification benchmark. Subclasses give the images (`__len__`, `load`, `describe`), what identifies
    their content (`fingerprint`, without touching every image) and the pair scoring (`score_pairs`)."""

    kind: str = ""

    def __init__(self, spec: str, path: Path, *, flip: bool = True):
        self.spec = spec
        self.path = path
        self.flip = flip
        self.name = path.stem if path.suffix else path.name

    @abstractmethod
    def __len__(self) -> int:
        """Number of images to decode."""

    @abstractmethod
    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        """Image i as an RGB uint8 array of `size` (h, w): decoded, aligned or resized as the benchmark does."""

    @abstractmethod
    def describe(self, i: int) -> str:
        """A human name for image i (a file path, or pack.bin#i)."""

    def loader(self, start: int, stop: int):
        """A small picklable object with this benchmark's `load(i, size)` and `describe(i)` for images start..stop-1
        (global indices): what a decode worker receives instead of the whole benchmark (IJB-C's pair list alone is
        250 MB)."""
        return _Slice(self, start, stop)

    @abstractmethod
    def fingerprint(self) -> dict:
        """What identifies the benchmark's content, for the decode cache key."""

    @property
    @abstractmethod
    def n_pairs(self) -> int:
        """Number of verification pairs."""

    @abstractmethod
    def score_pairs(self, features: np.ndarray) -> PairScores:
        """Per-pair scores from per-image features (N x D, flip-summed when `flip`)."""

    @abstractmethod
    def labels(self) -> np.ndarray:
        """Pair labels (bool, True = genuine), in pair order."""

    def scores_identity(self) -> dict:
        """What besides the images and the switches decides the scores (part of the per-pair scores' cache key)."""
        return {}

    def settings(self) -> dict:
        """The switches that change the numbers, printed with the table."""
        return {"flip": self.flip}

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "spec": self.spec, "path": str(self.path),
                "images": len(self), "pairs": self.n_pairs, "settings": self.settings()}


class _Slice:
    """Images start..stop-1 of a benchmark, carried by a light stand-in (`part`) that loads by local index."""

    def __init__(self, bench: Benchmark, start: int, stop: int):
        self.start = start
        self.part = bench._part(start, stop)

    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return self.part.load(i - self.start, size)

    def describe(self, i: int) -> str:
        return self.part.describe(i - self.start)


class _EncodedImages:
    """Encoded images of a pack, named pack.bin#i by their index in the whole pack."""

    def __init__(self, path: Path, images: list[bytes], first: int):
        self.path, self.images, self.first = path, images, first

    def load(self, j: int, size: tuple[int, int]) -> np.ndarray:
        return resize_rgb(decode_rgb(self.images[j], self.describe(j)), size)

    def describe(self, j: int) -> str:
        return f"{self.path}#{self.first + j}"


class _Aligned:
    """IJB images: their loader's `load_aligned` under the common name `load`."""

    def __init__(self, images):
        self.images = images

    def load(self, j: int, size: tuple[int, int]) -> np.ndarray:
        return self.images.load_aligned(j, size)

    def describe(self, j: int) -> str:
        return self.images.describe(j)


def decode_rgb(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 with OpenCV (as insightface's tools decode); a bad image names `what`."""
    from bnport.data.align import decode_rgb as decode

    return decode(data, f"benchmark image {what}", "the image is corrupt or not an image; fix or remove it from the "
                  "benchmark")


class BinBenchmark(Benchmark):
    """An insightface verification pack (lfw.bin, cfp_fp.bin, agedb_30.bin...): pair k is images 2k and 2k+1.

    Images are decoded as insightface's `load_bin` does (RGB) and resized bilinearly when they are not already the
    model's size. Scores: flip-summed features L2-normalised (sklearn.preprocessing.normalize), cosine per pair;
    the 10-fold accuracy of `eval/verification.py` is computed from the same features."""

    kind = "bin"

    def __init__(self, spec: str, path: Path, *, flip: bool = True):
        from bnport.data.binpack import read_bin_pack

        super().__init__(spec, path, flip=flip)
        pack = read_bin_pack(path)
        self._images, self.issame = pack.images, pack.issame
        if not len(self.issame):
            raise BnportError(f"{path} holds no pairs", "give a pack with at least one pair")
        self._sha = None

    def __len__(self) -> int:
        return len(self._images)

    def _part(self, start: int, stop: int) -> _EncodedImages:
        return _EncodedImages(self.path, self._images[start:stop], start)

    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return self._part(i, i + 1).load(0, size)

    def describe(self, i: int) -> str:
        return f"{self.path}#{i}"

    def fingerprint(self) -> dict:
        from bnport.atomic import sha256_file

        if self._sha is None:
            self._sha = sha256_file(self.path)
        return {"kind": self.kind, "sha256": self._sha, "images": len(self)}

    @property
    def n_pairs(self) -> int:
        return len(self.issame)

    def labels(self) -> np.ndarray:
        return self.issame.astype(bool)

    def score_pairs(self, features: np.ndarray) -> PairScores:
        from bnport.score.metrics import compute_verification_accuracy, normalize_embeddings

        normed = normalize_embeddings(np.asarray(features, dtype=np.float64))
        scores = np.einsum("ij,ij->i", normed[0::2], normed[1::2])
        extra = {}
        if len(self.issame) >= ACCURACY_FOLDS:  # insightface's 10-fold accuracy needs a pair per fold at least
            extra["accuracy"] = compute_verification_accuracy(normed[0::2], normed[1::2], self.issame,
                                                              normalize=False)
        return PairScores(scores=scores, labels=self.issame.astype(bool), extra=extra)


class IjbBenchmark(Benchmark):
    """IJB-B / IJB-C in the release layout, evaluated as insightface's `eval_ijbc.py` does (see bnport.data.ijb)."""

    def __init__(self, spec: str, path: Path, kind: str, *, flip: bool = True, norm: bool = True,
                 faceness: bool = True, cache_dir: str | Path | None = None):
        """`cache_dir`: keep the parsed release in CACHE_DIR/ijb-releases/ (bnport.data.ijb_cache); None reads the
        release every time."""
        from bnport.data.ijb_cache import read_ijb_cached

        super().__init__(spec, path, flip=flip)
        self.kind = kind
        self.release = read_ijb_cached(path, kind, Path(cache_dir) / "ijb-releases" if cache_dir else None)
        self.name = kind.upper()
        self.norm, self.faceness = norm, faceness

    def __len__(self) -> int:
        return len(self.release.names)

    def _part(self, start: int, stop: int) -> _Aligned:
        from bnport.data.ijb import IjbImages

        images = self.release.images
        return _Aligned(IjbImages(images.folder, images.names[start:stop], images.landmarks[start:stop]))

    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return self.release.load_aligned(i, size)

    def describe(self, i: int) -> str:
        return self.release.describe(i)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **self.release.fingerprint(), "align": "arcface-5pt"}

    @property
    def n_pairs(self) -> int:
        return len(self.release.labels)

    def labels(self) -> np.ndarray:
        return self.release.labels.astype(bool)

    def settings(self) -> dict:
        return {"flip": self.flip, "norm": self.norm, "faceness": self.faceness}

    def scores_identity(self) -> dict:
        protocol = self.release.identification
        return {"1:N": protocol.sha256 if protocol is not None else None}

    def to_dict(self) -> dict:
        protocol = self.release.identification
        return {**super().to_dict(), "identification": protocol.describe() if protocol is not None else None}

    def score_pairs(self, features: np.ndarray) -> PairScores:
        """The 1:1 template-pair cosines and, when the release has its 1:N protocol, the identification metrics
        (bnport.score.identification) in `extra["identification"]`, both from the same pooled template vectors."""
        from bnport.data.ijb import pair_cosines, release_template_vectors

        vectors, ids = release_template_vectors(self.release, features, norm=self.norm, faceness=self.faceness)
        scores = pair_cosines(vectors, ids, self.release.pairs)
        extra = {}
        if self.release.identification is not None:
            from bnport.score.identification import identification_metrics

            extra["identification"] = identification_metrics(vectors, ids, self.release.identification)
        return PairScores(scores=np.asarray(scores, dtype=np.float64), labels=self.release.labels.astype(bool),
                          extra=extra)


class PairListBenchmark(Benchmark):
    """`pairs:FILE.csv` or `folder:DIR`: image files, pairs of them, cosine of the L2-normalised features."""

    def __init__(self, spec: str, path: Path, kind: str, *, flip: bool = True):
        from bnport.data.pairs import folder_pairs, read_pairs_csv

        super().__init__(spec, path, flip=flip)
        self.kind = kind
        self.pairs = read_pairs_csv(path) if kind == "pairs" else folder_pairs(path)

    def __len__(self) -> int:
        return len(self.pairs.images)

    def _part(self, start: int, stop: int):
        from dataclasses import replace

        return replace(self.pairs, images=self.pairs.images[start:stop], pairs=np.zeros((0, 2), np.int64),
                       labels=np.zeros(0, bool))

    def load(self, i: int, size: tuple[int, int]) -> np.ndarray:
        return self.pairs.load(i, size)

    def describe(self, i: int) -> str:
        return self.pairs.describe(i)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, **self.pairs.fingerprint()}

    @property
    def n_pairs(self) -> int:
        return len(self.pairs.labels)

    def labels(self) -> np.ndarray:
        return self.pairs.labels.astype(bool)

    def score_pairs(self, features: np.ndarray) -> PairScores:
        from bnport.score.metrics import normalize_embeddings

        normed = normalize_embeddings(np.asarray(features, dtype=np.float64))
        a, b = self.pairs.pairs[:, 0], self.pairs.pairs[:, 1]
        scores = np.einsum("ij,ij->i", normed[a], normed[b])
        return PairScores(scores=scores, labels=self.pairs.labels.astype(bool))


def parse_bench(spec: str, *, cache_dir: str | Path | None = None) -> Benchmark:
    """A --bench SPEC -> its Benchmark (files read and checked now, so a bad one fails before any model runs);
    `cache_dir`: where an IJB release's parsed meta files are kept (None: not kept)."""
    text = spec.strip()
    prefix, sep, rest = text.partition(":")
    kind = prefix.lower() if sep and prefix.lower() in ("ijbc", "ijbb", "pairs", "folder") else None
    body = rest if kind else text
    path_text, *option_texts = body.split(",")
    options = {}
    for item in option_texts:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq or value.strip().lower() not in _SWITCHES:
            raise BnportError(f"bad option {item!r} in bench spec {spec!r}", f"options are key=on|off; {BENCH_HELP}")
        options[key] = _SWITCHES[value.strip().lower()]
    allowed = {"flip", "norm", "faceness"} if kind in ("ijbc", "ijbb") else {"flip"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise BnportError(f"unknown option {unknown[0]!r} in bench spec {spec!r}",
                          f"{'ijbc/ijbb take flip, norm, faceness' if kind in ('ijbc', 'ijbb') else 'take flip'}")
    path = Path(path_text).expanduser()
    if kind is None:
        if sep and len(prefix) > 1:
            raise BnportError(f"unknown benchmark kind {prefix!r} in {spec!r}", f"give {BENCH_HELP}")
        if path.suffix.lower() != ".bin":
            raise BnportError(f"cannot tell what kind of benchmark {spec!r} is", f"give {BENCH_HELP}")
        kind = "bin"
    if not path.exists():
        raise BnportError(f"benchmark not found: {path}", f"check the path; give {BENCH_HELP}")
    if kind == "bin":
        return BinBenchmark(spec, path, **options)
    if kind in ("ijbc", "ijbb"):
        if not path.is_dir():
            raise BnportError(f"{path} is not a folder", "give the IJB release folder holding meta/ and loose_crop/")
        return IjbBenchmark(spec, path, kind, cache_dir=cache_dir, **options)
    if kind == "folder" and not path.is_dir():
        raise BnportError(f"{path} is not a folder", "give folder:DIR with one sub-folder of images per identity")
    return PairListBenchmark(spec, path, kind, **options)


def parse_benches(specs: list[str] | tuple[str, ...], *, cache_dir: str | Path | None = None) -> list[Benchmark]:
    """Every --bench, with names made unique (a second lfw.bin becomes lfw-2); `cache_dir` as parse_bench takes it."""
    if not specs:
        raise BnportError("no benchmark given", f"add --bench SPEC ({BENCH_HELP})")
    benches: list[Benchmark] = []
    for spec in specs:
        bench = spec if isinstance(spec, Benchmark) else parse_bench(spec, cache_dir=cache_dir)
        base, count = bench.name, 1
        while bench.name in {b.name for b in benches}:  # a repeated name gets the first free -2, -3...
            count += 1
            bench.name = f"{base}-{count}"
        labels = bench.labels()
        if len(bench) == 0 or not labels.any() or labels.all():
            raise BnportError(f"benchmark {bench.spec} cannot be scored: {len(bench)} images, "
                              f"{int(labels.sum())} genuine and {int((~labels).sum())} impostor pairs",
                              "TPR at FPR needs at least one genuine and one impostor pair")
        benches.append(bench)
    return benches
