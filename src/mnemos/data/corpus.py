"""Offline natural text: a built-in corpus made from the Python standard library, user text files, and filler.

Nothing here downloads anything. The built-in corpus is prose taken from text that ships with every CPython: the
Zen of Python (the ``this`` module) and the docstrings of the standard library's ``.py`` files, read with ``ast``
(nothing is imported or executed).
"""

from __future__ import annotations

import ast
import codecs
import functools
import os
import re
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnemos.data._haystack import check_int

__all__ = ["builtin_corpus", "document_spans", "filler_text", "load_documents", "load_text"]

# Standard-library folders left out of the corpus: test suites (code-like docstrings, sample data), GUI demos,
# vendored or generated packages.
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "venv", "pydoc_data",
     "site-packages", "dist-packages", "__pycache__"}
)
_MIN_PARAGRAPH_CHARS = 80
# Share of a kept paragraph that must be letters, spaces or sentence punctuation (drops signatures, tables, paths).
_MIN_PROSE_SHARE = 0.95
_PROSE_CHAR = re.compile(r"[A-Za-z ,.;:'()\-?!\"]")
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`]*)`")  # :func:`os.path.join` -> os.path.join
_WHITESPACE = b" \t\n\r\f\v"


def _stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "this.py").is_file():
        raise RuntimeError(
            f"the built-in corpus reads the standard library's .py sources, but {path} has none (a Python built "
            "without them?); pass your own text files instead (mnemos.data.load_text)"
        )
    return path


def _zen_of_python(stdlib: Path) -> list[str]:
    """The Zen of Python, decoded from ``this.py`` without importing it (importing prints it)."""
    tree = ast.parse((stdlib / "this.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "s"
                and isinstance(node.value, ast.Constant)):
            text = codecs.decode(node.value.value, "rot13")
            return [line.strip() for line in text.splitlines() if line.strip()]
    raise RuntimeError(f"{stdlib / 'this.py'} no longer holds the Zen of Python in a string named s")


def _prose_paragraphs(docstring: str) -> Iterable[str]:
    """The paragraphs of a docstring that read as prose, each on one line; code, tables and lists are dropped."""
    for para in re.split(r"\n\s*\n", docstring):
        lines = para.split("\n")
        # after inspect.cleandoc, indented lines are literal blocks or parameter lists; '>>>' starts a doctest
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        text = " ".join(line.strip() for line in lines)
        text = _RST_ROLE.sub(r"\1", text).replace("`", "")
        text = re.sub(r"\s+", " ", text).strip()
        if (len(text) < _MIN_PARAGRAPH_CHARS or not text.isascii() or not text[0].isupper()
                or not text.endswith(".") or "::" in text):
            continue
        if len(_PROSE_CHAR.findall(text)) < _MIN_PROSE_SHARE * len(text):
            continue
        yield text


def _stdlib_sources(stdlib: Path) -> list[Path]:
    """The standard library's ``.py`` files outside the excluded folders, sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # prune, so the large test suite is never listed
        found.extend(Path(root, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(stdlib).as_posix())


_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


def _docstrings(node: ast.AST) -> Iterable[str]:
    """Docstrings of a module and of its classes and functions, nested ones included, in source order.

    Only statement blocks are visited (not expressions), which is several times faster than ``ast.walk``.
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            yield doc
    for field in _BLOCK_FIELDS:
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _docstrings(child)


@functools.cache
def builtin_corpus() -> str:
    """The built-in offline corpus: ASCII prose, one paragraph per line, deterministic for a Python version.

    The Zen of Python (one aphorism per line) followed by the prose paragraphs of the docstrings of the standard
    library's modules, classes and functions, files in sorted path order, duplicates dropped. Test suites, IDLE,
    tkinter and vendored packages are left out. The text is pure ASCII, so its length in characters equals its
    length in :class:`~mnemos.data.ByteTokenizer` tokens.

    Size: 614,651 characters (3,280 lines) on CPython 3.11.7; other Python versions give a similar amount of
    different text. Built once per process (about 1 s, parsing ~560 files with ``ast``) and cached.
    """
    stdlib = _stdlib_dir()
    paragraphs = _zen_of_python(stdlib)
    seen = set(paragraphs)
    for path in _stdlib_sources(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few stdlib files are templates or use another encoding on purpose
            continue
        for doc in _docstrings(tree):
            for para in _prose_paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    paragraphs.append(para)
    return "\n".join(paragraphs) + "\n"


def load_text(
    paths: str | os.PathLike | Iterable[str | os.PathLike], suffixes: tuple[str, ...] = (".txt", ".md")
) -> str:
    """Read user text: files as given, directories recursively (files ending in ``suffixes``, sorted by path).

    Documents (files) are joined with a blank line (:data:`DOCUMENT_SEPARATOR`), in the order given. A missing path
    raises FileNotFoundError, a directory without matching files or a file that is not UTF-8 raises ValueError, each
    naming the path.
    """
    return DOCUMENT_SEPARATOR.join(load_documents(paths, suffixes))


def load_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike], suffixes: tuple[str, ...] = (".txt", ".md")
) -> list[str]:
    """The files of :func:`load_text`, one string each, in its order (the same errors)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty: give at least one text file or directory")
    suffixes = tuple(s.lower() for s in suffixes)
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ValueError(f"directory {str(path)!r} holds no files ending in {suffixes}")
            files.extend(found)
        else:
            raise FileNotFoundError(f"text path {str(path)!r} does not exist")
    docs = []
    for f in files:
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{str(f)!r} is not UTF-8 text: {e}") from e
    return docs


DOCUMENT_SEPARATOR = "\n\n"  # what load_text puts between two files


def document_spans(lengths: Iterable[int], separator_len: int, total: int) -> list[tuple[int, int]]:
    """``[start, end)`` character spans of documents of ``lengths`` characters joined by a separator of
    ``separator_len``: each span takes the separator after its document, the last one runs to ``total`` (the text's
    length), so the spans tile the text."""
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n + separator_len))
        start = spans[-1][1]
    spans[-1] = (spans[-1][0], total)
    return spans


@dataclass(frozen=True)
class _CorpusIndex:
    """A corpus as a cycle of bytes, with the positions where a filler span may start."""

    data: np.ndarray  # [M] uint8: the corpus bytes, plus b"\n" when they do not end in whitespace
    is_space: np.ndarray  # [M] bool
    word_starts: np.ndarray  # [W] int64: non-space bytes whose predecessor (cyclically) is a space


@functools.lru_cache(maxsize=8)
def _index(corpus: str) -> _CorpusIndex:
    raw = corpus.encode("utf-8")
    if not raw.strip():
        raise ValueError("corpus is empty or all whitespace")
    if raw[-1:] not in [bytes([b]) for b in _WHITESPACE]:
        raw += b"\n"
    data = np.frombuffer(raw, dtype=np.uint8)
    is_space = np.isin(data, np.frombuffer(_WHITESPACE, dtype=np.uint8))
    word_starts = np.flatnonzero(np.roll(is_space, 1) & ~is_space)
    return _CorpusIndex(data, is_space, word_starts)


def filler_text(n_tokens: int, seed: int, *, corpus: str | None = None) -> str:
    """A span of natural text of exactly ``n_tokens`` byte-tokenizer tokens (= UTF-8 bytes), for haystacks.

    The span starts at the first character of a word and ends with a whitespace character, at a start drawn
    uniformly (by ``seed``) from all such spans of the corpus; the corpus is read as a cycle, so spans longer than
    the corpus repeat it. Because it starts after and ends on an ASCII space, the span is valid UTF-8 for any
    corpus. ``corpus`` defaults to :func:`builtin_corpus`. Raises ValueError when no span of that length exists:
    always for ``n_tokens == 1`` (a span holds a word and a space), otherwise only for a tiny or repetitive corpus.

    >>> s = filler_text(100, seed=0)
    >>> len(s.encode()), s[-1].isspace(), s == filler_text(100, seed=0)
    (100, True, True)
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise ValueError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
    check_int("seed", seed, 0)
    if n_tokens == 0:
        return ""
    idx = _index(builtin_corpus() if corpus is None else corpus)
    m = len(idx.data)
    ends = (idx.word_starts + (n_tokens - 1)) % m
    starts = idx.word_starts[idx.is_space[ends]]
    if len(starts) == 0:
        raise ValueError(
            f"the corpus has no span of n_tokens={n_tokens} bytes that starts at a word and ends on whitespace"
        )
    start = int(starts[np.random.default_rng(seed).integers(len(starts))])
    span = idx.data[(start + np.arange(n_tokens)) % m]
    return span.tobytes().decode("utf-8")

