"""Student descriptor, self-describing checkpoints, SSCD teacher loaders, `--model` resolution."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rdcd.models import ModelError, load_model
from rdcd.models.checkpoint import load_student, parse_checkpoint, save_checkpoint
from rdcd.models.resolve import TEACHER_ENV, resolve_teacher_uri
from rdcd.models.student import StudentConfig, StudentNet
from rdcd.models.teacher import TRUST_TORCHSCRIPT_ENV, SSCDResNet50, load_teacher


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def student() -> StudentNet:
    torch.manual_seed(0)
    return StudentNet(StudentConfig(dim=64, image_size=96)).eval()


def test_student_shapes_and_norm(student):
    x = torch.randn(2, 3, 96, 96)
    h, z = student.forward_features(x)
    assert h.shape == (2, 512) and z.shape == (2, 64)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(student(x), z)


@pytest.mark.parametrize("backbone,dim", [("resnet18", 128), ("mobilenetv3_small_050", 256)])
def test_any_timm_backbone(backbone, dim):
    net = StudentNet(StudentConfig(backbone=backbone, dim=dim)).eval()
    h, z = net.forward_features(torch.randn(1, 3, 64, 64))
    assert h.shape == (1, 512) and z.shape == (1, dim)


def test_checkpoint_round_trip(student, tmp_path):
    path = str(tmp_path / "s.pt")
    fp = save_checkpoint(student, path, meta={"steps": 3})
    emb = load_student(path, device="cpu")
    assert emb.fingerprint == fp and emb.dim == 64 and emb.image_size == 96
    imgs = _images(3, 96)
    direct = TorchRef(student).embed(imgs)
    assert np.allclose(emb.embed(imgs), direct, atol=1e-5)
    # saving the same weights again gives the same fingerprint; reloading keeps it
    assert save_checkpoint(student, str(tmp_path / "again.pt")) == fp
    model, fp2, meta = parse_checkpoint(open(path, "rb").read())
    assert fp2 == fp and meta == {"steps": 3}


def test_fingerprint_tracks_weights_and_preprocessing(student, tmp_path):
    fp = save_checkpoint(student, str(tmp_path / "a.pt"))
    other = StudentNet(StudentConfig(dim=64, image_size=96))
    other.load_state_dict(student.state_dict())
    other.config = StudentConfig(dim=64, image_size=128)  # same weights, other preprocessing
    assert save_checkpoint(other, str(tmp_path / "b.pt")) != fp
    with torch.no_grad():
        other.head.bias[0] += 1e-3
    other.config = student.config
    assert save_checkpoint(other, str(tmp_path / "c.pt")) != fp


def test_half_precision_checkpoint(student, tmp_path):
    full, half = str(tmp_path / "f.pt"), str(tmp_path / "h.pt")
    save_checkpoint(student, full)
    save_checkpoint(student, half, half=True)
    assert (tmp_path / "h.pt").stat().st_size < 0.6 * (tmp_path / "f.pt").stat().st_size
    imgs = _images(2, 96)
    a, b = load_student(full, "cpu").embed(imgs), load_student(half, "cpu").embed(imgs)
    assert np.all((a * b).sum(1) > 0.999)


def test_tampered_and_corrupt_checkpoints(student, tmp_path):
    path = tmp_path / "s.pt"
    save_checkpoint(student, str(path))
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] = payload["state_dict"]["head.bias"] + 1
    torch.save(payload, tmp_path / "tampered.pt")
    with pytest.raises(ModelError, match="fingerprint mismatch"):
        load_student(str(tmp_path / "tampered.pt"))
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelError, match="not a loadable"):
        load_student(str(tmp_path / "trunc.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not an rdcd student checkpoint"):
        load_student(str(tmp_path / "other.pt"))
    with pytest.raises(ModelError, match="cannot load model"):
        load_student(str(tmp_path / "missing.pt"))


def _forge(path, out, **config) -> str:
    """What a hostile file does: rewrite config fields and recompute the fingerprint to match, so
    only the bounds on the config, not the fingerprint check, stand between it and the loader."""
    from rdcd.models.checkpoint import fingerprint_of

    payload = torch.load(path, weights_only=True)
    payload["config"].update(config)
    forged = StudentConfig(**{**payload["config"], "mean": tuple(payload["config"]["mean"]),
                              "std": tuple(payload["config"]["std"])})  # fmt: skip
    payload["fingerprint"] = fingerprint_of(payload["state_dict"], forged)
    torch.save(payload, out)
    return str(out)


@pytest.mark.parametrize(
    "field,value",
    [("image_size", 20000), ("image_size", 8), ("gem_p", 1e6), ("std", [0.0, 0.0, 0.0]),
     ("mean", [50.0, 0.5, 0.5]), ("backbone", "local-dir:/nonexistent")],
)  # fmt: skip
def test_checkpoint_config_out_of_bounds_is_refused(tmp_path, field, value):
    """The fingerprint covers the config, but whoever edits the file recomputes it: a checkpoint
    claiming image_size=20000 loaded and sized every decode and input tensor by it."""
    from conftest import make_tiny_student

    path = make_tiny_student(tmp_path / "tiny.pt")
    assert load_student(path).image_size == 64
    forged = _forge(path, tmp_path / "forged.pt", **{field: value})
    with pytest.raises(ModelError, match=f"forged.pt: refused checkpoint config: {field}"):
        load_student(forged)
    with pytest.raises(ModelError, match=field):
        load_model(forged)
    naive = tmp_path / "naive.pt"  # an edit without a new fingerprint: refused by the bound too
    payload = torch.load(path, weights_only=True)
    payload["config"][field] = value
    torch.save(payload, naive)
    with pytest.raises(ModelError, match=f"naive.pt: refused checkpoint config: {field}"):
        load_student(str(naive))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path, capsys):
    torch.save({"format": "rdcd-student-v1", "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="not a loadable"):
        load_student(str(tmp_path / "evil.pt"))
    assert "must never run" not in capsys.readouterr().out


class TorchRef:
    """The student applied by hand: what an embedder must reproduce."""

    def __init__(self, net: StudentNet):
        self.net = net

    def embed(self, imgs: np.ndarray) -> np.ndarray:
        cfg = self.net.config
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
        with torch.no_grad():
            return self.net(x).numpy()


@pytest.fixture(scope="module")
def sscd_files(tmp_path_factory):
    """Randomly initialised files in Meta's two SSCD formats (the real ones are not reachable)."""
    d = tmp_path_factory.mktemp("sscd")
    torch.manual_seed(1)
    model = SSCDResNet50().eval()
    tv = d / "sscd_disc_mixup.torchvision.pt"
    torch.save(model.state_dict(), tv)
    ts = d / "sscd_disc_mixup.torchscript.pt"
    torch.jit.trace(model, torch.zeros(1, 3, 64, 64)).save(str(ts))
    return model, str(tv), str(ts)


def test_sscd_state_dict_keys_match_meta_layout(sscd_files):
    model, _, _ = sscd_files
    keys = set(model.state_dict())
    assert "backbone.fc.weight" in keys and "backbone.conv1.weight" in keys
    assert model.state_dict()["backbone.fc.weight"].shape == (512, 2048)


def test_sscd_torchvision_and_torchscript_agree(sscd_files, monkeypatch):
    model, tv, ts = sscd_files
    monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, "1")  # a file this test wrote
    a, b = load_teacher(tv, device="cpu"), load_teacher(ts, device="cpu")
    assert a.dim == b.dim == 512 and a.image_size == 288
    imgs = _images(2, 288, seed=3)
    ea, eb = a.embed(imgs), b.embed(imgs)
    assert np.allclose(np.linalg.norm(ea, axis=1), 1, atol=1e-5)
    assert np.allclose(ea, eb, atol=1e-4)
    assert a.fingerprint != b.fingerprint  # different files, different prints


def test_sscd_state_dict_variants(sscd_files, tmp_path, monkeypatch):
    model, tv, _ = sscd_files
    plain = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in plain.items()}}, tmp_path / "w.pt")
    imgs = _images(1, 288)
    assert np.allclose(
        load_teacher(str(tmp_path / "w.pt"), "cpu").embed(imgs),
        load_teacher(tv, "cpu").embed(imgs),
        atol=1e-5,
    )
    torch.save({"fc.weight": torch.zeros(10, 512)}, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="ResNet-50"):
        load_teacher(str(tmp_path / "bad.pt"))
    (tmp_path / "junk.torchscript.pt").write_bytes(b"not a zip")
    monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, "1")  # past the opt-in, to the archive check
    with pytest.raises(ModelError, match="not a TorchScript archive"):
        load_teacher(str(tmp_path / "junk.torchscript.pt"))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="ONNX"):
        load_teacher(str(tmp_path / "junk.onnx"))


def test_teacher_resolution_order(sscd_files, monkeypatch):
    _, tv, ts = sscd_files
    monkeypatch.setenv(TEACHER_ENV, ts)
    monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, "1")
    assert resolve_teacher_uri(tv) == tv  # explicit flag first
    assert resolve_teacher_uri(None) == ts  # then the environment
    assert load_model("sscd", device="cpu").name == "sscd-torchscript"
    assert load_model(tv, device="cpu").name == "sscd-torchvision"  # a teacher file as M
    monkeypatch.delenv(TEACHER_ENV)
    monkeypatch.setattr("rdcd.models.resolve.installed_onnx_teacher", lambda: None)
    with pytest.raises(ModelError, match="no SSCD teacher found"):
        load_model("sscd")


def test_torchscript_teacher_needs_an_opt_in(sscd_files, monkeypatch):
    """torch.jit.load runs the program in the file; without RDCD_TRUST_TORCHSCRIPT=1 (or
    --trust-torchscript) it is never called, and the refusal says why and how to opt in."""
    _, tv, ts = sscd_files
    real_load = torch.jit.load
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", spy)
    for value in (None, "0", "", "no"):
        if value is None:
            monkeypatch.delenv(TRUST_TORCHSCRIPT_ENV, raising=False)
        else:
            monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, value)
        for load in (lambda: load_teacher(ts, "cpu"), lambda: load_model(ts, device="cpu")):
            with pytest.raises(ModelError, match="runs the code") as refused:
                load()
            assert TRUST_TORCHSCRIPT_ENV in str(refused.value)
            assert "--trust-torchscript" in str(refused.value) and ts in str(refused.value)
        monkeypatch.setenv(TEACHER_ENV, ts)
        with pytest.raises(ModelError, match="TorchScript file without an opt-in"):
            load_model("sscd", device="cpu")
        monkeypatch.delenv(TEACHER_ENV)
    assert calls == []  # refused before torch.jit.load ever saw the bytes
    assert load_teacher(tv, "cpu").name == "sscd-torchvision"  # a state dict needs no opt-in
    monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, "1")
    teacher = load_teacher(ts, "cpu")
    assert teacher.name == "sscd-torchscript" and teacher.dim == 512 and len(calls) == 1


def test_trust_torchscript_flag_sets_the_opt_in(monkeypatch, capsys):
    """`--trust-torchscript` on every subcommand that loads a model sets the variable that the
    loader (and, forwarded, every Ray worker) reads."""
    from rdcd import cli

    monkeypatch.setenv(TRUST_TORCHSCRIPT_ENV, "0")  # restored after the test
    seen = []
    help_text, add_args, _ = cli.COMMANDS["evaluate"]
    stub = (help_text, add_args, lambda args: seen.append(os.environ[TRUST_TORCHSCRIPT_ENV]) or 0)
    monkeypatch.setitem(cli.COMMANDS, "evaluate", stub)
    assert cli.main(["evaluate", "--model", "x.torchscript.pt"]) == 0
    assert cli.main(["evaluate", "--model", "x.torchscript.pt", "--trust-torchscript"]) == 0
    assert seen == ["0", "1"]
    for name in cli.TORCHSCRIPT_COMMANDS:
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([name, "--help"])
        assert "--trust-torchscript" in capsys.readouterr().out, name


def test_student_as_model_spec(student, tmp_path):
    path = str(tmp_path / "student.pt")
    fp = save_checkpoint(student, path)
    m = load_model(path, device="cpu")
    assert m.fingerprint == fp and m.name == "student:efficientnet_b0/64"


def test_descriptor_whitening_is_part_of_the_model_and_its_fingerprint(student, tmp_path):
    """`StudentNet.whiten` makes the descriptor the numpy `Whitening` of the head's output; it is
    saved with the weights (so the fingerprint changes), and a checkpoint written before the
    whitening existed loads as the identity with its own fingerprint."""
    from rdcd.search import Whitening

    net = StudentNet(StudentConfig(dim=64, image_size=96)).eval()
    net.load_state_dict(student.state_dict())
    assert not net.is_whitened
    x = torch.randn(80, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net(x).numpy()
    white = Whitening.fit(plain, power=0.25)
    net.whiten(torch.from_numpy(white.mean), torch.from_numpy(white.projection))
    assert net.is_whitened
    with torch.no_grad():
        whitened = net(x).numpy()
    assert (whitened * white.apply(plain)).sum(1).min() > 0.999  # float32, low-variance axes
    assert (whitened * plain).sum(1).mean() < 0.99
    fp_plain = save_checkpoint(student, str(tmp_path / "plain.pt"))
    fp_white = save_checkpoint(net, str(tmp_path / "white.pt"))
    assert fp_white != fp_plain
    emb = load_student(str(tmp_path / "white.pt"), "cpu")
    assert emb.fingerprint == fp_white and emb.module.is_whitened
    imgs = _images(3, 96)
    assert (emb.embed(imgs) * TorchRef(net).embed(imgs)).sum(1).min() > 0.9999
    with pytest.raises(ValueError, match="64-d descriptor"):
        net.whiten(torch.zeros(32), torch.eye(32))
    net.clear_whitening()
    assert not net.is_whitened
    # a file without the whitening buffers (as every checkpoint before them)
    data = torch.load(str(tmp_path / "plain.pt"), weights_only=True)
    for key in ("white_mean", "white_proj"):
        del data["state_dict"][key]
    from rdcd.models.checkpoint import fingerprint_of

    data["fingerprint"] = fingerprint_of(data["state_dict"], student.config)
    torch.save(data, str(tmp_path / "old.pt"))
    old = load_student(str(tmp_path / "old.pt"), "cpu")
    assert old.fingerprint == data["fingerprint"] and not old.module.is_whitened
    np.testing.assert_allclose(old.embed(imgs), TorchRef(student).embed(imgs), atol=1e-5)
