"""Labeling: segment, score and tag documents, and write/read the labeled dataset (Parquet shards).

    doc = label_document(load_schema("pep8"), "import os,sys\\n")
    doc.segments, doc.scores["pep8"], doc.tags["pep8"]      # ['import os,sys\\n'], [0.1428...], ['bad']

    summary = label_corpus("stdlib", "pep8", "runs/stdlib-pep8", num_proc=2)
    schema, rows = load_labeled("runs/stdlib-pep8")

A corpus is cut into shards of ``shard_size`` documents in reading order; each shard is labeled as one batch
(scorers see many segments at once) and written atomically (temporary file + ``os.replace``). A shard whose file
exists is finished: a restarted run skips it without scoring, and since shards are a pure function of the corpus,
the schema and ``shard_size``, the resumed result equals an uninterrupted one. ``run.json`` records those inputs
and a restart with different ones is refused rather than silently mixing two runs.

Tags are stored as structure (a tag *name* per segment), never spliced into the text, so no text can imitate one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from pretag.corpus import Document, open_corpus
from pretag.problems import Problems
from pretag.schema import Schema, load_schema, schema_from_dict
from pretag.scorers import Doc, Scorer, ScorerError, build_scorer, cached_scorer, spec_problems
from pretag.segment import segment

logger = logging.getLogger(__name__)

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass
class LabeledDoc:
    """One labeled document: its segments and, per attribute, a score and a tag name per segment.

    Document-level attributes have lists of length 1. ``None`` score = not scored; ``None`` tag = untagged.
    """

    text: str
    segments: list[str]
    scores: dict[str, list[float | None]]
    tags: dict[str, list[str | None]]
    id: str = ""
    source: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    def to_row(self, schema: Schema) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.id, "source": self.source, "text": self.text, "segments": self.segments,
            "fields": json.dumps(self.fields, sort_keys=True, default=str),
        }
        for a in schema.attributes:
            row[f"score__{a.name}"] = self.scores[a.name]
            row[f"tag__{a.name}"] = self.tags[a.name]
        return row


# ---- scoring ---------------------------------------------------------------------------------------------------
def schema_scorer_problems(schema: Schema) -> list[str]:
    """Every problem in the schema's scorer specs (unknown types, options), found without loading any model."""
    return [p for a in schema.attributes for p in spec_problems(a.scorer, f"attribute {a.name!r}: scorer")]


def build_scorers(schema: Schema, *, cache: bool = False) -> dict[str, Scorer]:
    """One scorer per attribute; raises ScorerError listing every problem at once."""
    problems = Problems(schema_scorer_problems(schema))
    scorers: dict[str, Scorer] = {}
    if not problems:
        for a in schema.attributes:
            try:
                scorers[a.name] = (cached_scorer if cache else build_scorer)(a.scorer)
            except ScorerError as e:
                problems.append(f"attribute {a.name!r}: {e}")
    problems.check(ScorerError, f"schema {schema.name!r}", kind="scorer problem")
    return scorers


def selected(key: str, index: int, fraction: float) -> bool:
    """Partial labeling: is segment ``index`` of document ``key`` among the labeled ``fraction``?

    A hash, not a random draw, so a resumed or re-run job picks the same segments and all attributes agree.
    """
    if fraction >= 1.0:
        return True
    h = hashlib.blake2b(f"{key}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def label_documents(schema: Schema, docs: list[Document], scorers: dict[str, Scorer]) -> list[LabeledDoc]:
    """Label a batch: segment every document, then call each scorer once for the whole batch."""
    frac = schema.label_fraction
    seg_docs, doc_docs = [], []
    for d in docs:
        segs = segment(d.text, schema.segmenter)
        key = d.id or hashlib.blake2b(d.text.encode(), digest_size=8).hexdigest()
        keep = None if frac >= 1.0 else [selected(key, i, frac) for i in range(len(segs))]
        seg_docs.append(Doc(d.text, segs, d.fields, keep))
        doc_keep = None if frac >= 1.0 else [selected(key, -1, frac)]
        doc_docs.append(Doc(d.text, [d.text], d.fields, doc_keep))
    out = [LabeledDoc(d.text, sd.segments, {}, {}, d.id, d.source, d.fields) for d, sd in zip(docs, seg_docs)]
    for a in schema.attributes:
        batch = seg_docs if a.level == "segment" else doc_docs
        per_doc = scorers[a.name].score_docs(batch)
        for ld, bd, scores in zip(out, batch, per_doc):
            if bd.keep is not None:  # scorers needing context may score everything: drop unselected ones
                scores = [s if k else None for s, k in zip(scores, bd.keep)]
            scores = [None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s) for s in scores]
            ld.scores[a.name] = scores
            ld.tags[a.name] = [None if (v := a.value_of(s)) is None else a.tags[v] for s in scores]
    return out


def label_document(schema: Schema | str, text: str, fields: dict[str, Any] | None = None) -> LabeledDoc:
    """Label one text in memory (generation's output classifiers, evaluation). Scorers are cached per process."""
    if isinstance(schema, str):
        schema = load_schema(schema)
    scorers = build_scorers(schema, cache=True)
    return label_documents(schema, [Document(id="", source="", text=text, fields=dict(fields or {}))], scorers)[0]


# ---- the Parquet format ----------------------------------------------------------------------------------------
def arrow_schema(schema: Schema):
    import pyarrow as pa

    cols = [
        ("id", pa.string()), ("source", pa.string()), ("text", pa.string()),
        ("segments", pa.list_(pa.string())), ("fields", pa.string()),
    ]
    for a in schema.attributes:
        cols += [(f"score__{a.name}", pa.list_(pa.float64())), (f"tag__{a.name}", pa.list_(pa.string()))]
    return pa.schema(cols)


# pyarrow imports pandas (~0.4 s, a twentieth of a 100k-line PEP8 job) the first time ``pa.array`` converts Python
# objects and whenever ``pq.read_table`` is called, only to ask whether the input is a pandas object. Labeling never
# has one, so shards are built from buffers and read with ``ParquetFile``; test_label checks both against the
# pyarrow calls they replace.
def arrow_column(values: list, type_):
    """``pa.array(values, type=type_)`` for the shard format's types: string, float64 and lists of them."""
    import pyarrow as pa

    n = len(values)
    if pa.types.is_list(type_):  # a list column is its items plus where each row's items start
        offsets = array("i", [0, *accumulate(map(len, values))])
        items = arrow_column([x for v in values for x in v], type_.value_type)
        return pa.ListArray.from_arrays(pa.Array.from_buffers(pa.int32(), n + 1, [None, pa.py_buffer(offsets)]),
                                        items, type=type_)
    valid = None
    if any(v is None for v in values):  # Arrow's validity bitmap: bit i (least significant first) = row i is set
        bits = bytearray((n + 7) // 8)
        for i, v in enumerate(values):
            if v is not None:
                bits[i >> 3] |= 1 << (i & 7)
        valid = pa.py_buffer(bits)
    if pa.types.is_string(type_):
        data = [b"" if v is None else v.encode() for v in values]
        offsets = array("i", [0, *accumulate(map(len, data))])  # OverflowError past 2 GiB, as pa.array fails
        return pa.Array.from_buffers(type_, n, [valid, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))])
    if pa.types.is_float64(type_):
        data = array("d", [0.0 if v is None else v for v in values])
        return pa.Array.from_buffers(type_, n, [valid, pa.py_buffer(data)])
    raise TypeError(f"no shard column of type {type_}")


def read_shard(path: Path, columns: list[str] | None = None):
    """``pq.read_table(path, columns=columns)`` for one shard file (see arrow_column for why not read_table)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        return f.read(columns=columns)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


INPUTS_KEY = b"pretag.inputs"  # Parquet metadata: a hash of the documents a shard was labeled from


def inputs_hash(docs: Iterable[Document]) -> str:
    """A hash of a shard's input documents (id, source, text, fields): a resumed run relabels a finished shard
    whose inputs changed since (an edited source) instead of keeping its stale labels."""
    h = hashlib.blake2b(digest_size=16)
    for d in docs:
        for part in (d.id, d.source, d.text, json.dumps(d.fields, sort_keys=True, default=str)):
            b = part.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def shard_inputs_hash(path: Path) -> str | None:
    """The inputs hash a shard was written with (None: written before pretag recorded it)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return meta[INPUTS_KEY].decode() if INPUTS_KEY in meta else None


def write_shard(path: Path, schema: Schema, docs: list[LabeledDoc], inputs: str | None = None) -> None:
    """Write one shard atomically: readers (and a resumed run) never see a half-written file."""
    write_rows(path, schema, [d.to_row(schema) for d in docs], inputs)


def write_rows(path: Path, schema: Schema, rows: list[dict[str, Any]], inputs: str | None = None) -> None:
    """:func:`write_shard` for rows already in the shard format (``LabeledDoc.to_row``; ``fields`` as JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    aschema = arrow_schema(schema)
    table = pa.Table.from_arrays([arrow_column([r[f.name] for r in rows], f.type) for f in aschema], schema=aschema)
    if inputs is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), INPUTS_KEY: inputs.encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_files(out: str | Path) -> list[Path]:
    return sorted(Path(out).glob("part-*.parquet"))


def load_labeled(out: str | Path) -> tuple[Schema, list[dict[str, Any]]]:
    """Read a labeled dataset back: its schema and one dict per document (``fields`` parsed from JSON)."""
    out = Path(out)
    if not (out / "schema.yaml").exists():
        raise FileNotFoundError(f"{out} is not a labeled dataset (no schema.yaml in it)")
    schema = load_schema(out / "schema.yaml")
    rows: list[dict[str, Any]] = []
    for p in shard_files(out):
        for r in read_shard(p).to_pylist():
            r["fields"] = json.loads(r["fields"]) if r.get("fields") else {}
            rows.append(r)
    return schema, rows


# label_corpus and the engines follow -------------------------------------------------------------------------
@dataclass
class RunConfig:
    """What determines a run's output; ``run.json`` stores it so a restart can check it is the same job."""

    source: str
    schema: dict[str, Any]
    shard_size: int = 1000
    """Documents per shard at most. Shards are the unit of resume and of parallelism."""
    shard_chars: int = 1_000_000
    """Characters per shard at most, so a few huge files do not make one shard that runs long after the rest."""
    limit: int | None = None
    exclude: list[str] = field(default_factory=list)
    include_all: bool = False
    text_column: str = "text"
    fallback_encoding: str | None = None


def iter_shards(docs: Iterable[Document], shard_size: int, shard_chars: int) -> Iterator[list[Document]]:
    """Cut a document stream into shards, deterministically (same corpus and sizes -> same shards)."""
    cur: list[Document] = []
    chars = 0
    for d in docs:
        if cur and (len(cur) >= shard_size or chars + len(d.text) > shard_chars):
            yield cur
            cur, chars = [], 0
        cur.append(d)
        chars += len(d.text)
    if cur:
        yield cur


def shard_path(out: Path, k: int) -> Path:
    return out / f"part-{k:05d}.parquet"


def _limited(docs: Iterable[Document], limit: int | None) -> Iterator[Document]:
    for i, d in enumerate(docs):
        if limit is not None and i >= limit:
            return
        yield d


def prepare_out(out: Path, cfg: RunConfig, schema: Schema, overwrite: bool) -> list[Path]:
    """Create or check the output directory; returns the shard files already finished (to skip)."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    want = json.dumps(cfg.__dict__, sort_keys=True, default=str)
    if overwrite:
        for p in [*shard_files(out), run_file, out / "summary.json"]:
            p.unlink(missing_ok=True)
    elif run_file.exists() and run_file.read_text() != want:
        raise ValueError(f"{out} holds a different run (other source, schema or options; see {run_file}); "
                         "use another --out, or --overwrite to start again")
    for stale in out.glob(".part-*.tmp-*"):  # a killed writer's leftovers: never visible as finished shards
        stale.unlink(missing_ok=True)
    atomic_write_bytes(run_file, want.encode())
    atomic_write_bytes(out / "schema.yaml", schema_yaml(schema))
    return shard_files(out)


def schema_yaml(schema: Schema) -> bytes:
    import yaml

    return yaml.safe_dump(schema.to_dict(), sort_keys=False).encode()


# ---- engines: each labels the pending shards and yields (documents, segments) per finished shard -----------------
_WORKER: dict[str, Any] = {}


def _init_worker(schema_dict: dict[str, Any], out: str) -> None:
    schema = schema_from_dict(schema_dict)
    _WORKER.update(schema=schema, scorers=build_scorers(schema), out=Path(out))


def _label_shard(job: tuple[int, list[Document]]) -> tuple[int, int, int]:
    k, docs = job
    schema, scorers, out = _WORKER["schema"], _WORKER["scorers"], _WORKER["out"]
    labeled = label_documents(schema, docs, scorers)
    write_shard(shard_path(out, k), schema, labeled, inputs_hash(docs))
    return k, len(docs), sum(len(d.segments) for d in labeled)


def run_local(jobs: Iterator[tuple[int, list[Document]]], schema: Schema, out: Path, num_proc: int):
    if num_proc <= 1:
        _init_worker(schema.to_dict(), str(out))
        for job in jobs:
            yield _label_shard(job)
        return
    import multiprocessing as mp
    from collections import deque

    # spawn, not fork: the parent may hold threads (pyarrow, tqdm) and forking those can deadlock
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(schema.to_dict(), str(out))) as pool:
        pending: deque = deque()
        for job in jobs:  # keep at most 2 shards per process in flight: bounded memory on huge corpora
            pending.append(pool.apply_async(_label_shard, (job,)))
            while len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _RayLabeler:
    """Ray Data actor: builds the scorers once, labels batches of documents (one JSON row out per document)."""

    def __init__(self, schema_dict: dict[str, Any]) -> None:
        self.schema = schema_from_dict(schema_dict)
        self.scorers = build_scorers(self.schema)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        docs = [Document(str(i), str(s), str(t), json.loads(f))
                for i, s, t, f in zip(batch["id"], batch["source"], batch["text"], batch["fields"])]
        labeled = label_documents(self.schema, docs, self.scorers)
        rows = [json.dumps(d.to_row(self.schema)) for d in labeled]
        return {"shard": batch["shard"], "pos": batch["pos"], "row": np.array(rows, dtype=object)}


def run_ray(jobs: Iterator[tuple[int, list[Document]]], schema: Schema, out: Path, num_proc: int):
    """Label with Ray Data: the same schema and scorers, run by a pool of actors on a local or remote cluster.

    Pending shards go to Ray in windows (bounded driver memory); each window's rows come back, are grouped by
    shard and written with the same atomic shard writer, so resume and the output format are the same as local.
    Connects to a running cluster if ``RAY_ADDRESS`` is set, else starts a local one with ``num_proc`` CPUs.
    """
    import ray

    if not ray.is_initialized():
        kw = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(num_proc, 1)}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kw)
    window = max(num_proc, 1) * 4
    batch: list[tuple[int, list[Document]]] = []

    def flush():
        items = [{"shard": k, "pos": i, "id": d.id, "source": d.source, "text": d.text,
                  "fields": json.dumps(d.fields, default=str)} for k, docs in batch for i, d in enumerate(docs)]
        ds = ray.data.from_items(items).map_batches(
            _RayLabeler, fn_constructor_kwargs={"schema_dict": schema.to_dict()}, batch_size=64,
            concurrency=max(num_proc, 1), batch_format="numpy",
        )
        by_shard: dict[int, list[tuple[int, dict]]] = {}
        for r in ds.iter_rows():
            by_shard.setdefault(int(r["shard"]), []).append((int(r["pos"]), json.loads(r["row"])))
        for k, docs in batch:
            rows = [row for _, row in sorted(by_shard.get(k, []), key=lambda x: x[0])]
            labeled = [LabeledDoc(r["text"], r["segments"], {a.name: r[f"score__{a.name}"] for a in schema.attributes},
                                  {a.name: r[f"tag__{a.name}"] for a in schema.attributes}, r["id"], r["source"],
                                  json.loads(r["fields"])) for r in rows]
            write_shard(shard_path(out, k), schema, labeled, inputs_hash(docs))
            yield k, len(docs), sum(len(d.segments) for d in labeled)

    for job in jobs:
        batch.append(job)
        if len(batch) >= window:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


# ---- the corpus job ------------------------------------------------------------------------------------------------
def label_corpus(source: str, schema: Schema | str | Path, out: str | Path, *, num_proc: int = 1,
                 engine: str = "local", limit: int | None = None, shard_size: int = 1000,
                 shard_chars: int = 1_000_000, exclude: list[str] | tuple[str, ...] = (), include_all: bool = False,
                 text_column: str = "text", fallback_encoding: str | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Label a corpus into ``out`` (Parquet shards + schema.yaml + summary.json); returns the summary.

    Resumable: finished shards are skipped, so rerunning the same call after a crash finishes the job.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not isinstance(schema, Schema):
        schema = load_schema(schema)
    problems = []
    if engine not in ("local", "ray"):
        problems.append(f"engine {engine!r} is not one of local, ray")
    if num_proc < 1:
        problems.append(f"num_proc must be >= 1, got {num_proc}")
    if limit is not None and limit < 1:
        problems.append(f"limit must be >= 1, got {limit}")
    if shard_size < 1 or shard_chars < 1:
        problems.append("shard_size and shard_chars must be >= 1")
    problems += schema_scorer_problems(schema)
    if problems:
        raise ValueError("cannot label:\n  - " + "\n  - ".join(problems))
    from pretag import folders

    folders.check_dir(out)
    folders.refuse_foreign(out, "dataset")  # a model dir (or an experiment) is never mixed with a dataset
    build_scorers(schema)  # fail now on a bad option (e.g. a missing model dir), not inside a worker
    corpus = open_corpus(source, text_column=text_column, exclude=exclude, include_all=include_all,
                         fallback_encoding=fallback_encoding)
    out = Path(out)
    cfg = RunConfig(source=source, schema=schema.to_dict(), shard_size=shard_size, shard_chars=shard_chars,
                    limit=limit, exclude=list(exclude), include_all=include_all, text_column=text_column,
                    fallback_encoding=fallback_encoding)
    done = {p.name for p in prepare_out(out, cfg, schema, overwrite)}
    bar = tqdm(total=limit, unit="doc", desc=f"label {source}", disable=not progress, dynamic_ncols=True)
    resumed = written = 0
    changed: list[str] = []
    n_shards = 0

    def jobs() -> Iterator[tuple[int, list[Document]]]:
        nonlocal resumed, n_shards
        for k, docs in enumerate(iter_shards(_limited(corpus, limit), shard_size, shard_chars)):
            n_shards = k + 1
            path = shard_path(out, k)
            if path.name in done:
                was = shard_inputs_hash(path)
                if was is None or was == inputs_hash(docs):  # None: a shard from before hashes; kept
                    resumed += 1
                    bar.update(len(docs))
                    continue
                changed.append(path.name)
            yield k, docs

    runner = run_ray if engine == "ray" else run_local
    for _k, n_docs, _n_segs in runner(jobs(), schema, out, num_proc):
        written += 1
        bar.update(n_docs)
    bar.close()
    gone = [p for p in shard_files(out) if int(p.stem.split("-")[1]) >= n_shards]
    for p in gone:  # the source shrank: these shards' documents are no longer in it
        p.unlink()
    notes = []
    if changed or gone:
        notes.append(f"the source changed since {out} was labeled: relabeled {len(changed)} shard(s) whose "
                     f"documents changed" + (f", removed {len(gone)} shard(s) past its end" if gone else ""))
        logger.warning("%s", notes[-1])
    resolved = resolve_fractions(out, schema)
    summary = summarize(out, schema)
    if resolved:
        summary["resolved_thresholds"] = resolved
    summary.update(source=source, out=str(out), engine=engine, num_proc=num_proc,
                   shards={"total": len(shard_files(out)), "written": written, "resumed": resumed,
                           "relabeled": len(changed), "removed": len(gone)},
                   corpus=corpus.report(), seconds=round(time.perf_counter() - t0, 3))
    summary["corpus"].setdefault("notes", [])
    summary["corpus"]["notes"] = [*summary["corpus"]["notes"], *notes]
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, default=str).encode())
    logger.info("labeled %d documents, %d segments into %s", summary["documents"], summary["segments"], out)
    return summary


def resolve_fractions(out: str | Path, schema: Schema) -> dict[str, dict[str, float]]:
    """Cut every fraction-of-the-corpus threshold (``good_fraction`` / ``bad_fraction``) from the scores on disk,
    then write the tags it implies into every shard and the resolved ``tag_threshold`` into ``schema.yaml``.

    Shards are labeled independently (in parallel, resumable), so such attributes are written untagged first and
    tagged here, once every score is known. Idempotent: a rerun after a crash recomputes the same cut from the same
    scores and rewrites the same tags. ``schema`` is updated in place; returns {attribute: {fraction, threshold}}.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    pending = [a for a in schema.attributes if a.unresolved]
    if not pending:
        return {}
    files = shard_files(out)
    scores: dict[str, list[float | None]] = {a.name: [] for a in pending}
    for f in files:
        t = read_shard(f, columns=[f"score__{a.name}" for a in pending]).to_pydict()
        for a in pending:
            for row in t[f"score__{a.name}"]:
                scores[a.name].extend(row)
    resolved = {}
    for a in pending:
        a.tag_threshold = a.resolve_fraction(scores[a.name])
        kind = "good_fraction" if a.good_fraction is not None else "bad_fraction"
        resolved[a.name] = {kind: getattr(a, kind), "tag_threshold": a.tag_threshold}
        logger.info("%s: %s %s resolved to tag_threshold %.6g", a.name, kind, getattr(a, kind), a.tag_threshold)
    tag_type = pa.list_(pa.string())
    for f in files:
        table = read_shard(f)
        for a in pending:
            col = f"tag__{a.name}"
            tags = [[None if (v := a.value_of(x)) is None else a.tags[v] for x in row]
                    for row in table.column(f"score__{a.name}").to_pylist()]
            table = table.set_column(table.schema.get_field_index(col), col, arrow_column(tags, tag_type))
        tmp = f.with_name(f".{f.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, f)
    atomic_write_bytes(out / "schema.yaml", schema_yaml(schema))
    return resolved


def summarize(out: str | Path, schema: Schema) -> dict[str, Any]:
    """Counts, per attribute the fraction of each tag and score quantiles, from the shards on disk."""
    import numpy as np

    n_docs = n_segs = n_chars = 0
    scores: dict[str, list[float]] = {a.name: [] for a in schema.attributes}
    tags: dict[str, Counter] = {a.name: Counter() for a in schema.attributes}
    untagged: Counter = Counter()
    for p in shard_files(out):
        t = read_shard(p).to_pydict()
        n_docs += len(t["id"])
        n_segs += sum(len(s) for s in t["segments"])
        n_chars += sum(len(x) for x in t["text"])
        for a in schema.attributes:
            for row in t[f"score__{a.name}"]:
                scores[a.name] += [s for s in row if s is not None]
            for row in t[f"tag__{a.name}"]:
                tags[a.name].update(x for x in row if x is not None)
                untagged[a.name] += sum(x is None for x in row)
    attrs = {}
    for a in schema.attributes:
        s = np.asarray(scores[a.name], dtype=float)
        n_tagged = sum(tags[a.name].values())
        attrs[a.name] = {
            "level": a.level, "scorer": a.scorer.get("type"), "scored": int(s.size), "tagged": n_tagged,
            "untagged": untagged[a.name],
            "tag_fraction": {t: round(tags[a.name][t] / n_tagged, 6) if n_tagged else 0.0
                             for t in (a.tags[v] for v in a.values)},
            "score_quantiles": {str(q): float(np.quantile(s, q)) for q in QUANTILES} if s.size else {},
            "score_mean": float(s.mean()) if s.size else None,
        }
    return {"schema": schema.name, "segmenter": schema.segmenter, "documents": n_docs, "segments": n_segs,
            "characters": n_chars, "attributes": attrs}
