"""`bnport score` on an IJB-C-sized release: wall time against its floors, memory, disk, and the caches' reuse.

Usage: python tests/benchmarks/bench_ijb_scale.py [--crops 50000] [--root DIR] [--work DIR] [--cache-dir DIR]
       [--model mobilefacenet_tiny] [--faces 64] [--sample 2000] [--batch-size N] [--workers N] [--gen-workers 2]
       [--seed 0] [--json OUT.json] [--compare OTHER.json] [--no-progress]
       (--crops 469375 is IJB-C's size; defaults: --root /tmp/ijb_scale/N, --work /tmp/ijb_scale/work-N,
       --cache-dir WORK/cache)

1. A synthetic IJB-C release in the real layout at `--crops` images (`loose_crop/*.jpg` written with cv2.imencode,
   `meta/ijbc_face_tid_mid.txt`, `meta/ijbc_name_5pts_score.txt`, `meta/ijbc_template_pair_label.txt` and the 1:N
   CSVs `meta/ijbc_1N_gallery_G1.csv`, `_G2.csv`, `meta/ijbc_1N_probe_mixed.csv`), with IJB-C's proportions scaled:
   469,375 crops, 23,124 templates, 3,531 subjects, about 140k medias, 15,658,489 template pairs of which 19,557
   genuine, galleries G1/G2 of 1,772/1,759 subjects (one template each) and every other template a probe. Each crop
   is one of `--faces` drawn base faces (tests.helpers.ijb.draw_face, 130-260 px a side) cut at a random offset,
   tinted per subject, shaded and noised per crop, with its five landmarks and a faceness score. The release is
   kept in --root and reused by a later call at the same size (the marker bench_ijb_scale.json, written last).
2. Two small ONNX models (`--model`, default mobilefacenet_tiny: about 2,300 forward passes/s on 2 cores), two
   weight seeds, their BN statistics measured on 512 aligned crops of the release (random weights alone give every
   face nearly the same embedding), exported with bnport's `export_onnx`.
3. `bnport.score.score` of the first model on `ijbc:ROOT` from a cold decode cache (the dedicated --cache-dir is
   emptied first; the OS page cache is not: the release's JPEGs may be in it), timed; peak memory sampled from
   /proc every 0.2 s (anonymous RSS of this process and of its decode workers, apart from the file pages of the
   memory-mapped image cache, which count in RSS but are page cache) and getrusage's ru_maxrss (which includes
   them); disk used by the cache and the release.
4. The floors, in the same run: decode+align is bnport's own decode step, timed inside the score call (the cache's
   info.json; also a raw cv2 read+decode+align loop on a sample, per process, for reference); inference is a plain
   onnxruntime session (bnport's session factory, same providers and threads) over preloaded, already-normalised
   tensors of `--sample` images, image and flip, best of 3 rounds, extrapolated to all images; the input
   preparation it leaves out (uint8 -> normalised float32 and the mirror copy, which bnport does in a prefetch
   thread) is timed beside it.
   The sustained floor is the same plain session over every cached image in one pass (read, normalise and mirror
   timed apart and left out): a burst of a few thousand preloaded images runs 15-25% faster than any full pass on
   a shared machine, so the burst floor is printed beside it, not alone.
   Goal: wall / (decode+align + inference floor) <= 1.15, against each floor.
5. The template features and pair scores alone, as `IjbBenchmark.score_pairs` computes them
   (`release_template_vectors`, `pair_cosines`) on the first model's cached embeddings. Goal: < 60 s at full size.
   The release read (`read_ijb`), the 1:N metrics and the TPR@FPR table are timed beside it.
6. A second `score` call with the second model on the same cache: it must decode nothing (no "decoded" log line,
   the image cache file untouched); a third call with the first model into a new output folder: it must run no
   inference (the embedding cache; no session started).

Goals: wall / (decode+align + inference floor) <= 1.15; peak anonymous RSS of bnport and its workers <= 4 GB
(besides the page cache of the memory-mapped image cache); template vectors + pair cosines < 60 s; every figure
growing linearly from 50k to 469k crops (write --json at both sizes, give the first to the second run's --compare);
the second call decodes nothing. Every figure comes from this one run; the last two lines are the wall / floor ratios
(burst floor, then sustained floor).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.helpers imports

from bnport.data.ijb import meta_file_names
from bnport.data.ijb_1n import protocol_files
from tests.helpers.ijb import draw_face

# IJB-C's counts (insightface's IJB_release meta files); medias as the brief states them (about 140k)
FULL = {"crops": 469_375, "templates": 23_124, "subjects": 3_531, "pairs": 15_658_489, "genuine": 19_557,
        "medias": 140_000, "G1": 1_772, "G2": 1_759}
KIND = "ijbc"
MARKER = "bench_ijb_scale.json"
RELEASE_FORMAT = 1
MARGIN = 6  # a crop is cut at an offset of 0..2*MARGIN pixels out of its base face's canvas
SIDES = (130, 260)  # base faces' height and width range (pixels, before the margin)
NOISE = 64  # the noise pool is this much larger than the largest canvas: a crop takes its noise at a random offset
QUALITY = 90  # JPEG quality of the crops
GEN_CHUNK = 1000  # crops per generation task
GB = 1 << 30


# ---------------------------------------------------------------------------------------------------- the release

def base_faces(count: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` drawn faces on canvases MARGIN larger on every side (BGR uint8), and their landmarks (count x 5 x 2,
    canvas pixels)."""
    rng = np.random.default_rng([seed, 1])
    images, points = [], []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
        image, pts = draw_face(rng, h + 2 * MARGIN, w + 2 * MARGIN)
        images.append(image)
        points.append(pts)
    return images, np.array(points, dtype=np.float64)


def plan_release(crops: int, seed: int, faces: int, face_points: np.ndarray) -> dict:
    """Everything about the release but the pixels, IJB-C's proportions scaled to `crops`: per crop (rows grouped
    by template) its template row, media id, landmarks, faceness and how it is rendered; per template its id and
    subject; the pairs and labels; the 1:N galleries and probes."""
    scale = crops / FULL["crops"]
    subjects = max(4, round(FULL["subjects"] * scale))
    templates = max(2 * subjects, round(FULL["templates"] * scale))
    if crops < templates:
        raise SystemExit(f"--crops {crops} is too small: it needs at least {templates} (two templates per subject)")
    rng = np.random.default_rng(seed)
    subject_ids = np.sort(rng.choice(np.arange(1, 3 * subjects + 1), subjects, replace=False))
    template_ids = np.sort(rng.choice(np.arange(1, 8 * templates + 1), templates, replace=False))
    owner = np.concatenate([np.arange(subjects), np.arange(subjects),  # every subject: a gallery template and a probe
                            rng.integers(0, subjects, templates - 2 * subjects)])
    rng.shuffle(owner)
    # template sizes: one crop each, the rest spread with heavy-tailed weights (IJB-C's run from 1 to hundreds)
    weights = rng.lognormal(0.0, 1.0, templates)
    counts = 1 + np.bincount(rng.choice(templates, crops - templates, p=weights / weights.sum()), minlength=templates)
    crop_template = np.repeat(np.arange(templates), counts)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    # medias: a template's first crop opens a media, each later one opens another with the probability that gives
    # IJB-C's count (a video's frames share a media)
    first = np.zeros(crops, dtype=bool)
    first[starts] = True
    p_new = max(0.0, (FULL["medias"] * scale - templates) / max(1, crops - templates))
    medias = np.cumsum(first | (rng.random(crops) < p_new)).astype(np.int64)
    # appearance: a subject is a base face and a colour tint; a crop a shift, a shade and a noise offset
    crop_subject = owner[crop_template]
    subject_face = rng.permutation(subjects) % faces
    subject_tint = rng.normal(0.0, 18.0, (subjects, 3))
    crop_face = subject_face[crop_subject]
    offsets = rng.integers(0, 2 * MARGIN + 1, (crops, 2))  # (x, y)
    shade = np.rint(subject_tint[crop_subject] + rng.normal(0.0, 6.0, (crops, 1))).astype(np.int16)
    noise_at = rng.integers(0, NOISE, (crops, 2))
    landmarks = face_points[crop_face] - offsets[:, None, :] + rng.normal(0.0, 0.6, (crops, 5, 2))
    faceness = rng.uniform(0.4, 1.0, crops)
    # pairs: genuine = two templates of one subject, impostor = two templates of different subjects
    by_subject = np.argsort(owner, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(owner, minlength=subjects))]
    same = []
    for s in range(subjects):
        rows = by_subject[bounds[s]:bounds[s + 1]]
        i, j = np.triu_indices(len(rows), 1)
        same.append(np.stack([rows[i], rows[j]], axis=1))
    same = np.concatenate(same)
    genuine = same[rng.choice(len(same), min(len(same), max(1, round(FULL["genuine"] * scale))), replace=False)]
    n_impostor = max(1, round(FULL["pairs"] * scale) - len(genuine))
    a, b = rng.integers(0, templates, (2, n_impostor))
    clash = owner[a] == owner[b]
    while clash.any():
        b[clash] = rng.integers(0, templates, int(clash.sum()))
        clash = owner[a] == owner[b]
    pair_rows = np.concatenate([genuine, np.stack([a, b], axis=1)])
    labels = np.r_[np.ones(len(genuine), np.int64), np.zeros(n_impostor, np.int64)]
    order = np.argsort(pair_rows[:, 0].astype(np.uint16) if templates <= 1 << 16 else pair_rows[:, 0], kind="stable")
    # 1:N: the subjects split in two galleries (one template each: the subject's first), every other template a probe
    gallery_row = np.full(subjects, templates)
    np.minimum.at(gallery_row, owner, np.arange(templates))
    split = rng.permutation(subjects)
    n_g1 = round(subjects * FULL["G1"] / (FULL["G1"] + FULL["G2"]))
    probe_rows = np.setdiff1d(np.arange(templates), gallery_row)
    return {"crops": crops, "subjects": subjects, "templates": templates, "subject_ids": subject_ids,
            "template_ids": template_ids, "owner": owner, "counts": counts, "starts": starts,
            "crop_template": crop_template, "medias": medias, "landmarks": landmarks, "faceness": faceness,
            "crop_face": crop_face, "offsets": offsets, "shade": shade, "noise_at": noise_at,
            "pair_rows": pair_rows[order], "labels": labels[order],
            "galleries": {"G1": np.sort(gallery_row[split[:n_g1]]), "G2": np.sort(gallery_row[split[n_g1:]])},
            "probes": probe_rows}


def int_lines(columns: list[np.ndarray], block: int = 1 << 21):
    """Lines of space-separated non-negative integers, one per row of `columns`, as bytes in blocks: digits are
    written into a fixed-width uint8 grid by numpy and the padding dropped (np.savetxt takes minutes on 15.7 M
    rows; this takes seconds)."""
    widths = [max(1, len(str(int(c.max())))) for c in columns]
    assert all(int(c.min()) >= 0 for c in columns)
    n = len(columns[0])
    for lo in range(0, n, block):
        parts = [np.asarray(c[lo:lo + block], dtype=np.int64) for c in columns]
        rows = len(parts[0])
        grid = np.zeros((rows, sum(widths) + len(widths)), dtype=np.uint8)
        pos = 0
        for j, (values, width) in enumerate(zip(parts, widths)):
            digits = np.ones(rows, dtype=np.int64)
            for k in range(1, width):
                digits += values >= 10 ** k
            rest = values.copy()
            for d in range(width - 1, -1, -1):
                grid[:, pos + d] = 48 + rest % 10
                rest //= 10
            field = grid[:, pos:pos + width]
            field[np.arange(width)[None, :] < (width - digits)[:, None]] = 0  # leading zeros dropped below
            pos += width
            grid[:, pos] = 10 if j == len(parts) - 1 else 32
            pos += 1
        flat = grid.ravel()
        yield flat[flat != 0].tobytes()


_GEN: dict = {}


def _gen_init(faces: list[np.ndarray], folder: str, seed: int) -> None:
    cv2.setNumThreads(1)
    largest = max(max(f.shape[0], f.shape[1]) for f in faces)
    rng = np.random.default_rng([seed, 2, os.getpid()])
    _GEN.update(faces=[f.astype(np.int16) for f in faces], folder=folder,
                noise=rng.integers(-8, 9, (largest + NOISE, largest + NOISE, 3)).astype(np.int16))


def _gen_chunk(task) -> tuple[int, int]:
    """Render and write crops lo..: base face cut at its offset, plus noise and shade, JPEG via cv2.imencode."""
    lo, face, offsets, shade, noise_at = task
    faces, folder, noise = _GEN["faces"], _GEN["folder"], _GEN["noise"]
    written = 0
    for k in range(len(face)):
        base = faces[face[k]]
        h, w = base.shape[0] - 2 * MARGIN, base.shape[1] - 2 * MARGIN
        (ox, oy), (nx, ny) = offsets[k], noise_at[k]
        pixels = base[oy:oy + h, ox:ox + w] + noise[ny:ny + h, nx:nx + w] + shade[k]
        ok, data = cv2.imencode(".jpg", np.clip(pixels, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
        assert ok
        with open(os.path.join(folder, f"{lo + k + 1}.jpg"), "wb") as f:
            f.write(data)
        written += len(data)
    return len(face), written


def write_release(root: Path, crops: int, seed: int, faces: int, gen_workers: int) -> dict:
    """Write the release (crops in `gen_workers` processes, meta files meanwhile in this one); the marker last."""
    began = time.perf_counter()
    for part in ("meta", "loose_crop", MARKER):
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    images, points = base_faces(faces, seed)
    plan = plan_release(crops, seed, faces, points)
    print(f"generating {crops} crops ({plan['templates']} templates, {plan['subjects']} subjects, "
          f"{len(plan['labels'])} pairs) in {root} with {gen_workers} processes", file=sys.stderr, flush=True)
    tasks = [(lo, plan["crop_face"][lo:lo + GEN_CHUNK], plan["offsets"][lo:lo + GEN_CHUNK],
              plan["shade"][lo:lo + GEN_CHUNK], plan["noise_at"][lo:lo + GEN_CHUNK])
             for lo in range(0, crops, GEN_CHUNK)]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(gen_workers, initializer=_gen_init, initargs=(images, str(root / "loose_crop"), seed)) as pool:
        pending = pool.imap_unordered(_gen_chunk, tasks)
        meta_began = time.perf_counter()
        _write_meta(root / "meta", plan)  # while the workers encode
        meta_seconds = time.perf_counter() - meta_began
        done, jpeg_bytes, shown = 0, 0, 0
        for count, size in pending:
            done += count
            jpeg_bytes += size
            if done * 10 // crops > shown or done == crops:
                shown = done * 10 // crops
                elapsed = time.perf_counter() - began
                print(f"  {done}/{crops} crops, {elapsed:.0f}s, {done / elapsed:.0f} crops/s", file=sys.stderr,
                      flush=True)
    seconds = time.perf_counter() - began
    info = {"format": RELEASE_FORMAT, "crops": crops, "seed": seed, "faces": faces,
            "templates": plan["templates"], "subjects": plan["subjects"], "medias": int(plan["medias"].max()),
            "pairs": len(plan["labels"]), "genuine": int(plan["labels"].sum()),
            "galleries": {k: len(v) for k, v in plan["galleries"].items()}, "probes": len(plan["probes"]),
            "jpeg_bytes": jpeg_bytes, "generation_seconds": round(seconds, 2),
            "meta_seconds": round(meta_seconds, 2), "gen_workers": gen_workers}
    (root / MARKER).write_text(json.dumps(info, indent=1) + "\n")
    return info


def _write_meta(meta: Path, plan: dict) -> None:
    crops = plan["crops"]
    names = [f"{k + 1}.jpg" for k in range(crops)]
    files = meta_file_names(KIND)
    tids = plan["template_ids"][plan["crop_template"]]
    (meta / files["faces"]).write_text("".join(f"{n} {t} {m}\n" for n, t, m in
                                               zip(names, tids.tolist(), plan["medias"].tolist())))
    row = " ".join(["%.3f"] * 10) + " %.4f\n"
    values = np.column_stack([plan["landmarks"].reshape(crops, 10), plan["faceness"]]).tolist()
    (meta / files["landmarks"]).write_text("".join(f"{n} " + row % tuple(v) for n, v in zip(names, values)))
    ids = plan["template_ids"]
    with open(meta / files["pairs"], "wb") as f:
        f.writelines(int_lines([ids[plan["pair_rows"][:, 0]], ids[plan["pair_rows"][:, 1]], plan["labels"]]))
    subject_of = plan["subject_ids"][plan["owner"]]

    def csv(rows: np.ndarray) -> str:
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"]
        for t in rows.tolist():
            start, count = int(plan["starts"][t]), int(plan["counts"][t])
            lines += [f"{ids[t]},{subject_of[t]},img/{k + 1}.jpg,{plan['medias'][k]},0,0,100,100"
                      for k in range(start, start + count)]
        return "\n".join(lines) + "\n"

    names_1n = protocol_files(KIND)
    for gallery, rows in plan["galleries"].items():
        (meta / names_1n[gallery]).write_text(csv(rows))
    (meta / names_1n["probe"]).write_text(csv(plan["probes"]))


def ensure_release(root: Path, crops: int, seed: int, faces: int, gen_workers: int) -> tuple[dict, bool]:
    """The release at `root`: reused when its marker says it has this size, seed and face count; else written."""
    marker = root / MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if (info.get("format"), info.get("crops"), info.get("seed"), info.get("faces")) == \
                (RELEASE_FORMAT, crops, seed, faces):
            return info, False
    elif root.is_dir() and any(p.name not in ("meta", "loose_crop") for p in root.iterdir()):
        raise SystemExit(f"{root} holds other files and no {MARKER}: give an empty or new --root")
    root.mkdir(parents=True, exist_ok=True)
    return write_release(root, crops, seed, faces, gen_workers), True


# ------------------------------------------------------------------------------------------ models and measurement

def export_models(arch: str, folder: Path, root: Path, seeds=(0, 1), calibration: int = 512) -> list[Path]:
    """One ONNX file per seed (different weights), exported with bnport's export_onnx. Random weights map every face
    to nearly one point (all cosines ~1.0000), so each model's BN statistics are first measured on `calibration`
    crops of the release, aligned by bnport's loader (BN layers alone in train mode, cumulative average): the
    embeddings then spread (on a 3k release, mean template cosine ~0.92 genuine, ~0.49 impostor)."""
    import torch

    from bnport.data.ijb import read_ijb
    from bnport.data.transforms import InputSpec
    from bnport.export.onnx_export import export_onnx
    from bnport.export.settings import ExportSettings
    from bnport.model.arch import create_model
    from bnport.score.embed import to_network_input
    from tests.helpers.models import realistic_bn

    release = read_ijb(root, KIND)
    rows = np.linspace(0, len(release) - 1, min(calibration, len(release))).astype(np.int64)
    crops = torch.from_numpy(to_network_input(np.stack([release.load_aligned(int(i), (112, 112)) for i in rows]),
                                              InputSpec()))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = realistic_bn(create_model(arch), seed=seed)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the calibration batches
            bn.train()
        with torch.no_grad():
            for lo in range(0, len(crops), 128):
                model(crops[lo:lo + 128])
        model.eval()
        path = folder / f"{arch}-seed{seed}.onnx"
        # no onnxsim: the files only need to run; scoring cost is what is measured
        assert export_onnx(model, path, ExportSettings(exporter="torchscript", simplify=False), device="cpu")
        paths.append(path)
    return paths


def _status(pid: int | str) -> dict[str, int]:
    """RssAnon/RssFile/RssShmem/VmRSS/VmHWM of a process in bytes ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(v) for v in f.read().split()]
            except OSError:
                kids = []
            found += kids
            todo += kids
    return found


class MemoryPeaks:
    """Peak resident memory of this process and its descendants (decode workers), sampled every `interval` s:
    anonymous pages (heap, arrays, ORT's arena) apart from file pages (the memory-mapped image and embedding
    caches, which RSS counts but the kernel reclaims as page cache). `phase()` returns the peaks since the last
    call and starts new ones."""

    KEYS = ("main_anon", "main_rss", "children_anon", "children_rss", "all_anon")

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peaks = dict.fromkeys(self.KEYS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="memory-peaks")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        main = _status(os.getpid())
        kids = [_status(p) for p in _descendants(os.getpid())]
        now = {"main_anon": main.get("RssAnon", 0), "main_rss": main.get("VmRSS", 0),
               "children_anon": sum(k.get("RssAnon", 0) for k in kids),
               "children_rss": sum(k.get("VmRSS", 0) for k in kids)}
        now["all_anon"] = now["main_anon"] + now["children_anon"]
        with self._lock:
            for key, value in now.items():
                self.peaks[key] = max(self.peaks[key], value)

    def phase(self) -> dict[str, int]:
        self.sample()
        with self._lock:
            peaks, self.peaks = self.peaks, dict.fromkeys(self.KEYS, 0)
        return peaks


def disk_bytes(path: Path) -> int:
    """Bytes the files under `path` take on disk (allocated blocks, as du counts them)."""
    total = 0
    stack = [str(path)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def empty_cache_dir(cache: Path) -> None:
    """Remove the dedicated cache folder's content; refuse a folder that does not look like a bnport cache."""
    if not cache.exists():
        return
    foreign = [p.name for p in cache.iterdir() if p.name != "embeddings" and not re.match(r".+-\d+x\d+-[0-9a-f]+$",
                                                                                            p.name)]
    if foreign:
        raise SystemExit(f"--cache-dir {cache} holds {foreign[:3]}, not only bnport cache entries: give a dedicated "
                         "folder")
    shutil.rmtree(cache)


def decoded_folder(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.name != "embeddings" and (p / "info.json").is_file()]
    return folder


def inference_floor(onnx: Path, images: np.ndarray, sample: int, batch: int, total: int, rounds: int = 3
                    ) -> tuple[float, float, float]:
    """Seconds a plain onnxruntime session (made by bnport's factory with the settings bnport's scoring takes for
    `total` images, so the same providers and threads) needs per image for image + flip, over `sample` preloaded,
    already-normalised images, best of `rounds`; returns (seconds per image, sample seconds, and for reference the
    seconds per image of the input preparation the floor leaves out: uint8 -> normalised float32 NCHW and its
    mirror, as bnport's `to_network_input` and embed_many's flip copy do it)."""
    from bnport.data.transforms import InputSpec
    from bnport.runtime.sessions import create_session, scoring_use
    from bnport.score.embed import to_network_input

    spec = InputSpec()
    session = create_session(onnx, device="cpu", use=scoring_use(2 * total))
    ort_session, name = session.session, session.input_name
    pixels = np.array(images[:sample])
    batches = []
    for lo in range(0, len(pixels), batch):
        x = to_network_input(pixels[lo:lo + batch], spec)
        batches.append((x, np.ascontiguousarray(x[..., ::-1])))
    ort_session.run(None, {name: batches[0][0]})  # warm-up: first-run allocations
    seconds = prepare = float("inf")
    for _ in range(rounds):  # the best round: a floor is the least the work takes (a shared machine's noise is not)
        began = time.perf_counter()  # the preparation again, in steady state (batches discarded, memory reused)
        for lo in range(0, len(pixels), batch):
            x = to_network_input(pixels[lo:lo + batch], spec)
            np.ascontiguousarray(x[..., ::-1])
        prepare = min(prepare, (time.perf_counter() - began) / len(pixels))
        began = time.perf_counter()
        for image, mirrored in batches:
            ort_session.run(None, {name: image})
            ort_session.run(None, {name: mirrored})
        seconds = min(seconds, time.perf_counter() - began)
    return seconds / len(pixels), seconds, prepare


def sustained_floor(onnx: Path, images: np.ndarray, batch: int) -> tuple[float, float]:
    """(inference seconds, preparation seconds) of a plain onnxruntime session (bnport's factory and settings) over
    every image of bnport's decoded cache, image and flip, one pass: what a plain loop sustains over the whole run,
    where a burst on a sample of preloaded images runs faster than any full pass on a shared machine. The input
    preparation (read from the memory-mapped cache, normalise, mirror) is timed apart and left out."""
    from bnport.data.transforms import InputSpec
    from bnport.runtime.sessions import create_session, scoring_use
    from bnport.score.embed import to_network_input

    spec = InputSpec()
    session = create_session(onnx, device="cpu", use=scoring_use(2 * len(images)))
    ort_session, name = session.session, session.input_name
    inference = prepare = 0.0
    for lo in range(0, len(images), batch):
        began = time.perf_counter()
        x = to_network_input(np.asarray(images[lo:lo + batch]), spec)
        mirrored = np.ascontiguousarray(x[..., ::-1])
        ran = time.perf_counter()
        ort_session.run(None, {name: x})
        ort_session.run(None, {name: mirrored})
        inference += time.perf_counter() - ran
        prepare += ran - began
    return inference, prepare


def decode_floor(release, sample: int) -> float:
    """Seconds per image of a raw loop in this process (cv2 one thread, as bnport's decode workers): read the file,
    cv2.imdecode, BGR -> RGB, align by the five landmarks; on `sample` crops spread over the release."""
    from bnport.data.align import align_face

    rows = np.linspace(0, len(release) - 1, min(sample, len(release))).astype(np.int64)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        began = time.perf_counter()
        for i in rows.tolist():
            data = np.fromfile(release.describe(i), dtype=np.uint8)
            rgb = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            align_face(rgb, release.landmarks[i], (112, 112))
        return (time.perf_counter() - began) / len(rows)
    finally:
        cv2.setNumThreads(threads)


def pair_scoring(root: Path, features: np.ndarray, fprs) -> tuple[dict, object]:
    """Time what `IjbBenchmark.score_pairs` does, step by step, plus reading the release and the TPR@FPR table;
    returns the timings (and the scores) and the release read."""
    from bnport.data.ijb import pair_cosines, read_ijb, release_template_vectors
    from bnport.score.identification import identification_metrics
    from bnport.score.metrics import compute_tpr_at_fpr

    out = {}
    began = time.perf_counter()
    release = read_ijb(root, KIND)
    out["read_release"] = time.perf_counter() - began
    began = time.perf_counter()
    vectors, ids = release_template_vectors(release, features)
    out["template_vectors"] = time.perf_counter() - began
    began = time.perf_counter()
    scores = pair_cosines(vectors, ids, release.pairs)
    out["pair_cosines"] = time.perf_counter() - began
    began = time.perf_counter()
    identification_metrics(vectors, ids, release.identification)
    out["identification"] = time.perf_counter() - began
    began = time.perf_counter()
    compute_tpr_at_fpr(release.labels, scores, fprs=list(fprs))
    out["tpr_at_fpr"] = time.perf_counter() - began
    out["genuine_mean"] = float(scores[release.labels].mean())
    out["impostor_mean"] = float(scores[~release.labels].mean())
    out["scores"] = scores
    return out, release


def timed_score(onnx: Path, root: Path, cache: Path, out: Path, args) -> tuple[object, float, list[str]]:
    from bnport.score import ScoreSettings, score

    lines: list[str] = []

    def log(message: str) -> None:
        lines.append(message)
        print(message, file=sys.stderr, flush=True)

    if out.exists():
        shutil.rmtree(out)
    settings = ScoreSettings.of([f"{KIND}:{root}"], cache_dir=str(cache), batch_size=args.batch_size,
                                workers=args.workers)
    began = time.perf_counter()
    result = score([str(onnx)], settings, out=out, device="cpu", progress=args.progress, log=log)
    return result, time.perf_counter() - began, lines


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=50_000, help=f"images (IJB-C: {FULL['crops']})")
    parser.add_argument("--root", type=Path, default=None, help="release folder (default /tmp/ijb_scale/CROPS)")
    parser.add_argument("--work", type=Path, default=None, help="models and outputs (default /tmp/ijb_scale/work-N)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="dedicated bnport cache, emptied first")
    parser.add_argument("--model", default="mobilefacenet_tiny")
    parser.add_argument("--faces", type=int, default=64, help="base faces the crops are made from")
    parser.add_argument("--sample", type=int, default=2000, help="images of the inference and raw decode floors")
    parser.add_argument("--batch-size", type=int, default=None, help="bnport's and the floor's (default 32 on CPU)")
    parser.add_argument("--workers", type=int, default=None, help="bnport decode processes (default: its own)")
    parser.add_argument("--gen-workers", type=int, default=2, help="processes encoding the crops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--compare", type=Path, default=None, help="another size's --json: print each growth")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    n = args.crops
    root = (args.root or Path(f"/tmp/ijb_scale/{n}")).expanduser().resolve()
    work = (args.work or Path(f"/tmp/ijb_scale/work-{n}")).expanduser().resolve()
    cache = (args.cache_dir or work / "cache").expanduser().resolve()
    batch = args.batch_size or 32
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)

    began = time.perf_counter()
    release, generated = ensure_release(root, n, args.seed, args.faces, args.gen_workers)
    generation = time.perf_counter() - began
    release_disk = disk_bytes(root)
    crops_disk = disk_bytes(root / "loose_crop")
    models = export_models(args.model, work / "models", root)
    empty_cache_dir(cache)

    with MemoryPeaks() as memory:  # the three calls; the floors run after them (their arrays are not bnport's)
        memory.phase()
        first, wall, _ = timed_score(models[0], root, cache, work / "out1", args)
        peaks = memory.phase()
        folder = decoded_folder(cache)
        cache_stat = (folder / "images.npy").stat()
        second, wall2, log2 = timed_score(models[1], root, cache, work / "out2", args)
        after = (folder / "images.npy").stat()
        third, wall3, log3 = timed_score(models[0], root, cache, work / "out3", args)
        peaks_later = memory.phase()
    usage_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    decoded2 = [m for m in log2 if m.startswith("decoded ")]
    untouched = (after.st_ino, after.st_mtime_ns) == (cache_stat.st_ino, cache_stat.st_mtime_ns)
    sessions2 = second.table.session_settings.get("sessions", 0)
    decoded3 = [m for m in log3 if m.startswith("decoded ")]
    sessions3 = third.table.session_settings.get("sessions", 0)
    info = json.loads((folder / "info.json").read_text())
    decode_seconds = float(info["seconds"])
    bnport_bench = first.table.results[0]

    images = np.load(folder / "images.npy", mmap_mode="r")
    sample = min(args.sample, n)
    per_image, sample_seconds, prepare = inference_floor(models[0], images, sample, batch, n)
    infer_floor = per_image * n
    sustained, sustained_prepare = sustained_floor(models[0], images, batch)
    del images

    from bnport.score.embeddings import EmbeddingCache

    embeddings = EmbeddingCache(cache)
    features = embeddings.load("IJBC", embeddings.key(first.candidates[0].sha256, info["key"], True), n)
    timing, release_read = pair_scoring(root, features, first.table.fprs)
    raw_decode = decode_floor(release_read, sample)
    saved = np.load(bnport_bench.scores_file)
    assert np.allclose(saved, timing.pop("scores"), rtol=0, atol=1e-12), "pair scores differ from bnport's"
    del features, saved, release_read
    pairs_seconds = timing["template_vectors"] + timing["pair_cosines"]

    cache_disk = disk_bytes(cache)
    embeddings_disk = disk_bytes(cache / "embeddings") if (cache / "embeddings").is_dir() else 0
    floor = decode_seconds + infer_floor
    ratio = wall / floor
    ratio_sustained = wall / (decode_seconds + sustained)

    print(first.format(bundle=False))
    print()
    print(f"IJB-C at {n} crops ({n / FULL['crops']:.4f} of the real size): {release['templates']} templates, "
          f"{release['subjects']} subjects, {release['medias']} medias, {release['pairs']} pairs "
          f"({release['genuine']} genuine), 1:N galleries {release['galleries']} and {release['probes']} probe "
          f"templates; {args.model}, batch {batch}, {workers} decode processes, {os.cpu_count()} CPUs, flip on")
    print("release: " + (f"generated in {generation:.1f}s ({args.gen_workers} processes, "
                          f"{n / generation:.0f} crops/s; meta files {release['meta_seconds']:.1f}s)" if generated else
                          f"reused from {root} (generated earlier in {release['generation_seconds']:.1f}s)"))
    print(f"release disk: {_gb(release_disk)} (loose_crop {_gb(crops_disk)}, {crops_disk / n / 1024:.1f} KiB a crop; "
          f"meta {(release_disk - crops_disk) / 2 ** 20:.0f} MiB)")
    print(f"bnport score wall (cold cache, 1 model, flip): {wall:.1f}s")
    print(f"decode+align (bnport's decode step, {workers} processes): {n / decode_seconds:.0f} img/s ({n} images in "
          f"{decode_seconds:.1f}s); raw cv2 loop on {sample} crops: {1 / raw_decode:.0f} img/s per process")
    print(f"inference floor (plain ORT session, image + flip, batch {batch}, {sample} preloaded images in "
          f"{sample_seconds:.2f}s, best of 3): {1 / per_image:.0f} img/s -> {infer_floor:.1f}s for {n} images; "
          f"the input preparation it leaves out (normalise + mirror copy, which bnport overlaps in a thread) "
          f"{1 / prepare:.0f} img/s -> {prepare * n:.1f}s")
    scoring = timing["template_vectors"] + timing["pair_cosines"] + timing["identification"]
    print(f"bnport inference ~{bnport_bench.seconds - scoring:.1f}s (its inference + pair scoring "
          f"{bnport_bench.seconds:.1f}s less the pair scoring timed alone below, {scoring:.1f}s) vs the floor "
          f"{infer_floor:.1f}s; the wall's rest (release read, session start, TPR tables, bundle): "
          f"{wall - decode_seconds - bnport_bench.seconds:.1f}s")
    print(f"sustained inference floor (the same plain session over all {n} cached images, one pass, preparation "
          f"{sustained_prepare:.1f}s timed apart and left out): {sustained:.1f}s = {n / sustained:.0f} img/s, "
          f"{sustained / infer_floor:.2f}x the burst floor")
    print(f"peak anonymous RSS in the cold call: main {_gb(peaks['main_anon'])} + decode workers "
          f"{_gb(peaks['children_anon'])} = {_gb(peaks['all_anon'])} (goal <= 4 GB); with file pages: main "
          f"{_gb(peaks['main_rss'])}, workers {_gb(peaks['children_rss'])}; second and third calls "
          f"{_gb(peaks_later['all_anon'])} anonymous")
    print(f"ru_maxrss (the release's generation, the exports and the three calls, file pages included): main "
          f"{_gb(usage_self)}, largest child {_gb(usage_children)}")
    print(f"cache disk: {_gb(cache_disk)} (decoded images {_gb(cache_disk - embeddings_disk)}, embeddings "
          f"{embeddings_disk / 2 ** 20:.1f} MiB)")
    print(f"template vectors + pair cosines ({release['pairs']} pairs): {pairs_seconds:.2f}s (vectors "
          f"{timing['template_vectors']:.2f}s, cosines {timing['pair_cosines']:.2f}s; goal < 60 s); read release "
          f"{timing['read_release']:.2f}s, 1:N metrics {timing['identification']:.2f}s, TPR@FPR "
          f"{timing['tpr_at_fpr']:.2f}s")
    print(f"mean cosine: genuine {timing['genuine_mean']:.4f}, impostor {timing['impostor_mean']:.4f} "
          f"(genuine higher: {timing['genuine_mean'] > timing['impostor_mean']})")
    print(f"second model, same cache: wall {wall2:.1f}s, decoded {len(decoded2) and n} images "
          f"({'no decode log line' if not decoded2 else decoded2[0]}; image cache "
          f"{'untouched' if untouched else 'REWRITTEN'}), {sessions2} session(s) started")
    print(f"third call, first model, new output folder: wall {wall3:.1f}s, {sessions3} session(s) started "
          f"({'no inference: embedding cache' if sessions3 == 0 else 'INFERENCE RAN'}), decoded "
          f"{len(decoded3) and n} images")

    figures = {"crops": n, "model": args.model, "batch": batch, "decode_workers": workers, "cpus": os.cpu_count(),
               "release": release, "release_generated_now": generated, "generation_seconds": generation,
               "release_disk": release_disk, "loose_crop_disk": crops_disk, "wall": wall,
               "decode_seconds": decode_seconds, "decode_img_s": n / decode_seconds,
               "raw_decode_img_s_per_process": 1 / raw_decode, "inference_img_s": 1 / per_image,
               "inference_floor_seconds": infer_floor, "prepare_seconds": prepare * n,
               "bnport_inference_and_pairs_seconds": bnport_bench.seconds,
               "ratio": ratio, "sustained_floor_seconds": sustained, "sustained_prepare_seconds": sustained_prepare,
               "ratio_sustained": ratio_sustained, "peak_anon": peaks, "peak_anon_later_calls": peaks_later,
               "ru_maxrss_self": usage_self,
               "ru_maxrss_children": usage_children, "cache_disk": cache_disk, "embeddings_disk": embeddings_disk,
               "pair_scoring": timing, "template_and_pairs_seconds": pairs_seconds, "second_wall": wall2,
               "second_decoded": len(decoded2) and n, "second_cache_untouched": untouched,
               "second_sessions": sessions2, "third_wall": wall3, "third_sessions": sessions3}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, default=float) + "\n")
        print(f"figures written to {args.json}")
    if args.compare:
        compare(json.loads(args.compare.read_text()), figures)
    print(f"bnport score wall / (decode+align {decode_seconds:.1f}s + burst inference floor {infer_floor:.1f}s): "
          f"{ratio:.3f} (goal <= 1.15)")
    print(f"bnport score wall / (decode+align {decode_seconds:.1f}s + sustained inference floor {sustained:.1f}s): "
          f"{ratio_sustained:.3f} (goal <= 1.15)")


def compare(before: dict, now: dict) -> None:
    """Each figure's growth against another size's, next to the growth in crops (linear: the two agree)."""
    grow = now["crops"] / before["crops"]
    print(f"growth from {before['crops']} to {now['crops']} crops (x{grow:.2f}); linear growth = x{grow:.2f}:")
    rows = [("wall", lambda f: f["wall"]), ("decode+align seconds", lambda f: f["decode_seconds"]),
            ("inference floor seconds", lambda f: f["inference_floor_seconds"]),
            ("sustained inference floor seconds", lambda f: f.get("sustained_floor_seconds")),
            ("peak anonymous RSS", lambda f: f["peak_anon"]["all_anon"]), ("cache disk", lambda f: f["cache_disk"]),
            ("release disk", lambda f: f["release_disk"]),
            ("template vectors + pair cosines", lambda f: f["template_and_pairs_seconds"]),
            ("second-model wall", lambda f: f["second_wall"]), ("third-call wall", lambda f: f["third_wall"])]
    for name, get in rows:
        a, b = get(before), get(now)
        print(f"  {name}: x{b / a:.2f}" if a and b else f"  {name}: {b}")


if __name__ == "__main__":
    main()
