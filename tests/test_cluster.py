"""The operator's files in cluster/ name only entry points and flags that exist.

Every command found in them -- RayJob entrypoints, the launcher's `ray start` and setup commands,
the `ray job submit` lines of cluster/README.md -- is parsed by the parser that will run it:
rdcd's own argparse for `python -m jobs.<name>`, Ray's CLI for `ray start` and `ray job submit`.
Serve configs are validated by Ray Serve's schema and rdcd's ServeConfig, the launcher config by
the launcher's schema, runtime envs by Ray's RuntimeEnv. Nothing here needs a cluster.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rdcd.cli import build_parser, load_distill_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/rdcd/"  # where cluster/Dockerfile puts the checkout
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
RAYJOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "entrypointNumCpus", "entrypointNumGpus",
                 "entrypointResources", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                 "submissionMode", "rayClusterSpec", "suspend", "jobId"}  # fmt: skip
RAYSERVICE_FIELDS = {"serveConfigV2", "rayClusterConfig"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def job_subcommands() -> dict[str, str]:
    """`jobs.<module>` -> the rdcd subcommand it runs, read from the module itself."""
    found = {}
    for path in (REPO / "jobs").glob("*.py"):
        m = re.search(r'main\(\["(\w+)"', path.read_text())
        if m:
            found[f"jobs.{path.stem}"] = m.group(1)
    return found


def check_job_command(argv: list[str], root: str = "") -> object:
    """Fail unless `argv` is `python -m jobs.<name> FLAGS` with a real module and flags its rdcd
    subcommand accepts; returns the parsed namespace. `root` is the prefix that stands for this
    checkout in file arguments (the image's copy for KubeRay)."""
    assert argv[:2] == ["python", "-m"], f"not `python -m jobs.<name>`: {argv}"
    module, flags = argv[2], argv[3:]
    commands = job_subcommands()
    assert module in commands, f"{module} is not an entry point (known: {sorted(commands)})"
    parser = build_parser()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args([commands[module], *flags])
        except SystemExit:
            pytest.fail(f"`{shlex.join(argv)}` is refused: {err.getvalue().strip()}")
    # Whole flag names only: argparse would also take a unique prefix (--task-cpu), which breaks
    # the day another flag shares it.
    sub = next(a for a in parser._actions if a.dest == "command").choices[commands[module]]
    known = {o for action in sub._actions for o in action.option_strings}
    for flag in flags:
        if flag.startswith("--"):
            assert flag.split("=")[0] in known, f"{module}: {flag} is not a flag of its own"
    if args.command == "train":
        if args.config:  # the file exists in this checkout, and its keys are settings
            local = REPO / args.config.removeprefix(root) if root else REPO / args.config
            assert local.is_file(), f"--config {args.config}: no {local}"
            args.config = str(local)
        load_distill_config(args)
    if args.command == "embed":
        from rdcd.embed import EmbedJobConfig, plan_actors

        cfg = EmbedJobConfig(images=args.images, out=args.out, shard_size=args.shard_size,
                             batch_size=args.batch_size, actors=args.actors,
                             cpus_per_actor=args.cpus_per_actor,
                             gpus_per_actor=args.gpus_per_actor,
                             precision=args.precision)  # fmt: skip
        cfg.validate()
        if args.gpus_per_actor:  # a cluster whose GPU workers scale from zero
            assert plan_actors(cfg, cpus=0, gpus=0).device == "cuda"
    return args


def check_ray_start(command: str) -> None:
    """`ulimit ...; ray start FLAGS` (or `ray stop`) as the launcher runs it on a node."""
    from ray.scripts.scripts import start

    for part in command.split(";"):
        argv = shlex.split(part)
        if argv[:2] == ["ray", "start"]:
            start.make_context("start", argv[2:])  # raises on unknown flags or bad values
        else:
            assert argv[0] in ("ulimit", "ray"), part


def check_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from rdcd import serve as rserve

    schema = ServeDeploySchema.model_validate(config)
    names = {d.name for d in (rserve.Ingress, rserve.Embedder, rserve.Searcher)}
    live = {"Ingress": set(rserve.INGRESS_SETTINGS), "Embedder": set(rserve.EMBEDDER_SETTINGS)}
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert module in job_subcommands() or module == "rdcd.serve", app.import_path
        # `jobs` is a folder of the checkout, not an installed package
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        assert callable(getattr(importlib.import_module(module), attr)), app.import_path
        rserve.ServeArgs.model_validate(app.args)  # unknown keys are refused
        rserve.ServeConfig.from_dict(app.args).validate()
        for deployment in app.deployments:
            assert deployment.name in names, deployment.name
            user_config = deployment.user_config or {}
            assert set(user_config) <= live.get(deployment.name, set()), deployment.name


# ---- the checkers catch what they are for ----------------------------------------------------


def test_checkers_refuse_unknown_flags_modules_and_settings():
    ok = ["python", "-m", "jobs.embed", "--images", "s3://b/i/", "--out", "s3://b/o"]
    check_job_command(ok)
    with pytest.raises(pytest.fail.Exception, match="no-such-flag"):
        check_job_command([*ok, "--no-such-flag"])
    with pytest.raises(AssertionError, match="not an entry point"):
        check_job_command(["python", "-m", "jobs.no_such_job", "--out", "x"])
    with pytest.raises(pytest.fail.Exception, match="invalid choice"):
        check_job_command([*ok, "--precision", "int4"])
    with pytest.raises(AssertionError, match="--shard-siz "):
        check_job_command([*ok, "--shard-siz", "100"])  # argparse takes the prefix; we do not
    with pytest.raises(ValueError, match="no_such_setting"):
        check_job_command(["python", "-m", "jobs.train", "--set", "no_such_setting=1"])
    with pytest.raises(Exception, match="bogus"):
        check_ray_start("ray start --head --bogus")
    app = {"applications": [{"name": "x", "import_path": "jobs.serve:app_builder",
                              "args": {"index": "s3://b/i", "no_such_setting": 1}}]}  # fmt: skip
    with pytest.raises(Exception, match="no_such_setting"):
        check_serve_config(app)
    assert job_subcommands()["jobs.build_index"] == "index"


# ---- the shared runtime env -------------------------------------------------------------------


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    env = _load(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "."  # this checkout, submitted from the repository root
    assert {".venv", ".git", "runs"} <= set(env["excludes"])


# ---- the cluster launcher ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(CLUSTER / "aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` checks first
    return config


def test_launcher_node_types(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers only: a lost worker never costs a task here
    assert "InstanceMarketOptions" not in head["node_config"]  # the head is on demand
    for name in ("gpu_worker", "cpu_worker"):
        node = types[name]
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert node["min_workers"] == 0 and node["max_workers"] > 0
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4", "p5"))
    for node in types.values():  # S3 through instance profiles
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_launcher_commands_parse(launcher):
    for command in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]:
        check_ray_start(command)
    assert any("--head" in c for c in launcher["head_start_ray_commands"])
    for command in launcher["setup_commands"]:  # runs in the image; here, in this venv
        argv = shlex.split(command)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              timeout=120, cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_credentials_in_cluster_files():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]")
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text()), path


def test_one_image_and_one_ray_version_everywhere(launcher):
    import ray

    pins = (REPO / "constraints.txt").read_text()
    assert f"ray=={ray.__version__}" in pins
    base = re.search(r"^FROM rayproject/ray:(\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and base.group(1).startswith(f"{ray.__version__}-py311")
    image = launcher["docker"]["image"]
    for path in KUBERAY:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc.get("spec", {})
            cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
            if cluster is None:
                continue
            assert cluster["rayVersion"] == ray.__version__, path
            for pod in _pod_templates(cluster):
                for container in pod["spec"]["containers"]:
                    assert container["image"] == image, path


# ---- the commands of cluster/README.md ----------------------------------------------------------


def _readme_commands() -> list[str]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [ln.split("#")[0].strip().rstrip("&").strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln]


def test_readme_job_submissions_parse():
    from ray.dashboard.modules.job.cli import job_cli_group

    submitted = set()
    for line in _readme_commands():
        argv = shlex.split(line)
        if argv[:3] == ["ray", "job", "submit"]:
            ctx = job_cli_group.commands["submit"].make_context("submit", argv[3:])
            runtime_env = ctx.params["runtime_env"]
            assert runtime_env and (REPO / runtime_env).is_file(), line
            args = check_job_command(list(ctx.params["entrypoint"]))
            submitted.add(args.command)
        elif argv[0] in ("ray", "serve", "kubectl"):
            for arg in argv[1:]:  # every file a command names is in this checkout
                if arg.startswith("cluster/"):
                    assert (REPO / arg).is_file(), line
    assert {"train", "embed", "index", "evaluate"} <= submitted


# ---- KubeRay ------------------------------------------------------------------------------------


def _pod_templates(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]] + [
        g["template"] for g in cluster.get("workerGroupSpecs", [])
    ]


def _check_ray_cluster(cluster: dict, gpu: bool) -> None:
    from ray.scripts.scripts import start

    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values())  # Kubernetes wants strings
        start.make_context("start", [f"--{k}={v}" for k, v in params.items()])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for pod in _pod_templates(cluster):
        assert pod["spec"]["serviceAccountName"] == "rdcd"  # S3 through IRSA, no keys
    workers = cluster["workerGroupSpecs"]
    has_gpu = [
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in workers
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(has_gpu) == gpu
    for g in workers:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


@pytest.mark.parametrize("name", ["train", "embed", "index"])
def test_rayjob(name):
    from ray.runtime_env import RuntimeEnv

    doc = _load(CLUSTER / "kuberay" / f"rayjob-{name}.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_FIELDS, set(spec) - RAYJOB_FIELDS
    args = check_job_command(shlex.split(spec["entrypoint"]), root=IMAGE_ROOT)
    assert args.command == {"train": "train", "embed": "embed", "index": "index"}[name]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**env)
    shared = _load(CLUSTER / "runtime_env.yaml")
    assert env["env_vars"].items() >= shared["env_vars"].items()
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster(spec["rayClusterSpec"], gpu=name != "index")
    if name == "index":  # the driver trains the quantizer: not on the CPU-less head
        assert spec["entrypointNumCpus"] >= 1


def test_rayservice_serve_config():
    doc = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert set(doc["spec"]) <= RAYSERVICE_FIELDS
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    check_serve_config(config)
    assert config["applications"][0]["args"]["embedder_gpus"] == 1  # GPU pods, not autodetected
    _check_ray_cluster(doc["spec"]["rayClusterConfig"], gpu=True)


def test_serve_yaml_deployments_and_live_settings():
    check_serve_config(_load(CLUSTER / "serve.yaml"))


def test_serviceaccount_uses_an_iam_role():
    doc = _load(CLUSTER / "kuberay" / "serviceaccount.yaml")
    assert doc["kind"] == "ServiceAccount" and doc["metadata"]["name"] == "rdcd"
    assert doc["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam")


# ---- the planner accepts a pool the autoscaler has yet to provide (rdcd.embed) -----------------


def test_embed_plan_waits_for_gpu_nodes_the_autoscaler_adds():
    from rdcd.embed import EmbedJobConfig, plan_actors

    cfg = EmbedJobConfig(images="x", out="y", actors=8, gpus_per_actor=1, cpus_per_actor=2)
    plan = plan_actors(cfg, cpus=0, gpus=0)  # a fresh cluster: CPU-less head, no GPU worker yet
    assert (plan.actors, plan.gpus_per_actor, plan.cpus_per_actor, plan.device) == (8, 1, 2, "cuda")
    partial = plan_actors(cfg, cpus=32, gpus=2)  # two GPU nodes up, six to come
    assert partial.actors == 8
    with pytest.raises(ValueError, match="--actors"):  # no pool size: nothing to wait for
        plan_actors(EmbedJobConfig(images="x", out="y", gpus_per_actor=1), cpus=0, gpus=0)
