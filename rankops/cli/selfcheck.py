"""`rankops selfcheck` (and `python -m rankops` without arguments): this installation against
the known-answer case, per backend (rankops.testing.selfcheck)."""


def add_parser(sub) -> None:
    sub.add_parser("selfcheck", help="check the installation against the known-answer case")


def run(args) -> int:
    from rankops.testing import selfcheck
    return 0 if selfcheck() else 1
