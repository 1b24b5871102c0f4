"""`python -m jobs.build_index ...` runs `rdcd index ...` (for `ray job submit`)."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
