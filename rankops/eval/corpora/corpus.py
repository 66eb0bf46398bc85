"""What every corpus loader returns, and the one error it raises."""
from dataclasses import dataclass
from typing import Iterable, Tuple

__all__ = ["Corpus", "CorpusError", "make_corpus"]


class CorpusError(ValueError):
    """A corpus cannot be loaded: the message names the corpus spec and says why."""


@dataclass(frozen=True)
class Corpus:
    name: str          # short name: the built-in name, or derived from the path / id
    documents: tuple   # tuple[str, ...], non-empty strings, in a deterministic order
    source: str        # where it came from: a file path, folder, package, or hub id
    kind: str          # "prose", "code" or "user"
    license: str       # e.g. "public domain", "PSF-2.0", or "unknown" for user data

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:  # the default would print every document
        chars = sum(len(d) for d in self.documents)
        return (f"Corpus(name={self.name!r}, documents=<{len(self.documents)} documents, "
                f"{chars} chars>, source={self.source!r}, kind={self.kind!r}, "
                f"license={self.license!r})")


def clean(documents: Iterable) -> Tuple[str, ...]:
    return tuple(d for d in (doc.rstrip() for doc in documents) if d)


def make_corpus(name, documents, *, source, kind, license, spec) -> Corpus:
    docs = clean(documents)
    if not docs:
        raise CorpusError(f"corpus {spec!r} is empty: it has no documents that are not empty "
                          f"or whitespace ({source})")
    return Corpus(name=name, documents=docs, source=source, kind=kind, license=license)
