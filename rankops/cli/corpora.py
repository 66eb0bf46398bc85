"""`rankops corpora`: the built-in corpora, their licenses and how to get them;
`rankops corpora fetch [NAME ...]`: fetch their Debian packages into rankops' cache
(rankops.eval.corpora.debian: no root, no dependencies)."""
import sys


def add_parser(sub) -> None:
    c = sub.add_parser("corpora", help="list the built-in corpora; `rankops corpora fetch` gets them",
                       description="Lists the built-in corpora, their licenses and whether they are here. "
                       "`rankops corpora fetch [NAME ...]` downloads the Debian packages they come from "
                       "and unpacks them into rankops' cache ($RANKOPS_CACHE, else ~/.cache/rankops): no "
                       "root, no dependencies, a few MB.")
    actions = c.add_subparsers(dest="corpora_action", metavar="{fetch}")
    f = actions.add_parser("fetch", help="download and unpack the built-ins' Debian packages into "
                           "rankops' cache", description="Downloads the Debian packages of the built-in "
                           "corpora (apt-get download) and unpacks them (dpkg-deb -x) into rankops' cache: "
                           "no root, no dependencies.")
    f.add_argument("names", nargs="*", metavar="NAME",
                   help="built-in corpora to fetch (default: every one that comes from Debian packages)")
    f.add_argument("--force", action="store_true", help="fetch again even where already unpacked")


def run(args) -> int:
    if getattr(args, "corpora_action", None) == "fetch":
        return _fetch(args.names, args.force)
    from rankops.eval.corpora import builtin_corpora
    print("| name | kind | available | license | install | description |\n|---|---|---|---|---|---|")
    for c in builtin_corpora():
        print(f"| {c['name']} | {c['kind']} | {'yes' if c['available'] else 'no'} | {c['license']} | "
              f"`{c['install']}` | {c['description']} |")
    return 0


def _fetch(names, force: bool) -> int:
    from rankops.eval.corpora.builtin import BUILTINS
    from rankops.eval.corpora.debian import FetchError, fetch_packages
    fetchable = [b.name for b in BUILTINS.values() if b.packages]
    unknown = [n for n in names if n not in fetchable]
    if unknown:
        print(f"rankops corpora fetch: error: {', '.join(map(repr, unknown))}: not a built-in corpus "
              f"that comes from Debian packages (those are: {', '.join(fetchable)})", file=sys.stderr)
        return 2
    chosen = [BUILTINS[n] for n in (names or fetchable)]
    try:
        fetch_packages([p for b in chosen for p in b.packages], force=force)
    except FetchError as exc:
        packages = " ".join(p for b in chosen for p in b.packages)
        print(f"rankops corpora fetch: error: {exc}.\n  Instead, as root: apt-get install "
              f"--no-install-recommends {packages}\n  (the other built-in corpus, cpython-stdlib, "
              "needs nothing)", file=sys.stderr)
        return 1
    for b in chosen:
        b.load.cache_clear()
        state = "ready" if b.available() else "fetched, but not usable yet: see `rankops corpora`"
        print(f"{b.name}: {state}", file=sys.stderr)
    return 0
