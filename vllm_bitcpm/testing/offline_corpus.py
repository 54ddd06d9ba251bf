"""English text that every CPython installation carries: a training corpus that needs no network.

Two sources, both part of the standard library, so the corpus is the same wherever the same
Python version runs (its SHA-256 is recorded with every model trained on it):

* ``pydoc_data.topics``: the Language Reference sections that ``help()`` shows (English prose
  with some grammar and code);
* the docstrings of at least ``MIN_DOCSTRING_CHARS`` characters of the pure-Python standard
  library (modules, classes, functions; tests, idlelib and site-packages left out).

Documents go to the training or the held-out split by a hash of their text (1 in
``HELD_OUT_EVERY``), so adding or removing a document never moves another between the splits.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import pathlib
import sysconfig

__all__ = ["Corpus", "load_corpus"]

MIN_DOCSTRING_CHARS = 200
HELD_OUT_EVERY = 20
_SKIPPED_PARTS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    sha256: str
    sources: str

    def describe(self) -> dict:
        return {
            "sources": self.sources,
            "sha256": self.sha256,
            "train_documents": len(self.train),
            "train_chars": sum(map(len, self.train)),
            "held_out_documents": len(self.held_out),
            "held_out_chars": sum(map(len, self.held_out)),
        }


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def _stdlib_docstrings() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py"))
    docs = []
    for path in files:
        if _SKIPPED_PARTS & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc.strip())
    return docs


def _held_out(document: str) -> bool:
    return hashlib.sha256(document.encode()).digest()[0] % HELD_OUT_EVERY == 0


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The corpus, split; a few seconds (parsing the standard library), then cached."""
    import sys

    documents = list(dict.fromkeys(_pydoc_topics() + _stdlib_docstrings()))  # exact duplicates once
    digest = hashlib.sha256("\x00".join(documents).encode()).hexdigest()
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(
        train=tuple(d for d in documents if not _held_out(d)),
        held_out=tuple(d for d in documents if _held_out(d)),
        sha256=digest,
        sources=f"CPython {version}: pydoc_data.topics + standard-library docstrings "
                f">= {MIN_DOCSTRING_CHARS} chars",
    )
