"""The HTML report: its figures from real photos, the outcome of each query, and the page opened
in headless Chromium (screenshot, every image loaded, no console errors). The browser tests skip
where no Chromium is installed (`.ci/run` installs Debian's `chromium`)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdcd.demo import bundled_photos
from rdcd.edits import random_copy
from rdcd.metrics import GroundTruth, Match
from rdcd.report import (
    GalleryItem,
    ReportData,
    gallery_order,
    operating_point,
    write_report,
)

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    """A report of real photos: five references, a copy of each (one missed, one matched to the
    wrong reference), two unrelated photos (one wrongly flagged), with training history."""
    tmp = tmp_path_factory.mktemp("report")
    photos = sorted(bundled_photos())[:7]
    rng = random.Random(3)
    refs, items, preds, gt_rows = [], [], [], []
    for i, src in enumerate(photos):
        img = Image.open(src).convert("RGB")
        if i < 5:
            ref = tmp / f"R{i:06d}.jpg"
            img.save(ref)
            refs.append(str(ref))
        q = tmp / f"Q{i:05d}.jpg"
        random_copy(img, rng)[0].save(q)
        expected = f"R{i:06d}" if i < 5 else None
        gt_rows.append((f"Q{i:05d}", expected))
        match = {0: 0, 1: 1, 2: 3, 3: 3, 4: 4, 5: 0, 6: 2}[i]  # query 2 -> wrong reference
        score = {0: 0.71, 1: 0.08, 2: 0.41, 3: 0.66, 4: 0.52, 5: 0.33, 6: 0.02}[i]
        items.append(GalleryItem(f"Q{i:05d}", str(q), expected, refs[i] if i < 5 else None,
                                 f"R{match:06d}", str(tmp / f"R{match:06d}.jpg"), score,
                                 score + 0.2, score >= 0.3))  # fmt: skip
        preds.append(Match(f"Q{i:05d}", f"R{match:06d}", score))
    items.append(GalleryItem("Q99999", str(tmp / "missing.jpg"), error="HTTP 415: not an image"))
    gt = GroundTruth.from_rows(gt_rows)
    history = [{"step": s, "loss": 3 - 0.1 * s, "loss_con": 2 - 0.05 * s,
                "loss_rel": 1 - 0.05 * s, "agreement": 0.1 * s} for s in range(1, 9)]  # fmt: skip
    data = ReportData(
        title="test report",
        headline="Found 3 of 5 copies.",
        metrics={"µAP": 0.6123, "µAP (score-normalised)": 0.5871, "copies found": "3 of 5"},
        predictions=preds,
        ground_truth=gt,
        threshold=0.3,
        gallery=items,
        models=[{"model": "student", "µAP": 0.6123, "served": "yes"}],
        stages=[("embed", 12.3, "Ray Data")],
        history=history,
        notes=["a <note> with markup"],
        facts=[("photos", "bundled")],
    )
    page = write_report(data, str(tmp / "out"))
    assert page == str(tmp / "out" / "report.html")
    return tmp / "out"


def test_outcome_of_each_query():
    base = dict(query_id="q", query_uri="q.jpg")
    assert GalleryItem(**base, expected_id="r1", match_id="r1", is_copy=True).status == "found"
    assert GalleryItem(**base, expected_id="r1", match_id="r1").status == "missed"
    assert GalleryItem(**base, expected_id="r1", match_id="r2").status == "missed"
    assert (
        GalleryItem(**base, expected_id="r1", match_id="r2", is_copy=True).status == "wrong match"
    )
    assert GalleryItem(**base, match_id="r2", is_copy=True).status == "false positive"
    assert GalleryItem(**base, match_id="r2").status == "rejected"
    assert GalleryItem(**base, error="HTTP 415").status == "error"


def test_gallery_puts_mistakes_first_and_caps():
    hits = [GalleryItem(f"h{i}", "x", "r", match_id="r", is_copy=True) for i in range(50)]
    fps = [GalleryItem(f"f{i}", "x", match_id="r", is_copy=True) for i in range(15)]
    shown = gallery_order(hits + fps, limit=20)
    assert len(shown) == 20
    assert [i.status for i in shown[:15]] == ["false positive"] * 15
    assert all(i.status == "found" for i in shown[15:])


def test_operating_point_by_hand():
    gt = GroundTruth.from_rows([("q1", "a"), ("q2", "b"), ("q3", None)])
    preds = [Match("q1", "a", 0.9), Match("q3", "a", 0.5), Match("q2", "b", 0.4)]
    # threshold 0.45 keeps q1-a (right) and q3-a (wrong): precision 1/2, recall 1/2
    assert operating_point(preds, gt, 0.45) == (0.5, 0.5, 2)
    assert operating_point(preds, gt, 0.3) == (pytest.approx(2 / 3), 1.0, 3)
    assert operating_point(preds, gt, 0.95) == (1.0, 0.0, 0)


def test_report_files_and_content(report_dir):
    page = (report_dir / "report.html").read_text()
    for name in ("precision_recall.png", "scores.png", "gallery-1.png", "training.png"):
        with Image.open(report_dir / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
        assert f'src="{name}"' in page
    # the metrics as printed (4 decimals), the outcome counts, escaped text, no scripts
    assert "0.6123" in page and "0.5871" in page and "3 of 5" in page
    assert "wrong match: 1" in page and "false positive: 1" in page and "missed: 1" in page
    assert "found: 3" in page and "rejected: 1" in page and "error: 1" in page
    assert "a &lt;note&gt; with markup" in page and "<note>" not in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    # the operating point at 0.3 flags Q0 (right), Q2 (wrong), Q3, Q4 (right), Q5 (unrelated)
    assert "precision 0.6000, recall 0.6000 over 5 flagged pairs" in page


def test_gallery_pages_without_history(tmp_path):
    photo = sorted(bundled_photos())[0]
    items = [GalleryItem(f"Q{i:03d}", photo, "R1", photo, "R1", photo, 0.5, 0.6, True)
             for i in range(45)]  # fmt: skip
    data = ReportData("t", "h", {"µAP": 1.0}, [Match(f"Q{i:03d}", "R1", 0.5) for i in range(45)],
                      GroundTruth.from_rows([(f"Q{i:03d}", "R1") for i in range(45)]), 0.3,
                      items)  # fmt: skip
    write_report(data, str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("gallery-*.png")) == [
        "gallery-1.png", "gallery-2.png", "gallery-3.png"
    ]  # fmt: skip
    assert not (tmp_path / "training.png").exists()
    assert "No fine-tune ran" in (tmp_path / "report.html").read_text()


# ---- in a real browser ------------------------------------------------------------------------

_PROBE = """
<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', bad.join(','));
});
</script>
"""


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--enable-logging=stderr", "--v=0", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _loaded_images(browser: str, folder: Path) -> tuple[int, list[str]]:
    """Open a copy of the page with a probe appended (the report itself has no scripts) and
    read back how many images it shows and which did not load."""
    probe = folder / "_probe.html"
    probe.write_text((folder / "report.html").read_text().replace("</body>", _PROBE + "</body>"))
    done = _chromium(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    probe.unlink()
    m = re.search(r'<body[^>]*data-images="(\d+)"[^>]*data-broken="([^"]*)"', done.stdout)
    assert m, f"the probe did not run: {done.stdout[:300]} {done.stderr[-500:]}"
    return int(m.group(1)), [s for s in m.group(2).split(",") if s]


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def test_report_opens_in_headless_chromium(report_dir, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    done = _chromium(browser, "--window-size=1280,2400", f"--screenshot={shot}",
                     (report_dir / "report.html").as_uri())  # fmt: skip
    assert shot.exists(), done.stderr[-2000:]
    assert _console_errors(done.stderr) == []
    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 20  # not a blank page
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert colours > 500  # photos and plots rendered, not only text on white
    count, broken = _loaded_images(browser, report_dir)
    assert count == 4 and broken == []


def test_broken_report_is_detected_in_the_browser(report_dir, tmp_path):
    """The browser check can fail: a page whose PNG is missing is caught."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    damaged = tmp_path / "damaged"
    shutil.copytree(report_dir, damaged)
    (damaged / "scores.png").unlink()
    count, broken = _loaded_images(browser, damaged)
    assert count == 4 and broken == ["scores.png"]
