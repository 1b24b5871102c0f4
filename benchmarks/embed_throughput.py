"""Images/s of the teacher and the student at 224 and 288, beside a decode-only baseline.

    python benchmarks/embed_throughput.py [--images DIR] [--n 96] [--batch-size 32]

For each model and size it prints three figures on the same images:
  model only  - forward passes on pre-decoded pixels (the ceiling the model allows),
  end to end  - `rdcd.embed.embed_files`: read + decode + resize in threads, then the model,
and the decode-only loop (read + decode + resize, one thread, no model) as the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from rdcd import io as rio
from rdcd.decode import load_for_model
from rdcd.demo import bundled_photos
from rdcd.embed import embed_files
from rdcd.models.embedder import Embedder
from rdcd.models.student import StudentConfig, StudentNet
from rdcd.models.teacher import OnnxEmbedder, installed_onnx_teacher


def default_images() -> list[str]:
    shared = os.environ.get("RDCD_SHARED_DATA", os.path.join("..", "shared", "data"))
    photos = os.path.join(shared, "photos")
    if os.path.isdir(photos):
        return [f.uri for f in rio.list_files(photos, rio.IMAGE_SUFFIXES)]
    return bundled_photos()


def decode_only(uris: list[str], size: int) -> float:
    t = time.perf_counter()
    for u in uris:
        load_for_model(rio.read_bytes(u), size)
    return len(uris) / (time.perf_counter() - t)


def model_only(model: Embedder, pixels: np.ndarray, batch_size: int) -> float:
    model.embed(pixels[:2])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.embed(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - t)


def student(size: int, dim: int = 128):
    from rdcd.models import TorchEmbedder

    torch.manual_seed(0)
    net = StudentNet(StudentConfig(dim=dim, image_size=size))
    return TorchEmbedder(net, name=f"student effnet-b0/{dim}", dim=dim, image_size=size,
                         fingerprint="bench")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", help="folder of images (default: ../shared/data/photos)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    uris = (
        [f.uri for f in rio.list_files(args.images, rio.IMAGE_SUFFIXES)]
        if args.images
        else default_images()
    )[: args.n]
    print(f"{len(uris)} images, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda={torch.cuda.is_available()}")  # fmt: skip
    print(f"{'model':<28}{'size':>5}{'decode-only':>14}{'model only':>13}{'end to end':>13}"
          f"{'e2e/decode':>12}")  # fmt: skip
    teacher_path = installed_onnx_teacher()
    for size in (224, 288):
        base = decode_only(uris, size)
        pixels = np.stack([load_for_model(rio.read_bytes(u), size) for u in uris])
        models: list[Embedder] = [student(size)]
        if teacher_path:
            models.insert(0, OnnxEmbedder(teacher_path, image_size=size))
        for m in models:
            mo = model_only(m, pixels, args.batch_size)
            e2e = embed_files(m, uris, batch_size=args.batch_size, workers=args.workers,
                              progress=False).images_per_second  # fmt: skip
            print(f"{m.name:<28}{size:>5}{base:>14.1f}{mo:>13.1f}{e2e:>13.1f}{e2e / base:>12.2f}")


if __name__ == "__main__":
    main()
