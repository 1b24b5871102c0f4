"""`python -m jobs.evaluate ...` runs `rdcd evaluate ...` (for `ray job submit`)."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
