"""Can gradient steps on this CPU move the student past its closed-form start?

Full fine-tuning runs at ~8 images/s on a 2-core CPU, too slow to try the losses one by one on
the hard held-out set. This script makes each try cheap, at the price of a fixed set of views:
- V views per training image (the clean image, then V-1 DISC augmentations from `rdcd.augment`)
  are made once, pushed once through the frozen front of the student (stem and blocks below
  `--from-block`, batch norm in eval mode) and once through the teacher, and cached;
- then only the tail trains (blocks from `--from-block`, `conv_head`, both heads; batch norm
  statistics frozen), with the project's loss functions (`rdcd.losses`), on pairs of cached views
  of one image;
- every `--eval-every` steps the hard held-out set of `distill_quality.py` is scored, beside the
  same student at step 0 (the baseline).

    python benchmarks/distill_cached.py --student default --runs rel con feat con+rel

A run is a `+`-joined set of loss terms: `con` (InfoNCE against a queue of earlier keys, the
second view as the positive, T = 0.07), `rel` (relational, T = 0.04, against a memory of teacher
descriptors of other cached views), `feat` (cosine to the teacher) and `hn` (hard negatives).
The µAP-sn is also split into the hard synthetic copies and the real copy pairs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from distill_quality import SHARED, build_eval_set, training_manifest

from rdcd import io as rio
from rdcd.augment import AugmentConfig, augment, view_rng
from rdcd.decode import decode_image, load_for_model, resize_square
from rdcd.losses import (
    FeatureQueue,
    contrastive_loss,
    feature_loss,
    hard_negative_loss,
    relational_loss,
)
from rdcd.metrics import GroundTruth, Match, evaluate_predictions, read_ground_truth
from rdcd.models import load_model
from rdcd.models.student import StudentNet
from rdcd.search import ScoreNormalizer, search
from rdcd.viewcache import front, tail  # the frozen front and the trained rest

TRAIN_SIZE = 224
TERMS = ("con", "rel", "feat", "hn")


def views_of(uri: str, index: int, n_views: int) -> np.ndarray | None:
    try:
        img = decode_image(rio.read_bytes(uri), size=TRAIN_SIZE * 2)
    except Exception:  # noqa: BLE001 - an undecodable training image is skipped
        return None
    out = [resize_square(img, TRAIN_SIZE)]
    cfg = AugmentConfig(size=TRAIN_SIZE)
    out += [augment(img, view_rng(0, index, 1000, v), cfg) for v in range(1, n_views)]
    return np.stack(out)


def build_cache(net: StudentNet, uris: list[str], args, path: str) -> dict[str, np.ndarray]:
    """Front maps (fp16) and teacher descriptors of `args.views` views of every training image."""
    if os.path.exists(os.path.join(path, "ok.npy")):
        return {n: np.load(os.path.join(path, f"{n}.npy")) for n in ("maps", "teacher", "ok")}
    os.makedirs(path, exist_ok=True)
    teacher = load_model("sscd", teacher_size=TRAIN_SIZE)
    shape = front(net, np.zeros((1, TRAIN_SIZE, TRAIN_SIZE, 3), np.uint8), args.from_block).shape
    n, v = len(uris), args.views
    maps = np.zeros((n, v, *shape[1:]), np.float16)
    tdesc = np.zeros((n, v, teacher.dim), np.float32)
    ok = np.zeros(n, bool)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for lo in range(0, n, 32):
            idx = list(range(lo, min(n, lo + 32)))
            made = [(i, m) for i, m in zip(idx, pool.map(lambda i: views_of(uris[i], i, v), idx),
                                           strict=True) if m is not None]  # fmt: skip
            px = np.concatenate([m for _, m in made])
            f = front(net, px, args.from_block).half().numpy().reshape(len(made), v, *shape[1:])
            t = teacher.embed(px).reshape(len(made), v, -1)
            for j, (i, _) in enumerate(made):
                maps[i], tdesc[i], ok[i] = f[j], t[j], True
            print(f"  cached {idx[-1] + 1}/{n} images x {v} views, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    for name, arr in (("maps", maps), ("teacher", tdesc), ("ok", ok)):
        np.save(os.path.join(path, f"{name}.npy"), arr)
    return {"maps": maps, "teacher": tdesc, "ok": ok}


class HeldOut:
    """The hard held-out set, embedded up to the front once; `score` runs only the tail."""

    def __init__(self, net: StudentNet, root: str, from_block: int):
        self.from_block = from_block
        files = {d: sorted(f.uri for f in rio.list_files(rio.join(root, d), rio.IMAGE_SUFFIXES))
                 for d in ("queries", "references", "train")}  # fmt: skip
        size = net.config.image_size
        self.maps = {}
        for d, uris in files.items():
            px = np.stack([load_for_model(rio.read_bytes(u), size) for u in uris])
            self.maps[d] = torch.cat([front(net, px[i : i + 32], from_block)
                                      for i in range(0, len(px), 32)])  # fmt: skip
        self.q_ids = [rio.stem(u) for u in files["queries"]]
        self.r_ids = [rio.stem(u) for u in files["references"]]
        gt = read_ground_truth(rio.join(root, "ground_truth.csv"))
        real = {q for q in gt.queries if q.startswith("QC")}  # the real pairs of copy_pairs.csv

        def subset(keep) -> GroundTruth:
            return GroundTruth(frozenset(p for p in gt.pairs if keep(p[0])),
                               frozenset(q for q in gt.queries if keep(q)))  # fmt: skip

        self.sets = {
            "all": gt,
            "hard": subset(lambda q: q not in real),
            "real": subset(real.__contains__),
        }

    @torch.inference_mode()
    def score(self, net: StudentNet) -> dict[str, float]:
        net.eval()
        z = {d: torch.cat([tail(net, m[i : i + 64], self.from_block)[1]
                           for i in range(0, len(m), 64)]).numpy()
             for d, m in self.maps.items()}  # fmt: skip
        found = search(z["queries"], z["references"], 10, ScoreNormalizer(z["train"], 1.0, 3))
        out = {}
        for raw, scores in ((True, found.raw_scores), (False, found.scores)):
            preds = [Match(self.q_ids[i], self.r_ids[j], float(s))
                     for i in range(len(self.q_ids))
                     for j, s in zip(found.indices[i], scores[i], strict=True)
                     if j >= 0]  # fmt: skip
            for name, gt in self.sets.items():
                if raw and name != "all":
                    continue
                sub = [p for p in preds if p.query_id in gt.queries]
                out[("uap" if raw else "sn") + ("" if name == "all" else f"_{name}")] = (
                    evaluate_predictions(sub, gt)["uap"]
                )
        return out


def tail_loss(terms: set[str], h, z, h_t, memory, queue: FeatureQueue) -> torch.Tensor:
    """The weighted-1 sum of the chosen terms; the first half of the batch is view a, the second
    half view b of the same images (b is the positive key of `con`)."""
    b = len(z) // 2
    total = torch.zeros(())
    if "con" in terms:
        total = total + contrastive_loss(z[:b], z[b:].detach(), queue.items, 0.07)
    if "rel" in terms:
        total = total + relational_loss(h[:b], h_t, memory, 0.04)
    if "feat" in terms:
        total = total + feature_loss(h[:b], h_t)
    if "hn" in terms:
        total = total + hard_negative_loss(z[:b], queue.items)
    return total


def train_run(start: StudentNet, cache: dict, held: HeldOut, terms: set[str], args) -> list:
    net = copy.deepcopy(start).float()
    frozen = ("backbone.conv_stem", "backbone.bn1") + tuple(
        f"backbone.blocks.{i}." for i in range(args.from_block)
    )
    for name, p in net.named_parameters():
        p.requires_grad = not name.startswith(frozen)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    ok = np.flatnonzero(cache["ok"])
    n_views = cache["maps"].shape[1]
    tdesc = torch.from_numpy(cache["teacher"])
    if args.queue > len(ok) // 2:
        # the project's own rule (rdcd.distill.list_training_images): a queue that outlives an
        # epoch holds keys of the very images being trained on, as negatives
        raise SystemExit(f"--queue {args.queue} is more than half the {len(ok)} cached images")
    queue = FeatureQueue(args.queue, net.config.dim)
    rows, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.choice(ok, args.batch, replace=False)
        va = rng.integers(0, n_views, args.batch)
        vb = (va + rng.integers(1, n_views, args.batch)) % n_views  # another view of the image
        x = torch.from_numpy(np.concatenate([cache["maps"][idx, va], cache["maps"][idx, vb]]))
        net.eval()  # batch-norm statistics stay those of the start
        h, z = tail(net, x.float(), args.from_block)
        b = args.batch
        h_t = F.normalize(tdesc[idx, va], dim=1)
        pick = rng.choice(ok, args.memory), rng.integers(0, n_views, args.memory)
        memory = F.normalize(tdesc[pick], dim=1)  # teacher descriptors of other views
        total = tail_loss(terms, h, z, h_t, memory, queue)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        queue.enqueue(z[b:].detach())
        if step % args.eval_every == 0 or step == args.steps:
            m = held.score(net)
            rows.append((step, float(total), (time.perf_counter() - t0) / step, m))
            print(f"  {'+'.join(sorted(terms))} step {step}: loss {float(total):.3f}, "
                  f"µAP-sn {m['sn']:.3f} (hard {m['sn_hard']:.3f}, real {m['sn_real']:.3f})",
                  flush=True)  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--student", default="default", help="the start (any --model spec)")
    p.add_argument("--runs", nargs="+", default=["rel", "con", "feat", "con+rel"])
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--from-block", type=int, default=6, help="first trained block (Lite0: 0-6)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--queue", type=int, default=512, help="at most half the cached images")
    p.add_argument("--memory", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/distill-cached")
    args = p.parse_args()
    for run in args.runs:
        if not set(run.split("+")) <= set(TERMS):
            p.error(f"--runs: {run!r} is not a +-joined set of {', '.join(TERMS)}")
    torch.set_num_threads(os.cpu_count() or 1)
    root = os.path.join(args.work, "data")
    build_eval_set(SHARED, root)
    start = load_model(args.student).module.float().eval()
    print(f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}; "
          f"start {args.student}; {args.views} views/image; trains blocks >= "
          f"{args.from_block}")  # fmt: skip
    uris = training_manifest(SHARED)
    t = time.perf_counter()
    cache_dir = os.path.join(args.work, f"cache-v{args.views}-b{args.from_block}")
    cache = build_cache(start, uris, args, cache_dir)
    print(f"cache: {int(cache['ok'].sum())} images x {args.views} views, "
          f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    held = HeldOut(start, root, args.from_block)
    base = held.score(start)
    table = [("start (no step)", 0, float("nan"), base)]
    for run in args.runs:
        rows = train_run(start, cache, held, set(run.split("+")), args)
        table += [(run, step, sec, m) for step, _, sec, m in rows]
    print(f"\n{'run':<18}{'step':>6}{'s/step':>8}{'µAP':>8}{'µAP-sn':>8}{'hard':>8}{'real':>8}"
          f"{'Δ µAP-sn':>10}")  # fmt: skip
    for run, step, sec, m in table:
        print(f"{run:<18}{step:>6}{sec:>8.2f}{m['uap']:>8.3f}{m['sn']:>8.3f}{m['sn_hard']:>8.3f}"
              f"{m['sn_real']:>8.3f}{m['sn'] - base['sn']:>+10.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
