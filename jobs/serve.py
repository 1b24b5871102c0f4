"""`python -m jobs.serve ...` runs `rdcd serve ...` (for `ray job submit`), and
`jobs.serve:app_builder` is the import path of Serve config files (`serve deploy
cluster/serve.yaml`) and of `serve run jobs.serve:app_builder index=URI model=M`: all three build
the application with the same typed builder, `rdcd.serve.app_builder`."""

import sys

from rdcd.cli import main
from rdcd.serve import ServeArgs, app_builder

__all__ = ["ServeArgs", "app_builder"]

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
