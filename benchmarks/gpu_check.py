"""One prepared GPU check of the paper's training loop, without Ray: is a step fast, and does the
student learn rather than collapse in its first few hundred steps?

    python benchmarks/gpu_check.py [IMAGES] [--steps 400] [--batch-size 32] [--teacher random]

It runs `jobs/configs/paper.yaml` (EfficientNet-B0 from random weights, SGD lr 1.0 with the
paper's warm-up, the loss of `rdcd.distill.train_step`, bf16 autocast, the queues) as one of the
paper's eight workers would: batch 32 per GPU, the teacher inside the trainer on the same GPU
(`teacher_placement: trainer`), views made by `--workers` CPU processes ahead of the GPU. It
prints, every `--log-every` steps and summed up at the end: images/s end to end and GPU-bound
(teacher + student only), each loss term, the mean in-batch cosine between the student's
descriptors of different images (towards 1: collapse), the student-teacher agreement, and the
teacher's and the data wait's share of step time. With $OUT set (or --json) the figures go to
`$OUT/gpu_check.json`.

It imports nothing that needs Ray, FAISS or AugLy (the GPU machine has none of them): without
AugLy the text and emoji overlays are off (`text_p = emoji_p = 0`, said in the output) and the
rest of the DISC augmentation runs. The teacher defaults to a randomly initialised SSCD
ResNet-50 (`--teacher random`): Meta's weights cannot be fetched there, and a random ResNet-50
costs the same per image, so the timing and the loss mechanics are real while the agreement is
against a random target. `--teacher FILE` takes Meta's `.torchvision.pt` or an ONNX file.

IMAGES defaults to the first folder found of ../shared/data/train_pool, ../shared/data/photos,
shared/data/..., .gpu_data; else it synthesises 2,048 JPEGs (said in the output). The device
machine receives the checkout only (not ../shared), so copy images into the ignored .gpu_data/
and carry it:

    mkdir -p .gpu_data && ls ../shared/data/train_pool | head -3000 | \\
        xargs -I{} cp ../shared/data/train_pool/{} .gpu_data/      # ~45 MB, carry: [".gpu_data"]
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py .gpu_data --steps 400

Checked on CPU only (no GPU was lent to the task that wrote it), with tiny settings:
    python benchmarks/gpu_check.py ../shared/data/photos --steps 3 --batch-size 4 \\
        --backbone mobilenetv3_small_050 --size 64 --teacher random --workers 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rdcd.distill import (  # noqa: E402 - after the path insert
    RDCD,
    DistillConfig,
    make_optimizer,
    make_scaler,
    train_step,
)
from rdcd.trainset import epoch_order  # noqa: E402

SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CANDIDATES = ("../shared/data/train_pool", "../shared/data/photos", "shared/data/train_pool",
              "shared/data/photos", ".gpu_data")  # fmt: skip
HAS_AUGLY = importlib.util.find_spec("augly") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="?", help="folder of training images (see the docstring)")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "paper.yaml"))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32, help="per GPU (the paper: 8 x 32)")
    p.add_argument("--backbone", help="override the config's backbone")
    p.add_argument("--size", type=int, help="training view size (the paper: 224)")
    p.add_argument("--teacher", default="random", help="random, or a teacher file")
    p.add_argument("--amp-dtype", choices=("bf16", "fp16"), help="override the config's")
    p.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)),
                   help="processes making views")  # fmt: skip
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timings")
    p.add_argument("--json", help="write the figures here (default: $OUT/gpu_check.json)")
    return p.parse_args(argv)


def find_images(arg: str | None) -> tuple[list[str], str]:
    """The image files to train on, and where they came from."""
    folders = [arg] if arg else [str((REPO / c).resolve()) for c in CANDIDATES]
    for folder in folders:
        if os.path.isdir(folder):
            files = sorted(
                os.path.join(root, n)
                for root, _, names in os.walk(folder, followlinks=True)
                for n in names
                if n.lower().endswith(SUFFIXES)
            )
            if files:
                return files, folder
        if arg:
            raise SystemExit(f"gpu_check: no images under {arg}")
    return synthesise(2048), "synthetic (no image folder found)"


def synthesise(n: int) -> list[str]:
    """Smooth random colour fields with shapes, as JPEGs: decodable photos of no content."""
    from PIL import Image, ImageDraw

    root = tempfile.mkdtemp(prefix="gpu-check-")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((512, 384), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = int(rng.integers(0, 448)), int(rng.integers(0, 320))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.rectangle((x, y, x + int(rng.integers(16, 64)), y + int(rng.integers(16, 64))),
                           fill=colour)  # fmt: skip
        path = os.path.join(root, f"s{i:05d}.jpg")
        img.save(path, quality=90)
        paths.append(path)
    return paths


def build_config(args: argparse.Namespace, n_images: int, use_gpu: bool) -> DistillConfig:
    """paper.yaml for one worker of the paper's eight, with the queue capped below half the
    images (a longer queue holds the images being trained on as their own negatives)."""
    import yaml

    values = yaml.safe_load(Path(args.config).read_text())
    cfg = DistillConfig.from_dict(values)
    cfg = replace(cfg, images="(gpu_check)", workers=1, use_gpu=use_gpu, steps=args.steps,
                  batch_size=args.batch_size, teacher_placement="trainer", log_every=1,
                  checkpoint_every=max(1, args.steps))  # fmt: skip
    if args.backbone:
        cfg = replace(cfg, backbone=args.backbone)
    if args.size:
        cfg = replace(cfg, train_size=args.size, eval_size=args.size)
    if args.amp_dtype:
        cfg = replace(cfg, amp_dtype=args.amp_dtype)
    b = cfg.batch_size
    queue = min(cfg.queue_size, max(b, (n_images // 2) // b * b))
    memory = max(b, cfg.memory_size // b * b)
    return replace(cfg, queue_size=queue, memory_size=memory)


# ---- views, in worker processes -----------------------------------------------------------

_AUG = None


def _init_worker(size: int) -> None:
    global _AUG
    from rdcd.augment import AugmentConfig

    torch.set_num_threads(1)
    _AUG = AugmentConfig(size=size) if HAS_AUGLY else AugmentConfig(size=size, text_p=0.0,
                                                                    emoji_p=0.0)  # fmt: skip


def _pair(task: tuple[str, int, int, int, int]):
    """Two views of one image (None if it does not decode), as `rdcd.distill.make_views`."""
    from rdcd.augment import two_views
    from rdcd.decode import DecodeError, decode_image

    path, index, epoch, seed, size = task
    try:
        with open(path, "rb") as f:
            img = decode_image(f.read(), size=size * 2)
    except (DecodeError, OSError):
        return None
    return two_views(img, seed, index, epoch, _AUG)


def batches(files: list[str], cfg: DistillConfig, pool, ahead: int = 8):
    """Batches of two uint8 views, in the seeded epoch order, `ahead` batches in flight."""
    b, n = cfg.batch_size, len(files)
    per_epoch = n // b

    def submit(step: int):
        epoch, offset = divmod(step, per_epoch)
        idx = epoch_order(n, cfg.seed, epoch)[offset * b : (offset + 1) * b]
        tasks = [(files[i], i, epoch, cfg.seed, cfg.train_size) for i in idx]
        return pool.map_async(_pair, tasks, chunksize=max(1, b // 8))

    pending = deque(submit(s) for s in range(min(ahead, cfg.steps)))
    for step in range(cfg.steps):
        pairs = [p for p in pending.popleft().get() if p is not None]
        if step + ahead < cfg.steps:
            pending.append(submit(step + ahead))
        if len(pairs) < 2:
            raise SystemExit("gpu_check: a whole batch failed to decode")
        yield {"view1": np.stack([a for a, _ in pairs]), "view2": np.stack([v for _, v in pairs])}


# ---- the teacher ------------------------------------------------------------------------------


def load_teacher(spec: str, cfg: DistillConfig, device: torch.device):
    from rdcd.models.embedder import TorchEmbedder
    from rdcd.models.teacher import SSCDResNet50, load_teacher

    precision = cfg.teacher_precision if device.type == "cuda" else "fp32"
    if spec != "random":
        return load_teacher(spec, device=str(device), precision=precision,
                            image_size=cfg.train_size), spec  # fmt: skip
    torch.manual_seed(1)
    model = SSCDResNet50()
    return TorchEmbedder(model, name="sscd-random", dim=512, image_size=cfg.train_size,
                         fingerprint="random", device=str(device),
                         precision=precision), "random SSCD ResNet-50 (timing only)"  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def offdiag_cosine(z: torch.Tensor) -> float:
    z = torch.nn.functional.normalize(z.float(), dim=1)
    s = z @ z.T
    n = len(z)
    return float((s.sum() - s.diagonal().sum()) / max(1, n * n - n))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")
    files, source = find_images(args.images)
    cfg = build_config(args, len(files), use_gpu)
    cfg.validate()
    print(
        f"gpu_check: {platform.node()}, torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if use_gpu else 'NO GPU: a CPU run, not GPU figures'}"
    )
    print(
        f"images: {len(files)} from {source}; views by {args.workers} processes"
        + ("" if HAS_AUGLY else "; AugLy not installed: text and emoji overlays off")
    )
    print(f"config: {cfg.backbone}/{cfg.dim} at {cfg.train_size}px, batch {cfg.batch_size}, "
          f"lr {cfg.lr} (warm-up {cfg.warmup_steps} steps), queue {cfg.queue_size}, memory "
          f"{cfg.memory_size}, amp {cfg.amp_dtype if use_gpu and cfg.amp else 'off'}, "
          f"teacher {cfg.teacher_precision if use_gpu else 'fp32'}")  # fmt: skip
    # View processes fork before the teacher and the student touch the GPU; they never use it.
    pool = mp.get_context("fork").Pool(args.workers, _init_worker, (cfg.train_size,))
    teacher, teacher_name = load_teacher(args.teacher, cfg, device)
    torch.manual_seed(cfg.seed)
    model = RDCD(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = make_scaler(cfg, device)
    seen: dict = {}
    # the student's descriptors of view 1, as train_step computes them (no second forward)
    model.student.register_forward_hook(
        lambda m, i, o: seen.__setitem__("z", o[1] if isinstance(o, tuple) else o)
    )
    model.train()
    n_params = sum(p.numel() for p in model.student.parameters())
    print(f"teacher: {teacher_name}; student {n_params:,} parameters")
    records = []
    t_prev = time.perf_counter()
    for step, batch in enumerate(batches(files, cfg, pool)):
        t0 = time.perf_counter()
        batch["teacher"] = teacher.embed(batch["view1"])
        _sync(device)
        t1 = time.perf_counter()
        metrics = train_step(model, model.student, optimizer, batch, step, device, scaler)
        _sync(device)
        t2 = time.perf_counter()
        rec = {"step": step + 1, "images": len(batch["view1"]), "wait_s": t0 - t_prev,
               "teacher_s": t1 - t0, "student_s": t2 - t1,
               "in_batch_cosine": offdiag_cosine(seen["z"].detach()), **metrics}  # fmt: skip
        records.append(rec)
        t_prev = t2
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == cfg.steps:
            terms = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss"))
            window = records[-args.log_every :]
            ips = sum(r["images"] for r in window) / sum(
                r["wait_s"] + r["teacher_s"] + r["student_s"] for r in window
            )
            print(f"step {step + 1:>5}: {terms}; in-batch cosine {rec['in_batch_cosine']:.3f}, "
                  f"agreement {metrics.get('agreement', math.nan):.3f}, lr {metrics['lr']:.4g}, "
                  f"{ips:.1f} images/s", flush=True)  # fmt: skip
    pool.close()
    summary = summarise(records, args.skip)
    summary.update(
        device=torch.cuda.get_device_name() if use_gpu else "cpu",
        torch=torch.__version__,
        images=len(files),
        source=source,
        teacher=teacher_name,
        augly=HAS_AUGLY,
        config=cfg.to_dict(),
        peak_gpu_mib=(torch.cuda.max_memory_allocated() / 2**20) if use_gpu else 0,
    )
    print(
        f"summary over steps {summary['from_step']}-{len(records)}: "
        f"{summary['images_per_s']:.1f} images/s end to end, {summary['gpu_images_per_s']:.1f} "
        f"GPU-bound (teacher + student); teacher {100 * summary['teacher_share']:.0f}% of the "
        f"GPU step, data wait {100 * summary['data_wait_share']:.0f}% of wall time; in-batch "
        f"cosine {summary['in_batch_cosine_first']:.3f} -> {summary['in_batch_cosine_last']:.3f}; "
        f"final {', '.join(f'{k} {v:.4f}' for k, v in summary['final'].items())}"
    )
    out = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT")
                        else None)  # fmt: skip
    if out:
        Path(out).write_text(json.dumps({"summary": summary, "steps": records}, indent=1))
        print(f"figures: {out}")
    return 0


def summarise(records: list[dict], skip: int) -> dict:
    """Timing shares over the steps after the first `skip` (CUDA/cuDNN warm-up), loss terms
    averaged over the last tenth of the run."""
    timed = records[skip:] if len(records) > skip else records
    wait = sum(r["wait_s"] for r in timed)
    teach = sum(r["teacher_s"] for r in timed)
    stud = sum(r["student_s"] for r in timed)
    n = sum(r["images"] for r in timed)
    tail = records[-max(1, len(records) // 10) :]
    keys = [k for k in records[-1] if k.startswith("loss") or k in ("agreement", "lr")]
    head = records[: max(1, len(records) // 10)]
    return {
        "from_step": timed[0]["step"],
        "images_per_s": n / max(1e-9, wait + teach + stud),
        "gpu_images_per_s": n / max(1e-9, teach + stud),
        "teacher_share": teach / max(1e-9, teach + stud),
        "data_wait_share": wait / max(1e-9, wait + teach + stud),
        "step_ms": 1000 * (teach + stud) / len(timed),
        "in_batch_cosine_first": float(np.mean([r["in_batch_cosine"] for r in head])),
        "in_batch_cosine_last": float(np.mean([r["in_batch_cosine"] for r in tail])),
        "final": {k: float(np.mean([r[k] for r in tail if k in r])) for k in keys},
    }


if __name__ == "__main__":
    sys.exit(main())
