"""The compact RDCD student: timm backbone -> GeM -> 512-d `h_S` -> d-dim L2-normalised descriptor.

The 512-d projection `h_S` exists for relational distillation against the teacher's 512-d space;
the final d-dim layer (64/128/256) is what gets indexed. Any timm model name is accepted, so a
user can trade accuracy for speed without touching the training or serving code.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rdcd.models.embedder import IMAGENET_MEAN, IMAGENET_STD

# What a student config may say. A checkpoint is untrusted input: its config sizes every decode
# and every tensor the embedder allocates (a claimed image_size=20000 makes each image a 4.8 GB
# float32 input and lifts the decode budget to its maximum), and its backbone name reaches timm,
# which resolves `hf-hub:` and `local-dir:` names by fetching or reading configs. The ranges are
# wide enough for any real student: the paper's are 224-288 px and d in {64, 128, 256}.
IMAGE_SIZE_RANGE = (32, 1024)
DIM_RANGE = (1, 4096)
HIDDEN_DIM_RANGE = (1, 8192)
GEM_P_RANGE = (0.5, 16.0)
MEAN_RANGE = (0.0, 1.0)
STD_RANGE = (1e-3, 1.0)
_BACKBONE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # timm name, optional .tag


def _int_in(name: str, value: object, bounds: tuple[int, int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name}={value} is outside the allowed range {bounds[0]}..{bounds[1]}")


def _float_in(name: str, value: object, bounds: tuple[float, float]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{name}={value} is outside the allowed range {bounds[0]}..{bounds[1]}")


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student and preprocess its inputs."""

    backbone: str = "efficientnet_b0"
    dim: int = 128
    hidden_dim: int = 512
    gem_p: float = 3.0
    image_size: int = 288  # evaluation/inference resize (training uses 224 crops)
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StudentConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)

    def validate(self) -> StudentConfig:
        """Raise `ValueError` naming the first field outside the bounds above; returns self.
        Checkpoint loading calls it before building anything from a file's config."""
        if not isinstance(self.backbone, str) or not _BACKBONE_NAME.fullmatch(self.backbone):
            raise ValueError(f"backbone must be a plain timm model name, got {self.backbone!r}")
        if not timm.is_model(self.backbone):
            raise ValueError(f"backbone {self.backbone!r} is not a timm model")
        _int_in("dim", self.dim, DIM_RANGE)
        _int_in("hidden_dim", self.hidden_dim, HIDDEN_DIM_RANGE)
        _int_in("image_size", self.image_size, IMAGE_SIZE_RANGE)
        _float_in("gem_p", self.gem_p, GEM_P_RANGE)
        for name, values, bounds in (("mean", self.mean, MEAN_RANGE), ("std", self.std, STD_RANGE)):
            if not isinstance(values, tuple) or len(values) != 3:
                raise ValueError(f"{name} must hold 3 numbers (R, G, B), got {values!r}")
            for channel, v in zip("RGB", values, strict=True):
                _float_in(f"{name}[{channel}]", v, bounds)
        return self


class GeM(nn.Module):
    """Generalised-mean pooling, (mean x^p)^(1/p), over spatial positions or tokens."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if x.ndim == 4 else (1,)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=dims).pow(1.0 / self.p)


class StudentNet(nn.Module):
    """`forward` returns the descriptor; `forward_features` also returns `h_S` for distillation.

    The pooled backbone feature is standardised (`feat_mean`, `feat_scale`: fixed buffers, not
    trained) before `project`. GeM features of a pretrained trunk are non-negative with a large
    shared mean (norm ~36, mean cosine ~0.4 between unrelated images); without the
    standardisation any update of `project` carries a rank-one term `dW @ mean` that moves every
    image's `h_S` by the same vector, and one SGD step took the shipped student's descriptors
    from a mean pairwise cosine of 0.02 to 0.99. `fit_heads` sets them (the fitted function is
    the same either way); older checkpoints without them load as the identity."""

    def __init__(self, config: StudentConfig):
        super().__init__()
        self.config = config
        self.backbone = timm.create_model(
            config.backbone, pretrained=False, num_classes=0, global_pool=""
        )
        self.num_features = int(self.backbone.num_features)
        self.pool = GeM(config.gem_p)
        self.project = nn.Linear(self.num_features, config.hidden_dim)
        self.head = nn.Linear(config.hidden_dim, config.dim)
        self.register_buffer("feat_mean", torch.zeros(self.num_features))
        self.register_buffer("feat_scale", torch.ones(self.num_features))
        # descriptor whitening (fixed, fitted after training; identity until then): see `whiten`
        self.register_buffer("white_mean", torch.zeros(config.dim))
        self.register_buffer("white_proj", torch.eye(config.dim))

    @torch.no_grad()
    def standardise(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Make `project` read standardised features `(x - mean) / std` without changing the
        function: `project` is re-parameterised to absorb the old standardisation."""
        mean = mean.to(self.feat_mean).detach()
        scale = 1.0 / std.to(self.feat_scale).detach().clamp_min(1e-6)
        w, b = self.project.weight, self.project.bias
        # current: W (x - m0) s0 + b  ==  W' (x - m1) s1 + b'
        w_raw = w * self.feat_scale  # weights on the raw feature
        b_raw = b - w_raw @ self.feat_mean
        w.copy_(w_raw / scale)
        b.copy_(b_raw + w_raw @ mean)
        self.feat_mean.copy_(mean)
        self.feat_scale.copy_(scale)

    @torch.no_grad()
    def whiten(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        """Make the descriptor `normalise((z - mean) @ projection)` of the head's normalised
        output `z`. Trained descriptors are anisotropic (a few directions carry most of the
        variance, and the contrast adds a component every image shares), which raises every
        unrelated pair's cosine unevenly across queries; (partial) PCA whitening fitted on
        training images spreads the variance, and measured +0.03 held-out µAP on the default
        student. A fixed map like `feat_mean`: training sets it back to the identity first."""
        if projection.shape != self.white_proj.shape or mean.shape != self.white_mean.shape:
            raise ValueError(
                f"whitening for a {self.config.dim}-d descriptor needs a ({self.config.dim},) mean"
                f" and a {tuple(self.white_proj.shape)} projection"
            )
        self.white_mean.copy_(mean.to(self.white_mean))
        self.white_proj.copy_(projection.to(self.white_proj))

    @torch.no_grad()
    def clear_whitening(self) -> None:
        self.white_mean.zero_()
        self.white_proj.copy_(torch.eye(self.config.dim))

    @property
    def is_whitened(self) -> bool:
        eye = torch.eye(self.config.dim, device=self.white_proj.device)
        return bool(
            self.white_mean.abs().sum() > 0 or not torch.equal(self.white_proj.float(), eye)
        )

    def descriptor(self, h: torch.Tensor) -> torch.Tensor:
        """The L2-normalised d-dim descriptor of `h_S`: the head, then the whitening."""
        z = F.normalize(self.head(h), dim=1)
        return F.normalize((z - self.white_mean) @ self.white_proj, dim=1)

    @property
    def is_standardised(self) -> bool:
        return bool(self.feat_mean.abs().sum() > 0 or (self.feat_scale != 1).any())

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x)
        if f.ndim == 4 and f.shape[1] != self.num_features and f.shape[-1] == self.num_features:
            f = f.permute(0, 3, 1, 2)  # NHWC backbones (e.g. Swin) to NCHW
        return f

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The GeM-pooled backbone feature, before both linear heads."""
        return self.pool(self._feature_map(x))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (`h_S`, unnormalised 512-d; `z_S`, the L2-normalised d-dim descriptor)."""
        f = (self.pooled(x) - self.feat_mean) * self.feat_scale
        h = self.project(f)
        return h, self.descriptor(h)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        """The descriptor; with `return_hidden`, (`h_S`, descriptor) as for distillation."""
        h, z = self.forward_features(x)
        return (h, z) if return_hidden else z
