"""What one upload costs the embedder to decode, by format and pixel count (figures, no asserts).

Each case runs `load_for_model(data, size)` with every limit lifted in a fresh subprocess and
reports the wall time and the peak resident memory it added (Linux `VmHWM`, reset just before the
decode, minus `VmRSS` then), for a flat image (what an attacker uploads: under 1 MB for 64 MP)
and for photo content (what a user uploads). PNG is always decoded in full; JPEG (baseline and
progressive) goes through PIL's reduced-DCT `draft` mode. These are the figures behind
`rdcd.decode.DEFAULT_DECODE_BUDGET_PIXELS`.

    python benchmarks/decode_budget.py [--sizes 4,8,16,24,36,64] [--image-size 288]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
from rdcd.decode import DecodeConfig, load_for_model
data = open(sys.argv[1], "rb").read()
size = int(sys.argv[2])
# No limits: this measures what a decode costs, not what rdcd allows.
known = DecodeConfig.__dataclass_fields__
config = DecodeConfig(**{k: v for k, v in {"max_pixels": 10**9, "max_bytes": 2**31,
                         "decode_budget_pixels": 10**9, "decode_budget_per_input": 10**6}.items()
                         if k in known})

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to now: imports must not hide the decode's peak
before = status_kb("VmRSS")
t0 = time.perf_counter()
load_for_model(data, size, config)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "mb": (status_kb("VmHWM") - before) / 1024}))
"""


def _make(fmt: str, content: str, megapixels: float) -> bytes:
    from PIL import Image

    side = int(math.sqrt(megapixels * 1e6))
    if content == "flat":
        img = Image.new("RGB", (side, side), (200, 30, 30))
    else:  # a photo upscaled: smooth regions and edges, compresses like a real photo
        import skimage.data

        img = Image.fromarray(skimage.data.astronaut()).resize((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG", compress_level=1 if content == "flat" else 6)
    else:
        img.save(buf, "JPEG", quality=90, progressive=fmt == "JPEG-progressive")
    return buf.getvalue()


def _measure(data: bytes, size: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".img", delete=False) as f:
        f.write(data)
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, f.name, str(size)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4,8,16,24,36,64", help="megapixels, comma-separated")
    ap.add_argument("--image-size", type=int, default=288)
    ap.add_argument("--contents", default="flat,photo")
    args = ap.parse_args()
    print(f"{'format':16} {'content':7} {'MP':>4} {'file KB':>9} {'decode s':>9} {'+peak MB':>9}")
    for content in args.contents.split(","):
        for fmt in ("PNG", "JPEG", "JPEG-progressive"):
            for mp in (float(s) for s in args.sizes.split(",")):
                data = _make(fmt, content, mp)
                r = _measure(data, args.image_size)
                print(f"{fmt:16} {content:7} {mp:4.0f} {len(data) / 1024:9.0f} {r['s']:9.3f} "
                      f"{r['mb']:9.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
