"""`rankops cache`: what rankops keeps in its cache folder, and how big it is;
`rankops cache clear [--all]`: remove the GGUF conversions (--all: the reassembled GGUFs and the
corpora too; never files rankops did not write)."""
import sys

_WHAT = {"conversion": "GGUF converted to safetensors", "gguf": "GGUF reassembled from its packages",
         "corpus": "built-in corpus (Debian package)", "stale": "GGUF conversion by an earlier rankops: unused",
         "unfinished": "left by a killed conversion or fetch (or one running now)", "other": "not rankops' (never removed)"}


def add_parser(sub) -> None:
    c = sub.add_parser("cache", help="list rankops' cache and its sizes; `rankops cache clear` empties it",
                       description="Lists what rankops keeps in its cache folder ($RANKOPS_CACHE, else "
                       "~/.cache/rankops): GGUF files converted to safetensors (one per distinct file), "
                       "GGUF files reassembled from their packages, and the built-in corpora's Debian "
                       "packages, with their sizes. `rankops cache clear` removes the conversions (made "
                       "again at the next load, offline).")
    actions = c.add_subparsers(dest="cache_action", metavar="{clear}")
    clear = actions.add_parser("clear", help="remove the GGUF conversions (--all: the corpora too)",
                               description="Removes the GGUF conversions, stale and unfinished ones "
                               "included; they are made again at the next load, offline. With --all, also "
                               "the reassembled GGUF files and the corpora (fetched again with `rankops "
                               "corpora fetch`, which needs Debian's mirror). Files rankops did not write "
                               "are never removed.")
    clear.add_argument("--all", action="store_true", dest="everything",
                       help="also remove the reassembled GGUF files and the corpora (never files "
                       "rankops did not write)")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args) -> int:
    from rankops.eval.cache import cache_entries, cache_root, clear_cache
    if getattr(args, "cache_action", None) == "clear":
        removed = clear_cache(everything=args.everything)
        print(f"rankops cache clear: removed {len(removed)} entries, {_mb(sum(e['size'] for e in removed))}, "
              f"from {cache_root()}", file=sys.stderr)
        return 0
    entries = cache_entries()
    print(f"rankops' cache: {cache_root()} ({_mb(sum(e['size'] for e in entries))} in {len(entries)} entries)")
    if entries:
        print("| entry | what | size |\n|---|---|---|")
        for e in entries:
            what = _WHAT[e["kind"]] + (f" ({e['source']})" if e["source"] else "")
            print(f"| {e['path'].relative_to(cache_root())} | {what} | {_mb(e['size'])} |")
    return 0
