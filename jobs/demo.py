"""`python -m jobs.demo ...` runs `rdcd demo ...` (for `ray job submit`)."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
