"""Where the attribute lives: residual-stream activations at segment starts, per-layer probes, directions.

A *context* is a held-out segment start: the position whose next token is the segment's tag, teacher-forced with
the classifier's tags of the earlier segments (as ``evaluate.self_tagging`` reads the model). There the model's
P(bad tag) is its temptation, and the classifier's verdict on the segment that follows is the label a probe must
predict from the residual stream. Documents are split in two (by document, never by segment) so every AUROC is
measured on documents the probe never saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pretag.interpret.hooks import Recorder, layout, on_residual, read_direction, tag_rows
from pretag.metrics import Estimate, auroc


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) attention mask
    sites: torch.Tensor  # (B, T) bool: the contexts (segment starts) of this batch, row-major = context order


@dataclass
class Contexts:
    """Segment starts of held-out documents for one binary attribute, with what the plain model did there."""

    attribute: str
    bad_id: int
    good_id: int
    batches: list[Batch]
    doc: np.ndarray  # (N,) document index of each context
    label: np.ndarray  # (N,) bool: the classifier called the segment bad
    text: list[str]  # (N,) the segment that follows
    p_bad: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (N,) P(bad tag): the temptation
    p_good: np.ndarray = field(default_factory=lambda: np.zeros(0))
    acts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, d)

    @property
    def p_rel(self) -> np.ndarray:
        """P(bad) among the attribute's two tags: which tag the model would pick."""
        s = self.p_bad + self.p_good
        return np.where(s > 0, self.p_bad / np.maximum(s, 1e-30), 0.5)


def build_contexts(model, tokenizer, schema, rows: Sequence[dict], attribute: str | None = None, *,
                   batch_size: int = 16, max_segments: int = 32) -> Contexts:
    """Render held-out rows the way training did and mark their segment starts (the first binary segment
    attribute unless ``attribute`` is given); documents are cut to the model's context. For a span schema every
    text token of a tagged segment is a context (a span may close, and the next open, after any token)."""
    from pretag.evaluate import DEFAULT_CONTEXT
    from pretag.generate import context_limit
    from pretag.tokens import TagVocab

    attrs = [a for a in schema.segment_attributes if a.bands is None]
    attr = next((a for a in attrs if attribute in (None, a.name)), None)
    if attr is None:
        raise ValueError(f"schema {schema.name!r} has no binary segment attribute {attribute or ''}".strip())
    good_t, bad_t = attr.tags["good"], attr.tags["bad"]
    vocab = TagVocab(tokenizer, schema)
    bad_id, good_id = vocab.open_id[bad_t], vocab.open_id[good_t]
    start, ctx = vocab.start_id, context_limit(model, DEFAULT_CONTEXT)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    docs = []
    for d, row in enumerate(rows):
        segs = list(row["segments"])
        doc = vocab.render(segs, schema.row_tags(row))
        flat = ([start] if start is not None else []) + [t for c, _ in doc.chunks for t in c]
        offs = np.cumsum([len(flat) - sum(len(c) for c, _ in doc.chunks)] + [len(c) for c, _ in doc.chunks])
        flat = flat[:ctx]
        if schema.render == "span":  # a span can close at any token: every text token of a tagged segment
            seg_tag = schema.row_tags(row)[attr.name]
            sites = [(int(offs[j]) + k - 1, seg_tag[s], s) for j, ((c, is_text), s) in
                     enumerate(zip(doc.chunks, doc.segment)) if is_text and s >= 0 and seg_tag[s] in (good_t, bad_t)
                     for k in range(len(c)) if 0 < offs[j] + k < len(flat)]
        else:
            sites = [(int(offs[ci]) - 1, tag, s) for ci, tag, s in doc.opens
                     if tag in (good_t, bad_t) and 0 < offs[ci] < len(flat)][:max_segments]
        if not sites:
            continue
        docs.append((flat, [p for p, _, _ in sites], d, [(tag == bad_t, segs[s]) for _, tag, s in sites]))
    if not docs:
        raise ValueError("no segment starts with a tag of this attribute in the given rows")
    docs.sort(key=lambda x: len(x[0]))  # similar lengths together: less padding; contexts follow this order
    doc_idx = [d for _, pos, d, _ in docs for _ in pos]
    labels = [lab for *_, site in docs for lab, _ in site]
    texts = [t for *_, site in docs for _, t in site]
    batches = []
    for b in range(0, len(docs), batch_size):
        chunk = docs[b : b + batch_size]
        T = max(len(x[0]) for x in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        sites = torch.zeros(len(chunk), T, dtype=torch.bool)
        for r, (f, pos, _, _) in enumerate(chunk):
            ids[r, : len(f)] = torch.tensor(f)
            mask[r, : len(f)] = 1
            sites[r, pos] = True
        batches.append(Batch(ids, mask, sites))
    return Contexts(attr.name, bad_id, good_id, batches, np.asarray(doc_idx), np.asarray(labels, dtype=bool), texts)


def site_logits(model, b: Batch, select: torch.Tensor) -> torch.Tensor:
    """(n, V) logits at the selected rows of one batch: the body runs on every token, the unembedding only on
    the rows asked for (at an 8k vocabulary the full (B, T, V) logits cost more than the body of a 4-layer model)."""
    device = select.device
    hidden = model.base_model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device)).last_hidden_state
    return model.get_output_embeddings()(hidden[select])


def run_contexts(model, ctx: Contexts, layers: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray,
                                                                             dict[int, torch.Tensor]]:
    """One pass over the contexts: (P(bad), P(good), {layer: (N, d) activations}) at every segment start.
    Interventions wrap this call in ``hooks.intervene``; the recorder only reads."""
    rec = Recorder(layers)
    device = next(model.parameters()).device
    p_bad, p_good = [], []
    model.eval()
    with torch.no_grad(), on_residual(model, layers, rec):
        for b in ctx.batches:
            rec.select = b.sites.to(device)
            p = torch.softmax(site_logits(model, b, rec.select).float(), -1)  # (n, V): the rows predicting a tag
            p_bad.append(p[:, ctx.bad_id].cpu())
            p_good.append(p[:, ctx.good_id].cpu())
    return torch.cat(p_bad).numpy(), torch.cat(p_good).numpy(), rec.take()


def capture(model, ctx: Contexts, layers: Sequence[int] | None = None) -> Contexts:
    """Fill ``ctx`` with the plain model's temptation and its residual stream at every layer (0..L)."""
    layers = list(range(layout(model).n_layers + 1)) if layers is None else list(layers)
    ctx.p_bad, ctx.p_good, ctx.acts = run_contexts(model, ctx, layers)
    return ctx


# ---- statistics ---------------------------------------------------------------------------------------------------
def auroc_ci(scores, labels, *, n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """AUROC with a stratified percentile bootstrap interval (positives and negatives resampled separately, so
    every resample has both classes)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    point = auroc(s, y)
    if np.isnan(point):
        return Estimate(point, point, point, len(s))
    from scipy.stats import rankdata

    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(pos, (n_resamples, len(pos))), rng.choice(neg, (n_resamples, len(neg)))], 1)
    ranks = rankdata(s[idx], axis=1)  # (R, n) mid-ranks, positives in the first len(pos) columns
    u = ranks[:, : len(pos)].sum(1) - len(pos) * (len(pos) + 1) / 2
    lo, hi = np.quantile(u / (len(pos) * len(neg)), [0.025, 0.975])  # the Mann-Whitney form of metrics.auroc
    return Estimate(point, float(min(lo, point)), float(max(hi, point)), len(s))


def split_docs(doc: np.ndarray, train_fraction: float = 0.7, seed: int = 0) -> np.ndarray:
    """(N,) bool: the context's document is in the probe-training half (a seeded choice of documents)."""
    ids = np.unique(doc)
    rng = np.random.default_rng(seed)
    train = set(rng.permutation(ids)[: max(1, int(round(train_fraction * len(ids))))].tolist())
    return np.array([d in train for d in doc.tolist()])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().reshape(1, -1), b.float().reshape(1, -1)).item())


def fit_probe(X: np.ndarray, y: np.ndarray, C: float = 0.1) -> np.ndarray:
    """Logistic-regression probe on standardised activations; returns its direction in residual space (d,) with
    the intercept folded away (scores are X @ w up to a constant, which AUROC ignores)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced")
    clf.fit((X - mu) / sd, y)
    return clf.coef_[0] / sd


def layer_curve(model, tokenizer, schema, ctx: Contexts, *, train_fraction: float = 0.7, n_resamples: int = 1000,
                seed: int = 0) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """One record per layer: held-out AUROC (95 % interval) of a logistic probe and of the difference-of-means
    direction, and the cosine of that direction with the bad tag's rows. Also returns the directions."""
    attr = schema.attribute(ctx.attribute)
    bad_tag = attr.tags["bad"]
    tid = tokenizer.convert_tokens_to_ids(schema.open_token(bad_tag))
    emb_row = model.get_input_embeddings().weight[tid].detach()
    unemb_row = model.get_output_embeddings().weight[tid].detach()
    emb_diff, unemb_diff = tag_rows(model, tokenizer, schema, bad_tag)
    read = read_direction(model, tokenizer, schema, bad_tag)
    train = split_docs(ctx.doc, train_fraction, seed)
    test = ~train
    y = ctx.label
    records, directions = [], {}
    for layer, acts in sorted(ctx.acts.items()):
        X = acts.numpy().astype(np.float64)
        rec: dict = {"layer": layer, "n_train": int(train.sum()), "n_test": int(test.sum()),
                     "n_test_bad": int(y[test].sum())}
        if y[train].all() or (~y[train]).all():
            rec["probe_auroc"] = rec["diffmeans_auroc"] = None
            records.append(rec)
            continue
        dm = torch.tensor(X[train & y].mean(0) - X[train & ~y].mean(0), dtype=torch.float32)  # (d,)
        w = fit_probe(X[train], y[train])
        directions[layer] = dm
        rec["probe_auroc"] = auroc_ci(X[test] @ w, y[test], n_resamples=n_resamples, seed=seed).to_dict()
        rec["diffmeans_auroc"] = auroc_ci(X[test] @ dm.numpy(), y[test], n_resamples=n_resamples,
                                          seed=seed).to_dict()
        rec["diffmeans_norm"] = float(dm.norm())
        rec["cos_probe_diffmeans"] = cosine(torch.tensor(w), dm)
        rec["cos_embed_bad"] = cosine(dm, emb_row)
        rec["cos_unembed_bad"] = cosine(dm, unemb_row)
        rec["cos_embed_bad_minus_good"] = cosine(dm, emb_diff)
        rec["cos_unembed_bad_minus_good"] = cosine(dm, unemb_diff)
        rec["cos_read_direction"] = cosine(dm, read)
        records.append(rec)
    return records, directions


def best_layer(records: list[dict]) -> int:
    """The most informative layer: the highest held-out probe AUROC (the earliest on a tie)."""
    scored = [(r["probe_auroc"]["value"], -r["layer"]) for r in records if r.get("probe_auroc")]
    if not scored:
        raise ValueError("no layer has a probe (the held-out contexts hold a single class)")
    return -max(scored)[1]
