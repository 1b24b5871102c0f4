"""`rdcd demo`: the main job end to end, on photos that ship with the install (or your own).

    1 data       a DISC2021-layout set: references, edited copies of them as queries, unrelated
                 edited photos as distractor queries, and a disjoint background set
    2 fine-tune  a short RDCD distillation of the student from the SSCD teacher (the same loop as
                 `rdcd train --local`), on the references and the background, never the queries
    3 choose     the starting student and the fine-tuned one are evaluated on the set (exact
                 search); the better one is served, and the report shows both
    4 embed      Ray Data bulk embedding of the references into Parquet parts, with their
                 local features (the small background set is embedded in this process into a
                 run of the same format)
    5 index      a sharded, versioned FAISS index of the references, with score normalisation,
                 the references' local features, a local-recall index and a fused score
    6 serve      the Ray Serve app on a local port; every query is sent over real HTTP, with
                 local verification (`verify=true`)
    7 evaluate   DISC2021 metrics through the index (`rdcd evaluate --index --verify`), global
                 and verified, checked against the HTTP answers and the exact search
    8 report     `report/report.html` with the precision-recall curve, a gallery of queries and
                 their matches (mistakes first, the inlier matches drawn between the two images)
                 and the training curves

`verify=False` (`rdcd demo --no-verify`) runs the global-only pipeline.

The fine-tune is a demonstration of the training stage, sized for a CPU minute: the default
student's heads were fitted in closed form with a whitening step that makes SGD on them very
sensitive (lr 1e-4 for ten steps ruins it: measured µAP-sn 1.00 -> 0.41 on the bundled set), so
the demo trains only the heads (the trunk is frozen) at lr 1e-6 and lets the evaluation decide
which student is served. Real gains need the GPU recipe (`jobs/configs/paper.yaml`).

Ray: the demo uses the Ray instance this process is connected to, or `RAY_ADDRESS`, or starts a
local one, and shuts down what it started (Serve too). Photos come from scikit-image's and
matplotlib's sample data, or from `images`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import shutil
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from rdcd import io as rio
from rdcd.decode import DecodeError, decode_image
from rdcd.edits import random_copy
from rdcd.evaluate import EvalConfig, evaluate
from rdcd.metrics import read_ground_truth, read_predictions, write_ground_truth
from rdcd.models.embedder import ModelError
from rdcd.models.resolve import DEFAULT_NAME, TEACHER_NAMES, default_student_path

log = logging.getLogger(__name__)

# Photographs (not synthetic patterns) among scikit-image's bundled data files.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
    "microaneurysms.png", "moon.png", "motorcycle_left.png", "page.png", "retina.jpg",
    "rocket.jpg", "text.png",
)  # fmt: skip
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
APP_NAME = "rdcd-demo"
TEACHER_SUFFIXES = (".onnx", ".torchscript.pt", ".torchvision.pt")
_WHICH = {"start": "starting student", "fine-tuned": "fine-tuned student"}
STAGE_DIRS = ("data", "train", "embeddings", "index", "eval", "eval-start", "eval-finetuned",
              "eval-teacher", "report")  # fmt: skip
HEALTH_TIMEOUT_S = 240.0
_QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve: no line per request
HTTP_TIMEOUT_S = 120.0


@dataclass
class DemoConfig:
    """`rdcd demo` options. The defaults run the whole pipeline in a few minutes on two cores;
    `DemoConfig.quick()` is the reduced setting the test suite runs."""

    out: str = "rdcd-demo"
    images: str | None = None  # your own folder of photos instead of the bundled ones
    model: str = "default"  # the student to start from (`sscd`: serve the teacher, no fine-tune)
    teacher: str | None = None
    compare_teacher: bool = True  # evaluate the teacher too, for the model table
    copies_per_reference: int = 2
    reference_share: float = 0.55
    distractor_share: float = 0.2
    max_photos: int | None = 300  # a random sample of a larger folder
    max_side: int = 1024  # photos are shrunk to this first
    seed: int = 0
    # the fine-tune (0 steps: none)
    train_steps: int = 30
    train_batch: int = 8
    train_lr: float = 1e-6
    train_freeze: tuple[str, ...] = ("backbone",)
    # the pipeline
    shards: int = 2
    searchers: int | None = None  # Serve searcher deployments; None: one per shard
    k: int = 10
    threshold: float | None = None  # None: Serve's default for the index
    port: int | None = None  # None: a free port (when the demo starts Serve)
    http_workers: int = 4
    verify: bool = True  # local features, verification and local recall on every query
    fused_fit_sample: int = 32  # synthetic copies the index fits its fused score on
    progress: bool = True

    @classmethod
    def quick(cls, **changes: Any) -> DemoConfig:
        """The reduced setting: 10 photos, 3 fine-tune steps of 4, no teacher comparison, one
        searcher deployment for the two index shards."""
        base = cls(max_photos=10, train_steps=3, train_batch=4, compare_teacher=False,
                   max_side=512, copies_per_reference=2, searchers=1)  # fmt: skip
        return replace(base, **changes)

    def validate(self) -> None:
        if rio.is_s3(self.out):
            raise ValueError("the demo writes a local folder (it serves and draws a report from "
                             f"it): give a local --out, not {self.out}")  # fmt: skip
        if self.train_steps < 0 or self.train_batch < 2:
            raise ValueError("train_steps must be >= 0 and train_batch >= 2")
        if self.shards < 1 or self.k < 1:
            raise ValueError("shards and k must be >= 1")
        if self.max_photos is not None and self.max_photos < 6:
            raise ValueError(f"max_photos must be at least 6, got {self.max_photos}")


def bundled_photos() -> list[str]:
    """Paths of the sample photos that installed packages ship."""
    import matplotlib
    import skimage

    skd = Path(skimage.__file__).parent / "data"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    found = [skd / n for n in SKIMAGE_PHOTOS] + [mpl / n for n in MATPLOTLIB_PHOTOS]
    return [str(p) for p in found if p.exists()]


def _save_jpeg(img: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=92)
    rio.write_bytes(uri, buf.getvalue())


def _decodable(uri: str) -> bool:
    try:
        decode_image(rio.read_bytes(uri))
        return True
    except (DecodeError, rio.StorageError) as exc:
        log.warning("demo: skipping %s: %s", uri, exc)
        return False


def build_demo_set(
    photos: list[str],
    root: str,
    copies: int = 2,
    seed: int = 0,
    reference_share: float = 0.55,
    distractor_share: float = 0.2,
    hard: bool = False,
    max_side: int | None = None,
) -> dict[str, int]:
    """Write a DISC-layout folder under `root` from `photos`; returns its counts.

    Photos are split three ways, disjointly: references (each gets `copies` edited queries),
    distractor sources (edited queries with no reference: any match is a false positive) and
    background (for score normalisation, also with edited variants). `hard` makes queries with
    2-4 edits, tight crops and overlays onto the distractor photos (`rdcd.edits.random_copy`).
    `max_side` shrinks larger photos first (a camera's 24-megapixel files make a slow demo).
    """
    photos = [p for p in photos if _decodable(p)]
    if len(photos) < 6:
        raise ValueError(f"the demo needs at least 6 photos, got {len(photos)}")
    rng = random.Random(seed)
    photos = sorted(photos)
    rng.shuffle(photos)
    n_ref = max(2, int(len(photos) * reference_share))
    n_dis = max(1, int(len(photos) * distractor_share))
    refs, dis, bg = photos[:n_ref], photos[n_ref : n_ref + n_dis], photos[n_ref + n_dis :]
    images = {p: decode_image(rio.read_bytes(p)) for p in photos}
    if max_side:
        for img in images.values():
            img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if not rio.is_s3(root) and os.path.isdir(root):
        shutil.rmtree(root)  # a rebuilt set must not keep files of an earlier, larger one
    canvases = [images[p] for p in dis] if hard else []
    gt: list[tuple[str, str | None]] = []
    sources: list[tuple[str, str, str]] = []
    q = 0

    def add_query(src: str, ref_id: str | None) -> None:
        nonlocal q
        qid = f"Q{q:05d}"
        q += 1
        img, names = random_copy(images[src], rng, hard=hard, canvases=canvases)
        _save_jpeg(img, rio.join(root, "queries", f"{qid}.jpg"))
        gt.append((qid, ref_id))
        sources.append((qid, os.path.basename(src), "+".join(names)))

    for i, src in enumerate(refs):
        rid = f"R{i:06d}"
        _save_jpeg(images[src], rio.join(root, "references", f"{rid}.jpg"))
        sources.append((rid, os.path.basename(src), ""))
        for _ in range(copies):
            add_query(src, rid)
    for src in dis:
        for _ in range(max(1, copies // 2)):
            add_query(src, None)
    t = 0
    for src in bg:
        for variant in range(1 + copies):
            img = images[src] if variant == 0 else random_copy(images[src], rng)[0]
            _save_jpeg(img, rio.join(root, "train", f"T{t:06d}.jpg"))
            sources.append((f"T{t:06d}", os.path.basename(src), ""))
            t += 1
    write_ground_truth(rio.join(root, "ground_truth.csv"), gt)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("id", "source", "edits"), *sources])
    rio.write_text(rio.join(root, "sources.csv"), buf.getvalue())
    return {
        "references": len(refs),
        "queries": q,
        "background": t,
        "copies": sum(1 for _, r in gt if r),
        "distractors": sum(1 for _, r in gt if not r),
    }


# ---- stages ---------------------------------------------------------------------------------


Stage = Callable[[str, str], None]  # (stage name, what happened): the CLI prints it


def _photos(cfg: DemoConfig) -> list[str]:
    if cfg.images:
        photos = [f.uri for f in rio.list_files(cfg.images, rio.IMAGE_SUFFIXES)]
        if not photos:
            raise ValueError(f"no images under {cfg.images} (looked for {rio.IMAGE_SUFFIXES})")
    else:
        photos = bundled_photos()
    photos = sorted(photos)
    if cfg.max_photos and len(photos) > cfg.max_photos:
        photos = sorted(random.Random(cfg.seed).sample(photos, cfg.max_photos))
    return photos


def _clear(out: str) -> None:
    """Remove what an earlier demo left in `out` (only the demo's own folders)."""
    for name in STAGE_DIRS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
    for name in ("demo.json",):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def _images_in(folder: str) -> list[str]:
    return sorted(f.uri for f in rio.list_files(folder, rio.IMAGE_SUFFIXES))


def _start_model(cfg: DemoConfig) -> str:
    if cfg.model == DEFAULT_NAME and default_student_path() is None:
        log.warning("no packaged default student in this install: the demo serves the teacher")
        return "sscd"
    return cfg.model


def _is_teacher(spec: str) -> bool:
    return spec.lower() in TEACHER_NAMES or spec.lower().endswith(TEACHER_SUFFIXES)


def train_sizes(n_images: int, batch: int) -> tuple[int, int, int]:
    """(batch, key queue, teacher memory) for a fine-tune on `n_images`: the queue must be a
    multiple of the batch and at most half the images (`list_training_images` refuses more)."""
    half = n_images // 2
    if half < 2:
        raise ValueError(f"a fine-tune needs at least 4 training images, got {n_images}")
    batch = max(2, min(batch, 2 ** int(math.log2(half))))
    queue = batch * min(max(1, half // batch), max(1, 256 // batch))
    return batch, queue, min(4 * queue, max(1, 1024 // batch) * batch)


def fine_tune(
    cfg: DemoConfig, start: str, data: str, out: str
) -> tuple[dict[str, Any] | None, str]:
    """A short RDCD distillation of the student `start` on the references and the background of
    the demo set. Returns (the run summary, or None when nothing was trained; why/what)."""
    if cfg.train_steps == 0:
        return None, "skipped (0 steps)"
    if _is_teacher(start):
        return None, "skipped: the teacher is served, there is no student to fine-tune"
    from rdcd.distill import DistillConfig, list_training_images, local_batches, train
    from rdcd.models import load_model
    from rdcd.models.checkpoint import parse_checkpoint
    from rdcd.train import finish

    path = default_student_path() if start == DEFAULT_NAME else start
    student, _, _ = parse_checkpoint(rio.read_bytes(path), path)
    sc = student.config
    try:
        teacher = load_model("sscd", teacher=cfg.teacher, teacher_size=224)
    except ModelError as exc:
        log.warning("no teacher, no fine-tune: %s", exc)
        return None, f"skipped: no teacher ({exc})"
    files = _images_in(rio.join(data, "references")) + _images_in(rio.join(data, "train"))
    os.makedirs(out, exist_ok=True)
    listing = os.path.join(out, "images.txt")
    Path(listing).write_text("".join(f"{os.path.abspath(f)}\n" for f in files))
    batch, queue, memory = train_sizes(len(files), cfg.train_batch)
    dcfg = DistillConfig(
        images=listing, out=out, teacher="sscd", teacher_path=cfg.teacher,
        backbone=sc.backbone, init="student:" + os.path.abspath(path), dim=sc.dim,
        hidden_dim=sc.hidden_dim, train_size=224, eval_size=sc.image_size,
        steps=cfg.train_steps, batch_size=batch, lr=cfg.train_lr,
        warmup_steps=max(1, cfg.train_steps // 10), queue_size=queue, memory_size=memory,
        w_hn=0.0, freeze=tuple(cfg.train_freeze), log_every=1,
        checkpoint_every=cfg.train_steps, seed=cfg.seed,
    )  # fmt: skip
    uris = list_training_images(dcfg)
    from tqdm.auto import tqdm

    bar = tqdm(total=dcfg.steps, desc="fine-tune", unit="step", disable=not cfg.progress)
    last: dict[str, bytes] = {}

    def on_log(m: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", agreement=f"{m['agreement']:.2f}",
                        cos=f"{m.get('offdiag_cos', float('nan')):.2f}")  # fmt: skip

    t0 = time.perf_counter()
    try:
        train(dcfg, lambda s: local_batches(dcfg, uris, teacher, s), on_log=on_log,
              on_checkpoint=lambda state, step: last.__setitem__("state", state))  # fmt: skip
    finally:
        bar.close()
    summary = finish(dcfg, last["state"], time.perf_counter() - t0, 0, len(uris))
    what = (f"{dcfg.steps} steps x {batch} images (lr {dcfg.lr:g}, frozen "
            f"{', '.join(dcfg.freeze) or 'nothing'}) on {len(uris)} images")  # fmt: skip
    return summary, what


def embed_background(folder: str, out: str, spec: str, cfg: DemoConfig) -> int:
    """The background set (score normalisation) as an embedding run, embedded in this process:
    a few dozen images do not repay a second Ray Data job's start-up. Same model, decoder and
    files as `rdcd embed` writes. Returns the number of images embedded."""
    from rdcd import store
    from rdcd.embed import embed_files
    from rdcd.models import load_model

    model = load_model(spec, teacher=cfg.teacher)
    done = embed_files(model, _images_in(folder), batch_size=8, progress=False)
    identity = store.RunIdentity(model.fingerprint, model.name, model.dim, model.image_size,
                                 "fp32", 10_000)  # fmt: skip
    store.write_embeddings(out, done.uris, done.embeddings, identity, source=folder)
    return len(done.uris)


def _evaluate(cfg: DemoConfig, data: str, spec: str, out: str, index: str | None = None) -> dict:
    return evaluate(EvalConfig(disc_root=data, model=spec, teacher=cfg.teacher, out=out, k=cfg.k,
                               progress=cfg.progress, index=index,
                               verify=cfg.verify and index is not None))  # fmt: skip


def _key(m: dict) -> tuple[float, float, float]:
    sn = m["uap_sn"] if m.get("uap_sn") is not None else m["uap"]
    return (round(sn, 6), round(m["uap"], 6), round(m["recall_at_1"], 6))


@contextlib.contextmanager
def ray_session() -> Iterator[bool]:
    """The Ray instance this process uses: the one it is connected to, `RAY_ADDRESS`, or a local
    one started here (no dashboard, a small object store) and shut down on exit. Yields whether
    it was started here."""
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(include_dashboard=False, object_store_memory=256 * 1024**2,
                     logging_level=logging.WARNING)  # fmt: skip
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, data: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
    token = os.environ.get("RDCD_SERVE_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": str(exc)}


@contextlib.contextmanager
def serve_app(index: str, model: str, cfg: DemoConfig) -> Iterator[str]:
    """The Serve app over `index` on a local port; yields its base URL. If Serve already runs on
    this cluster the app joins it under /rdcd-demo and only the app is deleted afterwards;
    otherwise Serve is started here and shut down afterwards."""
    from ray import serve

    from rdcd.serve import ServeConfig, build_app

    client = None
    with contextlib.suppress(Exception):  # private API; without it, assume no Serve running
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
    started = client is None
    if started:
        host, port, prefix = "127.0.0.1", cfg.port or _free_port(), "/"
        serve.start(http_options={"host": host, "port": port}, logging_config=_QUIET)
    else:
        http = client.http_config
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
        port, prefix = int(http.port), f"/{APP_NAME}"
    sc = ServeConfig(index=index, model=model, teacher=cfg.teacher, name=APP_NAME, host=host,
                     port=port, route_prefix=prefix, k=max(cfg.k, 1), max_k=max(cfg.k, 100),
                     threshold=cfg.threshold, embedder_cpus=0.5, poll_interval_s=5.0,
                     searchers=cfg.searchers)  # fmt: skip
    try:
        serve.run(build_app(sc), name=APP_NAME, route_prefix=prefix, blocking=False,
                  logging_config=_QUIET)  # fmt: skip
        url = f"http://{host}:{port}{prefix.rstrip('/')}"
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError, ValueError):
                if _http("GET", f"{url}/v1/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Serve app at {url} was not healthy after "
                                   f"{HEALTH_TIMEOUT_S:.0f} s")  # fmt: skip
            time.sleep(0.5)
        yield url
    finally:
        if started:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)


def query_over_http(url: str, files: list[str], k: int, workers: int,
                    progress: bool, verify: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """POST every file to `/v1/match` (raw bytes, `workers` at a time; `verify=true` with
    `verify`); one record per file with the HTTP status, the answer and the round-trip time."""
    from tqdm.auto import tqdm

    params = f"k={k}" + ("&verify=true" if verify else "")

    def ask(path: str) -> dict[str, Any]:
        data = rio.read_bytes(path)
        t0 = time.perf_counter()
        status, body = _http("POST", f"{url}/v1/match?{params}", data)
        ms = 1000 * (time.perf_counter() - t0)
        return {"query_id": rio.stem(path), "uri": path, "status": status, "ms": round(ms, 2),
                "answer": body}  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        bar = tqdm(total=len(files), desc="HTTP queries", unit="query", disable=not progress)
        out = []
        for record in pool.map(ask, files):
            out.append(record)
            bar.update(1)
        bar.close()
    return out


def gallery_items(records: list[dict[str, Any]], data: str, local: Any = None) -> list[Any]:
    """What each HTTP answer means against the ground truth. With `local` (the index's
    `LocalData`), the inlier matches of each verified best match are recomputed for drawing:
    the same features and code as the answer, so the lines are the inliers it counted."""
    from rdcd.report import GalleryItem

    gt = read_ground_truth(rio.join(data, "ground_truth.csv"))
    expected = dict(gt.pairs)
    refs = {rio.stem(u): u for u in _images_in(rio.join(data, "references"))}
    items = []
    for r in records:
        answer, qid = r["answer"], r["query_id"]
        exp = expected.get(qid)
        item = GalleryItem(qid, r["uri"], exp, refs.get(exp) if exp else None)
        if r["status"] != 200:
            item.error = f"HTTP {r['status']}: {answer.get('error', '')}"
        elif answer.get("matches"):
            top = answer["matches"][0]
            item.match_uri = top["uri"]
            item.match_id = rio.stem(top["uri"]) if top["uri"] else str(top["reference_id"])
            item.score, item.raw_score = top["score"], top["raw_score"]
            item.is_copy = bool(answer["is_copy"])
            if "inliers" in top:
                item.inliers = int(top["inliers"])
                region = top.get("region") or {}
                item.query_region, item.reference_region = (
                    region.get("query"),
                    region.get("reference"),
                )
                if local is not None and item.inliers:
                    item.pairs = _inlier_pairs(local, r["uri"], int(top["reference_id"]))
        items.append(item)
    return items


def _inlier_pairs(local: Any, query_uri: str, reference_id: int) -> Any:
    """(qx, qy, rx, ry) of the inliers of a query against one reference, for the gallery."""
    from rdcd.index import stored_form
    from rdcd.local import extract_uri, verify

    ref = local.features_of([reference_id]).get(reference_id)
    if ref is None:
        return None
    try:
        query = stored_form(extract_uri(query_uri, local.config))
    except (DecodeError, rio.StorageError):
        return None
    return verify(query, ref, local.config).pairs


def agreement(records: list[dict[str, Any]], predictions: list, tolerance: float = 1e-4) -> int:
    """Queries whose HTTP answer (references and scores, in order) equals the offline search's
    predictions for them: the served and the offline path are one query path."""
    offline: dict[str, list] = {}
    for p in predictions:
        offline.setdefault(p.query_id, []).append(p)
    same = 0
    for r in records:
        if r["status"] != 200:
            continue
        served = [(rio.stem(m["uri"]), m["score"]) for m in r["answer"]["matches"]]
        mine = sorted(offline.get(r["query_id"], []), key=lambda p: -p.score)
        if len(served) == len(mine) and all(
            a == p.reference_id and abs(s - p.score) <= tolerance
            for (a, s), p in zip(served, mine, strict=True)
        ):
            same += 1
    return same


# ---- the whole run --------------------------------------------------------------------------


@dataclass
class _Clock:
    stages: list[tuple[str, float, str]] = field(default_factory=list)
    on_stage: Stage | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, str]]:
        note = {"what": ""}
        t0 = time.perf_counter()
        yield note
        seconds = time.perf_counter() - t0
        self.stages.append((name, seconds, note["what"]))
        log.info("demo stage %s: %.1f s %s", name, seconds, note["what"])
        if self.on_stage is not None:
            self.on_stage(name, f"{seconds:.1f} s  {note['what']}")


def run_demo(cfg: DemoConfig, on_stage: Stage | None = None) -> dict[str, Any]:
    """Run every stage (module docstring) under `cfg.out`; returns what happened, also written
    to `<out>/demo.json`, with the report at `result["report"]`."""
    cfg.validate()
    t_start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    os.makedirs(out, exist_ok=True)
    _clear(out)
    clock = _Clock(on_stage=on_stage)
    data = os.path.join(out, "data")
    result: dict[str, Any] = {"config": asdict(cfg), "out": out}

    with clock.stage("data") as note:
        photos = _photos(cfg)
        counts = build_demo_set(photos, data, cfg.copies_per_reference, cfg.seed,
                                cfg.reference_share, cfg.distractor_share,
                                max_side=cfg.max_side)  # fmt: skip
        note["what"] = (f"{counts['references']} references, {counts['copies']} edited copies + "
                        f"{counts['distractors']} unrelated photos as queries, "
                        f"{counts['background']} background images")  # fmt: skip
    result["demo_set"] = counts

    start = _start_model(cfg)
    with clock.stage("fine-tune") as note:
        trained, note["what"] = fine_tune(cfg, start, data, os.path.join(out, "train"))
    result["fine_tune"] = None
    if trained is not None:
        keep = ("student", "fingerprint", "steps", "images", "seconds", "history")
        result["fine_tune"] = {k: trained[k] for k in keep}

    with clock.stage("choose") as note:
        evals: dict[str, dict] = {}
        names = {"start": start}
        if trained is not None:
            names["fine-tuned"] = trained["student"]
        for name, spec in names.items():
            folder = "eval-start" if name == "start" else "eval-finetuned"
            evals[name] = _evaluate(cfg, data, spec, os.path.join(out, folder))
        if cfg.compare_teacher and not _is_teacher(start):
            try:
                evals["teacher"] = _evaluate(cfg, data, "sscd", os.path.join(out, "eval-teacher"))
            except ModelError as exc:
                log.warning("no teacher to compare with: %s", exc)
        served = "start"
        if "fine-tuned" in evals and _key(evals["fine-tuned"]) >= _key(evals["start"]):
            served = "fine-tuned"
        served_spec = names[served]
        teacher_served = _is_teacher(served_spec)
        note["what"] = "serving the teacher" if teacher_served else f"serving the {served} student"
        if "fine-tuned" in evals:
            note["what"] += (f" (µAP-sn start {_key(evals['start'])[0]:.4f}, fine-tuned "
                             f"{_key(evals['fine-tuned'])[0]:.4f})")  # fmt: skip
    result["served"] = {"which": served, "spec": served_spec}

    from rdcd.embed import EmbedJobConfig, run_embed_job
    from rdcd.index import IndexConfig, build_index

    emb_refs = os.path.join(out, "embeddings", "references")
    emb_bg = os.path.join(out, "embeddings", "background")
    index_root = os.path.join(out, "index")
    with ray_session() as started_ray:
        result["ray_started_here"] = started_ray
        with clock.stage("embed") as note:
            shard = max(1, math.ceil(counts["references"] / cfg.shards))
            job = EmbedJobConfig(images=os.path.join(data, "references"), out=emb_refs,
                                 model=served_spec, teacher=cfg.teacher, shard_size=shard,
                                 batch_size=8, local_features=cfg.verify,
                                 progress=cfg.progress)  # fmt: skip
            run = run_embed_job(job)
            n_bg = embed_background(os.path.join(data, "train"), emb_bg, served_spec, cfg)
            note["what"] = (f"Ray Data: {run['counts']['embedded']} references in "
                            f"{run['counts']['parts']} Parquet parts; {n_bg} background images "
                            "(in-process, same format)")  # fmt: skip
        with clock.stage("index") as note:
            manifest = build_index(IndexConfig(embeddings=emb_refs, out=index_root,
                                               shards=cfg.shards, background=emb_bg,
                                               task_cpus=0.5,
                                               fused_fit_sample=cfg.fused_fit_sample))  # fmt: skip
            note["what"] = (f"{manifest['factory']} v{manifest['version']}: {manifest['ntotal']} "
                            f"vectors in {len(manifest['shards'])} shards")  # fmt: skip
            if manifest.get("local"):
                loc = manifest["local"]
                note["what"] += (f"; local features of {loc['sizes']['references']} references, "
                                 f"fused score {loc['fused_fit']['how']}")  # fmt: skip
        with clock.stage("serve") as note:
            queries = _images_in(os.path.join(data, "queries"))
            with serve_app(index_root, served_spec, cfg) as url:
                t_ready = time.perf_counter()
                records = query_over_http(url, queries, cfg.k, cfg.http_workers, cfg.progress,
                                          cfg.verify)  # fmt: skip
                t_done = time.perf_counter()
                info = _http("GET", f"{url}/v1/index")[1]
            note["what"] = (f"{len(records)} queries over HTTP to {url}/v1/match in "
                            f"{t_done - t_ready:.1f} s")  # fmt: skip
    ok = [r for r in records if r["status"] == 200]
    latencies = sorted(r["ms"] for r in ok)
    threshold = float(info.get("threshold", cfg.threshold or 0.0))
    if cfg.verify and ok:  # the fused score's threshold, as the answers report it
        threshold = float(ok[0]["answer"]["threshold"])
    result["http"] = {
        "url": url,
        "queries": len(records),
        "answered": len(ok),
        "threshold": threshold,
        "score_normalised": bool(info.get("score_normalised")),
        "index_version": info.get("version"),
        "latency_ms_p50": round(statistics.median(latencies), 1) if latencies else None,
        "latency_ms_max": round(latencies[-1], 1) if latencies else None,
    }
    rio.write_text(os.path.join(out, "served.json"), json.dumps(records, indent=1))

    with clock.stage("evaluate") as note:
        ev = _evaluate(cfg, data, served_spec, os.path.join(out, "eval"), index=index_root)
        preds_file = "predictions_sn.csv" if ev.get("uap_sn") is not None else "predictions.csv"
        if ev.get("verified"):
            preds_file = "predictions_verified.csv"
        predictions = read_predictions(os.path.join(out, "eval", preds_file))
        same = agreement(records, predictions)
        flat = evals[served]
        note["what"] = (f"through the index: µAP {ev['uap']:.4f}, score-normalised "
                        f"{_fmt(ev.get('uap_sn'))}; HTTP equals offline for {same}/{len(ok)} "
                        "queries")  # fmt: skip
        if ev.get("verified"):
            note["what"] += f"; verified µAP {ev['verified']['uap']:.4f}"
    result["evaluation"] = ev
    result["http"]["agree_with_offline"] = same
    result["flat_evaluations"] = {name: _brief(m) for name, m in evals.items()}
    local = None
    if cfg.verify and manifest.get("local"):
        from rdcd.index import load_local

        local = load_local(index_root)
    items = gallery_items(records, data, local)
    outcome: dict[str, int] = {}
    for item in items:
        outcome[item.status] = outcome.get(item.status, 0) + 1
    result["outcome"] = outcome

    with clock.stage("report") as note:
        report = _write_report(cfg, result, items, predictions, data, flat, clock.stages)
        note["what"] = report
    result["report"] = report
    result["stages"] = [{"stage": n, "seconds": round(s, 2), "what": w} for n, s, w in clock.stages]
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    rio.write_text(os.path.join(out, "demo.json"), json.dumps(result, indent=2, default=str))
    return result


def _fmt(v: Any) -> str:
    from rdcd.report import fmt

    return fmt(v)


def _brief(m: dict) -> dict[str, Any]:
    return {
        "model": m["model"].get("name"),
        "fingerprint": m["model"].get("fingerprint"),
        "dim": m["model"].get("dim"),
        **{k: m.get(k) for k in ("uap", "uap_sn", "recall_at_p90", "recall_at_p90_sn",
                                 "recall_at_1")},
    }  # fmt: skip


def headline(result: dict[str, Any]) -> str:
    """One sentence of what the served system found."""
    o, n = result["outcome"], result["demo_set"]
    found, copies = o.get("found", 0), n["copies"]
    fp = o.get("false positive", 0) + o.get("wrong match", 0)
    return (f"Found {found} of {copies} edited copies over HTTP at threshold "
            f"{result['http']['threshold']:.3g}, with {fp} false "
            f"{'positive' if fp == 1 else 'positives'}; {o.get('rejected', 0)} of "
            f"{n['distractors']} unrelated photos correctly not matched.")  # fmt: skip


def report_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the demo prints, in the order it prints them (also the report's table)."""
    ev, http = result["evaluation"], result["http"]
    verified = ev.get("verified") or {}
    return {
        "µAP": ev["uap"],
        "µAP (score-normalised)": ev.get("uap_sn"),
        "recall at precision 0.9": ev.get("recall_at_p90_sn", ev["recall_at_p90"]),
        "recall@1": ev["recall_at_1"],
        **(
            {
                "µAP with verification": verified["uap"],
                "recall at precision 0.9, verified": verified["recall_at_p90"],
                "recall@1, verified": verified["recall_at_1"],
            }
            if verified
            else {}
        ),
        "copies found over HTTP": f"{result['outcome'].get('found', 0)} of "
        f"{result['demo_set']['copies']}",
        "false positives over HTTP": result["outcome"].get("false positive", 0)
        + result["outcome"].get("wrong match", 0),
        "HTTP answers equal to offline search": f"{http['agree_with_offline']} of "
        f"{http['answered']}",
        "HTTP latency, median": f"{http['latency_ms_p50']:.0f} ms",
    }


def _write_report(cfg: DemoConfig, result: dict[str, Any], items: list, predictions: list,
                  data: str, flat: dict, stages: list) -> str:  # fmt: skip
    from rdcd.report import ReportData, write_report

    served = result["served"]["which"]
    models = []
    for name, m in result["flat_evaluations"].items():
        role = {"start": "starting student", "fine-tuned": "fine-tuned here",
                "teacher": "SSCD teacher"}[name]  # fmt: skip
        if name == "start" and _is_teacher(result["served"]["spec"]):
            role = "SSCD teacher"
        models.append({
            "model": f"{role} ({m['model']}, {m['dim']}-d)",
            "served": "yes" if name == served else "",
            "µAP": m["uap"], "µAP-sn": m["uap_sn"],
            "recall@P90": m.get("recall_at_p90_sn", m["recall_at_p90"]),
            "recall@1": m["recall_at_1"], "fingerprint": (m["fingerprint"] or "")[:12],
        })  # fmt: skip
    ev = result["evaluation"]
    if result["fine_tune"] is not None:
        choice = (
            "Model choice: the starting student and the fine-tuned one were both evaluated on "
            "this set with exact search; the better one (µAP-sn, then µAP, then recall@1; a tie "
            f"goes to the fine-tuned one) is served: the {_WHICH[served]}. The choice uses the "
            "very queries it is then measured on, so the served figure is optimistic by that "
            "choice."
        )
        tuned = (
            f"Fine-tune: {_stage_note(stages, 'fine-tune')}. On a CPU budget the demo trains "
            "only the heads at a tiny learning rate: the default student's whitened head makes "
            "larger SGD steps destructive (see README, rdcd demo)."
        )
    else:
        choice = f"No fine-tune ran, so the starting model ({result['served']['spec']}) is served."
        tuned = f"Fine-tune: {_stage_note(stages, 'fine-tune')}."
    notes = [
        choice,
        tuned,
        f"Index and exact search agree: µAP-sn through the index {_fmt(ev.get('uap_sn'))}, "
        f"with exact search {_fmt(flat.get('uap_sn'))}; µAP {_fmt(ev['uap'])} and "
        f"{_fmt(flat['uap'])}.",
    ]
    if ev.get("verified"):
        v = ev["verified"]
        notes.append(
            f"Local verification: every query's top {cfg.k} plus the references its keypoints "
            "vote for (local recall) are matched with RootSIFT (ratio test, then a MAGSAC "
            "homography), and ranked by the index's fused score of the cosine and the inlier "
            f"count: µAP {_fmt(v['uap'])} against {_fmt(ev['uap'])} global-only, "
            f"{v['verify_ms_per_query']} ms per query to verify. The gallery draws the inliers."
        )
    n = result["demo_set"]
    facts = [
        ("photos", cfg.images or "bundled with scikit-image and matplotlib"),
        ("demo set", f"{n['references']} references, {n['queries']} queries "
                     f"({n['copies']} copies, {n['distractors']} unrelated), "
                     f"{n['background']} background"),
        ("served model", f"{result['served']['spec']}"),
        ("endpoint", f"{result['http']['url']}/v1/match (stopped after the run)"),
        ("index", os.path.join(result["out"], "index")),
        ("predictions", os.path.join(result["out"], "eval")),
        ("HTTP answers", os.path.join(result["out"], "served.json")),
    ]  # fmt: skip
    data_report = ReportData(
        title="rdcd demo: image copy detection, end to end",
        headline=headline(result),
        metrics=report_metrics(result),
        predictions=predictions,
        ground_truth=read_ground_truth(os.path.join(data, "ground_truth.csv")),
        threshold=result["http"]["threshold"],
        threshold_label="the fused score's threshold" if cfg.verify else "Serve's threshold",
        gallery=items,
        models=models,
        stages=stages,
        history=(result["fine_tune"] or {}).get("history", []),
        notes=notes,
        facts=facts,
    )
    return write_report(data_report, os.path.join(result["out"], "report"))


def _stage_note(stages: list, name: str) -> str:
    return next((w for n, _, w in stages if n == name), "")
