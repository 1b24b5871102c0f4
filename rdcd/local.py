"""Local features: RootSIFT keypoints, their Parquet form, pair verification and local recall.

A global descriptor sees a whole image; it misses a copy that is a small crop of its original, or
one buried under an overlay, and it cannot tell a copy from another photo of the same landmark.
Local features answer those cases (the ISC2021 matching-track design): keypoints that match one
to one under a single geometric transform exist only between an image and a copy of it, and the
matched keypoints say *where* in each image the copy is.

Extraction. OpenCV SIFT on the grey image resized so that its short side is `short_side` px (long
side capped at `max_side`), the `max_keypoints` strongest by response, RootSIFT (L1-normalise,
square root: the Hellinger kernel, which matches better than L2 SIFT), quantised to uint8 as
`round(sqrt(d / |d|_1) * QUANT_SCALE)` clipped to 255. Keypoints are stored in the pixels of the
original (EXIF-transposed) image, so a match region is meaningful to a user; verification maps
them back to the working size with `working_scale(width, height, cfg)`.

Verification (`verify`). Lowe's ratio test on the RootSIFT distances, one match per reference
keypoint, then a geometric model fitted by MAGSAC (`cv2.USAC_MAGSAC` homography) or a partial
affine (`cv2.estimateAffinePartial2D`), in working pixels; the inlier count is the pair's local
score. A mirrored copy has no SIFT matches (its descriptors are mirrored), so with `flips` the
query is also matched mirrored: its descriptor bins are permuted (see `mirror_descriptors`) and
its keypoint x mirrored, without a second extraction. SIFT's dominant orientation already makes
descriptors rotation-invariant, so 90/180/270-degree rotations cost nothing extra: the fitted model
says how the query is rotated (`Verification.transform`), and `rotations=False` refuses models
rotated by more than 45 degrees.

Fusion (`FusedScore`). A logistic on the global score and log(1 + inliers) keeps predictions on
one "higher = more similar" scale in (0, 1); its weights are fitted (plain numpy) on labelled pairs
and stored in the index manifest, or `FusedScore.DEFAULT` is used.

Local recall (`LocalIndex`). A FAISS index (IVF-PQ by default) over the descriptors of every
reference, labelled by reference id; each query keypoint votes for the reference of its nearest
neighbour when that neighbour passes a ratio test against the nearest descriptor of any *other*
reference. References with enough votes join the global candidates before verification.

Measured defaults (../shared/data, inliers per pair; "copies": the 83 non-GCompris real copy
pairs; "other photo": the 11 hard negatives that are another photograph of the same landmark;
"same scene": the 7 stereo / video-frame / Oxford / aerial negatives; "random": 60 random pairs
of photos/; GCompris: the 106 detail crops; times on the shared, loaded 2-core machine):

    setting            ms/img kp/img | copies min/med | negatives >= 12 | random max | GCompris
    300 px, 600 kp         25    377 |   17 / 143     |    6 of 18      |     4      |   14%
    no upscaling           21    309 |   17 / 139     |    6 of 18      |     0      |   13%
    upscale up to 4x       49    394 |   17 / 143     |    6 of 18      |     4      |   17%
    400 px, 1000 kp        70    570 |   20 / 174     |    8 of 18      |     4      |   43%

(GCompris: the share of crops with >= 12 inliers.) At the default, the 6 negatives that verify
are all same-scene pairs and the 11 other photographs get at most 7 inliers. Ratio 0.75 or 0.85
instead of 0.8 moves every figure by at most a pair; a partial affine instead of the MAGSAC
homography verifies 98% of the copies at >= 15 inliers (MAGSAC: 100%); a mutual nearest-neighbour
check on top of the one-match-per-reference-keypoint rule changed no pair's side of the
threshold. So:
`min_inliers` = 12, above the most an unrelated pair (4) or another photograph of the landmark
(7) gets and below the fewest a real copy gets (17). Same-scene pairs verify whatever the
setting: one geometric transform relates two views of a planar scene or consecutive frames, as
it relates a copy; telling them apart is a policy, not a keypoint, question. 300 px / 600
keypoints is the ISC2021 setting and the cheapest that verifies every real copy; 400 px / 1000
keypoints triples the GCompris detail crops found (74-px fragments of ~680-px originals, which
the 300-px working size shrinks to 0.44x) for 2.8x the extraction time and 1.5x the bytes: an
option for crop-heavy collections (`LocalConfig(short_side=400, max_side=800,
max_keypoints=1000)`), not the default. Mirrored copies get 0-4 inliers without flip handling
(the ThreatExchange and imagededup flips) and 400+ with the permuted descriptors; matching a
mirrored photo this way gives 230 inliers where the photo against itself gives 237, so the
permutation recovers what re-extracting on the mirrored image would, at no extraction cost (the
other candidate layout, reflecting the grid's columns, gives 0).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import cv2
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rdcd import io as rio
from rdcd.decode import DecodeConfig, decode_image

log = logging.getLogger(__name__)

# RootSIFT components are square roots of L1-normalised SIFT bins. OpenCV clamps each SIFT bin at
# 0.2 of the L2 norm and renormalises, so a component reaches 0.5 only for a descriptor with four
# non-zero bins; the largest seen on the shared photos is 0.31. 512 keeps every real component in
# the uint8 range at a quantisation step of 0.002, far below the distances the ratio test judges.
QUANT_SCALE = 512.0
# Images whose short side is below this many pixels get no keypoints: at 16 px there is no
# structure SIFT could describe, and an upscaled thumbnail only yields blur blobs.
MIN_SIDE = 16
GEOMETRIES = ("magsac", "affine")
FORMAT = "rdcd-local-v2"  # v1: typed nested lists (still read)
META_CONFIG = "rdcd.local_config"
INDEX_FILE, INDEX_META = "local.faiss", "local.json"


# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalConfig:
    """Extraction and verification settings. The extraction fields (`short_side`, `max_side`,
    `max_upscale`, `max_keypoints`) must be the same for references and queries, so they travel
    with the stored features; the verification fields may differ per query."""

    short_side: int = 300  # working size: the short side is resized to this
    max_side: int = 600  # ... unless that makes the long side larger than this
    max_upscale: float = 2.0  # small images are enlarged at most this much
    max_keypoints: int = 600  # strongest by response
    ratio: float = 0.8  # Lowe ratio test
    min_inliers: int = 12  # from this count a pair counts as verified (measured: module doc)
    geometry: str = "magsac"  # "magsac" (homography) or "affine" (partial affine)
    reproj_px: float = 6.0  # inlier distance in working pixels
    flips: bool = True  # also match the mirrored query
    rotations: bool = True  # accept models rotated by more than 45 degrees (90/180/270)
    max_iters: int = 2000  # robust-fit iterations

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.short_side < MIN_SIDE or self.max_side < self.short_side:
            raise ValueError(
                f"need {MIN_SIDE} <= short_side <= max_side, got {self.short_side}/{self.max_side}"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.max_keypoints < 1 or self.min_inliers < 1:
            raise ValueError("max_keypoints and min_inliers must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LocalConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def extraction(self) -> dict[str, Any]:
        """The fields that make two feature sets comparable."""
        keys = ("short_side", "max_side", "max_upscale", "max_keypoints")
        return {k: getattr(self, k) for k in keys}


def working_scale(width: int, height: int, cfg: LocalConfig = LocalConfig()) -> float:
    """Factor from original pixels to the working size of an image of `width` x `height`."""
    short, long = min(width, height), max(width, height)
    if short <= 0:
        return 1.0
    return min(cfg.short_side / short, cfg.max_side / long, cfg.max_upscale)


# ---- features --------------------------------------------------------------------------------


@dataclass
class LocalFeatures:
    """Keypoints and RootSIFT descriptors of one image, strongest first."""

    keypoints: np.ndarray  # float32 [N, 4]: x, y, scale, angle (deg), original image pixels
    descriptors: np.ndarray  # uint8 [N, 128], RootSIFT quantised by QUANT_SCALE
    width: int  # original (EXIF-transposed) image size
    height: int

    def __post_init__(self) -> None:
        self.keypoints = np.ascontiguousarray(self.keypoints, np.float32).reshape(-1, 4)
        self.descriptors = np.ascontiguousarray(self.descriptors, np.uint8).reshape(-1, 128)
        if len(self.keypoints) != len(self.descriptors):
            raise ValueError(
                f"{len(self.keypoints)} keypoints but {len(self.descriptors)} descriptors"
            )
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, width: int, height: int) -> LocalFeatures:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 128), np.uint8), width, height)

    def nbytes(self) -> int:
        """Bytes of the stored (float16 keypoints + uint8 descriptors) form."""
        return len(self) * (4 * 2 + 128)


_SIFT = threading.local()


def _sift(n: int):
    """One SIFT detector per thread and keypoint cap: cv2 objects are not picklable (so not
    module state a Ray worker could receive), and OpenCV does not promise that one detector may
    run in several threads at once (Serve extracts in a thread pool)."""
    cache = _SIFT.__dict__.setdefault("by_cap", {})
    if n not in cache:
        cache[n] = cv2.SIFT_create(nfeatures=n)
    return cache[n]


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """OpenCV SIFT float descriptors -> RootSIFT quantised to uint8."""
    d = np.asarray(descriptors, np.float32)
    d = d / np.maximum(d.sum(axis=1, keepdims=True), 1e-7)
    return np.clip(np.rint(np.sqrt(d) * QUANT_SCALE), 0, 255).astype(np.uint8)


def _grey(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            from rdcd.decode import to_rgb

            image = to_rgb(image)
        return np.asarray(image.convert("L"), np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got {arr.dtype}")
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2GRAY)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return arr[..., 0]
    raise ValueError(f"expected an HxW or HxWx3 image array, got shape {arr.shape}")


def extract(
    image: Image.Image | np.ndarray,
    cfg: LocalConfig = LocalConfig(),
    original_size: tuple[int, int] | None = None,
) -> LocalFeatures:
    """RootSIFT features of `image` (PIL or uint8 HxW[x3] RGB array).

    `original_size` (width, height): the size the keypoints are reported in, when `image` is a
    reduced decode of a larger original (JPEG draft); by default the image's own size. A blank,
    one-colour or tiny image yields zero keypoints, never an error."""
    grey = _grey(image)
    h, w = grey.shape
    ow, oh = original_size if original_size is not None else (w, h)
    if min(w, h) < MIN_SIDE or min(ow, oh) < MIN_SIDE:
        return LocalFeatures.empty(ow, oh)
    # the working size is a function of the original size only, so it is the same whatever
    # reduced decode the pixels came from
    s_orig = working_scale(ow, oh, cfg)
    tw, th = max(1, round(ow * s_orig)), max(1, round(oh * s_orig))
    if (tw, th) != (w, h):
        interp = cv2.INTER_AREA if tw < w else cv2.INTER_LINEAR
        grey = cv2.resize(grey, (tw, th), interpolation=interp)
    kps, desc = _sift(cfg.max_keypoints).detectAndCompute(grey, None)
    if desc is None or not kps:
        return LocalFeatures.empty(ow, oh)
    resp = np.array([k.response for k in kps], np.float32)
    order = np.argsort(-resp, kind="stable")[: cfg.max_keypoints]
    pts = np.array([(k.pt[0], k.pt[1], k.size, k.angle) for k in kps], np.float32)[order]
    # back to original pixels (angle unchanged; a uniform scale preserves it)
    sx, sy = ow / tw, oh / th
    pts[:, 0] = (pts[:, 0] + 0.5) * sx - 0.5
    pts[:, 1] = (pts[:, 1] + 0.5) * sy - 0.5
    pts[:, 2] *= (sx + sy) / 2
    return LocalFeatures(pts, rootsift(desc[order]), ow, oh)


def _original_size(data: bytes) -> tuple[int, int] | None:
    """The EXIF-transposed size of an encoded image, from its header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - decode_image has already accepted the bytes
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def extract_bytes(
    data: bytes, cfg: LocalConfig = LocalConfig(), decode: DecodeConfig = DecodeConfig()
) -> LocalFeatures:
    """Decode with `rdcd.decode` (a `DecodeError` with its reason on bad input), then `extract`.
    A large JPEG is decoded at a reduced DCT scale that still covers the working size."""
    img = decode_image(data, size=cfg.short_side, config=decode)
    size = _original_size(data) or img.size
    if size[0] < img.size[0] or size[1] < img.size[1]:  # orientation disagreement: trust pixels
        size = img.size
    return extract(img, cfg, original_size=size)


def extract_uri(uri: str, cfg: LocalConfig = LocalConfig()) -> LocalFeatures:
    """`extract_bytes` of the file at `uri` (local path or s3://), read through `rdcd.io`."""
    return extract_bytes(rio.read_bytes(uri), cfg)


# ---- table form ------------------------------------------------------------------------------

# One row per image; keypoints and descriptors as one binary value each: keypoints N x 4
# little-endian float16 (x, y, scale, angle: half precision is 0.25 px at 700 px, 0.5 px up to
# 2048), descriptors N x 128 uint8, row-major, N = the row's keypoint count. Measured on 60
# photos (27k keypoints, 3.27 MB raw): as binary, 2.48 MB of zstd Parquet read and decoded in
# 19 ms; as Arrow's typed list<fixed_size_list<uint8>[128]>, 3.66 MB (12.7 MB uncompressed:
# Parquet has no 8-bit type, so each byte is an INT32 value with its repetition levels) read in
# 260 ms. The typed form (`rdcd-local-v1` as first committed) is still read by `from_table`.
LOCAL_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("keypoints", pa.large_binary(), nullable=False),  # float16 [N, 4]
        pa.field("descriptors", pa.large_binary(), nullable=False),  # uint8 [N, 128]
    ]
)


def to_table(
    ids: Sequence[int], feats: Sequence[LocalFeatures], cfg: LocalConfig | None = None
) -> pa.Table:
    """Rows of `LOCAL_SCHEMA`, sorted by id. With `cfg`, its extraction settings go into the
    schema metadata, so a reader can refuse features extracted differently."""
    if len(ids) != len(feats):
        raise ValueError(f"{len(ids)} ids for {len(feats)} feature sets")
    ids_arr = np.asarray(ids, np.int64).reshape(-1)
    if len(np.unique(ids_arr)) != len(ids_arr):
        raise ValueError("duplicate ids in a local-feature table")
    order = np.argsort(ids_arr, kind="stable")
    feats = [feats[i] for i in order]
    table = pa.Table.from_arrays(
        [
            pa.array(ids_arr[order], pa.int64()),
            pa.array([f.width for f in feats], pa.int32()),
            pa.array([f.height for f in feats], pa.int32()),
            pa.array([f.keypoints.astype("<f2").tobytes() for f in feats], pa.large_binary()),
            pa.array([f.descriptors.tobytes() for f in feats], pa.large_binary()),
        ],
        schema=LOCAL_SCHEMA,
    )
    meta = {"rdcd.format": FORMAT}
    if cfg is not None:
        meta[META_CONFIG] = json.dumps(cfg.extraction(), sort_keys=True)
    return table.replace_schema_metadata(meta)


def from_table(table: pa.Table) -> dict[int, LocalFeatures]:
    """`to_table`'s inverse: id -> features (keypoints back to float32). A row whose byte
    lengths do not fit its keypoint count is a damaged file: ValueError naming the id."""
    missing = {"id", "width", "height", "keypoints", "descriptors"} - set(table.column_names)
    if missing:
        raise ValueError(f"not a local-feature table: missing columns {sorted(missing)}")
    if pa.types.is_list(table.schema.field("descriptors").type):
        return _from_typed_table(table)
    ids = table.column("id").to_pylist()
    widths = table.column("width").to_pylist()
    heights = table.column("height").to_pylist()
    kps = table.column("keypoints").to_pylist()
    des = table.column("descriptors").to_pylist()
    out: dict[int, LocalFeatures] = {}
    for rid, w, h, kb, db in zip(ids, widths, heights, kps, des, strict=True):
        n = len(db) // 128
        if len(db) != 128 * n or len(kb) != 8 * n:
            raise ValueError(
                f"local features of id {rid}: {len(kb)} keypoint bytes and {len(db)} descriptor "
                "bytes do not describe a whole number of keypoints (damaged file)"
            )
        kp = np.frombuffer(kb, "<f2").reshape(n, 4).astype(np.float32)
        out[int(rid)] = LocalFeatures(kp, np.frombuffer(db, np.uint8).reshape(n, 128), w, h)
    return out


def _from_typed_table(table: pa.Table) -> dict[int, LocalFeatures]:
    """The first form: list<fixed_size_list<float16>[4]> / list<fixed_size_list<uint8>[128]>."""
    table = table.combine_chunks()
    out: dict[int, LocalFeatures] = {}
    if table.num_rows == 0:
        return out
    ids = table.column("id").to_numpy()
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()
    kcol, dcol = table.column("keypoints").chunk(0), table.column("descriptors").chunk(0)
    koff, doff = kcol.offsets.to_numpy(), dcol.offsets.to_numpy()
    kflat = kcol.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    dflat = dcol.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.uint8)
    kbase, dbase = koff[0], doff[0]
    for i, rid in enumerate(ids.tolist()):
        k0, k1 = koff[i] - kbase, koff[i + 1] - kbase
        d0, d1 = doff[i] - dbase, doff[i + 1] - dbase
        out[int(rid)] = LocalFeatures(
            kflat[k0 * 4 : k1 * 4].reshape(-1, 4),
            dflat[d0 * 128 : d1 * 128].reshape(-1, 128),
            int(widths[i]),
            int(heights[i]),
        )
    return out


def table_config(table: pa.Table | pa.Schema) -> dict[str, Any] | None:
    """The extraction settings a table was written with, or None when it does not say."""
    schema = table.schema if isinstance(table, pa.Table) else table
    raw = (schema.metadata or {}).get(META_CONFIG.encode())
    return json.loads(raw) if raw else None


def parquet_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of a local-feature table: one row group, zstd level 1 (RootSIFT bytes
    compress by ~25%: many bins are zero)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=1, use_dictionary=False,
                   row_group_size=max(1, table.num_rows))  # fmt: skip
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


# ---- verification ----------------------------------------------------------------------------


def _mirror_permutation() -> np.ndarray:
    """Index map that turns the descriptor of a patch into that of its mirror image.

    OpenCV lays a SIFT descriptor out as 4 x 4 spatial cells (row = y, col = x in the keypoint's
    rotated frame) x 8 orientation bins, index (row * 4 + col) * 8 + bin, bin b centred on
    b * 45 degrees from the keypoint's orientation. Mirroring the image about a vertical axis maps
    a keypoint's orientation theta to 180 - theta; in the keypoint frame that is a reflection of
    the frame's y axis: row -> 3 - row and a gradient angle phi -> -phi, bin b -> (8 - b) % 8.
    (Measured on the shared photos: descriptors of a mirrored image permuted so match the
    original's at the mirrored keypoints; the column reflection does not.)"""
    perm = np.empty(128, np.int64)
    for r in range(4):
        for c in range(4):
            for b in range(8):
                perm[(r * 4 + c) * 8 + b] = ((3 - r) * 4 + c) * 8 + (8 - b) % 8
    return perm


MIRROR = _mirror_permutation()


def mirror_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """Descriptors of the horizontally mirrored image at the mirrored keypoints."""
    return np.ascontiguousarray(np.asarray(descriptors)[:, MIRROR])


def mirror(feats: LocalFeatures) -> LocalFeatures:
    """The features the mirrored image would have (x -> width - 1 - x, angle -> 180 - angle)."""
    kp = feats.keypoints.copy()
    kp[:, 0] = feats.width - 1 - kp[:, 0]
    kp[:, 3] = np.mod(180.0 - kp[:, 3], 360.0)
    return LocalFeatures(kp, mirror_descriptors(feats.descriptors), feats.width, feats.height)


@dataclass
class Verification:
    """The outcome of matching one query against one reference."""

    inliers: int  # 0 when unverifiable
    matches: int  # ratio-test matches before geometry
    transform: str  # query variant and rotation: "none", "flip", "rot90", "flip+rot180", ...
    query_region: tuple[float, float, float, float] | None  # x0, y0, x1, y1, query pixels
    reference_region: tuple[float, float, float, float] | None  # same, reference pixels
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # qx qy rx ry

    @classmethod
    def none(cls, matches: int = 0) -> Verification:
        return cls(0, matches, "none", None, None, np.zeros((0, 4), np.float32))

    def verified(self, cfg: LocalConfig = LocalConfig()) -> bool:
        return self.inliers >= cfg.min_inliers

    def to_dict(self) -> dict[str, Any]:
        def box(b):
            return None if b is None else [round(float(v), 1) for v in b]

        return {
            "inliers": int(self.inliers),
            "matches": int(self.matches),
            "transform": self.transform,
            "region": {"query": box(self.query_region), "reference": box(self.reference_region)},
        }


def ratio_matches(q: np.ndarray, r: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(query index, reference index) of the matches passing Lowe's ratio test, at most one per
    reference keypoint (the closest), so a repeated pattern cannot vote many times."""
    if len(q) < 1 or len(r) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    qf, rf = q.astype(np.float32), r.astype(np.float32)
    d2 = (qf * qf).sum(1)[:, None] + (rf * rf).sum(1)[None, :] - 2.0 * (qf @ rf.T)
    np.maximum(d2, 0.0, out=d2)
    two = np.argpartition(d2, 1, axis=1)[:, :2]
    dd = np.take_along_axis(d2, two, 1)
    swap = dd[:, 1] < dd[:, 0]
    best = np.where(swap, two[:, 1], two[:, 0])
    d1 = np.where(swap, dd[:, 1], dd[:, 0])
    d2nd = np.where(swap, dd[:, 0], dd[:, 1])
    ok = d1 < (ratio * ratio) * d2nd
    qi = np.nonzero(ok)[0]
    ri = best[qi]
    # one per reference keypoint: the closest query keypoint
    order = np.lexsort((d1[qi], ri))
    qi, ri = qi[order], ri[order]
    first = np.ones(len(ri), bool)
    first[1:] = ri[1:] != ri[:-1]
    return qi[first], ri[first]


def _rotation_deg(model: np.ndarray) -> float:
    """The in-plane rotation of a 2x3 or 3x3 model's linear part, in degrees [0, 360)."""
    a = model[:2, :2]
    return float(np.degrees(np.arctan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1])) % 360.0)


def _plausible(model: np.ndarray, geometry: str) -> bool:
    """Reject degenerate fits: mirrored or collapsed linear parts, scale changes beyond 30x, and
    homographies with strong perspective (a copy is a similarity or a mild perspective)."""
    if model is None or not np.all(np.isfinite(model)):
        return False
    det = float(np.linalg.det(model[:2, :2]))
    if det <= 0 or not (1 / 900 < det < 900):
        return False
    if geometry == "magsac" and model.shape == (3, 3):
        if abs(model[2, 0]) > 2e-3 or abs(model[2, 1]) > 2e-3:
            return False
    return True


def _fit(
    src: np.ndarray, dst: np.ndarray, cfg: LocalConfig
) -> tuple[np.ndarray | None, np.ndarray]:
    n = len(src)
    none = np.zeros(n, bool)
    if cfg.geometry == "magsac":
        if n < 4:
            return None, none
        model, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, cfg.reproj_px,
                                         maxIters=cfg.max_iters, confidence=0.999)  # fmt: skip
    else:
        if n < 3:
            return None, none
        model, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=cfg.reproj_px,
            maxIters=cfg.max_iters, confidence=0.999,
        )  # fmt: skip
    if model is None or mask is None or not _plausible(model, cfg.geometry):
        return None, none
    return model, mask.reshape(-1).astype(bool)


def _box(pts: np.ndarray) -> tuple[float, float, float, float]:
    return (float(pts[:, 0].min()), float(pts[:, 1].min()),
            float(pts[:, 0].max()), float(pts[:, 1].max()))  # fmt: skip


def _rot_label(deg: float) -> str:
    k = int(round(deg / 90.0)) % 4
    return ("", "rot90", "rot180", "rot270")[k]


def _verify_variant(
    qkp: np.ndarray, qdesc: np.ndarray, qscale: float, reference: LocalFeatures,
    rscale: float, cfg: LocalConfig,
) -> tuple[int, int, np.ndarray, np.ndarray, float]:  # fmt: skip
    """(inliers, matches, query idx of inliers, ref idx of inliers, rotation deg) of one variant."""
    qi, ri = ratio_matches(qdesc, reference.descriptors, cfg.ratio)
    empty = np.zeros(0, np.int64)
    if len(qi) < 4:
        return 0, len(qi), empty, empty, 0.0
    src = (qkp[qi, :2] * qscale).astype(np.float32)
    dst = (reference.keypoints[ri, :2] * rscale).astype(np.float32)
    model, mask = _fit(src, dst, cfg)
    if model is None:
        return 0, len(qi), empty, empty, 0.0
    deg = _rotation_deg(model)
    if not cfg.rotations and min(deg, 360.0 - deg) > 45.0:
        return 0, len(qi), empty, empty, deg
    # distinct inlier positions: SIFT repeats a keypoint per dominant orientation
    qin, rin = qi[mask], ri[mask]
    _, keep = np.unique(np.round(dst[mask] / 2.0), axis=0, return_index=True)
    keep = np.sort(keep)
    return len(keep), len(qi), qin[keep], rin[keep], deg


def verify(
    query: LocalFeatures, reference: LocalFeatures, cfg: LocalConfig = LocalConfig()
) -> Verification:
    """Ratio-test matches, then a geometric model; the best of the plain and (with `flips`) the
    mirrored query. Zero keypoints on either side give a zero-inlier result, never an error."""
    if len(query) < 4 or len(reference) < 4:
        return Verification.none()
    qscale = working_scale(query.width, query.height, cfg)
    rscale = working_scale(reference.width, reference.height, cfg)
    variants: list[tuple[str, np.ndarray, np.ndarray]] = [("", query.keypoints, query.descriptors)]
    if cfg.flips:
        m = mirror(query)
        variants.append(("flip", m.keypoints, m.descriptors))
    best = None
    total_matches = 0
    for name, kp, desc in variants:
        res = _verify_variant(kp, desc, qscale, reference, rscale, cfg)
        total_matches = max(total_matches, res[1])
        if best is None or res[0] > best[1][0]:
            best = (name, res)
    assert best is not None
    name, (inl, nmatch, qin, rin, deg) = best
    if inl == 0:
        return Verification.none(total_matches)
    label = "+".join(p for p in (name, _rot_label(deg)) if p) or "none"
    qpts = query.keypoints[qin, :2]  # original query pixels: mirroring only changed the copy
    rpts = reference.keypoints[rin, :2]
    pairs = np.concatenate([qpts, rpts], axis=1).astype(np.float32)
    return Verification(int(inl), int(nmatch), label, _box(qpts), _box(rpts), pairs)


# ---- fused score -----------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -50, 50)))


@dataclass(frozen=True)
class FusedScore:
    """p(copy) = sigmoid(w_global * global_score + w_inliers * log(1 + inliers) + bias).

    One "higher = more similar" scale in (0, 1), so µAP and a single threshold still apply to
    predictions that mix verified and unverified pairs. Monotone in both inputs when the weights
    are positive (`fit` keeps them so)."""

    w_global: float
    w_inliers: float
    bias: float
    threshold: float = 0.5
    DEFAULT: ClassVar[FusedScore]

    def logit(self, global_score: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        g = np.asarray(global_score, np.float64)
        n = np.maximum(np.asarray(inliers, np.float64), 0.0)
        return self.w_global * g + self.w_inliers * np.log1p(n) + self.bias

    def __call__(self, global_score: np.ndarray, inliers: np.ndarray) -> np.ndarray:
        return _sigmoid(self.logit(global_score, inliers))

    def to_dict(self) -> dict[str, float]:
        return {"w_global": self.w_global, "w_inliers": self.w_inliers, "bias": self.bias,
                "threshold": self.threshold}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FusedScore:
        return cls(float(d["w_global"]), float(d["w_inliers"]), float(d["bias"]),
                   float(d.get("threshold", 0.5)))  # fmt: skip

    @classmethod
    def fit(
        cls,
        global_scores: np.ndarray,
        inliers: np.ndarray,
        labels: np.ndarray,
        l2: float = 1e-2,
        iters: int = 100,
    ) -> FusedScore:
        """Logistic regression by Newton's method (IRLS) with a small L2 penalty on the weights
        (not the bias), so separable labelled sets still give finite weights. Negative weights
        (a tiny or odd labelled set) are clipped to zero and the fit repeated, so the score stays
        monotone: more inliers or a higher global score never lower it."""
        g = np.asarray(global_scores, np.float64).reshape(-1)
        n = np.log1p(np.maximum(np.asarray(inliers, np.float64).reshape(-1), 0.0))
        y = np.asarray(labels, np.float64).reshape(-1)
        if not (len(g) == len(n) == len(y)) or len(y) == 0:
            raise ValueError("fit needs equally long, non-empty global_scores, inliers, labels")
        if y.min() == y.max():
            raise ValueError("fit needs both copies (label 1) and non-copies (label 0)")
        free = [True, True]
        w = np.zeros(3)
        for _ in range(3):
            cols = [c for c, f in zip((g, n), free, strict=True) if f]
            x = np.column_stack([*cols, np.ones_like(g)])
            beta = np.zeros(x.shape[1])
            pen = np.full(x.shape[1], l2)
            pen[-1] = 0.0
            for _ in range(iters):
                p = _sigmoid(x @ beta)
                grad = x.T @ (p - y) + pen * beta
                hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(pen) + 1e-9 * np.eye(len(beta))
                step = np.linalg.solve(hess, grad)
                beta -= step
                if np.abs(step).max() < 1e-8:
                    break
            w = np.zeros(3)
            w[[i for i, f in enumerate(free) if f] + [2]] = beta
            neg = [i for i in (0, 1) if free[i] and w[i] < 0]
            if not neg:
                break
            for i in neg:
                free[i] = False
        return cls(float(w[0]), float(w[1]), float(w[2]))


# The default when no fit is stored, set by two anchors rather than fitted, so that it means the
# same for any model: a pair at the SSCD operating point (raw cosine 0.75) with no inliers sits at
# 0.5, and 15 inliers (just verified) lift a cosine of 0.0 to 0.5; a doubling of the inliers is
# worth 0.19 of cosine. Against fits (benchmarks/local.py, 1,500 candidate pairs of 150 seeded
# hard copies of the pool hold-out background: teacher w_global 1.00, w_inliers 0.83, bias -3.76;
# default student 2.97 / 0.80 / -4.90) it ranks as well: µAP with verification and local recall
# 0.924 (fit 0.924) for the teacher and 0.866 (fit 0.865) for the student on the hard set. The
# fits put p = 0.5 higher (the teacher's needs ~40 inliers at cosine 0.75), since most candidates
# of a search are not copies; an index stores its own fit (`rdcd index`).
FusedScore.DEFAULT = FusedScore(w_global=8.0, w_inliers=2.2, bias=-6.0)


# ---- local recall ----------------------------------------------------------------------------


def _auto_factory(n: int, gpu: bool = False) -> str:
    """IVF with 4-bit fast-scan PQ sized for `n` descriptors: ~4 sqrt(n) lists (at least 39
    training points each) and PQ64x4fs, 32 code bytes per descriptor (64 sub-quantisers of 2
    dims, 16 centroids each). 8-bit PQ (PQ32) costs as many bytes but trains 40x slower
    (16 vs 256 centroids per sub-quantiser: 100 s vs 2.4 s for 50k descriptors on this machine)
    and searches slower on CPU; on a GPU (no fast-scan kernels there, fast k-means) PQ32. Exact
    search below 10k descriptors, where a flat index is small."""
    if n < 10_000:
        return "IDMap,Flat"
    nlist = int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))
    nlist = max(16, min(nlist, n // 39))
    return f"IVF{nlist},PQ32" if gpu else f"IVF{nlist},PQ64x4fs"


class LocalIndex:
    """FAISS over the descriptors of every reference, labelled by reference id (the labels are
    the descriptor -> reference map), for local recall by nearest-neighbour votes.

    Memory: an IVF-PQ64x4fs entry costs 32 code bytes + 8 id bytes, so at `per_reference` = 256
    descriptors a reference costs ~10 KB (10 GB per million references, plus the coarse
    quantiser: 65,536 x 512 B = 32 MB at that size); measured 11.5-13.2 KiB per reference on 279
    and 410 references (benchmarks/local.py; the quantiser's share is larger at that scale).
    Exact `IDMap,Flat` costs 128 x 4 + 8 = 520 bytes per descriptor (133 KB per reference): for
    a GPU (`faiss-gpu`, exact as in ISC2021) up to a few hundred thousand references. The stored
    Parquet features, which verification reads, are ~102 B per keypoint (measured over 1,663
    images; ~50 KiB per reference at ~500 keypoints, 50 GB per million references, on object
    storage, read by id).

    Cost per query: its keypoints (x2 with flips, up to 1,200) each search `k` neighbours,
    probing `nprobe` of the lists: 18-24 ms per query measured on 72k-105k descriptors (one
    thread); at a million references (256M descriptors, 65,536 lists) a query scans ~1,200 x 16
    lists x ~3,900 codes = 75M fast-scan codes, an estimated 0.1-0.2 s of one core."""

    def __init__(self, index: faiss.Index, info: dict[str, Any], gpu: faiss.Index | None = None):
        self.index = index  # the CPU index (what `save` writes)
        self.info = info
        self._gpu = gpu  # its GPU copy that searches, when there is one

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def references(self) -> int:
        return int(self.info.get("references", 0))

    @classmethod
    def build(
        cls,
        feats: Iterable[tuple[int, LocalFeatures]],
        factory: str = "auto",
        per_reference: int = 256,
        use_gpu: bool | None = None,
        nprobe: int = 16,
        seed: int = 0,
    ) -> LocalIndex:
        """Index the `per_reference` strongest descriptors of each reference. `factory`: a FAISS
        factory string, or "auto" (IVF-PQ64x4fs, flat below 10k descriptors). GPU (faiss-gpu) when
        one is present and `use_gpu` is not False; `use_gpu=True` without one is an error."""
        t0 = time.perf_counter()
        ids_l, desc_l = [], []
        refs = 0
        for rid, f in feats:
            d = f.descriptors[:per_reference]
            refs += 1
            if len(d):
                desc_l.append(d)
                ids_l.append(np.full(len(d), int(rid), np.int64))
        x = np.concatenate(desc_l).astype(np.float32) if desc_l else np.zeros((0, 128), np.float32)
        labels = np.concatenate(ids_l) if ids_l else np.zeros(0, np.int64)
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu and gpus == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (install faiss-gpu)")
        on_gpu = bool(gpus > 0 and use_gpu is not False)
        spec = _auto_factory(len(x), on_gpu) if factory == "auto" else factory
        index = faiss.index_factory(128, spec, faiss.METRIC_L2)
        work = index
        if on_gpu:
            try:
                work = faiss.index_cpu_to_all_gpus(index)
            except RuntimeError as exc:  # a factory without GPU kernels: build on the CPU
                if use_gpu:
                    raise
                log.warning("local index %s stays on the CPU: %s", spec, exc)
                on_gpu = False
        if not work.is_trained:
            if len(x) == 0:
                raise ValueError("cannot train a local index without descriptors")
            rng = np.random.default_rng(seed)
            sample = x[rng.choice(len(x), min(len(x), 256 * 1024), replace=False)]
            work.train(sample)
        if len(x):
            work.add_with_ids(x, labels)
        index = faiss.index_gpu_to_cpu(work) if on_gpu else work
        info = {"format": FORMAT, "factory": spec, "per_reference": per_reference,
                "references": refs, "descriptors": int(len(x)), "nprobe": nprobe,
                "build_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
        return cls(index, info, work if on_gpu else None)

    def _searcher(self) -> faiss.Index:
        gpu = self._gpu
        index = gpu if gpu is not None else self.index
        try:
            faiss.extract_index_ivf(self.index).nprobe = int(self.info.get("nprobe", 16))
            if gpu is not None:
                faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", self.info["nprobe"])
        except RuntimeError:
            pass  # not an IVF index
        return index

    def vote(
        self,
        query: LocalFeatures,
        k: int = 8,
        min_votes: int = 4,
        top: int = 10,
        ratio: float = 0.9,
        flips: bool = True,
    ) -> list[tuple[int, int]]:
        """(reference id, votes) for the references that at least `min_votes` query keypoints
        point at, best first, at most `top`. A keypoint votes for its nearest descriptor's
        reference when the nearest descriptor of any other reference (among its `k` neighbours)
        is farther by the `ratio` test; with `flips` the mirrored query votes too, and each
        reference keeps the larger of its two counts."""
        if len(query) == 0 or self.ntotal == 0:
            return []
        variants = [query.descriptors]
        if flips:
            variants.append(mirror_descriptors(query.descriptors))
        index = self._searcher()
        best: dict[int, int] = {}
        for desc in variants:
            dist, lab = index.search(desc.astype(np.float32), min(k, self.ntotal))
            first = lab[:, 0]
            other = np.where(lab != first[:, None], dist, np.inf)
            other[lab < 0] = np.inf
            d_other = other.min(axis=1)
            ok = (first >= 0) & (dist[:, 0] < (ratio * ratio) * d_other)
            refs, counts = np.unique(first[ok], return_counts=True)
            for r, c in zip(refs.tolist(), counts.tolist(), strict=True):
                best[r] = max(best.get(r, 0), c)
        ranked = sorted(((r, c) for r, c in best.items() if c >= min_votes),
                        key=lambda rc: (-rc[1], rc[0]))  # fmt: skip
        return ranked[:top]

    def save(self, uri: str) -> dict[str, str]:
        """Write `<uri>/local.faiss` (FAISS's own format via `faiss.serialize_index`, never a
        pickle) and `<uri>/local.json`; returns {file name: sha256}."""
        data = faiss.serialize_index(self.index).tobytes()
        sha = hashlib.sha256(data).hexdigest()
        meta = {**self.info, "file": INDEX_FILE, "sha256": sha, "bytes": len(data)}
        meta_bytes = json.dumps(meta, indent=2, sort_keys=True).encode()
        rio.write_bytes(rio.join(uri, INDEX_FILE), data)
        rio.write_bytes(rio.join(uri, INDEX_META), meta_bytes)
        return {INDEX_FILE: sha, INDEX_META: hashlib.sha256(meta_bytes).hexdigest()}

    @classmethod
    def load(cls, uri: str, use_gpu: bool | None = None) -> LocalIndex:
        """Read what `save` wrote, checking the FAISS file against its recorded sha256."""
        meta = json.loads(rio.read_text(rio.join(uri, INDEX_META)))
        data = rio.read_bytes(rio.join(uri, INDEX_FILE))
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise ValueError(f"{rio.join(uri, INDEX_FILE)}: sha256 differs from {INDEX_META}")
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        gpu = None
        if gpus and use_gpu is not False:
            try:
                gpu = faiss.index_cpu_to_all_gpus(index)
            except RuntimeError as exc:  # e.g. fast-scan PQ has no GPU kernels
                if use_gpu:
                    raise
                log.warning("local index %s searches on the CPU: %s", meta.get("factory"), exc)
        return cls(index, meta, gpu)

    def bytes_per_reference(self) -> float:
        """Serialised index bytes per indexed reference (codes, ids, quantiser)."""
        if self.references == 0:
            return 0.0
        return len(faiss.serialize_index(self.index)) / self.references
