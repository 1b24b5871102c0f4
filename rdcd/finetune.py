"""Tail distillation over cached views: how the default student is made on a CPU.

`rdcd.distill` is the paper's recipe (Ray Train, every view through the teacher, the whole
student trained); on two CPU cores it manages ~8 images/s, so a session's run sees the training
pool a couple of times. This trainer gets many more distinct images into the same hours:
- the teacher's descriptor of every view and the student's frozen front are computed once
  (`rdcd.viewcache`), so each step only runs the tail (blocks from `from_block`, `conv_head`,
  both heads; batch norm frozen at the start's statistics, which is what a pretrained start wants);
- the loss is direct feature distillation, the most sample-efficient signal a teacher gives:
  `h_S` (512-d) points where the teacher's descriptor of the same view points (`w_feat`), the
  d-dim descriptor points where the teacher's descriptor projected on its own top-d principal axes
  points (`w_desc`), plus the paper's relational term on the descriptor against a memory of other
  views' teacher targets (`w_rel`, T = 0.04), which keeps the ranking among unrelated images,
  and a cross-view contrast (`w_con`): an image's clean view and an augmented view must find each
  other among the batch's other images and that memory. Feature distillation alone plateaus well
  below the teacher on a few thousand images; the contrast asks for what copy detection scores
  (measured: +0.06 held-out µAP over the same 300 steps without it). Its augmented side may be
  an extra view of the `copy` augmentation (`con_views`: pasted onto another photo, turned,
  cropped tight; student fronts only, no teacher): the copies the student missed most
  (measured: +0.10 held-out µAP over 600 steps without them);
- the weights are averaged (EMA), and the average is what gets saved.
The principal axes (PCA of the teacher's normalised descriptors over all cached views) also give
the 64/128-d heads: after training, a head per dimension is fitted in closed form (least squares
from `h_S` to the teacher's projected descriptor), so one run yields every dimension.

Checkpoints (`<out>/state.pt`: weights, EMA, optimizer, step) are written every
`checkpoint_every` steps; a re-run of the same command resumes from the last one. The batch of a
step is a pure function of (seed, step), so a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from rdcd import io as rio
from rdcd import viewcache
from rdcd.losses import cross_view_loss, feature_loss, koleo_loss
from rdcd.models import load_model
from rdcd.models.checkpoint import save_checkpoint
from rdcd.models.pretrained import load_backbone_weights
from rdcd.models.student import StudentConfig, StudentNet

log = logging.getLogger(__name__)


@dataclass
class TailConfig:
    """`rdcd train --config jobs/configs/cpu-pool.yaml` (a config with `trainer: tail`)."""

    images: str = ""  # a listing file (one path/URI per line) or a folder
    max_images: int = 0  # train on the first N of the seeded shuffle of the listing (0: all)
    out: str = "runs/pool/train"
    # `efficientnet-lite0` (ImageNet weights the installed package ships; both heads fitted in
    # closed form to the cached teacher targets before the first step) or any --model spec of a
    # student checkpoint (its trunk, front and BN; the head refitted)
    start: str = "efficientnet-lite0"
    # refit the head of a student `start` in closed form before step 1 (always when its dim is not
    # `dim`); False keeps a trained head, which a run going on from a tail run of the same cache
    # and dim wants (its head already fits these targets)
    refit_head: bool = True
    teacher: str = "sscd"
    views: int = 3
    size: int = 224
    from_block: int = 5
    seed: int = 0
    cache_dir: str | None = None  # default <out>/cache
    # a cache of the same images and views made for another from_block/start: its teacher
    # descriptors are reused (the teacher is ~80 % of a cache's cost)
    teacher_from: str | None = None
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-4  # AdamW, for the trained blocks and conv_head
    # ... times this for `project` and `head`: their closed-form fits have tiny entries (~1e-3),
    # which Adam's per-weight steps of ~lr would overwrite within a few steps
    head_lr_scale: float = 0.03
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    w_feat: float = 1.0
    w_desc: float = 1.0
    w_rel: float = 0.1
    t_rel: float = 0.04
    # cross-view contrast (InfoNCE, both directions): the descriptor of an image's clean view and
    # of one of its augmented views must find each other among the batch's other images and the
    # teacher memory (minus the image's own entries); what copy detection asks of a descriptor
    # directly. With it on, a batch is batch_size // 2 images x 2 views (same cost per step).
    w_con: float = 0.0
    t_con: float = 0.05
    # entropy term on the contrast's descriptors (KoLeo, as SSCD has it; `rdcd.losses`): pushes
    # each descriptor away from its nearest unrelated one in the batch and the teacher memory,
    # so unrelated images score low for every query (raw-score µAP) and not just lower than the
    # copy (InfoNCE); needs w_con (its batch is the contrast's)
    w_koleo: float = 0.0
    # extra views per image for the contrast only (0: none): made with the `con_augment` preset
    # of `rdcd.augment` (its `copy` mix pastes views onto other photos, rotates and crops harder:
    # the copies the student missed most), front maps only (no teacher, so cheap to cache, in
    # `con_cache_dir`, default <cache_dir>-con). A contrast pair's augmented side is one of them
    # with probability `con_p`; feature terms stay on the views the teacher labelled.
    con_views: int = 0
    con_augment: str = "copy"
    con_p: float = 0.5
    # label the extra views with the teacher too (its descriptors cost ~3x the fronts): then the
    # feature terms also ask the student to see an overlay copy as the teacher does
    con_teacher: bool = False
    con_cache_dir: str | None = None
    # descriptor whitening fitted after training (`fit_whitening`): the power of the PCA
    # eigenvalues each axis is divided by (0: none, 0.5: full whitening; 0.25 measured best on the
    # default student: +0.03 held-out µAP), over the clean views of `whiten_images` images
    whiten_power: float = 0.0
    whiten_images: int = 2048
    memory_size: int = 4096
    ema: float = 0.99
    dim: int = 256  # the trained head
    extra_dims: list[int] = field(default_factory=lambda: [128, 64])  # fitted heads
    # the last N cached images of the shuffle never train: they choose the ridge strength of the
    # closed-form fits and give the cheap `val_cos` curve (at most a fifth of the cache)
    val_images: int = 512
    # ridge strengths tried by the closed-form fits, relative to the mean feature variance;
    # plain least squares over a 1280-d pooled feature fits a few thousand views exactly and
    # generalises worst of all (measured: held-out cos 0.21 unregularised, 0.26 at the best ridge)
    ridge: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0, 3.0])
    checkpoint_every: int = 200
    eval_every: int = 0  # steps between held-out scores (0: none during the run)
    eval_root: str | None = None  # a DISC-layout folder scored every eval_every steps
    threads: int = 0  # torch threads (0: all cores)

    @classmethod
    def from_dict(cls, values: dict) -> TailConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"trainer"})
        if unknown:
            raise ValueError(f"unknown tail-trainer settings: {', '.join(unknown)}")
        typed = {f.name: f.type for f in fields(cls)}
        out = {}
        for k, v in values.items():
            if k not in known:
                continue
            # YAML reads `1e-9` (no dot) as a string; a number field takes it as the number
            if typed[k] in ("float", "int") and isinstance(v, str):
                try:
                    v = float(v) if typed[k] == "float" else int(v)
                except ValueError:
                    raise ValueError(f"{k}: expected a number, got {v!r}") from None
            out[k] = v
        return cls(**out)

    def validate(self) -> TailConfig:
        if not self.images:
            raise ValueError("images: a listing file or folder of training images is required")
        for name in ("views", "size", "steps", "batch_size", "memory_size", "dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.views < 2:
            raise ValueError("views must be at least 2 (the clean image and one augmentation)")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("ema must be in [0, 1)")
        if self.w_con < 0 or self.t_con <= 0:
            raise ValueError("w_con must be at least 0 and t_con above 0")
        if self.con_views < 0 or not 0.0 <= self.con_p <= 1.0:
            raise ValueError("con_views must be at least 0 and con_p in [0, 1]")
        if self.con_teacher and not self.con_views:
            raise ValueError("con_teacher labels the extra views: set con_views too")
        if not 0.0 <= self.whiten_power <= 1.0:
            raise ValueError("whiten_power must be in [0, 1]")
        if self.whiten_power and self.whiten_images <= self.dim:
            raise ValueError(f"whiten_images must exceed dim ({self.dim}): a {self.dim}-d "
                             "whitening needs more images than axes")  # fmt: skip
        if self.w_koleo < 0 or (self.w_koleo and not self.w_con):
            raise ValueError("w_koleo must be at least 0, and above 0 only with w_con")
        if self.con_views and not self.w_con:
            raise ValueError("con_views are views for the contrast: set w_con above 0 too")
        from rdcd.augment import preset

        preset(self.con_augment, self.size)  # an unknown preset is refused before any work
        return self


def list_images(images: str) -> list[str]:
    """A listing file (one per line, `#` comments) or a folder of images."""
    if rio.is_s3(images) or os.path.isdir(images):
        return [f.uri for f in rio.list_files(images, rio.IMAGE_SUFFIXES)]
    lines = rio.read_text(images).splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def teacher_axes(targets: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, axes [D, dim]) of the L2-normalised teacher descriptors: their top-`dim`
    principal axes, the best `dim`-d linear view of the teacher's geometry."""
    t = targets.reshape(-1, targets.shape[-1]).astype(np.float64)
    if len(t) <= dim:
        raise ValueError(f"{len(t)} cached views cannot give {dim} principal axes: "
                         "cache more images or views, or train a smaller dim")  # fmt: skip
    t /= np.linalg.norm(t, axis=1, keepdims=True).clip(1e-12)
    mean = t.mean(axis=0)
    _, _, vt = np.linalg.svd(t - mean, full_matrices=False)
    return mean.astype(np.float32), vt[:dim].T.astype(np.float32)


def project_targets(targets: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.normalize(targets, dim=-1) @ axes - mean @ axes, dim=-1)


def _trainable(net: StudentNet, from_block: int) -> list[torch.nn.Parameter]:
    frozen = ("backbone.conv_stem", "backbone.bn1") + tuple(
        f"backbone.blocks.{i}." for i in range(from_block)
    )
    params = []
    for name, p in net.named_parameters():
        p.requires_grad = not name.startswith(frozen)
        if p.requires_grad:
            params.append(p)
    return params


def ridge_fit(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor | None,
              y_val: torch.Tensor | None, grid: list[float]) -> tuple[torch.Tensor, torch.Tensor,
                                                                      float, float]:  # fmt: skip
    """Ridge regression y ~ x @ W + b (float64), its strength picked from `grid` (relative to the
    mean variance of x's columns, times the number of rows) by the mean cosine between prediction
    and target on (x_val, y_val); without a validation set, the middle of the grid.
    Returns (W [dx, dy], b [dy], chosen strength, validation cosine or nan)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram, rhs = xc.T @ xc, xc.T @ yc
    unit = float(torch.diagonal(gram).mean())
    eye = torch.eye(len(gram), dtype=gram.dtype)
    tried = grid if x_val is not None and len(x_val) else [sorted(grid)[len(grid) // 2]]
    best = None
    for rel in tried:
        w = torch.linalg.solve(gram + rel * unit * eye, rhs)
        b = my - mx @ w
        score = (F.cosine_similarity(x_val @ w + b, y_val).mean().item()
                 if x_val is not None and len(x_val) else float("nan"))  # fmt: skip
        if best is None or score > best[3]:
            best = (w, b, rel, score)
    return best


def split(cache: viewcache.ViewCache, val_images: int) -> tuple[viewcache.ViewCache,
                                                                 viewcache.ViewCache]:  # fmt: skip
    """(training part, validation part): the last min(val_images, n // 5) cached images of the
    seeded shuffle are the validation part."""
    n_val = min(val_images, len(cache) // 5)
    cut = len(cache) - n_val
    part = lambda sl: viewcache.ViewCache(cache.maps[sl], cache.teacher[sl], cache.index[sl])  # noqa: E731
    return part(slice(0, cut)), part(slice(cut, len(cache)))


def _views(cache: viewcache.ViewCache, sample: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """Up to `sample` (map, teacher descriptor) views of the cache, a seeded draw in order."""
    n, v = cache.maps.shape[:2]
    pick = np.sort(np.random.default_rng(seed).choice(n * v, min(sample, n * v), replace=False))
    maps = cache.maps.reshape(n * v, *cache.maps.shape[2:])[pick]
    return maps, torch.from_numpy(cache.teacher.reshape(n * v, -1)[pick])


def _hidden(net: StudentNet, maps: np.ndarray, from_block: int, batch: int = 128) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([viewcache.tail(net, torch.from_numpy(maps[i : i + batch]).float(),
                                         from_block)[0]
                          for i in range(0, len(maps), batch)])  # fmt: skip


def fit_head(
    net: StudentNet,
    cache: viewcache.ViewCache,
    cfg: TailConfig,
    dim: int,
    sample: int = 16384,
    val: viewcache.ViewCache | None = None,
) -> StudentNet:
    """A copy of `net` with a new `dim`-d head fitted in closed form: ridge regression from `h_S`
    to the teacher's descriptor on its top-`dim` principal axes, over `sample` cached views (the
    strength chosen on the `val` views)."""
    mean, axes = (torch.from_numpy(a) for a in teacher_axes(cache.teacher, dim))
    maps, targets = _views(cache, sample, cfg.seed + dim)
    h = _hidden(net, maps, cfg.from_block).double()
    z_t = project_targets(targets, mean, axes).double()
    h_val = z_val = None
    if val is not None and len(val):
        vm, vt = _views(val, sample, cfg.seed + dim)
        h_val = _hidden(net, vm, cfg.from_block).double()
        z_val = project_targets(vt, mean, axes).double()
    w, b, rel, score = ridge_fit(h, z_t, h_val, z_val, cfg.ridge)
    log.info("tail trainer: %d-d head fitted (ridge %g, validation cos %.3f)", dim, rel, score)
    config = copy.deepcopy(net.config)
    config.dim = dim
    out = StudentNet(config)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("head.", "white_"))}
    state["head.weight"] = w.T.float()
    state["head.bias"] = b.float()
    out.load_state_dict(state, strict=False)  # whitening: the identity of the new dim
    return out.eval()


def whitening_images(cfg: TailConfig, cached: int, dim: int) -> int:
    """How many training images fit the whitening; refused (before any training step, too)
    when they are not more than the descriptor's axes."""
    n = min(cfg.whiten_images, cached)
    if n <= dim:
        raise ValueError(f"whitening a {dim}-d descriptor needs more than {dim} training "
                         f"images; the cache has {cached} outside validation")  # fmt: skip
    return n


@torch.no_grad()
def fit_whitening(net: StudentNet, cache: viewcache.ViewCache, cfg: TailConfig) -> dict:
    """Set `net`'s descriptor whitening (`StudentNet.whiten`, power `cfg.whiten_power`) from
    its descriptors of the clean views of up to `cfg.whiten_images` training images, a seeded
    draw. Fitted on training images, never on a set it is scored on (measured on the default
    student: clean views at the training size fit it as well as the images at inference size)."""
    n = whitening_images(cfg, len(cache), net.config.dim)
    from rdcd.search import Whitening

    pick = np.sort(np.random.default_rng(cfg.seed + 7).choice(len(cache), n, replace=False))
    net.clear_whitening()
    z = torch.cat([viewcache.tail(net, torch.from_numpy(cache.maps[pick[i : i + 128], 0]).float(),
                                  cfg.from_block)[1]
                   for i in range(0, len(pick), 128)])  # fmt: skip
    white = Whitening.fit(z.numpy(), power=cfg.whiten_power)
    net.whiten(torch.from_numpy(white.mean), torch.from_numpy(white.projection))
    spread = np.linalg.eigvalsh(np.cov(z.numpy().T))
    log.info("tail trainer: %d-d descriptor whitened (power %g, %d images; top axis %.1f%% of "
             "the variance before)", net.config.dim, cfg.whiten_power, len(pick),
             100 * spread[-1] / spread.sum())  # fmt: skip
    return {"images": len(pick), "power": cfg.whiten_power}


class HeldOutScorer:
    """µAP of the tail on a DISC-layout folder, every `eval_every` steps: the front of each
    image (at the student's inference size) is computed once, so a score costs tail passes only.
    The learning curve goes into run.json; it is how a recipe's steps are chosen."""

    def __init__(self, net: StudentNet, root: str, from_block: int):
        from rdcd.decode import load_for_model
        from rdcd.metrics import read_ground_truth

        self.from_block = from_block
        self.maps, self.ids = {}, {}
        for d in ("references", "queries", "train"):
            uris = sorted(f.uri for f in rio.list_files(rio.join(root, d), rio.IMAGE_SUFFIXES))
            px = np.stack([load_for_model(rio.read_bytes(u), net.config.image_size) for u in uris])
            self.maps[d] = torch.cat([viewcache.front(net, px[i : i + 32], from_block)
                                      for i in range(0, len(px), 32)])  # fmt: skip
            self.ids[d] = [rio.stem(u) for u in uris]
        self.gt = read_ground_truth(rio.join(root, "ground_truth.csv"))

    @torch.inference_mode()
    def __call__(self, net: StudentNet, step: int) -> dict:
        from rdcd.metrics import Match, evaluate_predictions
        from rdcd.search import ScoreNormalizer, search

        net.eval()
        z = {d: torch.cat([viewcache.tail(net, m[i : i + 64], self.from_block)[1]
                           for i in range(0, len(m), 64)]).numpy()
             for d, m in self.maps.items()}  # fmt: skip
        found = search(z["queries"], z["references"], 10, ScoreNormalizer(z["train"]))
        out = {}
        for key, scores in (("uap", found.raw_scores), ("uap_sn", found.scores)):
            refs = self.ids["references"]
            preds = [Match(q, refs[j], float(s)) for qi, q in enumerate(self.ids["queries"])
                     for j, s in zip(found.indices[qi], scores[qi], strict=True)
                     if j >= 0]  # fmt: skip
            out[key] = evaluate_predictions(preds, self.gt)["uap"]
        log.info("tail trainer: step %d held-out µAP %.3f µAP-sn %.3f", step, out["uap"],
                 out["uap_sn"])  # fmt: skip
        return out


@torch.inference_mode()
def validation_cos(net: StudentNet, val: viewcache.ViewCache, cfg: TailConfig, mean: torch.Tensor,
                   axes: torch.Tensor, sample: int = 768) -> dict:  # fmt: skip
    """Mean cosine, over validation views, between `h_S` and the teacher's descriptor and between
    the descriptor and its target: the two terms the loss fits, on images it never saw (the gap
    to the same figures on training views is the overfit)."""
    if not len(val):
        return {}
    maps, t = _views(val, sample, cfg.seed)
    net.eval()
    h, z = viewcache.tail(net, torch.from_numpy(maps).float(), cfg.from_block)
    return {"val_cos_feat": round(F.cosine_similarity(h, F.normalize(t, dim=1)).mean().item(), 4),
            "val_cos_desc": round(F.cosine_similarity(z, project_targets(t, mean, axes))
                                  .mean().item(), 4)}  # fmt: skip


def _batch(
    rng: np.random.Generator, n: int, v: int, cfg: TailConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, view, from the extra views) indices of a step's batch. With `w_con`, the first
    half is the clean view (0) of batch_size // 2 images and the second half one augmented view
    of each of them: of the main cache, or (with probability `con_p`, when there are
    `con_views`) of the extra views."""
    if not cfg.w_con:
        idx = rng.choice(n, cfg.batch_size, replace=n < cfg.batch_size)
        return idx, rng.integers(0, v, cfg.batch_size), np.zeros(cfg.batch_size, bool)
    half = max(1, cfg.batch_size // 2)
    idx = rng.choice(n, half, replace=n < half)
    view = np.concatenate([np.zeros(half, int), rng.integers(1, v, half)])
    extra = np.zeros(2 * half, bool)
    if cfg.con_views:
        extra[half:] = rng.random(half) < cfg.con_p
        view[half:][extra[half:]] = rng.integers(0, cfg.con_views, int(extra[half:].sum()))
    return np.concatenate([idx, idx]), view, extra


def _state_uri(cfg: TailConfig) -> str:
    return rio.join(cfg.out, "state.pt")


# settings that do not change what a step computes: a run may resume with other values of these
_NOT_RECIPE = ("out", "cache_dir", "teacher_from", "checkpoint_every", "eval_every", "eval_root",
               "threads", "con_cache_dir", "whiten_power", "whiten_images")  # fmt: skip


def _recipe(cfg: TailConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_RECIPE}


def _load_state(cfg: TailConfig) -> dict | None:
    """The checkpoint in `cfg.out`, refused when it was made with another recipe (a resumed run
    must draw what the uninterrupted one would; `steps` counts too: it shapes the schedule)."""
    import io

    if not rio.exists(_state_uri(cfg)):
        return None
    state = torch.load(io.BytesIO(rio.read_bytes(_state_uri(cfg))), weights_only=True)
    made = state.get("recipe")
    if made is not None:
        now = json.loads(json.dumps(_recipe(cfg)))
        # a setting newer than the checkpoint was made with its default then
        made = {**json.loads(json.dumps(_recipe(TailConfig()))), **made}
        differ = sorted(k for k in set(made) | set(now) if made.get(k) != now.get(k))
        if differ:
            raise ValueError(
                f"{_state_uri(cfg)} was made with other settings ("
                + ", ".join(f"{k}: {made.get(k)!r} there, {now.get(k)!r} now" for k in differ)
                + "); use another --out, or the settings it was made with"
            )
    return state


def _save_state(cfg: TailConfig, step: int, net, ema, opt) -> None:
    import io

    buf = io.BytesIO()
    torch.save({"step": step, "model": net.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "recipe": json.loads(json.dumps(_recipe(cfg)))},
               buf)  # fmt: skip
    rio.write_bytes(_state_uri(cfg), buf.getvalue())


def train_tail(
    cfg: TailConfig,
    evaluate_hook: Callable[[StudentNet, int], dict] | None = None,
) -> dict:
    """Build or resume the view cache, train the tail, save `student.pt` (the EMA weights,
    cfg.dim) and `student-d<N>.pt` for each extra dim; returns the summary written to
    `run.json`."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    state = _load_state(cfg)  # before any work: a checkpoint of another recipe is refused
    uris = list_images(cfg.images)
    # a seeded shuffle: chunks of the cache mix every source, and `max_images` takes a prefix
    uris = [uris[i] for i in np.random.default_rng(cfg.seed).permutation(len(uris))]
    if cfg.max_images:
        uris = uris[: cfg.max_images]
    start, head_trained = _start(cfg)
    teacher = load_model(cfg.teacher, teacher_size=cfg.size)
    vc_cfg = viewcache.ViewCacheConfig(views=cfg.views, size=cfg.size, from_block=cfg.from_block,
                                       seed=cfg.seed)  # fmt: skip
    cache_dir = cfg.cache_dir or os.path.join(cfg.out, "cache")
    t0 = time.perf_counter()
    cache = viewcache.build(cache_dir, uris, start, teacher.embed, vc_cfg,
                            teacher_name=cfg.teacher, teacher_from=cfg.teacher_from)  # fmt: skip
    cache_s = time.perf_counter() - t0
    n_cached = len(cache)
    extra = _extra_views(cfg, cache_dir, uris, start, cache, teacher)
    cache, val = split(cache, cfg.val_images)
    if extra is not None:
        extra = split(extra, cfg.val_images)[0]
    n, v = cache.maps.shape[:2]
    if cfg.whiten_power:  # refused now, not after the last step
        whitening_images(cfg, n, max([cfg.dim, *cfg.extra_dims]))
    log.info("tail trainer: %d images x %d views cached (%.0f s), %d of them for validation",
             n_cached, v, cache_s, len(val))  # fmt: skip

    mean, axes = (torch.from_numpy(a) for a in teacher_axes(cache.teacher, cfg.dim))
    targets = torch.from_numpy(cache.teacher)
    net = copy.deepcopy(start)
    if state is None:
        if cfg.start == PACKAGE_START:
            fit_project(net, cache, cfg, val=val)
        if cfg.refit_head or not head_trained:  # start the head where the loss wants it
            net = fit_head(net, cache, cfg, cfg.dim, val=val)
    params = _trainable(net, cfg.from_block)
    heads = {id(p) for p in (*net.project.parameters(), *net.head.parameters())}
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if id(p) not in heads], "scale": 1.0},
         {"params": [p for p in params if id(p) in heads], "scale": cfg.head_lr_scale}],
        lr=cfg.lr, weight_decay=cfg.weight_decay)  # fmt: skip
    ema = copy.deepcopy(net)
    step0 = 0
    if state is not None:
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step0 = int(state["step"])
        log.info("tail trainer: resuming at step %d", step0)
    net.eval()  # batch norm keeps the start's statistics throughout
    history = []
    if evaluate_hook is None and cfg.eval_root and cfg.eval_every:
        scorer = HeldOutScorer(net, cfg.eval_root, cfg.from_block)
        evaluate_hook = lambda m, s: {**scorer(m, s), **validation_cos(m, val, cfg, mean, axes)}  # noqa: E731
        history.append({"step": step0, **evaluate_hook(ema, step0)})
    t_train = time.perf_counter()
    for step in range(step0 + 1, cfg.steps + 1):
        warm = min(1.0, step / max(1, cfg.warmup_steps))
        lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        rng = np.random.default_rng([cfg.seed, step])
        idx, view, from_extra = _batch(rng, n, v, cfg)
        pair_idx = idx[: len(idx) // 2]  # the images of the contrast pairs
        x = _pick(cache, extra, "maps", idx, view, from_extra)
        h, z = viewcache.tail(net, torch.from_numpy(x).float(), cfg.from_block)
        z_all = z
        if extra is not None and not extra.teacher.shape[-1]:  # feature terms where labelled
            keep = ~from_extra
            h, z = h[torch.from_numpy(keep)], z[torch.from_numpy(keep)]
            idx, view, from_extra = idx[keep], view[keep], from_extra[keep]
        t = F.normalize(torch.from_numpy(_pick(cache, extra, "teacher", idx, view, from_extra)),
                        dim=1)  # fmt: skip
        z_t = project_targets(t, mean, axes)
        loss = cfg.w_feat * feature_loss(h, t) + cfg.w_desc * feature_loss(z, z_t)
        if cfg.w_rel or cfg.w_con:
            mi = rng.integers(0, n, cfg.memory_size), rng.integers(0, v, cfg.memory_size)
            memory = project_targets(targets[mi], mean, axes)
        if cfg.w_rel:
            log_p_t = F.log_softmax(z_t @ memory.T / cfg.t_rel, dim=1)
            log_p_s = F.log_softmax(z @ memory.T / cfg.t_rel, dim=1)
            rel = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
            loss = loss + cfg.w_rel * rel
        if cfg.w_con:
            own = torch.from_numpy(pair_idx[:, None] == mi[0][None, :])
            loss = loss + cfg.w_con * cross_view_loss(z_all, memory, own, cfg.t_con)
        if cfg.w_koleo:
            rows = np.concatenate([pair_idx, pair_idx])
            same = torch.from_numpy(
                np.concatenate(
                    [rows[:, None] == rows[None, :], rows[:, None] == mi[0][None, :]], axis=1
                )
            )
            loss = loss + cfg.w_koleo * koleo_loss(z_all, same, memory)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                if p.requires_grad:
                    pe.mul_(cfg.ema).add_(p.detach(), alpha=1 - cfg.ema)
        if step % 20 == 0:
            sec = (time.perf_counter() - t_train) / (step - step0)
            log.info("tail trainer: step %d/%d loss %.4f lr %.2e (%.2f s/step)", step, cfg.steps,
                     loss.item(), lr, sec)  # fmt: skip
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_state(cfg, step, net, ema, opt)
        if evaluate_hook and cfg.eval_every and step % cfg.eval_every == 0:
            history.append({"step": step, **evaluate_hook(ema, step)})
    train_s = time.perf_counter() - t_train
    ema.eval()
    whitening = None
    if cfg.whiten_power:
        whitening = fit_whitening(ema, cache, cfg)
        if evaluate_hook and cfg.eval_every:
            history.append({"step": cfg.steps, "whitened": True, **evaluate_hook(ema, cfg.steps)})
    fp = save_checkpoint(ema, rio.join(cfg.out, "student.pt"),
                         meta={"trainer": "tail", "steps": cfg.steps})  # fmt: skip
    outputs = {cfg.dim: {"uri": rio.join(cfg.out, "student.pt"), "fingerprint": fp}}
    for d in cfg.extra_dims:
        head = fit_head(ema, cache, cfg, d, val=val)
        if cfg.whiten_power:
            fit_whitening(head, cache, cfg)
        uri = rio.join(cfg.out, f"student-d{d}.pt")
        outputs[d] = {
            "uri": uri,
            "fingerprint": save_checkpoint(head, uri, meta={"trainer": "tail"}),
        }
    summary = {
        "config": asdict(cfg),
        "images": len(uris),
        "cached_images": int(n_cached),
        "validation_images": len(val),
        "views": int(v),
        "cache_seconds": round(cache_s, 1),
        "train_seconds": round(train_s, 1),
        "steps_this_run": cfg.steps - step0,
        "seconds_per_step": round(train_s / max(1, cfg.steps - step0), 3),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "outputs": {str(k): o for k, o in outputs.items()},
        "whitening": whitening,
        "history": history,
        "hardware": f"{os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}",
    }
    rio.write_text(rio.join(cfg.out, "run.json"), json.dumps(summary, indent=2))
    return summary


PACKAGE_START = "efficientnet-lite0"


def _pick(cache: viewcache.ViewCache, extra: viewcache.ViewCache | None, what: str,
          idx: np.ndarray, view: np.ndarray, from_extra: np.ndarray) -> np.ndarray:  # fmt: skip
    """`what` ("maps" or "teacher") of the (image, view) pairs, each from the main cache or
    from the extra views."""
    if not from_extra.any():
        return getattr(cache, what)[idx, view]
    return np.stack([getattr(extra if e else cache, what)[i, j]
                     for i, j, e in zip(idx, view, from_extra, strict=True)])  # fmt: skip


def _extra_views(cfg: TailConfig, cache_dir: str, uris: list[str], start: StudentNet,
                 cache: viewcache.ViewCache, teacher) -> viewcache.ViewCache | None:  # fmt: skip
    """The cache of `con_views` contrast-only views of the same images (built or resumed), row
    for row beside `cache`; None without con_views."""
    if not cfg.con_views:
        return None
    vc_cfg = viewcache.ViewCacheConfig(views=cfg.con_views, size=cfg.size, seed=cfg.seed + 1,
                                       from_block=cfg.from_block, augment=cfg.con_augment,
                                       clean_view=False)  # fmt: skip
    folder = cfg.con_cache_dir or cache_dir.rstrip("/") + "-con"
    t0 = time.perf_counter()
    extra = viewcache.build(folder, uris, start, teacher.embed if cfg.con_teacher else None,
                            vc_cfg, teacher_name=cfg.teacher)  # fmt: skip
    if not np.array_equal(extra.index, cache.index):
        raise viewcache.CacheMismatchError(
            f"{folder} holds other images than {cache_dir} ({len(extra)} and {len(cache)}); "
            "use a new con_cache_dir"
        )
    log.info("tail trainer: %d extra views per image for the contrast (%s, %.0f s)",
             cfg.con_views, cfg.con_augment, time.perf_counter() - t0)  # fmt: skip
    return extra


def start_student(cfg: TailConfig) -> StudentNet:
    """The student before the first step (float32, eval mode), of `cfg.dim`."""
    return _start(cfg)[0]


def _start(cfg: TailConfig) -> tuple[StudentNet, bool]:
    """(start student, whether its head is a trained head of `cfg.dim` that may be kept)."""
    if cfg.start == PACKAGE_START:
        net = StudentNet(StudentConfig(backbone="efficientnet_lite0", dim=cfg.dim))
        load_backbone_weights(net.backbone, "efficientnet_lite0", PACKAGE_START)
        return net.float().eval(), False
    net = load_model(cfg.start).module
    if not isinstance(net, StudentNet):
        raise ValueError(f"start {cfg.start!r} is not a student checkpoint")
    net = net.float().eval()
    if net.is_whitened:  # the losses train the head's own output; whitening is refitted after
        log.info("tail trainer: the start's descriptor whitening is dropped for training")
        net.clear_whitening()
    if net.config.dim == cfg.dim:
        return net, True
    # same trunk, a head of the new dim (fitted before step 1)
    config = copy.deepcopy(net.config)
    config.dim = cfg.dim
    out = StudentNet(config)
    state = {k: t for k, t in net.state_dict().items() if not k.startswith(("head.", "white_"))}
    out.load_state_dict(state, strict=False)
    return out.eval(), False


def _pooled(net: StudentNet, maps: np.ndarray, from_block: int) -> torch.Tensor:
    bb = net.backbone
    pooled = []
    with torch.inference_mode():
        for i in range(0, len(maps), 128):
            x = torch.from_numpy(maps[i : i + 128]).float()
            for block in bb.blocks[from_block:]:
                x = block(x)
            pooled.append(net.pool(bb.bn2(bb.conv_head(x))).flatten(1))
    return torch.cat(pooled)


@torch.inference_mode()
def fit_project(net: StudentNet, cache: viewcache.ViewCache, cfg: TailConfig,
                sample: int = 16384, val: viewcache.ViewCache | None = None) -> None:  # fmt: skip
    """Standardise the pooled feature and fit `project` in closed form (ridge regression onto the
    teacher's normalised descriptor, its strength chosen on the `val` views) over `sample`
    cached views: a random projection would spend the first hundreds of steps finding what one
    solve gives."""
    maps, targets = _views(cache, sample, cfg.seed + 1)
    f = _pooled(net, maps, cfg.from_block)
    net.standardise(f.mean(0), f.std(0))
    x = ((f - net.feat_mean) * net.feat_scale).double()
    x_val = t_val = None
    if val is not None and len(val):
        vm, vt = _views(val, sample, cfg.seed + 1)
        x_val = ((_pooled(net, vm, cfg.from_block) - net.feat_mean) * net.feat_scale).double()
        t_val = F.normalize(vt, dim=1).double()
    w, b, rel, score = ridge_fit(x, F.normalize(targets, dim=1).double(), x_val, t_val, cfg.ridge)
    log.info("tail trainer: projection fitted (ridge %g, validation cos %.3f)", rel, score)
    net.project.weight.copy_(w.T.float())
    net.project.bias.copy_(b.float())
