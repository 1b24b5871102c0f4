"""Teacher targets cached once per training view, with the student's frozen front beside them.

On a CPU the int8 SSCD teacher embeds ~30 views/s and a full student training step runs ~8
images/s, so a distillation run of a few hours sees each image a handful of times at most. Two
costs repeat for nothing across epochs: the teacher's descriptor of a view (the teacher never
changes) and, when the lower blocks of the student are frozen with their batch norm in eval mode,
the student's own feature map up to the first trained block. This cache pays both once: for every
training image it keeps `views` views (the clean image, then DISC augmentations of
`rdcd.augment`, each a pure function of (seed, image index, view)), the front's feature map of
each view (float16) and the teacher's descriptor (float32). Training the tail over it runs
3-4x faster per sample, and more distinct images fit in a session.

The cache is written in chunks (`chunk-NNNNN.npz`, atomically renamed), so a killed build resumes
where it stopped; `cache.json` holds what the chunks were made from (the front's weights digest,
the views, the teacher) and each chunk the digest of its own slice of the listing, so a cache of
another setup is refused, not mixed in, while a longer listing that starts with the same images
reuses the chunks already made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from rdcd import io as rio
from rdcd.augment import augment, preset, view_rng
from rdcd.decode import DecodeError, decode_image, resize_square
from rdcd.models.embedder import IMAGENET_MEAN, IMAGENET_STD
from rdcd.models.student import StudentNet

log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """The cache folder holds chunks of another setup (front, views or image listing)."""


@dataclass(frozen=True)
class ViewCacheConfig:
    """What the cache is made of; every field is part of its identity."""

    views: int = 3  # the clean image, then views-1 augmentations
    size: int = 224  # side of every view, for the student front and the teacher
    from_block: int = 5  # first trained block: the front is stem + blocks[:from_block]
    seed: int = 0
    chunk: int = 256  # images per chunk file
    decode_threads: int = 2
    augment: str = "sscd"  # a preset of `rdcd.augment.PRESETS`
    # the first view is the clean image; False: every view is augmented (a cache of extra
    # views beside one that has the clean view)
    clean_view: bool = True


def _same_setup(found: dict, cfg: ViewCacheConfig) -> bool:
    """A cache.json made before a setting existed was made with that setting's default."""
    return {**asdict(ViewCacheConfig()), **found} == asdict(cfg)


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def front(net: StudentNet, pixels: np.ndarray, from_block: int) -> torch.Tensor:
    """The frozen front of an EfficientNet-style timm student (stem, bn1, blocks[:from_block]),
    batch norm in eval mode: uint8 NHWC views -> NCHW feature maps."""
    bb = net.backbone
    was = net.training
    net.eval()
    x = bb.bn1(bb.conv_stem(_normalise(pixels)))
    for block in bb.blocks[:from_block]:
        x = block(x)
    net.train(was)
    return x


def tail(net: StudentNet, x: torch.Tensor, from_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained rest, from a front feature map: (`h_S`, descriptor), as
    `StudentNet.forward_features` computes them from the image."""
    bb = net.backbone
    for block in bb.blocks[from_block:]:
        x = block(x)
    f = net.pool(bb.bn2(bb.conv_head(x))).flatten(1)
    h = net.project((f - net.feat_mean) * net.feat_scale)
    return h, net.descriptor(h)


def front_digest(net: StudentNet, from_block: int) -> str:
    """sha256 of the front's weights and buffers: a cache made by another front is refused."""
    h = hashlib.sha256()
    prefixes = ("backbone.conv_stem.", "backbone.bn1.") + tuple(
        f"backbone.blocks.{i}." for i in range(from_block)
    )
    for name, t in sorted(net.state_dict().items()):
        if name.startswith(prefixes):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def listing_digest(uris: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(uris).encode()).hexdigest()


def _decode(uri: str, cfg: ViewCacheConfig):
    try:
        return decode_image(rio.read_bytes(uri), size=cfg.size * 2)
    except (DecodeError, rio.StorageError, OSError) as exc:
        log.warning("view cache: skipping %s: %s", uri, exc)
        return None


def make_views(img, index: int, cfg: ViewCacheConfig, canvas=None) -> np.ndarray:
    """The `cfg.views` views of one decoded image (uint8, views x size x size x 3): the clean
    image first (with `clean_view`), then augmentations; `canvas` is another decoded image an
    overlay view is pasted onto."""
    aug = preset(cfg.augment, cfg.size)
    first = 1 if cfg.clean_view else 0
    out = [resize_square(img, cfg.size)] if cfg.clean_view else []
    out += [augment(img, view_rng(cfg.seed, index, 0, v), aug, canvas)
            for v in range(first, cfg.views)]  # fmt: skip
    return np.stack(out)


def views_of(uri: str, index: int, cfg: ViewCacheConfig, canvas=None) -> np.ndarray | None:
    """The views of one image; None when the image cannot be read or decoded (it is logged and
    left out of training)."""
    img = _decode(uri, cfg)
    return None if img is None else make_views(img, index, cfg, canvas)


@dataclass
class ViewCache:
    """All chunks in memory: `maps` [n, views, C, H, W] float16, `teacher` [n, views, D] float32,
    `index` [n] (position of the image in the listing)."""

    maps: np.ndarray
    teacher: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)


def _chunk_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"chunk-{i:05d}.npz")


def build(
    folder: str,
    uris: Sequence[str],
    net: StudentNet,
    teacher_embed: Callable[[np.ndarray], np.ndarray] | None,
    cfg: ViewCacheConfig = ViewCacheConfig(),
    teacher_name: str = "sscd",
    teacher_from: str | None = None,
) -> ViewCache:
    """Build (or resume, or just load) the cache of `uris` in the local folder `folder`.

    `teacher_embed` maps uint8 NHWC views (cfg.size square) to descriptors (None: no teacher
    descriptors, `teacher` of width 0, for views only the student sees). `teacher_from`: a
    cache of the same listing, views, size, seed and teacher made for another front (another
    `from_block` or start); its teacher descriptors are copied chunk by chunk instead of being
    recomputed, which is most of a cache's cost (the views are pure functions of their inputs, so
    the descriptors are the same). A chunk it lacks, or holds for other images, is computed."""
    # a donor of other views is refused before anything is written
    donor = _teacher_donor(teacher_from, cfg, teacher_name)
    os.makedirs(folder, exist_ok=True)
    identity = {
        "config": asdict(cfg),
        "front": front_digest(net, cfg.from_block),
        "teacher": teacher_name if teacher_embed is not None else None,
    }
    meta = os.path.join(folder, "cache.json")
    if os.path.exists(meta):
        with open(meta) as f:
            found = json.load(f)
        for key in identity:
            same = (_same_setup(found.get(key, {}), cfg) if key == "config"
                    else found.get(key) == identity[key])  # fmt: skip
            if not same:
                raise CacheMismatchError(
                    f"{folder}: the cache was made with another {key} "
                    f"({found.get(key)!r} != {identity[key]!r}); use a new folder"
                )
    else:
        with open(meta + ".tmp", "w") as f:
            json.dump(identity, f, indent=2)
        os.replace(meta + ".tmp", meta)
    n_chunks = (len(uris) + cfg.chunk - 1) // cfg.chunk
    t0, done, reused = time.perf_counter(), 0, 0
    with ThreadPoolExecutor(cfg.decode_threads) as pool:
        for c in range(n_chunks):
            path = _chunk_path(folder, c)
            lo, hi = c * cfg.chunk, min(len(uris), (c + 1) * cfg.chunk)
            digest = listing_digest(uris[lo:hi])
            if os.path.exists(path):
                with np.load(path) as z:
                    if str(z["listing"]) != digest:
                        raise CacheMismatchError(f"{path} holds other images than the listing's "
                                                 f"{lo}..{hi}; use a new folder")  # fmt: skip
                continue
            known = _donor_chunk(donor, c, digest)
            idx, maps, targets = [], [], []
            for b in range(lo, hi, 32):
                ids = list(range(b, min(hi, b + 32)))
                imgs = list(pool.map(lambda i: _decode(uris[i], cfg), ids))
                ok = [k for k, im in enumerate(imgs) if im is not None]
                # an overlay view's canvas: the next readable image of the batch
                canvas = {k: imgs[ok[(j + 1) % len(ok)]] if len(ok) > 1 else None
                          for j, k in enumerate(ok)}  # fmt: skip
                got = list(pool.map(make_views, [imgs[k] for k in ok], [ids[k] for k in ok],
                                    [cfg] * len(ok), [canvas[k] for k in ok]))  # fmt: skip
                made = [(ids[k], v) for k, v in zip(ok, got, strict=True)]
                if not made:
                    continue
                px = np.concatenate([v for _, v in made])
                f = front(net, px, cfg.from_block).half().numpy()
                ids_made = [i for i, _ in made]
                if teacher_embed is None:  # a cache of views for the student only
                    t = np.zeros((len(px), 0), np.float32)
                elif known is not None and all(i in known for i in ids_made):
                    t = np.concatenate([known[i] for i in ids_made])
                    reused += len(ids_made)
                else:
                    t = np.asarray(teacher_embed(px), dtype=np.float32)
                maps.append(f.reshape(len(made), cfg.views, *f.shape[1:]))
                targets.append(t.reshape(len(made), cfg.views, -1))
                idx += [i for i, _ in made]
            tmp = path + ".tmp.npz"
            np.savez(tmp, maps=np.concatenate(maps), teacher=np.concatenate(targets),
                     index=np.asarray(idx, np.int64), listing=np.asarray(digest))  # fmt: skip
            os.replace(tmp, path)
            done += hi - lo
            rate = done / (time.perf_counter() - t0)
            log.info("view cache: chunk %d/%d (%d images, %.1f images/s, %d teacher "
                     "descriptors reused so far)", c + 1, n_chunks, hi - lo, rate,
                     reused)  # fmt: skip
    return load(folder, n_chunks)


def _teacher_donor(folder: str | None, cfg: ViewCacheConfig, teacher_name: str) -> str | None:
    """`folder` when its cache was made from the same views and teacher (any front)."""
    if not folder:
        return None
    meta = os.path.join(folder, "cache.json")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"teacher_from {folder}: no cache.json there")
    with open(meta) as f:
        found = json.load(f)
    same = ("views", "size", "seed", "chunk", "augment", "clean_view")
    theirs = {**asdict(ViewCacheConfig()), **found.get("config", {})}
    if found.get("teacher") != teacher_name or any(theirs.get(k) != getattr(cfg, k) for k in same):
        raise CacheMismatchError(
            f"teacher_from {folder}: made with other views or teacher ({theirs}, "
            f"{found.get('teacher')!r}); its descriptors would not be of these views"
        )
    return folder


def _donor_chunk(donor: str | None, c: int, digest: str) -> dict[int, np.ndarray] | None:
    """{listing position: teacher descriptors [views, D]} of the donor's chunk `c`, when it
    holds the same images."""
    path = _chunk_path(donor, c) if donor else None
    if path is None or not os.path.exists(path):
        return None
    with np.load(path) as z:
        if str(z["listing"]) != digest:
            return None
        return {int(i): t for i, t in zip(z["index"], z["teacher"], strict=True)}


def load(folder: str, n_chunks: int | None = None) -> ViewCache:
    """Chunks 0..n_chunks-1 of `folder` (every chunk there when None), concatenated."""
    if n_chunks is None:
        n_chunks = sum(1 for n in os.listdir(folder) if n.startswith("chunk-")
                       and n.endswith(".npz") and ".tmp" not in n)  # fmt: skip
    missing = [c for c in range(n_chunks) if not os.path.exists(_chunk_path(folder, c))]
    if missing:
        raise CacheMismatchError(f"{folder}: chunks {missing[:5]} are missing")
    parts = [np.load(_chunk_path(folder, c)) for c in range(n_chunks)]
    return ViewCache(
        maps=np.concatenate([p["maps"] for p in parts]),
        teacher=np.concatenate([p["teacher"] for p in parts]),
        index=np.concatenate([p["index"] for p in parts]),
    )
