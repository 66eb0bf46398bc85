"""`rankops eval` that dies like a SIGKILL right after a checkpoint, for the resume tests.

    python tests/kill_after_checkpoint.py N eval ARGS...

runs `rankops eval ARGS...` and, as soon as this process has written a checkpoint holding N or
more of its batches, exits at once with status 137 (os._exit: no cleanup, no further writes),
through evaluate's on_checkpoint callback.
"""
import os
import sys

from rankops.cli import build_parser
from rankops.cli import eval as eval_command


def main(argv) -> int:
    n_batches = int(argv[0])

    def die(written):
        if written.batches_done >= n_batches:
            os._exit(137)

    return eval_command.run(build_parser().parse_args(argv[1:]), on_checkpoint=die)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
