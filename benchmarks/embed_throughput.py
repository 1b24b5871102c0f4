"""Images/s of the teacher and of a student in each CPU runtime, at 224 and 288, side by side.

    python benchmarks/embed_throughput.py [--images DIR] [--n 96] [--batch-size 32] [--repeats 3]

Rows, on the same images: the int8 ONNX teacher (as installed), and the shipped default student
(its real weights; at 224 a copy of it whose config says 224) as PyTorch eager fp32 (the old CPU
path), exported to ONNX fp32, and static int8 (QDQ, per-channel), both in onnxruntime as jobs run
them (`load_model(..., backend="auto")`; files built on first use into the cache, not timed).
Columns:
  model only  - forward passes on pre-decoded pixels (the ceiling the model allows), best of
                `--repeats` rounds taken in turn, so load from other processes hits every row alike,
  end to end  - `rdcd.embed.embed_files`: read + decode + resize in threads, then the model,
  x teacher   - model-only images/s over the teacher's at the same size,
and the decode-only loop (read + decode + resize, one thread, no model) as the baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time

import numpy as np
import torch

from rdcd import io as rio
from rdcd.decode import load_for_model
from rdcd.demo import bundled_photos
from rdcd.embed import embed_files
from rdcd.models import load_model
from rdcd.models.checkpoint import parse_checkpoint, save_checkpoint
from rdcd.models.embedder import Embedder
from rdcd.models.resolve import default_student_path
from rdcd.models.teacher import OnnxEmbedder, installed_onnx_teacher

RUNTIMES = (("torch fp32", "fp32", "torch"), ("ONNX fp32", "fp32", "auto"),
            ("ONNX int8", "int8", "auto"))  # fmt: skip


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
    t = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.embed(pixels[i : i + batch_size])
    return len(pixels) / (time.perf_counter() - t)


def student_at(size: int, work: str) -> str:
    """The default student's checkpoint with its config's image size set to `size`."""
    path = default_student_path()
    if path is None:
        raise SystemExit("this checkout ships no default student")
    model, _, _ = parse_checkpoint(rio.read_bytes(path), path)
    if model.config.image_size == size:
        return path
    model.config.image_size = size
    out = os.path.join(work, f"default-{size}.pt")
    if not os.path.exists(out):
        save_checkpoint(model, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", help="folder of images (default: ../shared/data/photos)")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="model-only rounds; the best counts")
    p.add_argument("--sizes", default="224,288")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rdcd-embed-throughput"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.makedirs(args.work, exist_ok=True)
    uris = (
        [f.uri for f in rio.list_files(args.images, rio.IMAGE_SUFFIXES)]
        if args.images
        else default_images()
    )[: args.n]
    print(f"{len(uris)} images, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda={torch.cuda.is_available()}")  # fmt: skip
    print(f"{'model':<46}{'size':>5}{'decode-only':>13}{'model only':>12}{'end to end':>12}"
          f"{'e2e/decode':>12}{'x teacher':>11}")  # fmt: skip
    teacher_path = installed_onnx_teacher()
    for size in (int(s) for s in args.sizes.split(",")):
        base = decode_only(uris, size)
        pixels = np.stack([load_for_model(rio.read_bytes(u), size) for u in uris])
        models: list[tuple[str, Embedder]] = []
        if teacher_path:
            models.append(("teacher SSCD R50 int8 ONNX", OnnxEmbedder(teacher_path, size)))
        spec = student_at(size, args.work)
        for label, precision, backend in RUNTIMES:
            m = load_model(spec, precision=precision, backend=backend)
            if m.precision != precision:
                label += f" (ran {m.precision})"
            models.append((f"student {m.name.split(':')[-1]} {label}", m))
        for _, m in models:
            m.embed(pixels[:2])  # warm-up: first-call allocations out of the timing
        best = {name: 0.0 for name, _ in models}
        for _ in range(args.repeats):
            for name, m in models:
                best[name] = max(best[name], model_only(m, pixels, args.batch_size))
        teacher_rate = best[models[0][0]] if teacher_path else None
        for name, m in models:
            e2e = embed_files(m, uris, batch_size=args.batch_size, workers=args.workers,
                              progress=False).images_per_second  # fmt: skip
            ratio = f"{best[name] / teacher_rate:>10.2f}x" if teacher_rate else f"{'-':>11}"
            print(f"{name:<46}{size:>5}{base:>13.1f}{best[name]:>12.1f}{e2e:>12.1f}"
                  f"{e2e / base:>12.2f}{ratio}")  # fmt: skip


if __name__ == "__main__":
    main()
