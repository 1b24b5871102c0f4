"""The compact RDCD student: timm backbone -> GeM -> 512-d `h_S` -> d-dim L2-normalised descriptor.

The 512-d projection `h_S` exists for relational distillation against the teacher's 512-d space;
the final d-dim layer (64/128/256) is what gets indexed. Any timm model name is accepted, so a
user can trade accuracy for speed without touching the training or serving code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rdcd.models.embedder import IMAGENET_MEAN, IMAGENET_STD


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


class GeM(nn.Module):
    """Generalised-mean pooling, (mean x^p)^(1/p), over spatial positions or tokens."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if x.ndim == 4 else (1,)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=dims).pow(1.0 / self.p)


class StudentNet(nn.Module):
    """`forward` returns the descriptor; `forward_features` also returns `h_S` for distillation."""

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
        h = self.project(self.pooled(x))
        z = F.normalize(self.head(h), dim=1)
        return h, z

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        """The descriptor; with `return_hidden`, (`h_S`, descriptor) as for distillation."""
        h, z = self.forward_features(x)
        return (h, z) if return_hidden else z
