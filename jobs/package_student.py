"""`python -m jobs.package_student CHECKPOINT [--figures FILE]`: make a trained student the
packaged default (`--model default`): an fp16 copy in rdcd/assets/default_student.pt (at most
10 MB, so it ships inside the wheel) and default_student.json with its recipe and figures."""

import argparse
import json
import os
import sys

from rdcd import io as rio
from rdcd.models.checkpoint import parse_checkpoint, save_checkpoint
from rdcd.models.resolve import default_student_path

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rdcd", "assets")
LIMIT = 10 * 1024 * 1024


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="student.pt of a finished run (its run.json is read too)")
    p.add_argument("--figures", help="JSON of evaluation figures to ship beside the weights")
    args = p.parse_args(argv)
    model, source_fp, meta = parse_checkpoint(rio.read_bytes(args.checkpoint), args.checkpoint)
    os.makedirs(ASSETS, exist_ok=True)
    target = os.path.join(ASSETS, "default_student.pt")
    fp = save_checkpoint(model, target, half=True, meta={**meta, "source": source_fp})
    size = os.path.getsize(target)
    if size > LIMIT:
        os.remove(target)
        print(f"refused: {size / 1e6:.1f} MB in fp16 is over the 10 MB limit", file=sys.stderr)
        return 2
    run_json = os.path.join(os.path.dirname(args.checkpoint), "run.json")
    run = json.loads(rio.read_text(run_json)) if rio.exists(run_json) else {}
    recipe = run.get("config")
    # the run's data, steps, wall time and hardware travel with the weights (not its history)
    made = {k: v for k, v in run.items() if k not in ("config", "history", "outputs")} or None
    figures = json.loads(rio.read_text(args.figures)) if args.figures else None
    info = {"fingerprint": fp, "source_fingerprint": source_fp, "config": model.config.to_dict(),
            "bytes": size, "recipe": recipe, "run": made, "figures": figures}  # fmt: skip
    rio.write_text(os.path.join(ASSETS, "default_student.json"), json.dumps(info, indent=2))
    print(f"packaged {args.checkpoint} -> {default_student_path()} ({size / 1e6:.1f} MB fp16, "
          f"fingerprint {fp[:12]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
