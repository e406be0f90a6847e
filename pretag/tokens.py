"""Tokenizers, tag-safe encoding, and packing of labeled documents into training blocks.

The one rule of this module: **tags are structure, never text**. A tag token id enters a sequence only when the
labeled structure says so (``Schema.render_pieces``); text pieces, from the corpus or from a prompt, are encoded with
special-token matching switched off, so ``"<|bad|>"`` typed by a user is just seven characters. ``encode_text``
checks the result anyway and refuses to return a special id.

Packing concatenates documents (EOS between them) into fixed-length blocks and carries, for every token, the
scores of the segment it came from, that segment's reward and whether the token is a tag, so the objectives in
``pretag.objectives`` can weight tokens without knowing about segments.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretag.schema import Schema, load_schema

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


# ---- reading the labeled dataset ----------------------------------------------------------------------------------
def read_labeled(path: str | Path) -> tuple[Schema, list[dict[str, Any]]]:
    """Read a labeled dataset directory (see docs/CONTRACTS.md) into (schema, rows).

    Uses ``pretag.label.load_labeled`` when it exists; otherwise reads the Parquet shards with pyarrow, which is all
    the contract needs.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"labeled dataset {str(path)!r} is not a directory")
    try:
        from pretag.label import load_labeled
    except ImportError:
        load_labeled = None
    if load_labeled is not None:
        return load_labeled(path)
    import pyarrow.parquet as pq

    if not (path / "schema.yaml").exists():
        raise FileNotFoundError(f"{path}: no schema.yaml; is this a directory written by `pretag label`?")
    shards = sorted(path.glob("part-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"{path}: no part-*.parquet shards")
    schema = load_schema(path / "schema.yaml")
    rows: list[dict[str, Any]] = []
    for shard in shards:
        rows.extend(pq.read_table(shard).to_pylist())
    for r in rows:
        if isinstance(r.get("fields"), str):
            r["fields"] = json.loads(r["fields"] or "{}")
    return schema, rows


# ---- tokenizers ---------------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], schema: Schema, vocab_size: int = 8192, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer (GPT-2 style) and return it as a HF fast tokenizer with the tag tokens.

    The tag tokens are *not* given to the BPE trainer: a trainer's special tokens live in the model vocabulary,
    where merges learnt from a corpus that contains the literal ``<|bad|>`` could reproduce them. They are added
    afterwards as added tokens, with ids past the BPE vocabulary that no merge can reach.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small for byte-level BPE (256 bytes + specials); use >= 300")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(schema.tag_tokens),  # the total, tags included, is what the user asked for
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                 pad_token=PAD_TOKEN, model_max_length=1_000_000)
    add_tag_tokens(hf, schema)
    return hf


def add_tag_tokens(tokenizer, schema: Schema) -> list[str]:
    """Make the schema's tag tokens special tokens of ``tokenizer``; returns the ones that were new.

    Also gives the tokenizer an EOS and a pad token when it lacks them (packing needs both).
    """
    extra: dict[str, Any] = {}
    if tokenizer.eos_token is None:
        extra["eos_token"] = EOS_TOKEN
    if tokenizer.pad_token is None:
        extra["pad_token"] = tokenizer.eos_token or EOS_TOKEN
    vocab = tokenizer.get_vocab()
    new = [t for t in schema.tag_tokens if t not in vocab]
    present = set(tokenizer.all_special_tokens)
    missing = [t for t in schema.tag_tokens if t not in present]
    if missing:  # transformers 5 calls them extra special tokens; extend, never replace, the existing list
        extra["extra_special_tokens"] = missing
    if extra:
        tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)
    protect_special_tokens(tokenizer)
    return new


def protect_special_tokens(tokenizer) -> bool:
    """Make ``tokenizer`` encode special-token *text* as plain text, now and in its saved config.

    pretag's own encoder switches special-token matching off per call (:func:`encode_texts`); this makes a plain
    ``AutoTokenizer.from_pretrained(model_dir)("x<|bad|>y")`` just as safe, through transformers'
    ``split_special_tokens`` setting, which ``save_pretrained`` writes to ``tokenizer_config.json`` and every encode
    path (``__call__``, ``encode``, ``tokenize``, batches, pairs) honours. Tags, BOS/EOS and pad are still
    inserted by id. Returns whether the tokenizer was unprotected before (an old model directory).

    Only the ``tokenizers`` library used alone (``Tokenizer.from_file("tokenizer.json")``) does not read the
    setting: set ``encode_special_tokens = True`` there. A chat template that writes special tokens as text (a
    pretrained model's, e.g. SmolLM2's ``<|im_start|>``) now gets them as plain text too; pretag never uses one.
    """
    was = bool(getattr(tokenizer, "split_special_tokens", False))
    tokenizer.split_special_tokens = True
    tokenizer.init_kwargs["split_special_tokens"] = True  # what save_pretrained writes
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.encode_special_tokens = True
    return not was


def tokenizer_config_protected(directory: str | Path) -> bool | None:
    """Whether a plain ``AutoTokenizer`` of ``directory`` is tag-safe (``split_special_tokens`` saved);
    None when the directory has no ``tokenizer_config.json``."""
    p = Path(directory) / "tokenizer_config.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text()).get("split_special_tokens") is True


def upgrade_tokenizer_config(directory: str | Path) -> bool:
    """Add ``"split_special_tokens": true`` to a model directory's ``tokenizer_config.json`` (one key, nothing
    else touched), so plain transformers users of a directory saved before pretag protected tags are safe too.
    Returns whether the file changed."""
    p = Path(directory) / "tokenizer_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer_config.json")
    cfg = json.loads(p.read_text())
    if cfg.get("split_special_tokens") is True:
        return False
    cfg["split_special_tokens"] = True
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(p)
    return True


def tag_ids(tokenizer, schema: Schema) -> dict[str, int]:
    """Tag token string -> id, always derived from the schema (never written down as numbers); ValueError when
    the tokenizer lacks one."""
    return dict(TagVocab(tokenizer, schema).checked().ids)


def text_problem(text: Any, what: str = "text") -> str | None:
    """Why ``text`` cannot be tokenized, or None. Python keeps undecodable bytes of argv (``--prompt
    "$(printf 'a\\xffb')"``) and of JSON (``"a\\ud800b"``) as lone surrogates, which no tokenizer accepts."""
    if not isinstance(text, str):
        return f"{what} must be a string, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the original byte, as the shell passed it
            return f"{what} is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {e.start})"
        return f"{what} is not valid Unicode (lone surrogate U+{code:04X} at character {e.start})"
    return None


def check_text(text: Any, what: str = "text") -> str:
    """``text`` itself if it can be tokenized; else ValueError naming the first bad character."""
    problem = text_problem(text, what)
    if problem:
        raise ValueError(problem)
    return text


def good_swap(tokenizer, schema: Schema) -> dict[int, int]:
    """Tag id -> id to put in its place for the counterfactual "had this segment been tagged good" input: each
    bad value's tag (open and, for spans, close) maps to its attribute's first non-bad value; others are kept."""
    ids = tag_ids(tokenizer, schema)
    swap: dict[int, int] = {}
    for a in schema.attributes:
        good = [v for v in a.values if v not in a.bad]
        if not good:
            continue
        to = a.tags[good[0]]
        for v in a.bad:
            t = a.tags[v]
            swap[ids[schema.open_token(t)]] = ids[schema.open_token(to)]
            if schema.close_token(t) is not None:
                swap[ids[schema.close_token(t)]] = ids[schema.close_token(to)]
    return swap


def encode_text(tokenizer, text: str) -> list[int]:
    """Encode user or corpus text so that it can never produce a tag (or any special) token id.

    Special-token matching is switched off for the call (tokenizers' ``encode_special_tokens``), so a literal
    ``<|bad|>`` is encoded as ordinary characters; the result is then checked, so a tokenizer whose base vocabulary
    happens to hold a special string fails loudly instead of silently emitting a tag.
    """
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Batch form of :func:`encode_text` (one Rust call for many pieces)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("pretag needs a fast (Rust `tokenizers`) tokenizer for tag-safe encoding")
    backend = tokenizer.backend_tokenizer
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
    except TypeError:  # tokenizers' "TextEncodeInput must be ..." for a str that is not valid Unicode
        for t in texts:
            check_text(t)
        raise
    finally:
        backend.encode_special_tokens = before
    out = [e.ids for e in encs]
    special = set(tokenizer.all_special_ids)
    for text, ids in zip(texts, out):
        bad = special.intersection(ids)
        if bad:
            raise ValueError(f"text {text[:60]!r} encodes to special token ids {sorted(bad)}; this tokenizer's base "
                             "vocabulary contains a special token string, so tag-safe encoding is impossible with it")
    return out


# ---- the tag vocabulary: a tokenizer and a schema bound once ----------------------------------------------------
def document_start_id(tokenizer) -> int | None:
    """The id every document starts after: BOS if the tokenizer has one, else EOS (GPT-2 style document
    separator, as packing puts between documents), so the first text token has a probability too."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def pad_id(tokenizer) -> int | None:
    """The id that pads a batch or a last block: the tokenizer's pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


Chunk = tuple[list[int], bool]
"""A run of token ids and whether it is text (counted) or a tag (context only, never counted)."""


@dataclass
class RenderedDoc:
    """A document as token chunks: ``chunks[i]`` is (ids, is_text), ``segment[i]`` its segment (-1: document tag);
    ``opens`` lists (chunk index, tag name, segment) of every opening tag: where self-tagging reads the model."""

    chunks: list[Chunk]
    segment: list[int]
    opens: list[tuple[int, str, int]]

    @property
    def ids(self) -> list[int]:
        return [t for c, _ in self.chunks for t in c]


_TOKEN_TEXT: dict[int, tuple[Any, int, dict[int, str]]] = {}
_TAG_TABLES: dict[tuple[int, int, int], tuple[Any, Any, tuple[dict, dict, dict]]] = {}


def _tag_tables(tokenizer, schema: Schema) -> tuple[dict[str, int], dict[str, int], dict[int, str]]:
    """(tag token -> id, tag name -> open id, open id -> tag name), memoised per tokenizer (and its length: adding
    tokens makes new tables) and schema: generation builds a TagVocab per call, and looking up a dozen tag tokens
    costs ~100 us. A schema's tags never change after ``schema_from_dict``."""
    import weakref

    key = (id(tokenizer), len(tokenizer), id(schema))
    hit = _TAG_TABLES.get(key)
    if hit is not None and hit[0]() is tokenizer and hit[1]() is schema:
        return hit[2]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in schema.tag_tokens}
    open_id = {t: ids[schema.open_token(t)] for t in schema.tag_names}
    tables = (ids, open_id, {i: t for t, i in open_id.items()})
    if len(_TAG_TABLES) > 16:
        _TAG_TABLES.clear()
    _TAG_TABLES[key] = (weakref.ref(tokenizer), weakref.ref(schema), tables)
    return tables


class TagVocab:
    """A tokenizer and a schema bound once: the document start, EOS and pad, the tag token ids, each token's text,
    and rendering of documents and prompts into ids exactly as training rendered them.

    Tags are structure, never text: :meth:`render` inserts tag pieces by id (from the schema) and encodes text
    pieces tag-safe (:func:`encode_texts`). Building one is cheap (its tag tables are memoised per tokenizer and
    schema), so callers make one where they need it rather than pass it around.

    Examples:
        >>> from pretag.schema import load_schema
        >>> schema = load_schema("pep8")
        >>> tok = train_tokenizer(["x = 1\\n"] * 4, schema, vocab_size=300)
        >>> v = TagVocab(tok, schema)
        >>> v.start_id == tok.eos_token_id and v.tag_of_id[v.open_id["bad"]]
        'bad'
        >>> v.render(["x = 1\\n"], {"pep8": ["good"]}).ids == [v.open_id["good"], *encode_text(tok, "x = 1\\n")]
        True
    """

    def __init__(self, tokenizer, schema: Schema):
        self.tokenizer, self.schema = tokenizer, schema
        self.ids, self.open_id, self.tag_of_id = _tag_tables(tokenizer, schema)
        """Tag token string (open and, for spans, close) -> id; tag name -> the id of its opening token; opening
        tag id -> tag name. Shared: never modify them."""

    @property
    def start_id(self) -> int | None:
        return document_start_id(self.tokenizer)

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return pad_id(self.tokenizer)

    def checked(self) -> TagVocab:
        """Self, or ValueError when the tokenizer lacks some tag token (see :func:`add_tag_tokens`)."""
        missing = [t for t, i in self.ids.items() if i is None or i == self.tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the tag tokens {missing}; add them with pretag.tokens.add_tag_tokens")
        return self

    # ---- token texts ---------------------------------------------------------------------------------------------
    def text(self, tid: int) -> str:
        """``tokenizer.decode([tid], skip_special_tokens=False)``, memoised per tokenizer (a decode costs ~2.5 us,
        and a batch of 32 x 64 tokens would pay it 2048 times per call)."""
        cache = self._text_cache()
        t = cache.get(tid)
        if t is None:
            t = cache[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return t

    def _text_cache(self) -> dict[int, str]:
        import weakref

        tok = self.tokenizer
        hit = _TOKEN_TEXT.get(id(tok))
        if hit is None or hit[0]() is not tok or hit[1] != len(tok):
            if len(_TOKEN_TEXT) > 16:
                _TOKEN_TEXT.clear()
            hit = (weakref.ref(tok), len(tok), {})
            _TOKEN_TEXT[id(tok)] = hit
        return hit[2]

    # ---- rendering -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Tag-safe ids of ``text`` (:func:`encode_text`); none for an empty text."""
        return encode_text(self.tokenizer, text) if text else []

    def render(self, segments: list[str], tags: dict[str, list[str | None]], *, close: bool = True) -> RenderedDoc:
        """Tokenize one document the way training does (``Schema.render_pieces``): tag pieces by id, text pieces
        tag-safe. ``close=False`` leaves out closing span tags (a prompt stays inside its spans)."""
        return self.render_many([(segments, tags)], close=close)[0]

    def render_many(self, docs: Sequence[tuple[list[str], dict[str, list[str | None]]]], *, close: bool = True
                    ) -> list[RenderedDoc]:
        """:meth:`render` for many documents, their text pieces encoded in one batch (one Rust call)."""
        pieces = [[p for p in self.schema.render_pieces(segs, tags) if close or not p.closing] for segs, tags in docs]
        texts = iter(encode_texts(self.tokenizer, [p.text for ps in pieces for p in ps if p.tag is None]))
        out = []
        for ps in pieces:
            doc = RenderedDoc([], [], [])
            for p in ps:
                if p.tag is None:
                    doc.chunks.append((list(next(texts)), True))
                else:
                    if not p.closing:
                        doc.opens.append((len(doc.chunks), p.tag, p.segment))
                    doc.chunks.append(([self.ids[p.text]], False))
                doc.segment.append(p.segment)
            out.append(doc)
        return out

    def prompt_ids(self, prompt: str, start_tags: dict[str, str] | None, *, every_segment: bool = False
                   ) -> list[int]:
        """A prompt's ids as training rendered documents: the document start, then ``start_tags`` (attribute name ->
        tag) as a document that begins with ``prompt``. Prefix schemas tag the prompt's first segment (the schema's
        segmenter), or ``every_segment``; span schemas open their spans once, before the whole prompt, and leave
        them open. ``start_tags=None``: no tags. Either way each segment is its own text piece, as in training, where
        a segment boundary is always a piece boundary: encoded in one piece, ``"foo.  " + "It"`` would come out as
        ``" " + " It"`` where training only ever showed ``"  " + "It"``."""
        from pretag.segment import segment

        start = [] if (first := self.start_id) is None else [first]
        schema = self.schema
        segs = segment(prompt, schema.segmenter)
        if start_tags is None:
            return start + self.render(segs, {}).ids
        if schema.render == "span" and not segs:
            segs = [""]  # an empty prompt still opens its spans
        tags = {a.name: [start_tags[a.name]] for a in schema.document_attributes}
        first_only = schema.render == "prefix" and not every_segment
        for a in schema.segment_attributes:
            tags[a.name] = [start_tags[a.name] if i == 0 or not first_only else None for i in range(len(segs))]
        return start + self.render(segs, tags, close=False).ids


# ---- per-segment scores, rewards and badness ---------------------------------------------------------------------
def _score(x: Any) -> float:
    return float("nan") if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def segment_table(schema: Schema, row: dict[str, Any], threshold: float | None = None):
    """Per-segment arrays for one document: scores (S, A) with NaN = unscored, reward (S,), bad (S,).

    Document-level attributes are broadcast to every segment. The reward is the paper's R = -misalignment, summed
    over attributes with the schema's weights (``Attribute.reward`` gives the sign); unscored attributes add 0.
    """
    n = len(row["segments"])
    scores = np.full((n, len(schema.attributes)), np.nan, dtype=np.float32)
    for j, a in enumerate(schema.attributes):
        vals = row.get(f"score__{a.name}")
        if vals is None:
            continue
        if a.level == "document":
            scores[:, j] = _score(vals[0]) if len(vals) else np.nan
        else:
            if len(vals) != n:
                raise ValueError(f"document {row.get('id')!r}: score__{a.name} has {len(vals)} scores "
                                 f"for {n} segments")
            scores[:, j] = [_score(v) for v in vals]
    reward = np.zeros(n, dtype=np.float32)
    bad = np.zeros(n, dtype=bool)
    for j, a in enumerate(schema.attributes):
        col = scores[:, j]
        ok = ~np.isnan(col)
        reward += np.where(ok, a.weight * a.reward(col), 0.0).astype(np.float32)
        bad |= np.array([a.tagged_bad(float(s), threshold) for s in col], dtype=bool)
    return scores, reward, bad


def document_misaligned(schema: Schema, row: dict[str, Any], threshold: float | None = None) -> bool:
    """The filter objective's test (paper Eq. 4): is the document's average score, per attribute, bad?"""
    scores, _, _ = segment_table(schema, row)
    for j, a in enumerate(schema.attributes):
        col = scores[:, j]
        col = col[~np.isnan(col)]
        if a.bands is None and len(col) and a.tagged_bad(float(col.mean()), threshold):
            return True
    return False


def percentile_filter(schema: Schema, rows: Sequence[dict[str, Any]], drop: float) -> list[dict[str, Any]]:
    """The paper's percentile filter (Eq. 4 with t at a percentile): drop the worst ``drop`` fraction of documents
    by their average score, per binary attribute (a document in any attribute's worst fraction goes)."""
    if not 0.0 < drop < 1.0:
        raise ValueError(f"filter_drop must be strictly between 0 and 1, got {drop}")
    attrs = [(j, a) for j, a in enumerate(schema.attributes) if a.bands is None]
    means = np.full((len(rows), len(schema.attributes)), np.nan)
    for i, row in enumerate(rows):
        scores, _, _ = segment_table(schema, row)
        for j, _a in attrs:
            col = scores[:, j][~np.isnan(scores[:, j])]
            means[i, j] = col.mean() if len(col) else np.nan
    out = np.ones(len(rows), dtype=bool)
    for j, a in attrs:
        col = means[:, j]
        ok = ~np.isnan(col)
        if not ok.any():
            continue
        worse = -a.reward(col)
        cut = np.quantile(worse[ok], 1.0 - drop, method="inverted_cdf")
        out &= ~(ok & (worse > cut))
    return [r for r, keep in zip(rows, out) if keep]


# ---- documents -> token streams -> blocks ------------------------------------------------------------------------
@dataclass
class Blocks:
    """Packed training data; row i is one block of ``block_size`` tokens (numpy arrays, torch-ready)."""

    input_ids: np.ndarray  # (N, T) int64
    scores: np.ndarray  # (N, T, A) float32: the token's segment scores per attribute; NaN = none (EOS, pad)
    reward: np.ndarray  # (N, T) float32: the segment's reward (weighted sum over attributes)
    bad: np.ndarray  # (N, T) bool: the token's segment is misaligned under the schema (or threshold override)
    is_tag: np.ndarray  # (N, T) bool
    mask: np.ndarray  # (N, T) bool: False on padding of the last block
    attributes: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def encode_documents(tokenizer, schema: Schema, rows: Sequence[dict[str, Any]], *, tags: bool,
                     tag_dropout: float = 0.0, untagged_openings: float = 0.0, threshold: float | None = None,
                     seed: int = 0):
    """Encode documents into one token stream with per-token metadata (EOS after each document).

    ``tags``: insert tag ids (conditional training). ``tag_dropout``: leave this fraction of segments (and of
    document-level tags) untagged, the paper's trick so the model also learns the unconditional distribution.
    ``untagged_openings``: in this fraction of documents with two or more segments, leave the first k segments'
    segment tags out (k uniform in 1..n-1), as a prompt rendered with ``prompt_tags: none`` arrives; the next tag must
    then be read from the text alone, which a tag history (labels that hold for a whole document) never asks for.
    """
    for name, v in (("tag_dropout", tag_dropout), ("untagged_openings", untagged_openings)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    rng = np.random.default_rng(seed)
    vocab = TagVocab(tokenizer, schema).checked()
    eos = tokenizer.eos_token_id
    tables = []
    docs = []
    for row in rows:
        segs = list(row["segments"])
        tables.append(segment_table(schema, row, threshold))
        row_tags = schema.row_tags(row) if tags else {}
        if tags and tag_dropout > 0:
            drop_doc = rng.random() < tag_dropout
            drop_seg = rng.random(len(segs)) < tag_dropout
            for a in schema.attributes:
                keep = [not drop_doc] if a.level == "document" else ~drop_seg
                row_tags[a.name] = [t if k else None for t, k in zip(row_tags[a.name], keep)]
        if tags and untagged_openings > 0 and len(segs) > 1 and rng.random() < untagged_openings:
            k = int(rng.integers(1, len(segs)))
            for a in schema.segment_attributes:
                row_tags[a.name] = [None] * k + list(row_tags[a.name][k:])
        docs.append((segs, row_tags))
    plan: list[tuple[int, int, list[int], bool]] = []  # (doc, segment (-1: document tag, -2: EOS), ids, is tag)
    for d, doc in enumerate(vocab.render_many(docs)):
        for (piece, is_text), seg in zip(doc.chunks, doc.segment):
            if piece:
                plan.append((d, seg, piece, not is_text))
        plan.append((d, -2, [eos], False))
    n_attr = len(schema.attributes)
    doc_cols = [j for j, a in enumerate(schema.attributes) if a.level == "document"]
    ids: list[int] = []
    lengths: list[int] = []  # one entry per piece; per-piece metadata is repeated over its tokens at the end
    rows_sc: list[np.ndarray] = []
    reward: list[float] = []
    bad: list[bool] = []
    is_tag: list[bool] = []
    nan_row = np.full(n_attr, np.nan, dtype=np.float32)
    for d, seg, piece, tag in plan:
        sc, rw, bd = tables[d]
        if seg >= 0:
            srow, r, b = sc[seg], float(rw[seg]), bool(bd[seg])
        elif seg == -1 and len(sc):  # document-level tag: the document's attributes, no segment's
            srow = nan_row.copy()
            srow[doc_cols] = sc[0, doc_cols]
            r, b = 0.0, False
        else:  # EOS
            srow, r, b = nan_row, 0.0, False
        ids.extend(piece)
        lengths.append(len(piece))
        rows_sc.append(srow)
        reward.append(r)
        bad.append(b)
        is_tag.append(tag)
    n = np.asarray(lengths, dtype=np.int64)
    scores = np.repeat(np.asarray(rows_sc, dtype=np.float32).reshape(-1, n_attr), n, axis=0)
    return (np.asarray(ids, dtype=np.int64), scores, np.repeat(np.asarray(reward, dtype=np.float32), n),
            np.repeat(np.asarray(bad, dtype=bool), n), np.repeat(np.asarray(is_tag, dtype=bool), n))


def pack(tokenizer, schema: Schema, rows: Sequence[dict[str, Any]], block_size: int, *, tags: bool,
         tag_dropout: float = 0.0, untagged_openings: float = 0.0, threshold: float | None = None,
         seed: int = 0) -> Blocks:
    """Documents -> fixed-length blocks (the last one padded and masked), scores aligned with tokens."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if not rows:
        raise ValueError("no documents to pack")
    ids, scores, reward, bad, is_tag = encode_documents(tokenizer, schema, rows, tags=tags, tag_dropout=tag_dropout,
                                                        untagged_openings=untagged_openings, threshold=threshold,
                                                        seed=seed)
    n = len(ids)
    n_blocks = max(1, math.ceil(n / block_size))
    pad = n_blocks * block_size - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])

    def fill(x: np.ndarray, value) -> np.ndarray:
        tail = np.full((pad, *x.shape[1:]), value, dtype=x.dtype)
        return np.concatenate([x, tail]).reshape(n_blocks, block_size, *x.shape[1:])

    blocks = Blocks(input_ids=fill(ids, pad_id(tokenizer)), scores=fill(scores, np.nan), reward=fill(reward, 0.0),
                    bad=fill(bad, False), is_tag=fill(is_tag, False), mask=mask.reshape(n_blocks, block_size),
                    attributes=[a.name for a in schema.attributes])
    logger.info("packed %d documents into %d blocks of %d tokens (%d tokens, %.1f%% bad, %d tag tokens)",
                len(rows), n_blocks, block_size, n, 100 * bad.mean() if n else 0.0, int(is_tag.sum()))
    return blocks
