"""The `rdcd` command line. Every subcommand also runs as `python -m jobs.<name>` with the same
flags, so a laptop run and a `ray job submit` run share one code path."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

from rdcd.decode import DecodeError
from rdcd.errors import ModelError
from rdcd.io import StorageError
from rdcd.metrics import MetricError

USER_ERRORS = (StorageError, ModelError, DecodeError, MetricError, ValueError, FileNotFoundError)
# rdcd.models.runtime.PRECISIONS (not imported here: it pulls in torch)
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
PRECISION_HELP = (
    "compute precision: auto (default: int8 in onnxruntime on CPU, fp16 on a GPU), fp32, "
    "fp16/bf16 (GPU), int8 (CPU, students). Descriptors of every precision share the model's "
    "fingerprint, so any of them can query an index built in another"
)


def add_precision_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_metrics(result: dict) -> None:
    counts = result.get("counts", {})
    print(f"model            {result['model']['name']} ({result['model']['fingerprint'][:12]})")
    print(
        f"images           {counts.get('references')} references, {counts.get('queries')} queries, "
        f"{counts.get('background')} background, {counts.get('errors')} undecodable"
    )
    print(f"µAP              {_fmt(result['uap'])}")
    print(f"µAP (score-norm) {_fmt(result.get('uap_sn'))}")
    print(f"recall@P90       {_fmt(result.get('recall_at_p90_sn', result['recall_at_p90']))}")
    print(f"recall@1         {_fmt(result['recall_at_1'])}")
    v = result.get("verified")
    if v:
        recall = "with local recall" if v.get("local_recall") else "no local recall"
        print(f"verified µAP     {_fmt(v['uap'])}, recall@P90 {_fmt(v['recall_at_p90'])}, "
              f"recall@1 {_fmt(v['recall_at_1'])} ({recall}; {v['verify_ms_per_query']} ms "
              "per query)")  # fmt: skip
    t = result.get("timings", {})
    print(f"time             {t.get('total_seconds')} s ({t.get('images_per_second')} images/s)")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disc-root", help="folder (or s3:// prefix) in the DISC2021 layout")
    p.add_argument("--model", default="sscd", help="`sscd` (the teacher) or a student checkpoint")
    p.add_argument("--teacher", help="teacher file: .torchvision.pt, .torchscript.pt or .onnx")
    p.add_argument("--out", default="eval", help="where predictions and metrics.json go")
    p.add_argument("--references", help="override the references folder")
    p.add_argument("--queries", help="override the queries folder")
    p.add_argument("--background", help="override the background (train) folder")
    p.add_argument("--ground-truth", help="override the ground-truth CSV")
    p.add_argument("--k", type=int, default=10, help="references retrieved per query")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--beta", type=float, default=1.0, help="score-normalisation strength")
    p.add_argument("--max-background", type=int, help="subsample the background set")
    p.add_argument("--whiten", action="store_true", help="PCA-whiten on the background set")
    add_precision_arg(p)
    p.add_argument(
        "--index",
        help="search this published index (`rdcd index --out`) instead of embedding references/: "
        "the production path; its background set does the score normalisation",
    )
    add_verify_args(p)
    p.add_argument("--no-progress", action="store_true")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rdcd.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        disc_root=args.disc_root,
        model=args.model,
        out=args.out,
        references=args.references,
        queries=args.queries,
        background=args.background,
        ground_truth=args.ground_truth,
        teacher=args.teacher,
        k=args.k,
        batch_size=args.batch_size,
        workers=args.workers,
        beta=args.beta,
        max_background=args.max_background,
        whiten=args.whiten,
        progress=not args.no_progress,
        index=args.index,
        precision=args.precision,
        verify=args.verify,
        local_recall=args.local_recall is not False,
    )
    result = evaluate(cfg)
    print_metrics(result)
    print(f"wrote {cfg.out}/metrics.json and predictions")
    return 0


def add_match_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--queries",
        required=True,
        help="query images: folder, s3:// prefix or manifest file (.txt/.parquet)",
    )
    p.add_argument("--index", required=True, help="index root (`rdcd index --out`)")
    p.add_argument(
        "--model",
        default="default",
        help="the index's model: default, sscd or a "
        "checkpoint (checked against the index's fingerprint)",
    )
    p.add_argument("--out", required=True, help="predictions file: .csv or .parquet")
    p.add_argument("--teacher", help="teacher file when --model sscd")
    p.add_argument("--k", type=int, default=10, help="candidates per query (10)")
    p.add_argument(
        "--threshold",
        type=float,
        help="keep rows scoring >= this (what /v1/match flags is_copy); default: all",
    )
    p.add_argument(
        "--max-predictions",
        type=int,
        metavar="N",
        help="keep the N best rows over all queries (DISC2021 allowed 500000)",
    )
    p.add_argument(
        "--raw-scores",
        action="store_true",
        help="write cosine similarities, not score-normalised scores",
    )
    p.add_argument(
        "--reference-ids",
        choices=("stem", "id", "uri"),
        default="stem",
        help="reference_id column: file name without extension (DISC2021, default), "
        "the index's integer id, or the URI",
    )
    p.add_argument(
        "--embeddings",
        help="where the query descriptors go (a resumable embedding "
        "run; default: <out without suffix>-query-embeddings)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    add_precision_arg(p)
    p.add_argument("--shard-size", type=int, default=10_000, help="queries per embedding part")
    p.add_argument("--actors", type=int, help="model actors (default: fill the cluster)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per model actor (default: auto)")
    p.add_argument("--gpus-per-actor", type=float, help="GPUs per model actor")
    add_verify_args(p)
    p.add_argument("--no-progress", action="store_true")


def add_verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verify",
        action="store_true",
        help="verify every candidate with local features (RootSIFT ratio test + geometric "
        "model) and rank by the fused score; the answer carries inliers and region",
    )
    p.add_argument(
        "--local-recall",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --verify: also verify the references the query's keypoints vote for "
        "(default: on when the index has a local-recall index)",
    )


def cmd_match(args: argparse.Namespace) -> int:
    from rdcd.match import MatchConfig, run_match

    cfg = MatchConfig(
        queries=args.queries,
        index=args.index,
        out=args.out,
        model=args.model,
        teacher=args.teacher,
        k=args.k,
        threshold=args.threshold,
        max_predictions=args.max_predictions,
        raw_scores=args.raw_scores,
        reference_ids=args.reference_ids,
        embeddings=args.embeddings,
        batch_size=args.batch_size,
        precision=args.precision,
        shard_size=args.shard_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        verify=args.verify,
        local_recall=args.local_recall,
        progress=not args.no_progress,
    )
    s = run_match(cfg)
    c, t = s["counts"], s["timings"]
    print(f"model            {s['model']} ({s['fingerprint'][:12]})")
    print(f"index            {s['index']} v{s['index_version']}, {c['references']} references")
    print(f"queries          {c['queries']}: {c['embedded']} embedded, {c['errors']} undecodable")
    for e in s["errors"][:5]:
        print(f"                 {e['uri']}: {e['error']}")
    cap = f", {c['dropped_by_cap']} dropped by --max-predictions" if c["dropped_by_cap"] else ""
    print(f"predictions      {c['predictions']} ({s['score']} scores) for "
          f"{c['queries_with_predictions']} queries{cap}")  # fmt: skip
    print(f"time             {t['total_seconds']} s (embed {t['embed_seconds']} s, "
          f"search {t['search_seconds']} s)")  # fmt: skip
    if s.get("verify"):
        v = s["verify"]
        print(f"verified         {v['verified']} rows with enough inliers, {v['recalled']} "
              f"proposed by local recall ({'on' if v['local_recall'] else 'off'}); "
              f"records in {v['records']}")  # fmt: skip
    print(f"wrote {cfg.out} (query descriptors in {s['embeddings']})")
    return 0


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="rdcd-demo", help="folder for the demo set and results")
    p.add_argument("--images", help="your own folder of photos instead of the bundled ones")
    p.add_argument(
        "--model",
        default="default",
        help="student to start from (default: the shipped one; sscd: the teacher)",
    )
    p.add_argument("--teacher", help="teacher file: .torchvision.pt, .torchscript.pt or .onnx")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher comparison")
    p.add_argument("--copies", type=int, help="edited copies per reference photo (2)")
    p.add_argument("--max-photos", type=int, help="sample at most this many photos (300)")
    p.add_argument("--steps", type=int, help="fine-tune steps (40; 0: no fine-tune)")
    p.add_argument("--shards", type=int, help="index shards (2)")
    p.add_argument("--port", type=int, help="HTTP port of the endpoint (default: a free one)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the reduced setting (10 photos, 3 steps, no teacher): about a minute",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="global descriptors only: no local features, verification or recall",
    )
    p.add_argument("--no-progress", action="store_true")


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from rdcd.demo import DemoConfig, report_metrics, run_demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    given = {"out": args.out, "images": args.images, "model": args.model,
             "teacher": args.teacher, "copies_per_reference": args.copies,
             "max_photos": args.max_photos, "train_steps": args.steps, "shards": args.shards,
             "port": args.port, "seed": args.seed}  # fmt: skip
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if args.no_teacher:
        cfg = replace(cfg, compare_teacher=False)
    if args.no_progress:
        cfg = replace(cfg, progress=False)
    if args.no_verify:
        cfg = replace(cfg, verify=False)
    print(f"rdcd demo: data -> fine-tune -> choose -> embed -> index -> serve -> evaluate -> "
          f"report, under {os.path.abspath(cfg.out)}", flush=True)  # fmt: skip

    def stage(name: str, what: str) -> None:
        print(f"[{name}] {what}", flush=True)

    result = run_demo(cfg, on_stage=stage)
    print()
    print_metrics(result["evaluation"])
    for name, m in result["flat_evaluations"].items():
        served = " (served)" if name == result["served"]["which"] else ""
        print(f"{name + served:<16} µAP {_fmt(m['uap'])}, score-normalised {_fmt(m['uap_sn'])}, "
              f"recall@1 {_fmt(m['recall_at_1'])}, {m['dim']}-d (exact search)")  # fmt: skip
    for label, value in report_metrics(result).items():
        if label.startswith(("copies", "false", "HTTP")):
            print(f"{label:<37} {_fmt(value)}")
    print(f"demo took {result['total_seconds']} s")
    print(f"report: {result['report']}")
    return 0


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of distillation settings (jobs/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set lr=0.1 (repeatable)")  # fmt: skip
    p.add_argument("--images", help="training images: folder or s3:// prefix")
    p.add_argument("--out", help="output URI: checkpoints, run.json, student.pt")
    p.add_argument("--steps", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP)")
    p.add_argument("--dim", type=int, help="descriptor dimension (64/128/256)")
    p.add_argument("--teacher", help="M for the teacher: sscd or a teacher file")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--local", action="store_true", help="one process, no Ray (e.g. a lone GPU)")
    p.add_argument(
        "--allow-cpu-teacher",
        action="store_true",
        help="let a --gpu run use the int8 ONNX teacher on CPU (refused otherwise)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (resources, teacher, schedule, checkpoints) and exit: "
        "reads the config and the image listing, starts nothing",
    )
    p.add_argument(
        "--cluster-cpus",
        type=float,
        help="--dry-run: check the plan against a cluster of this many CPUs "
        "(default: the Ray cluster at RAY_ADDRESS, else this machine)",
    )
    p.add_argument("--cluster-gpus", type=float, help="--dry-run: ... and this many GPUs")


def load_distill_config(args: argparse.Namespace):
    """Config file, then --set overrides, then the direct flags (highest precedence)."""
    import dataclasses

    import yaml

    from rdcd import io as rio
    from rdcd.distill import DistillConfig

    values: dict = {}
    if args.config:
        values = yaml.safe_load(rio.read_text(args.config)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
    types = {f.name: f.type for f in dataclasses.fields(DistillConfig)}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in types:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        values[key] = yaml.safe_load(raw) if raw else None
    direct = {"images": args.images, "out": args.out, "steps": args.steps,
              "workers": args.workers, "dim": args.dim, "teacher": args.teacher}  # fmt: skip
    values.update({k: v for k, v in direct.items() if v is not None})
    init = str(values.get("init") or "")
    if "dim" not in values and init.startswith("student:"):
        # fine-tuning keeps the start's dimension unless told otherwise (a new head would start
        # at random and throw away what the start had learned)
        from rdcd.models.checkpoint import parse_checkpoint

        uri = init[len("student:") :]
        values["dim"] = parse_checkpoint(rio.read_bytes(uri), uri)[0].config.dim
    if args.gpu:
        values["use_gpu"] = True
    if getattr(args, "allow_cpu_teacher", False):
        values["allow_cpu_teacher"] = True
    return DistillConfig.from_dict(values)


def dry_run_train(args: argparse.Namespace, cfg) -> int:
    """`rdcd train --dry-run`: print the plan; refuse (exit 2, reasons) one that cannot run."""
    from rdcd.plan import ClusterSpec, PlanError, dry_run

    if args.cluster_cpus is not None or args.cluster_gpus is not None:
        cluster = ClusterSpec.given(args.cluster_cpus, args.cluster_gpus)
    elif os.environ.get("RAY_ADDRESS") and not args.local:
        import ray

        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        cluster = ClusterSpec.from_ray()
    else:
        cluster = ClusterSpec.this_machine()
    plan = dry_run(cfg, cluster, local=args.local)
    print(plan.format())
    if plan.problems:
        raise PlanError("the plan cannot run: " + "; ".join(plan.problems))
    return 0


def _tail_config(args: argparse.Namespace):
    """The config of a `trainer: tail` file (`rdcd.finetune`), or None for the Ray Train
    distillation. --set, --images, --out, --steps and --dim apply to both."""
    import yaml

    from rdcd import io as rio

    if not args.config:
        return None
    values = yaml.safe_load(rio.read_text(args.config)) or {}
    if not isinstance(values, dict) or values.get("trainer", "distill") != "tail":
        return None
    from rdcd.finetune import TailConfig

    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        values[key] = yaml.safe_load(raw) if raw else None
    direct = {"images": args.images, "out": args.out, "steps": args.steps, "dim": args.dim}
    values.update({k: v for k, v in direct.items() if v is not None})
    return TailConfig.from_dict(values)


def cmd_train_tail(cfg) -> int:
    from rdcd.finetune import train_tail

    for name in ("rdcd.finetune", "rdcd.viewcache"):
        logging.getLogger(name).setLevel(logging.INFO)
    print(f"tail distillation of {cfg.start} from {cfg.teacher} on {cfg.images}: {cfg.views} "
          f"views/image cached in {cfg.cache_dir or cfg.out + '/cache'}, {cfg.steps} steps "
          f"-> {cfg.out}")  # fmt: skip
    s = train_tail(cfg)
    print(f"done: {s['cached_images']} images x {s['views']} views (cache {s['cache_seconds']} s), "
          f"{s['steps_this_run']} steps in {s['train_seconds']} s")  # fmt: skip
    for dim, o in s["outputs"].items():
        print(f"student d{dim}: {o['uri']} (fingerprint {o['fingerprint'][:12]})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rdcd.train import run_local, run_training

    tail = _tail_config(args)
    if tail is not None:
        if args.dry_run:
            print(f"tail trainer (rdcd.finetune): {tail}")
            return 0
        return cmd_train_tail(tail)
    cfg = load_distill_config(args)
    if args.dry_run:
        return dry_run_train(args, cfg)
    for name in ("rdcd.train", "rdcd.distill"):  # per-step metrics, head-fitting progress
        logging.getLogger(name).setLevel(logging.INFO)
    print(
        f"distilling {cfg.backbone}/{cfg.dim} from {cfg.teacher} on {cfg.images} ({cfg.steps} "
        f"steps, {cfg.workers} worker(s) x batch {cfg.batch_size}) -> {cfg.out}"
    )
    summary = run_local(cfg) if args.local else run_training(cfg)
    final = summary["final"]
    if summary["steps"] == 0:
        print(f"done: exported the closed-form (fit_heads) student in {summary['seconds']} s")
    else:
        print(f"done: {summary['steps']} steps (resumed from {summary['resumed_from']}) in "
              f"{summary['seconds']} s; final loss {final.get('loss', float('nan')):.4f}, "
              f"teacher agreement {final.get('agreement', float('nan')):.3f}")  # fmt: skip
    print(f"student: {summary['student']} (fingerprint {summary['fingerprint'][:12]})")
    return 0


def add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images",
        required=True,
        help="folder or s3:// prefix, or a manifest file (.txt/.lst/.parquet) of URIs",
    )
    p.add_argument("--model", default="sscd", help="`sscd` (the teacher) or a student checkpoint")
    p.add_argument("--out", required=True, help="output URI: manifest/, shards/, errors/, run.json")
    p.add_argument("--teacher", help="teacher file: .torchvision.pt, .torchscript.pt or .onnx")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per part (fixed per run)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--actors", type=int, help="model actors (default: fill the cluster)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs per model actor (default: auto)")
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)",
    )
    add_precision_arg(p)
    p.add_argument(
        "--storage",
        choices=("fp32", "fp16"),
        help="stored descriptor dtype (default fp32; fp16 with --precision fp16, as before)",
    )
    p.add_argument("--image-size", type=int, help="teacher input size (default 288)")
    p.add_argument("--io-threads", type=int, default=8, help="concurrent reads per decode task")
    p.add_argument(
        "--all-files",
        action="store_true",
        help="embed every file under the prefix, not only image suffixes",
    )
    p.add_argument(
        "--reuse-manifest",
        action="store_true",
        help="finish the recorded input listing even if the input changed since",
    )
    p.add_argument(
        "--local-features",
        action="store_true",
        help="also extract RootSIFT keypoints of every image into local/part-NNNNN.parquet "
        "(verification and local recall; fixed for a run: a resume must say it too)",
    )
    p.add_argument(
        "--local-short-side", type=int, help="--local-features working size: short side (300 px)"
    )
    p.add_argument(
        "--local-max-keypoints", type=int, help="--local-features: strongest keypoints kept (600)"
    )
    p.add_argument("--no-progress", action="store_true")


def _local_overrides(args: argparse.Namespace) -> dict:
    given = {"short_side": args.local_short_side, "max_keypoints": args.local_max_keypoints}
    return {k: v for k, v in given.items() if v is not None}


def cmd_embed(args: argparse.Namespace) -> int:
    from rdcd.embed import EmbedJobConfig, run_embed_job

    cfg = EmbedJobConfig(
        images=args.images,
        out=args.out,
        model=args.model,
        teacher=args.teacher,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        precision=args.precision,
        storage=args.storage,
        image_size=args.image_size,
        io_threads=args.io_threads,
        all_files=args.all_files,
        reuse_manifest=args.reuse_manifest,
        local_features=args.local_features,
        local_config=_local_overrides(args),
        progress=not args.no_progress,
    )
    run = run_embed_job(cfg)
    c, t = run["counts"], run["timings"]
    print(f"model            {run['model']} ({run['fingerprint'][:12]})")
    print(f"images           {c['images']}: {c['embedded']} embedded, {c['errors']} in errors/")
    print(f"parts            {c['parts']}: {c['parts_written']} written, "
          f"{c['parts_skipped']} already committed")  # fmt: skip
    rate = t["images_per_second"]
    print(f"time             {t['total_seconds']} s"
          + (f" ({rate} images/s)" if rate else " (nothing left to embed)"))  # fmt: skip
    local = ", local/" if cfg.local_features else ""
    print(f"wrote {cfg.out} (run.json, shards/, errors/{local})")
    return 0


def _parse_bytes(text: str) -> int:
    """`8G`, `512M`, `1.5GiB` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M, 1000000)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * 1024**power)


def add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="index root (path or s3://): v<N>/ and CURRENT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--embeddings", help="build a new version from this embedding run")
    what.add_argument("--add", metavar="RUN", help="add another embedding run as a delta shard")
    what.add_argument(
        "--remove",
        metavar="FILE",
        help="tombstone the references listed in FILE (ids or URIs, one a line; - for stdin)",
    )
    what.add_argument("--compact", action="store_true", help="fold deltas and tombstones in")
    what.add_argument("--show", action="store_true", help="print the published version")
    p.add_argument("--factory", help="FAISS factory string (default: chosen from size and budget)")
    p.add_argument("--shards", type=int, help="index shards (default: one per million vectors)")
    p.add_argument("--memory-budget", type=_parse_bytes, default="8G", help="e.g. 8G (default)")
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: chosen)")
    p.add_argument("--k-factor", type=int, default=4, help="exact re-rank candidates per result")
    p.add_argument("--background", help="embedding run of unrelated images (score normalisation)")
    p.add_argument("--max-background", type=int, default=10_000)
    p.add_argument("--train-sample", type=int, help="vectors the codec is trained on")
    p.add_argument("--task-cpus", type=float, default=1.0, help="CPUs per shard-building task")
    p.add_argument("--allow-model-change", action="store_true",
                   help="replace a published version of another model")  # fmt: skip
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train the quantizer on a GPU (default: when FAISS sees one)")  # fmt: skip
    p.add_argument(
        "--no-local", action="store_true", help="leave a run's local features out (no --verify)"
    )
    p.add_argument(
        "--fused-fit-sample",
        type=int,
        default=64,
        metavar="N",
        help="synthetic copies the fused score is fitted on (0: FusedScore.DEFAULT)",
    )


def _print_index(manifest: dict) -> None:
    from rdcd.index import summary

    s = summary(manifest)
    print(f"version          v{s['version']}")
    print(f"factory          {s['factory']}: {manifest.get('factory_reason', '')}")
    print(f"model            {s['model']} ({s['fingerprint'][:12]}), {s['dim']}-d")
    print(f"vectors          {s['ntotal']} in {len(s['shards'])} shards "
          f"({', '.join(s['shards'])}), {s['tombstones']} tombstoned")  # fmt: skip
    print(f"search           {s['search']}, exact scores: {s['exact_scores']}")
    loc = s.get("local")
    if loc:
        recall = f"recall index {loc['recall_factory']}" if loc["recall"] else "no recall index"
        print(f"local features   {loc['references']} references in {loc['parts']} parts "
              f"({loc['feature_bytes_per_reference']:.0f} B each), {recall} "
              f"({loc['recall_bytes_per_reference']:.0f} B each), fused score "
              f"{loc['fused_fit']}")  # fmt: skip
    else:
        print("local features   none (--verify refused; embed with --local-features)")


def cmd_index(args: argparse.Namespace) -> int:
    from rdcd import index

    if args.embeddings:
        cfg = index.IndexConfig(
            embeddings=args.embeddings,
            out=args.out,
            factory=args.factory,
            shards=args.shards,
            memory_budget=args.memory_budget,
            nprobe=args.nprobe,
            k_factor=args.k_factor,
            train_sample=args.train_sample,
            background=args.background,
            max_background=args.max_background,
            task_cpus=args.task_cpus,
            gpu=args.gpu,
            allow_model_change=args.allow_model_change,
            local=not args.no_local,
            fused_fit_sample=args.fused_fit_sample,
        )
        manifest = index.build_index(cfg)
        b = manifest["build"]
        _print_index(manifest)
        print(f"time             {b['seconds']} s (sample {b['sample_seconds']} s, "
              f"train {b['train_seconds']} s, add {b['add_seconds']} s)")  # fmt: skip
    elif args.add:
        manifest = index.add_references(args.out, args.add, cpus=args.task_cpus)
        _print_index(manifest)
    elif args.remove:
        text = sys.stdin.read() if args.remove == "-" else open(args.remove).read()
        manifest, counts = index.remove_references(args.out, text.splitlines())
        _print_index(manifest)
        print(f"removed          {counts['removed']} (already removed {counts['already']}, "
              f"not in the index {counts['unknown']})")  # fmt: skip
    elif args.compact:
        manifest = index.compact(args.out, shards=args.shards, cpus=args.task_cpus)
        _print_index(manifest)
    else:
        _print_index(index.read_manifest(args.out))
        return 0
    print(f"wrote {args.out} (v{manifest['version']}, CURRENT)")
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    # Defaults live in rdcd.serve.ServeConfig (not imported here: it pulls in Ray and FastAPI).
    p.add_argument("--index", required=True, help="index root (`rdcd index --out`): path or s3://")
    p.add_argument("--model", help="`default` (the shipped student), `sscd` or a checkpoint")
    p.add_argument("--teacher", help="teacher file when --model sscd")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1; 0.0.0.0 for every address)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--route-prefix", help="URL prefix of the routes (default /)")
    p.add_argument("--k", type=int, help="matches returned when a request does not say (10)")
    p.add_argument("--threshold", type=float, help="score from which a match is a copy")
    p.add_argument("--max-batch-size", type=int, help="images per model call (16; 1 = none)")
    p.add_argument("--batch-wait-ms", type=float, help="how long a batch waits to fill (5)")
    p.add_argument("--max-upload-mb", type=float, help="largest image accepted (16)")
    p.add_argument("--poll-interval", type=float, help="seconds between checks of CURRENT (5)")
    p.add_argument("--searchers", type=int, help="searcher deployments (one per shard, <= 4)")
    p.add_argument("--embedder-replicas", type=int, help="embedder replicas (1)")
    p.add_argument("--embedder-cpus", type=float, help="CPUs per embedder replica (1)")
    p.add_argument("--embedder-gpus", type=float, help="GPUs per embedder (1 when there are any)")
    add_precision_arg(p, default=None)
    p.add_argument("--layout", choices=("auto", "local", "sharded"),
                   help="local: one replica embeds and searches (no handle hops); sharded: "
                   "embedder and searcher deployments; auto (default): local when the index "
                   "fits (<= 2 GiB of shards, CPU)")  # fmt: skip
    p.add_argument("--token-env", help="variable holding the bearer token (RDCD_SERVE_TOKEN)")
    p.add_argument("--verify", action="store_true", default=None,
                   help="verify with local features unless a request says verify=false "
                   "(the index needs local data)")  # fmt: skip
    p.add_argument("--local-recall", action=argparse.BooleanOptionalAction, default=None,
                   help="verification adds local-recall candidates (default: on)")  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from rdcd.serve import ServeConfig, serve_forever

    given = {
        "index": args.index,
        "model": args.model,
        "teacher": args.teacher,
        "host": args.host,
        "port": args.port,
        "route_prefix": args.route_prefix,
        "k": args.k,
        "threshold": args.threshold,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        "max_upload_bytes": None if args.max_upload_mb is None else int(args.max_upload_mb * 2**20),
        "poll_interval_s": args.poll_interval,
        "searchers": args.searchers,
        "embedder_replicas": args.embedder_replicas,
        "embedder_cpus": args.embedder_cpus,
        "embedder_gpus": args.embedder_gpus,
        "precision": args.precision,
        "layout": args.layout,
        "token_env": args.token_env,
        "verify": args.verify,
        "local_recall": args.local_recall,
    }
    cfg = ServeConfig.from_dict({k: v for k, v in given.items() if v is not None})
    auth = f"bearer token from ${cfg.token_env}" if os.environ.get(cfg.token_env) else "no auth"
    print(f"serving {cfg.index} with model {cfg.model} ({auth}); starting Ray Serve ...")

    def ready(url: str) -> None:
        print(f"ready: POST {url}/v1/match, GET {url}/v1/health, GET {url}/v1/index", flush=True)

    serve_forever(cfg, on_ready=ready)
    print("stopped: Serve shut down")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {
    "demo": ("end to end on a bundled photo set", add_demo_args, cmd_demo),
    "evaluate": (
        "DISC2021 µAP of a model on a DISC-layout folder",
        add_evaluate_args,
        cmd_evaluate,
    ),
    "embed": ("bulk embedding into Parquet shards (Ray Data)", add_embed_args, cmd_embed),
    "index": ("sharded, versioned FAISS index of an embedding run", add_index_args, cmd_index),
    "train": ("RDCD distillation of a compact student (Ray Train)", add_train_args, cmd_train),
    "serve": ("the copy-detection HTTP endpoint (Ray Serve)", add_serve_args, cmd_serve),
    "match": ("a query set against an index, as DISC2021 predictions", add_match_args, cmd_match),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdcd", description="Image copy detection at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        if name in TORCHSCRIPT_COMMANDS:
            p.add_argument("--trust-torchscript", action="store_true",
                           help="allow a .torchscript.pt teacher: loading one runs its code "
                           "(sets RDCD_TRUST_TORCHSCRIPT=1)")  # fmt: skip
    return parser


# The subcommands that may load a teacher file (--model/--teacher), so may need the opt-in.
TORCHSCRIPT_COMMANDS = ("demo", "evaluate", "embed", "train", "serve", "match")


# Commands that start a local Ray when RAY_ADDRESS is unset.
LOCAL_RAY_COMMANDS = frozenset({"demo", "embed", "index", "serve", "train"})


def _guard_local_ray() -> None:
    """Start the watchdog that ends the local Ray this command is about to start if the command
    is killed (see rdcd.watchdog): without it a SIGKILLed driver leaves Ray's agents running. A
    process that already has Ray (a caller of `main`) keeps its own."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    from rdcd import watchdog

    watchdog.start()


def _user_message(exc: BaseException) -> str:
    """The message of a user error, without the remote traceback Ray prepends when the error was
    raised in a task (a `RayTaskError(StoreError)` is caught as a StoreError, and its text starts
    with ~15 lines of a worker's stack): the user needs the one line that says what to do."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError"):
        return str(cause)
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "trust_torchscript", False):
        # Before any Ray start: local workers inherit it, remote ones get it forwarded.
        os.environ["RDCD_TRUST_TORCHSCRIPT"] = "1"  # rdcd.models.teacher.TRUST_TORCHSCRIPT_ENV
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    dry = getattr(args, "dry_run", False)  # starts no Ray
    if args.command in LOCAL_RAY_COMMANDS and not os.environ.get("RAY_ADDRESS") and not dry:
        _guard_local_ray()
    try:
        return COMMANDS[args.command][2](args)
    except USER_ERRORS as exc:
        print(f"rdcd {args.command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rdcd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
