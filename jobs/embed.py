"""`python -m jobs.embed ...` runs `rdcd embed ...` (for `ray job submit`)."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
