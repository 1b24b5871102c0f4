"""`python -m jobs.train ...` runs `rdcd train ...` (for `ray job submit`)."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
