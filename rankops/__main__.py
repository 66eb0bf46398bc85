"""python -m rankops: with no arguments, check this installation against the known-answer case
(rankops.testing.selfcheck); with arguments, the rankops command line (rankops.cli)."""
import sys

from rankops.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["selfcheck"]))
