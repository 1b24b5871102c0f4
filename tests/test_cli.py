"""The command line answers --help and refuses bad arguments without loading PyTorch first."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "ray", "faiss")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return set(out.stdout.split())


def test_cli_module_imports_no_heavy_package():
    loaded = _modules_after("import rdcd.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


@pytest.mark.parametrize("job", ["embed", "build_index", "match", "train", "evaluate"])
def test_job_help_and_bad_arguments_stay_light(job):
    code = (
        f"import runpy, sys\nsys.argv = ['jobs.{job}', '--no-such-flag']\n"
        f"try:\n    runpy.run_module('jobs.{job}', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 2, e.code\n"
        "else:\n    raise AssertionError('a bad flag was accepted')\n"
    )
    loaded = _modules_after(code)
    assert not loaded & {"torch", "timm"}, sorted(loaded & set(HEAVY))
