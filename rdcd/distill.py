"""RDCD distillation: the training module, one optimisation step, and a loop that needs no Ray.

The student learns from three signals at once (Kim, Woo & Nang, WACV 2025):
  L = w_con * L_con + w_hn * L_hn + w_rel * L_rel  (+ w_feat * L_feat, off by default)
- L_con, MoCo-v2 contrastive: a view must match the momentum student's encoding of the other view
  of the same image, against a FIFO queue of past momentum keys (instance discrimination);
- L_hn, hard negative: push each descriptor away from its nearest queue entry (spreads the
  compact space, which matters most at 64 dims);
- L_rel, relational distillation: the student's 512-d feature must reproduce the frozen teacher's
  similarity distribution over a FIFO memory of teacher descriptors.

The teacher is *not* part of this module: its descriptors of the first view arrive with the
batch, computed on the data side (Ray Data actors in `rdcd.train`, threads in `local_batches`),
so a CPU-bound teacher overlaps with the student's step instead of blocking it. The same `RDCD`
and `train_step` run under Ray Train (DDP) and in one plain process (e.g. a lone GPU box).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rdcd import io as rio
from rdcd.augment import AugmentConfig, two_views
from rdcd.decode import DecodeError, decode_image
from rdcd.losses import (
    FeatureQueue,
    contrastive_loss,
    feature_loss,
    hard_negative_loss,
    relational_loss,
)
from rdcd.models.checkpoint import parse_checkpoint, save_checkpoint
from rdcd.models.embedder import Embedder, ModelError
from rdcd.models.pretrained import load_backbone_weights
from rdcd.models.student import StudentConfig, StudentNet

log = logging.getLogger(__name__)

STUDENT_INIT = "student:"  # init: student:<checkpoint URI> starts from a trained student


@dataclass
class DistillConfig:
    """Every knob of a distillation run; the defaults follow the paper where it says."""

    images: str = ""  # training images: a local folder or s3:// prefix
    out: str = "runs/distill"  # checkpoints, metrics and the exported student.pt
    teacher: str = "sscd"  # M: `sscd` or a teacher file
    teacher_path: str | None = None  # explicit teacher file for `sscd`
    backbone: str = "efficientnet_b0"
    init: str = "random"  # "random", "efficientnet-lite0" (packaged ImageNet weights), a backbone
    # state-dict file, or "student:<checkpoint>" (a trained student's weights, where shapes fit)
    dim: int = 128
    hidden_dim: int = 512  # must equal the teacher's dimension
    train_size: int = 224
    eval_size: int = 288
    steps: int = 1000
    batch_size: int = 32  # per worker
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    lr: float = 0.05  # at batch 256 the paper uses 1.0; scale with the global batch
    momentum: float = 0.9
    weight_decay: float = 1e-6
    warmup_steps: int = 20
    queue_size: int = 65536
    memory_size: int = 65536
    t_con: float = 0.07
    t_rel: float = 0.04
    ema: float = 0.99
    w_con: float = 1.0
    w_hn: float = 5.0
    w_rel: float = 1.0
    w_feat: float = 0.0  # direct feature distillation (not in the paper; see losses.feature_loss)
    fit_heads: int = 0  # > 0: fit both linear heads in closed form on this many images first
    fit_views: int = 2  # augmented views per image for the fit (even)
    fit_whiten: bool = True  # the fitted d-dim head whitens (PCA whitening) as well as projects
    freeze: tuple[
        str, ...
    ] = ()  # student parameter-name prefixes kept fixed, e.g. backbone.blocks.0
    amp: bool = True  # mixed precision on GPU only
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    max_failures: int = 2
    teacher_actors: int = 1
    teacher_cpus: float = 0.5
    teacher_gpus: float = 0.0  # > 0: teacher actors run the (torch) teacher on a GPU share
    view_cpus: float = 0.25
    max_images: int | None = None
    holdout: str | None = None  # a file of image names to exclude (kept for evaluation)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    def validate(self) -> None:
        if not self.images:
            raise ValueError("no training images: set images (--images URI)")
        if self.queue_size % self.global_batch or self.memory_size % self.global_batch:
            raise ValueError(
                f"queue_size ({self.queue_size}) and memory_size ({self.memory_size}) must be "
                f"multiples of the global batch ({self.global_batch})"
            )
        if self.w_con == 0 and self.w_hn == 0 and self.w_rel == 0 and self.w_feat == 0:
            raise ValueError("all loss weights are 0: nothing to train")
        if self.steps < 0 or self.batch_size < 2:
            raise ValueError("steps must be >= 0 and batch_size >= 2")
        if self.steps == 0 and not self.fit_heads:
            raise ValueError("steps 0 trains nothing: set steps >= 1, or fit_heads to export "
                             "the closed-form student")  # fmt: skip
        if self.fit_views < 2 or self.fit_views % 2:
            raise ValueError("fit_views must be an even number >= 2 (views come in pairs)")

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown distillation settings: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class RDCD(nn.Module):
    """Student, momentum student, key queue and teacher memory, as one checkpointable module."""

    def __init__(self, cfg: DistillConfig):
        super().__init__()
        self.cfg = cfg
        self.student = StudentNet(
            StudentConfig(cfg.backbone, cfg.dim, cfg.hidden_dim, image_size=cfg.eval_size)
        )
        if cfg.init != "random":
            self._initialise(cfg)
        self._freeze_unused(self.student)
        self._frozen_norms = self._freeze_prefixes(self.student, tuple(cfg.freeze))
        self.student.to(memory_format=torch.channels_last)  # before DDP builds its buckets
        self.momentum_student = copy.deepcopy(self.student)
        for p in self.momentum_student.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(cfg.seed)
        self.queue = FeatureQueue(cfg.queue_size, cfg.dim, g)
        self.memory = FeatureQueue(cfg.memory_size, cfg.hidden_dim, g)

    def _initialise(self, cfg: DistillConfig) -> None:
        """Start from ImageNet backbone weights, or from a trained student checkpoint (`student:`
        prefix): everything whose shape fits is copied, so a 256-d student can seed a 64-d one
        (backbone, GeM and the 512-d projection carry over; a new head starts at random)."""
        if not cfg.init.startswith(STUDENT_INIT):
            load_backbone_weights(self.student.backbone, cfg.backbone, cfg.init)
            return
        uri = cfg.init[len(STUDENT_INIT) :]
        donor, fp, _ = parse_checkpoint(rio.read_bytes(uri), uri)
        if donor.config.backbone != cfg.backbone or donor.config.hidden_dim != cfg.hidden_dim:
            raise ModelError(
                f"init {uri}: a {donor.config.backbone}/{donor.config.hidden_dim} student cannot "
                f"seed a {cfg.backbone}/{cfg.hidden_dim} one"
            )
        own = self.student.state_dict()
        fits = {k: v for k, v in donor.state_dict().items() if k in own and v.shape == own[k].shape}
        self.student.load_state_dict(fits, strict=False)
        log.info("initialised from student %s (%s): %d of %d tensors", uri, fp[:12], len(fits),
                 len(own))  # fmt: skip

    @staticmethod
    def _freeze_prefixes(net: StudentNet, prefixes: tuple[str, ...]) -> list[str]:
        """Fix the parameters named by `prefixes` (fine-tuning only the top of a pretrained
        backbone: on a small CPU budget the lower layers have nothing to gain and most of the
        backward cost). Their normalisation layers stay in eval mode, so their statistics do
        not drift towards the augmented views either. Returns those layers' names."""
        if not prefixes:
            return []
        names = {n for n, _ in net.named_parameters()}
        for prefix in prefixes:
            if not any(n.startswith(prefix) for n in names):
                raise ValueError(f"freeze: no student parameter starts with {prefix!r}")
        for n, p in net.named_parameters():
            if n.startswith(prefixes):
                p.requires_grad_(False)
        norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
        return [
            n for n, m in net.named_modules() if n.startswith(prefixes) and isinstance(m, norms)
        ]

    def train(self, mode: bool = True) -> RDCD:
        super().train(mode)
        modules = dict(self.student.named_modules())
        momentum = dict(self.momentum_student.named_modules())
        for name in self._frozen_norms:
            modules[name].eval()
            momentum[name].eval()
        return self

    @staticmethod
    def _freeze_unused(net: StudentNet) -> None:
        """Some timm backbones keep layers that only their classifier path uses (MobileNetV3's
        conv_head). They get no gradient here, which DDP refuses, so they are frozen."""
        was_training = net.training
        net.eval()
        size = net.backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        h, z = net.forward_features(torch.zeros(1, 3, size, size))
        (h.sum() + z.sum()).backward()
        for p in net.parameters():
            if p.grad is None:
                p.requires_grad_(False)
            p.grad = None
        net.train(was_training)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.ema
        for p_m, p in zip(
            self.momentum_student.parameters(), self.student.parameters(), strict=True
        ):
            p_m.mul_(m).add_(p.detach(), alpha=1 - m)
        for b_m, b in zip(self.momentum_student.buffers(), self.student.buffers(), strict=True):
            b_m.copy_(b)


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: RDCD, cfg: DistillConfig) -> torch.optim.Optimizer:
    params = [p for p in model.student.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1) * 255
_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255


def to_input(views: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC views to normalised NCHW floats on `device` (normalising there, not on CPU)."""
    x = torch.as_tensor(views).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return ((x - _MEAN.to(device)) / _STD.to(device)).contiguous(memory_format=torch.channels_last)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def similarity_agreement(z: torch.Tensor, h_t: torch.Tensor) -> float:
    """Pearson correlation between the student's and the teacher's in-batch cosine similarities:
    1.0 means the student orders image pairs exactly as the teacher does."""
    n = z.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=z.device)
    s = (z @ z.T)[mask].float()
    t = (F.normalize(h_t, dim=1) @ F.normalize(h_t, dim=1).T)[mask].float()
    s, t = s - s.mean(), t - t.mean()
    return float((s * t).sum() / (s.norm() * t.norm()).clamp_min(1e-12))


def train_step(
    model: RDCD,
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    step: int,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One optimisation step on a batch {view1, view2: uint8 NHWC, teacher: (B, 512)}.

    `student` is `model.student` or its DDP wrapper. Queues are updated after the losses are
    computed, with keys gathered from every worker, so all replicas hold the same queues.
    """
    cfg = model.cfg
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    x1, x2 = to_input(batch["view1"], device), to_input(batch["view2"], device)
    h_t = F.normalize(torch.as_tensor(batch["teacher"]).to(device).float(), dim=1)
    use_amp = scaler is not None
    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
        h, z = student(x1, return_hidden=True)
        with torch.no_grad():
            model.momentum_update()
            k = model.momentum_student(x2)
    h, z, k = h.float(), z.float(), k.float()
    terms: dict[str, torch.Tensor] = {}
    if cfg.w_con:
        terms["loss_con"] = contrastive_loss(z, k, model.queue.items.clone(), cfg.t_con)
    if cfg.w_hn:
        terms["loss_hn"] = hard_negative_loss(z, model.queue.items.clone())
    if cfg.w_rel:
        terms["loss_rel"] = relational_loss(h, h_t, model.memory.items.clone(), cfg.t_rel)
    if cfg.w_feat:
        terms["loss_feat"] = feature_loss(h, h_t)
    weights = {"loss_con": cfg.w_con, "loss_hn": cfg.w_hn, "loss_rel": cfg.w_rel,
               "loss_feat": cfg.w_feat}  # fmt: skip
    loss = sum(weights[n] * v for n, v in terms.items())
    optimizer.zero_grad(set_to_none=True)
    if use_amp:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    model.queue.enqueue(_gather(k.detach()))
    model.memory.enqueue(_gather(h_t))
    out = {n: float(v.detach()) for n, v in terms.items()}
    out.update(loss=float(loss.detach()), lr=lr_at(step, cfg),
               agreement=similarity_agreement(z.detach(), h_t))  # fmt: skip
    return out


# ---- state, export ---------------------------------------------------------------------------


def state_bytes(model: RDCD, optimizer: torch.optim.Optimizer, step: int, history: list) -> bytes:
    """A resumable training state (tensors and plain values only: safe to load)."""
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "config": model.cfg.to_dict(), "history": history},
        buf,
    )  # fmt: skip
    return buf.getvalue()


def load_state(data: bytes, model: RDCD, optimizer: torch.optim.Optimizer) -> tuple[int, list]:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state.get("history", []))


def export_student(model: RDCD, uri: str, meta: dict | None = None, half: bool = False) -> str:
    """Write the student as a self-describing checkpoint usable as `--model` everywhere."""
    student = copy.deepcopy(model.student).cpu().eval()
    return save_checkpoint(student, uri, half=half, meta=meta)


# ---- data without Ray ------------------------------------------------------------------------


def list_training_images(cfg: DistillConfig) -> list[str]:
    """The training URIs: every image under `images` (a folder, a prefix, or a `.txt` manifest of
    URIs, one per line, relative ones against the manifest's folder), minus the hold-out list."""
    if cfg.images.endswith(".txt"):
        base = cfg.images.rsplit("/", 1)[0] if "/" in cfg.images else "."
        lines = [ln.strip() for ln in rio.read_text(cfg.images).splitlines()]
        uris = [
            ln if rio.is_s3(ln) or ln.startswith("/") else rio.join(base, ln)
            for ln in lines
            if ln and not ln.startswith("#")
        ]
    else:
        uris = [f.uri for f in rio.list_files(cfg.images, rio.IMAGE_SUFFIXES)]
    if cfg.holdout:
        excluded = {
            line.strip() for line in rio.read_text(cfg.holdout).splitlines() if line.strip()
        }
        uris = [u for u in uris if u.rsplit("/", 1)[-1] not in excluded]
    if cfg.max_images:
        uris = uris[: cfg.max_images]
    if len(uris) < cfg.global_batch:
        raise ValueError(f"{len(uris)} training images under {cfg.images}: fewer than one batch")
    if cfg.queue_size > len(uris) // 2:
        # A queue that outlives an epoch holds keys of the very images being trained on: the
        # "hardest negative" is then the image itself and training collapses (seen here with a
        # 2048 queue on 1,297 images). DISC2021's 1M images leave 65,536 far from that.
        raise ValueError(
            f"queue_size {cfg.queue_size} is more than half the {len(uris)} training images: "
            "the queue would hold positives as negatives; use a smaller queue or more images"
        )
    return uris


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return order


def make_views(uri: str, index: int, epoch: int, cfg: DistillConfig):
    """Two augmented views of one training image, or None if it cannot be decoded."""
    try:
        img = decode_image(rio.read_bytes(uri), size=cfg.train_size * 2)
    except (DecodeError, rio.StorageError) as exc:
        log.warning("skipping training image %s: %s", uri, exc)
        return None
    return two_views(img, cfg.seed, index, epoch, AugmentConfig(size=cfg.train_size))


def local_batches(
    cfg: DistillConfig, uris: list[str], teacher: Embedder, start_step: int = 0, threads: int = 2
) -> Iterator[dict]:
    """Batches for `train` in one process: threads decode and augment, and the teacher embeds
    batch i+1 while the student trains on batch i."""
    per_epoch = len(uris) // cfg.batch_size
    pool = ThreadPoolExecutor(max_workers=threads)

    def build(step: int) -> dict:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(len(uris), cfg.seed, epoch)
        idx = order[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
        pairs = [p for p in pool.map(lambda i: make_views(uris[i], i, epoch, cfg), idx) if p]
        v1 = np.stack([a for a, _ in pairs])
        v2 = np.stack([b for _, b in pairs])
        if teacher.image_size != cfg.train_size:
            raise ValueError(f"teacher takes {teacher.image_size}px, views are {cfg.train_size}px")
        return {"view1": v1, "view2": v2, "teacher": teacher.embed(v1)}

    with ThreadPoolExecutor(max_workers=1) as ahead:
        future = ahead.submit(build, start_step)
        for step in range(start_step, cfg.steps):
            batch = future.result()
            if step + 1 < cfg.steps:
                future = ahead.submit(build, step + 1)
            yield batch
    pool.shutdown()


def _pooled_features(net: StudentNet, views: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return net.pooled(to_input(views, torch.device("cpu"))).flatten(1)


def _ridge(x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y ~ x @ w + b with an L2 penalty of `scale` x the mean feature variance."""
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.T @ xc
    lam = scale * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=x.dtype), xc.T @ (y - my))
    return w, my - mx @ w


def fit_heads(
    cfg: DistillConfig, uris: list[str], teacher: Embedder, n_images: int | None = None
) -> StudentNet:
    """A student whose two linear heads start from closed-form fits instead of random weights.

    Not part of the paper, which trains for 100 epochs on 1M images and can afford random heads.
    On a CPU budget of a few thousand steps, random heads are most of what there is to learn:
    - `project` (backbone -> 512): ridge regression of the teacher's descriptor on the pooled
      backbone features of two augmented views per image (penalty chosen on held-out images),
      so `h_S` starts in the teacher's space and L_rel/L_feat refine rather than discover it;
    - `head` (512 -> d): the top-d principal directions of the fitted `h_S` (centred), the
      linear d-dim code that keeps the most of the 512-d geometry, whitened with `fit_whiten`
      (as SSCD whitens its descriptors for DISC2021).
    Starting from a trained student (`init: student:...`, e.g. a 256-d one seeding a 64-d one),
    its projection is kept and only the new head is fitted.
    """
    n = min(n_images or cfg.fit_heads, len(uris))
    net = RDCD(replace(cfg, queue_size=2, memory_size=2)).student.eval()
    order = epoch_order(len(uris), cfg.seed, -1)[:n]
    feats, targets, groups = [], [], []
    pool = ThreadPoolExecutor(max_workers=2)
    for epoch in range(-1, -1 - cfg.fit_views // 2, -1):  # negative epochs: never trained on
        for lo in range(0, n, cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            made = pool.map(lambda i, e=epoch: make_views(uris[i], i, e, cfg), idx)
            pairs = [(i, p) for i, p in zip(idx, made, strict=True) if p]
            if not pairs:
                continue
            views = np.concatenate([np.stack([p[0] for _, p in pairs]),
                                    np.stack([p[1] for _, p in pairs])])  # fmt: skip
            feats.append(_pooled_features(net, views).double())
            targets.append(torch.as_tensor(teacher.embed(views)).double())
            groups.extend([i for i, _ in pairs] * 2)
        log.info("fit_heads: %d views embedded", len(groups))
    pool.shutdown()
    x, y = torch.cat(feats), torch.cat(targets)
    if cfg.init.startswith(STUDENT_INIT):  # a trained student keeps its projection
        w, b = net.project.weight.detach().double().T, net.project.bias.detach().double()
        best = (float(F.cosine_similarity(x @ w + b, y, dim=1).mean()), 0.0)
    else:
        held = torch.tensor([g % 5 == 0 for g in groups])  # by image: both views on one side
        best = (-2.0, 1.0)
        for scale in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
            w, b = _ridge(x[~held], y[~held], scale)
            score = float(F.cosine_similarity(x[held] @ w + b, y[held], dim=1).mean())
            best = max(best, (score, scale))
        w, b = _ridge(x, y, best[1])
    h = x @ w + b
    mean = h.mean(0)
    _, sv, v = torch.linalg.svd(h - mean, full_matrices=False)
    basis = v[: cfg.dim]  # (d, 512)
    if cfg.fit_whiten:  # unit variance per component (floored, so noise is not blown up)
        std = sv[: cfg.dim] / math.sqrt(len(h))
        basis = basis / (std + 1e-3 * std[0])[:, None]
    if basis.shape[0] < cfg.dim:  # fewer views than dimensions: complete orthonormally
        extra = torch.randn(cfg.dim - basis.shape[0], basis.shape[1], dtype=basis.dtype)
        basis = torch.linalg.qr(torch.cat([basis, extra]).T).Q.T
    with torch.no_grad():
        net.project.weight.copy_(w.T.float())
        net.project.bias.copy_(b.float())
        net.head.weight.copy_(basis.float())
        net.head.bias.copy_((-(basis @ mean)).float())
    log.info("fitted heads on %d views of %d images: held-out cosine to the teacher %.3f "
             "(ridge scale %g)", len(x), n, best[0], best[1])  # fmt: skip
    return net


def train(
    cfg: DistillConfig,
    batches: Callable[[int], Iterator[dict]],
    *,
    device: torch.device | None = None,
    resume: bytes | None = None,
    on_log: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[bytes, int], None] | None = None,
) -> tuple[RDCD, list[dict]]:
    """Train in this process. `batches(start_step)` yields batches from that step on;
    `resume` is a state from `state_bytes`; callbacks receive metrics and checkpoint states."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = RDCD(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    step, history = load_state(resume, model, optimizer) if resume else (0, [])
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    model.train()
    t_last, n_last = time.perf_counter(), 0
    for batch in batches(step):
        metrics = train_step(model, model.student, optimizer, batch, step, device, scaler)
        step += 1
        n_last += len(batch["view1"])
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            metrics.update(step=step, images_per_s=n_last / (now - t_last))
            t_last, n_last = now, 0
            history.append(metrics)
            if on_log:
                on_log(metrics)
        if on_checkpoint and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            on_checkpoint(state_bytes(model, optimizer, step, history), step)
        if step >= cfg.steps:
            break
    return model, history
