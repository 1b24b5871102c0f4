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
from rdcd.trainset import ImageTable, epoch_order, listing_problems, read_training_images

log = logging.getLogger(__name__)

STUDENT_INIT = "student:"  # init: student:<checkpoint URI> starts from a trained student
BN_MODES = ("auto", "frozen", "train")
OPTIMIZERS = ("sgd", "adamw", "lars")
WARM_FILL_MAX = 256  # batches at most spent filling the queue and memory before step 0


class CollapseError(ValueError):
    """Training stopped because the descriptors collapsed; no student is exported."""


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
    # BatchNorm of the student: "frozen" (eval statistics, affine still trained), "train", or
    # "auto" = frozen when starting from pretrained weights (their statistics are what the
    # heads were fitted on), trained from random weights
    bn: str = "auto"
    standardise: bool = True  # estimate the pooled-feature standardisation when a start lacks it
    warm_fill: bool = True  # fill queue and memory with real keys/teacher vectors before step 0
    warm_fill_batches: int | None = None  # None: enough for both, at most WARM_FILL_MAX
    optimizer: str = "sgd"  # "sgd" (the paper), "adamw", or "lars" (layer-wise trust ratio)
    lars_eta: float = 1e-3  # LARS trust coefficient: a step moves a layer by ~lr*eta of its norm
    backbone_lr_scale: float = 1.0  # the backbone's learning rate relative to the heads'
    collapse_limit: float = 0.5  # stop when the mean in-batch off-diagonal cosine exceeds this
    collapse_window: int = 5  # ... averaged over this many steps
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
    # How the run executes (rdcd.train, README "rdcd train"); none of these changes the loss.
    amp_dtype: str = "fp16"  # with amp on GPU: "fp16" (with a GradScaler) or "bf16" (none)
    bn_sync: str = "auto"  # BatchNorm across DDP workers: auto, off, sync or shuffle
    teacher_placement: str = "actors"  # "actors" (a Ray Data pool) or "trainer" (in each
    # DDP worker, on its GPU, as the paper runs it)
    teacher_precision: str = "fp16"  # a torch teacher on a GPU: fp32, fp16 or bf16
    allow_cpu_teacher: bool = False  # let a GPU run use the (int8, CPU) ONNX teacher
    io_threads: int = 8  # concurrent image reads per view task (S3 latency bounds reads)
    max_data_blocks: int = 4096  # Ray Data blocks (view tasks) of the sample stream, at most
    check_resources: bool = True  # refuse a plan the cluster cannot hold (off: autoscaling)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    def validate(self) -> None:
        _check_run_settings(self)
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
        if self.bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES}, got {self.bn!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 < self.collapse_limit <= 1 or self.collapse_window < 1:
            raise ValueError("collapse_limit must be in (0, 1] and collapse_window >= 1")
        if self.backbone_lr_scale < 0:
            raise ValueError("backbone_lr_scale must be >= 0")

    @property
    def bn_frozen(self) -> bool:
        return self.bn == "frozen" or (self.bn == "auto" and self.init != "random")

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
        if cfg.bn_frozen:  # every norm layer keeps the statistics the start was made with
            norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
            self._frozen_norms = sorted(
                set(self._frozen_norms)
                | {n for n, m in self.student.named_modules() if isinstance(m, norms)}
            )
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
        self.student.clear_whitening()  # fitted for the donor's head, not the one trained here
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
    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise the pooled feature of both students (the function is unchanged)."""
        self.student.standardise(mean, std)
        self.momentum_student.standardise(mean, std)

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.cfg.ema
        for p_m, p in zip(
            self.momentum_student.parameters(), self.student.parameters(), strict=True
        ):
            p_m.mul_(m).add_(p.detach(), alpha=1 - m)
        for b_m, b in zip(self.momentum_student.buffers(), self.student.buffers(), strict=True):
            b_m.copy_(b)


def warm_batches(cfg: DistillConfig) -> int:
    """Batches spent before step 0 filling the key queue and the teacher memory with real
    entries (and estimating the feature standardisation): random unit vectors as negatives and
    memory let a fresh fine-tune push every descriptor the same way at no cost."""
    if not cfg.warm_fill:
        return 0
    if cfg.warm_fill_batches is not None:
        return max(0, cfg.warm_fill_batches)
    need = math.ceil(max(cfg.queue_size, cfg.memory_size) / cfg.global_batch)
    return min(need, WARM_FILL_MAX)


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is scaled by `eta * |w| / |g|`, so
    every layer moves by about `lr * eta` of its own norm per step (You et al., 2017).

    Why here: a fitted start has layers of very different scales (the ridge-fitted `project`
    has entries ~1e-4, the whitening head large ones); SGD or Adam steps of one size for all
    move the small layers by more than their own size and destroy the fitted function. Biases
    and 1-d parameters (norm layers) take plain SGD steps without weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3):  # fmt: skip
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "eta": eta})  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                w_norm, g_norm = p.norm(), g.norm()
                if w_norm > 0 and g_norm > 0:
                    g = g.mul(group["eta"] * w_norm / g_norm)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def make_optimizer(model: RDCD, cfg: DistillConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the paper) or AdamW over the trainable student parameters only (the
    momentum student is an EMA, never optimised), in two groups: the backbone at
    `backbone_lr_scale` x the heads' learning rate."""
    backbone, heads = [], []
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else heads).append(p)
    groups = [
        {"params": g, "lr_scale": scale}
        for g, scale in ((backbone, cfg.backbone_lr_scale), (heads, 1.0))
        if g and scale > 0
    ]
    if cfg.backbone_lr_scale == 0:
        for p in backbone:
            p.requires_grad_(False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    eta=cfg.lars_eta)  # fmt: skip
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


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


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over every worker (identity without torch.distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def offdiag_cosine(z: torch.Tensor) -> float:
    """Mean cosine between the descriptors of different images in a batch: ~0 for a healthy
    copy-detection descriptor, towards 1 when every image gets the same descriptor."""
    n = z.shape[0]
    if n < 2:
        return 0.0
    s = F.normalize(z.float(), dim=1) @ F.normalize(z.float(), dim=1).T
    return float((s.sum() - s.diagonal().sum()) / (n * n - n))


class CollapseGuard:
    """Stops a run whose descriptors collapse, before a collapsed student can be exported: the
    mean in-batch off-diagonal cosine, averaged over `window` steps, must stay under `limit`."""

    def __init__(self, limit: float, window: int):
        self.limit, self.window = limit, window
        self.recent: list[float] = []

    def check(self, metrics: dict[str, float], cfg: DistillConfig) -> None:
        self.recent = (self.recent + [float(metrics["offdiag_cos"])])[-self.window :]
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) == self.window and mean > self.limit:
            raise CollapseError(
                f"descriptors collapsed at step {metrics.get('step', '?')}: mean in-batch cosine "
                f"between different images {mean:.3f} over {self.window} steps (limit "
                f"{self.limit}); no student was exported. Likely causes: a learning rate too "
                f"high for this start (lr {cfg.lr}, {cfg.optimizer}; try 10x lower), BatchNorm "
                f"trained from a pretrained start (bn={cfg.bn}), a queue close to the number of "
                f"images (queue_size {cfg.queue_size}) or without warm fill. Raise "
                "collapse_limit only if this is expected"
            )


def similarity_agreement(z: torch.Tensor, h_t: torch.Tensor) -> float:
    """Pearson correlation between the student's and the teacher's in-batch cosine similarities:
    1.0 means the student orders image pairs exactly as the teacher does."""
    n = z.shape[0]
    mask = ~torch.eye(n, dtype=torch.bool, device=z.device)
    s = (z @ z.T)[mask].float()
    t = (F.normalize(h_t, dim=1) @ F.normalize(h_t, dim=1).T)[mask].float()
    s, t = s - s.mean(), t - t.mean()
    return float((s * t).sum() / (s.norm() * t.norm()).clamp_min(1e-12))


# ---- precision, and BatchNorm across DDP workers ----------------------------------------------

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", "fp16", "bf16")
BN_SYNC_MODES = ("auto", "off", "sync", "shuffle")
TEACHER_PLACEMENTS = ("actors", "trainer")


def _check_run_settings(cfg: DistillConfig) -> None:
    """Check the execution settings (precision, BatchNorm sync, teacher placement, data
    stream); part of `DistillConfig.validate`, so a bad value fails before any work starts."""
    for name, value, allowed in (
        ("amp_dtype", cfg.amp_dtype, tuple(AMP_DTYPES)),
        ("teacher_precision", cfg.teacher_precision, PRECISIONS),
        ("bn_sync", cfg.bn_sync, BN_SYNC_MODES),
        ("teacher_placement", cfg.teacher_placement, TEACHER_PLACEMENTS),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if cfg.bn_sync == "sync" and cfg.workers > 1 and not cfg.use_gpu:
        raise ValueError("bn_sync=sync needs GPU workers (torch's SyncBatchNorm runs on CUDA "
                         "only); CPU workers can use bn_sync=shuffle")  # fmt: skip
    if cfg.io_threads < 1 or cfg.max_data_blocks < 1:
        raise ValueError("io_threads and max_data_blocks must be >= 1")


def autocast_dtype(cfg: DistillConfig, device: torch.device) -> torch.dtype | None:
    """The student's autocast dtype: `amp_dtype` when `amp` is on and the step runs on a GPU;
    None (fp32) otherwise: CPU autocast is slower than fp32 for these convolutions."""
    if not cfg.amp or device.type != "cuda":
        return None
    return AMP_DTYPES[cfg.amp_dtype]


def make_scaler(cfg: DistillConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast, whose small gradients underflow without one; bf16 has
    fp32's exponent range and takes none."""
    if autocast_dtype(cfg, device) != torch.float16:
        return None
    return torch.amp.GradScaler("cuda")


def bn_sync_mode(cfg: DistillConfig, world_size: int, device_type: str) -> str:
    """What BatchNorm shares across workers: "off" with one worker (nothing to share), else
    `bn_sync`, where "auto" means "sync" on GPUs and "shuffle" on CPU workers.

    Why: with per-worker BatchNorm the student and the momentum student normalise both views
    over the same few images, and the contrastive task can be solved from batch statistics
    instead of content (the shortcut MoCo's shuffle-BN removes; RDCD's code shuffles across
    GPUs). "sync" normalises over the global batch (SyncBatchNorm in both students); "shuffle"
    feeds the momentum student a random cross-worker mix of the views."""
    if world_size <= 1 or cfg.bn_sync == "off":
        return "off"
    mode = cfg.bn_sync
    if mode == "auto":
        mode = "sync" if device_type == "cuda" else "shuffle"
    if mode == "sync" and device_type != "cuda":
        raise ValueError("bn_sync=sync needs CUDA devices; use bn_sync=shuffle on CPU")
    return mode


def convert_sync_bn(model: RDCD) -> RDCD:
    """Make both students' BatchNorm layers SyncBatchNorm (timm's converter, which keeps the
    activation of timm's fused BatchNormAct layers; torch's would drop it). Call it before the
    optimiser and DDP are built; the parameters stay the same tensors, and state dicts keep
    their keys, so checkpoints load with or without it."""
    from timm.layers import convert_sync_batchnorm

    model.student = convert_sync_batchnorm(model.student)
    model.momentum_student = convert_sync_batchnorm(model.momentum_student)
    return model


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shuffled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seed: int, step: int
) -> torch.Tensor:
    """`fn` over a random cross-worker mix of every worker's `x`; each worker gets the outputs
    of its own rows back, in order (MoCo's shuffle-BN). The permutation is a function of
    (seed, step), the same on every worker, so it needs no broadcast. Workers whose batches
    differ in size all fall back to `fn(x)`."""
    rank, world = _world()
    if world == 1:
        return fn(x)
    sizes = _gather(torch.tensor([x.shape[0]], device=x.device))
    if bool((sizes != sizes[0]).any()):
        return fn(x)
    n, per = int(sizes.sum()), x.shape[0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    perm = torch.randperm(n, generator=g).to(x.device)
    mixed = fn(_gather(x)[perm[rank * per : (rank + 1) * per]])
    out = torch.empty((n, *mixed.shape[1:]), dtype=mixed.dtype, device=mixed.device)
    out[perm] = _gather(mixed)  # row j of the gathered outputs belongs to input perm[j]
    return out[rank * per : (rank + 1) * per]


def _batch_stats_in_use(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def momentum_keys(model: RDCD, x2: torch.Tensor, step: int) -> torch.Tensor:
    """The momentum student's keys of `x2`, through a cross-worker shuffle when BatchNorm runs
    in "shuffle" mode and uses batch statistics (frozen statistics need no shuffle)."""
    _, world = _world()
    net = model.momentum_student
    if bn_sync_mode(model.cfg, world, x2.device.type) != "shuffle" or not _batch_stats_in_use(net):
        return net(x2)
    return shuffled_apply(net, x2, model.cfg.seed, step)


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
        group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
    x1, x2 = to_input(batch["view1"], device), to_input(batch["view2"], device)
    h_t = F.normalize(torch.as_tensor(batch["teacher"]).to(device).float(), dim=1)
    amp = autocast_dtype(cfg, device)
    if amp == torch.float16 and scaler is None:
        amp = None  # fp16 gradients underflow without a scaler: this step runs in fp32
    with torch.autocast(device.type, dtype=amp or torch.float16, enabled=amp is not None):
        h, z = student(x1, return_hidden=True)
        with torch.no_grad():
            model.momentum_update()
            k = momentum_keys(model, x2, step)
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
    if scaler is not None:
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
               agreement=similarity_agreement(z.detach(), h_t),
               offdiag_cos=offdiag_cosine(z.detach()))  # fmt: skip
    return out


def feature_scale(var: torch.Tensor) -> torch.Tensor:
    """The standardisation's divisor: one global scale (the RMS of the per-dimension standard
    deviations), broadcast over every dimension. Centring removes the shared mean that made
    every update of `project` move all images alike; a per-dimension scale would also blow
    near-constant dimensions up to unit variance, weighting them like the informative ones in
    every later update, where one scale keeps the geometry the trunk gives."""
    return var.mean().sqrt().clamp_min(1e-6).expand_as(var).clone()


@torch.no_grad()
def warm_fill(model: RDCD, batches: list[dict], device: torch.device) -> dict[str, float]:
    """Before the first optimiser step: estimate the pooled-feature standardisation when the
    start lacks one (`cfg.standardise`), then fill the key queue with the momentum student's
    keys and the memory with the teacher's descriptors of these batches (gathered over every
    worker, so all replicas hold the same). Returns what was done, for the run's log."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    done: dict[str, float] = {"warm_batches": float(len(batches))}
    if cfg.standardise and not model.student.is_standardised and batches:
        total = torch.zeros((), dtype=torch.float64, device=device)
        s1 = s2 = None
        for b in batches:
            x = model.student.pooled(to_input(b["view2"], device)).flatten(1).double()
            s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
            s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
            total += len(x)
        s1, s2, total = _all_sum(s1), _all_sum(s2), _all_sum(total)
        mean = s1 / total
        var = (s2 / total - mean * mean).clamp_min(0)
        model.standardise(mean.float(), feature_scale(var).float())
        done["standardised"] = 1.0
    for b in batches:
        k = model.momentum_student(to_input(b["view2"], device)).float()
        model.queue.enqueue(_gather(k))
        h_t = F.normalize(torch.as_tensor(b["teacher"]).to(device).float(), dim=1)
        model.memory.enqueue(_gather(h_t))
    model.train(was_training)
    return done


# ---- state, export ---------------------------------------------------------------------------


def state_bytes(
    model: RDCD,
    optimizer: torch.optim.Optimizer,
    step: int,
    history: list,
    scaler: torch.amp.GradScaler | None = None,
) -> bytes:
    """A resumable training state (tensors and plain values only: safe to load). An fp16 run's
    GradScaler state is part of it: a resumed run that restarted at the default scale (65,536)
    would skip steps on overflow until the scale had backed off again."""
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
         "config": model.cfg.to_dict(), "history": history,
         "scaler": scaler.state_dict() if scaler is not None else {}},
        buf,
    )  # fmt: skip
    return buf.getvalue()


def load_state(
    data: bytes,
    model: RDCD,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, list]:
    """Restore a `state_bytes` state into `model`, `optimizer` and (when both the state and
    the run have one) `scaler`; returns (step, history)."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    weights = dict(state["model"])
    own = model.state_dict()
    for key in own:  # states saved before the feature standardisation existed
        if key.rsplit(".", 1)[-1] in ("feat_mean", "feat_scale"):
            weights.setdefault(key, own[key])
    model.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state.get("history", []))


def export_student(model: RDCD, uri: str, meta: dict | None = None, half: bool = False) -> str:
    """Write the student as a self-describing checkpoint usable as `--model` everywhere."""
    student = copy.deepcopy(model.student).cpu().eval()
    return save_checkpoint(student, uri, half=half, meta=meta)


# ---- data without Ray ------------------------------------------------------------------------


def list_training_images(cfg: DistillConfig) -> ImageTable:
    """The training URIs: every image under `images` (a folder, a prefix, or a `.txt` manifest of
    URIs, one per line, relative ones against the manifest's folder), minus the hold-out list;
    a compact sequence of strings (`rdcd.trainset.ImageTable`), read without a Python object per
    image. Raises ValueError when they cannot train `cfg` (fewer than a batch, a queue longer
    than half of them)."""
    table = read_training_images(cfg)
    problems = listing_problems(len(table), cfg)
    if problems:
        raise ValueError(problems[0])
    return table


def make_views(uri: str, index: int, epoch: int, cfg: DistillConfig, data: bytes | None = None):
    """Two augmented views of one training image, or None if it cannot be decoded. `data`: its
    bytes when the caller has read them already (view tasks read a batch concurrently)."""
    try:
        img = decode_image(rio.read_bytes(uri) if data is None else data, size=cfg.train_size * 2)
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

    total = cfg.steps + warm_batches(cfg)  # batch i of the stream; warm fill takes the first
    with ThreadPoolExecutor(max_workers=1) as ahead:
        future = ahead.submit(build, start_step)
        for step in range(start_step, total):
            batch = future.result()
            if step + 1 < total:
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
    if cfg.init.startswith(STUDENT_INIT):
        donor = parse_checkpoint(rio.read_bytes(cfg.init[len(STUDENT_INIT) :]), cfg.init)[0]
        if donor.config.dim == cfg.dim:  # a trained student of this size: nothing to fit
            log.info("fit_heads: %s already has %d-d heads; keeping them", cfg.init, cfg.dim)
            return net
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
        w_raw = net.project.weight.detach().double() * net.feat_scale.double()
        w = w_raw.T  # on the raw pooled feature, whatever standardisation the start has
        b = net.project.bias.detach().double() - w_raw @ net.feat_mean.double()
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
        # `project` is fitted on the pooled feature as it comes (x, as `_pooled_features` gives
        # it before any standardisation); then re-expressed on the standardised feature.
        net.feat_mean.zero_()
        net.feat_scale.fill_(1.0)
        net.project.weight.copy_(w.T.float())
        net.project.bias.copy_(b.float())
        net.standardise(x.mean(0).float(), feature_scale(x.var(0)).float())
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
    scaler = make_scaler(cfg, device)
    step, history = load_state(resume, model, optimizer, scaler) if resume else (0, [])
    model.train()
    warm = warm_batches(cfg)
    stream = batches(step + warm if step else 0)  # the stream's first `warm` batches fill
    if step == 0 and warm:
        filled = warm_fill(model, [next(stream) for _ in range(warm)], device)
        log.info("warm fill: %s", filled)
    guard = CollapseGuard(cfg.collapse_limit, cfg.collapse_window)
    t_last, n_last = time.perf_counter(), 0
    for batch in stream:
        metrics = train_step(model, model.student, optimizer, batch, step, device, scaler)
        step += 1
        metrics["step"] = step
        guard.check(metrics, cfg)
        n_last += len(batch["view1"])
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.perf_counter()
            metrics.update(step=step, images_per_s=n_last / (now - t_last))
            t_last, n_last = now, 0
            history.append(metrics)
            if on_log:
                on_log(metrics)
        if on_checkpoint and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            on_checkpoint(state_bytes(model, optimizer, step, history, scaler), step)
        if step >= cfg.steps:
            break
    return model, history
