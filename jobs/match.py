"""`python -m jobs.match ...` runs `rdcd match ...` (for `ray job submit`): embed a query set with
Ray Data, search a published index, write DISC2021 predictions."""

import sys

from rdcd.cli import main

if __name__ == "__main__":
    sys.exit(main(["match", *sys.argv[1:]]))
