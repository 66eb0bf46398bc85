"""`rankops corpora`: the built-in corpora, their licenses and how to install them."""


def add_parser(sub) -> None:
    sub.add_parser("corpora", help="list the built-in corpora, their licenses and how to install them")


def run(args) -> int:
    from rankops.eval.corpora import builtin_corpora
    print("| name | kind | available | license | install | description |\n|---|---|---|---|---|---|")
    for c in builtin_corpora():
        print(f"| {c['name']} | {c['kind']} | {'yes' if c['available'] else 'no'} | {c['license']} | "
              f"`{c['install']}` | {c['description']} |")
    return 0
