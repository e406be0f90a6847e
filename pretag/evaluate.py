"""The paper's metrics, and ours: misalignment, capability, self-tagging, temptation, diversity.

Korbak et al. (2023) judge an objective on two axes. *Misalignment*: the mean classifier score of unconditional
samples (lower is better), here with its companions (expected maximum over 25 samples, fraction of samples with any
bad segment, fraction of bad segments). *Capability*: KL from a reference model, estimated with reference samples
as mean_x[log p_ref(x) - log p_model(x)], and held-out LM loss. Every headline number carries a bootstrap interval.

The statistics are pure functions in ``pretag.metrics`` (re-exported here); this module runs them over a model
directory (``evaluate_model``) using labeling and generation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretag.metrics import (  # noqa: F401  (re-exported: the metrics are part of pretag.evaluate's API)
    Estimate,
    auroc,
    bootstrap_ci,
    calibration_table,
    distinct_n,
    expected_max,
    json_safe,
    misalignment_summary,
    pooled_fraction,
    ratio_ci,
    sample_score,
    scorable_segments,
    strip_tags,
)
from pretag.tokens import Chunk, RenderedDoc, TagVocab, document_start_id  # noqa: F401  (Chunk, RenderedDoc: API)

log = logging.getLogger(__name__)


# ---- log-probabilities under a model ----------------------------------------------------------------------
DEFAULT_CONTEXT = 2048
"""Positions assumed when a model's config does not say (``pretag.generate.context_limit``)."""


def encode_plain(tokenizer, text: str) -> list[int]:
    """Text -> ids, tag-safe (``pretag.tokens.encode_text``): a sample that happens to contain ``<|bad|>`` is
    scored as those characters, never as the tag."""
    from pretag.tokens import encode_text

    return list(encode_text(tokenizer, text))


def _windows(docs: Sequence[Sequence[Chunk]], start: int | None, ctx: int) -> list[tuple[int, list[int], list[bool]]]:
    """Flatten each doc to (doc index, ids, counted) windows of at most ``ctx`` tokens. A doc longer than the
    context is cut into consecutive windows (each later window loses the earlier context: a small, documented
    overestimate of the loss of very long documents)."""
    out = []
    for d, chunks in enumerate(docs):
        ids = [] if start is None else [start]
        counted = [] if start is None else [False]
        for toks, is_text in chunks:
            ids += list(toks)
            counted += [is_text] * len(toks)
        for a in range(0, max(len(ids) - 1, 1), ctx):
            w_ids, w_cnt = ids[a : a + ctx + 1], counted[a : a + ctx + 1]
            if a and len(w_ids) < 2:
                break
            out.append((d, w_ids, w_cnt))
    return out


LOGPROB_CHUNK = 1 << 27  # logits (in float32) turned into log-probs at once: 512 MiB


def model_identity(path: str | Path) -> str:
    """What names a model in cache keys. A pretag model dir is named by its content (its training config and
    training log), so an experiment folder that is moved or copied keeps its cached evaluations and reference
    samples, and a model retrained in place gets new ones; anything else by its resolved path or hub name."""
    import hashlib

    from pretag.modeldir import TRAIN_FILE

    p = Path(path)
    if (p / TRAIN_FILE).is_file():
        h = hashlib.sha1((p / TRAIN_FILE).read_bytes())
        if (p / "metrics.csv").is_file():
            h.update((p / "metrics.csv").read_bytes())
        return "pretag:" + h.hexdigest()[:16]
    return str(p.resolve()) if p.exists() else str(path)


def token_logprobs(model, docs: Sequence[Sequence[Chunk]], *, start_id: int | None, batch_size: int = 8
                   ) -> list[tuple[float, int]]:
    """For each doc (a list of chunks), (sum of log p over its counted tokens, number of counted tokens).

    The first token is predicted from ``start_id`` (the model's document start); tag tokens are context only. This
    is the one scorer behind KL (sequence log-probs) and held-out loss (nats per text token).
    """
    import torch

    from pretag.generate import context_limit

    model.eval()
    device = next(model.parameters()).device
    ctx = context_limit(model, DEFAULT_CONTEXT) - 1
    windows = _windows(docs, start_id, ctx)
    sums, counts = [0.0] * len(docs), [0] * len(docs)
    windows.sort(key=lambda w: len(w[1]))  # similar lengths together: less padding
    with torch.no_grad():
        for b in range(0, len(windows), batch_size):
            batch = windows[b : b + batch_size]
            T = max(len(w[1]) for w in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            counted = torch.zeros(len(batch), T, dtype=torch.bool)
            for r, (_, w_ids, w_cnt) in enumerate(batch):
                ids[r, : len(w_ids)] = torch.tensor(w_ids)
                mask[r, : len(w_ids)] = 1
                counted[r, : len(w_cnt)] = torch.tensor(w_cnt)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            # log p(token t+1 | ..t) = logit − logsumexp, a few rows at a time: a float32 log-softmax of the whole
            # batch is B·T·V floats (6.8 GiB for SmolLM2 at 128 × 256), which ran a GPU shared by four jobs out
            # of memory
            nxt = ids[:, 1:].to(device)
            tgt = torch.empty(len(batch), T - 1)
            rows = max(1, LOGPROB_CHUNK // max(1, T * logits.shape[-1]))
            for r0 in range(0, len(batch), rows):
                x = logits[r0 : r0 + rows, :-1].float()
                tgt[r0 : r0 + rows] = (x.gather(-1, nxt[r0 : r0 + rows].unsqueeze(-1)).squeeze(-1)
                                       - torch.logsumexp(x, dim=-1)).cpu()
            del logits
            keep = counted[:, 1:] & mask[:, 1:].bool()
            for r, (d, _, _) in enumerate(batch):
                sums[d] += float(tgt[r][keep[r]].sum())
                counts[d] += int(keep[r].sum())
    return list(zip(sums, counts))


def sequence_logprobs(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8) -> list[float]:
    """log p(text) for each text, summed over all its tokens after the document start.

    Sequence-level, so two models with different tokenizers give comparable numbers (the basis of KL below).
    """
    docs = [[(encode_plain(tokenizer, t), True)] for t in texts]
    return [s for s, _ in token_logprobs(model, docs, start_id=document_start_id(tokenizer), batch_size=batch_size)]


def kl_from_reference(ref_logprobs: Sequence[float], model_logprobs: Sequence[float], *, n_resamples: int = 1000,
                      seed: int = 0) -> Estimate:
    """KL(p_ref || p_model) estimated as the paper did: mean over reference samples x of
    log p_ref(x) − log p_model(x), in nats per sample, with a bootstrap interval."""
    if len(ref_logprobs) != len(model_logprobs) or not len(ref_logprobs):
        raise ValueError(f"need equally many log-probs, got {len(ref_logprobs)} and {len(model_logprobs)}")
    diff = np.asarray(ref_logprobs, dtype=float) - np.asarray(model_logprobs, dtype=float)
    return bootstrap_ci(diff, n_resamples=n_resamples, seed=seed)


def lm_loss(model, docs: Sequence[Sequence[Chunk]], *, start_id: int | None, batch_size: int = 8,
            count_tags: bool = False) -> dict:
    """Held-out LM loss in nats per text token, pooled over docs. Tag tokens are context, never counted, unless
    ``count_tags``: then their log-probabilities are added in too (still divided by the text tokens), which gives
    −log p(text, tags) per text token."""
    scored = [[(c, True) for c, _ in doc] for doc in docs] if count_tags else docs
    nll = -sum(s for s, _ in token_logprobs(model, scored, start_id=start_id, batch_size=batch_size))
    # the text tokens that get predicted: every token of a doc but its very first when there is no start token
    n = sum(sum(len(c) for c, is_text in doc if is_text) - int(start_id is None and bool(doc) and doc[0][1])
            for doc in docs)
    if n == 0:
        raise ValueError("no text tokens to score")
    return {"loss": nll / n, "perplexity": math.exp(min(nll / n, 50.0)), "n_tokens": n, "n_docs": len(docs)}


def heldout_loss(model, tokenizer, schema, rows: Sequence[dict], *, joint: bool, batch_size: int = 8) -> dict:
    """``loss`` of :func:`evaluate_model` on labeled ``rows``: ``untagged`` (the per-segment tokenization training
    used, no tag between segments), ``tagged`` (the classifier's tags as context) and, with ``joint`` (a tag-trained
    model), ``joint`` (the tags counted too: no oracle, see ``pretag.results.HeldoutLoss.joint``)."""
    vocab = TagVocab(tokenizer, schema)
    start = vocab.start_id
    plain = [vocab.render(list(r["segments"]), {a.name: [None] * len(r["segments"]) for a in schema.attributes}).chunks
             for r in rows]
    tagged = [vocab.render(list(r["segments"]), schema.row_tags(r)).chunks for r in rows]
    out = {"untagged": lm_loss(model, plain, start_id=start, batch_size=batch_size),
           "tagged": lm_loss(model, tagged, start_id=start, batch_size=batch_size)}
    if joint:
        out["joint"] = lm_loss(model, tagged, start_id=start, batch_size=batch_size, count_tags=True)
    return out


# ---- self-tagging: does the model know when it is about to write a bad segment? ----------------------------
def render_doc(tokenizer, schema, segments: list[str], tags: dict[str, list[str | None]]) -> RenderedDoc:
    """Tokenize a document the way training does (``pretag.tokens.TagVocab.render``)."""
    return TagVocab(tokenizer, schema).render(segments, tags)


def row_tags(schema, row: dict) -> dict[str, list[str | None]]:
    """The per-attribute tag lists of a labeled row (``pretag.schema.Schema.row_tags``)."""
    return schema.row_tags(row)


def self_tagging(model, tokenizer, schema, rows: Sequence[dict], *, max_segments: int = 16, batch_size: int = 8,
                 n_bins: int = 10) -> dict[str, dict]:
    """For each binary segment-level attribute: the model's P(bad tag) at held-out segment starts against the
    classifier's label (AUROC, calibration), and the log-likelihood ratio of each segment under the bad vs the
    good tag, log p(seg | bad) − log p(seg | good), against the same label (AUROC, mean per class).

    P(bad) is renormalised over the attribute's two tags (p_bad / (p_bad + p_good)): the question is which tag the
    model would pick, not how likely a tag is at all; the raw tag mass is reported as ``mean_tag_mass``.
    Documents are teacher-forced with their classifier tags and cut to the model's context.
    """
    import torch

    from pretag.generate import context_limit

    vocab = TagVocab(tokenizer, schema)
    start = vocab.start_id
    ctx = context_limit(model, DEFAULT_CONTEXT) - 1
    ids_of = vocab.open_id
    device = next(model.parameters()).device
    out: dict[str, dict] = {}
    for a in (a for a in schema.segment_attributes if a.bands is None):
        good_t, bad_t = a.tags["good"], a.tags["bad"]
        probs, labels, mass, llr, llr_labels = [], [], [], [], []
        for row in rows:
            doc = vocab.render(list(row["segments"]), schema.row_tags(row))
            flat = ([start] if start is not None else []) + [t for c, _ in doc.chunks for t in c]
            offs = np.cumsum([len(flat) - sum(len(c) for c, _ in doc.chunks)] + [len(c) for c, _ in doc.chunks])
            flat = flat[: ctx + 1]
            sites = [(ci, t, s) for ci, t, s in doc.opens if t in (good_t, bad_t) and 0 < offs[ci] < len(flat)]
            if not sites:
                continue
            sites = sites[:max_segments]
            with torch.no_grad():
                ids = torch.tensor([flat], device=device)
                p = torch.softmax(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1).cpu()
            variants = []
            for ci, tag, seg in sites:
                before = p[offs[ci] - 1]  # (V,): the distribution that predicts this tag
                pb, pg = float(before[ids_of[bad_t]]), float(before[ids_of[good_t]])
                probs.append(pb / (pb + pg) if pb + pg > 0 else 0.5)
                mass.append(pb + pg)
                labels.append(tag == bad_t)
                last = max(i for i, s in enumerate(doc.segment) if s == seg)
                for swap in (bad_t, good_t):  # same context, only this tag swapped; count this segment's text
                    v = [(c, False) for c, _ in doc.chunks[:ci]] + [([ids_of[swap]], False)]
                    v += [(c, txt and doc.segment[j] == seg) for j, (c, txt) in enumerate(doc.chunks) if ci < j <= last]
                    variants.append(v)
            lps = token_logprobs(model, variants, start_id=start, batch_size=batch_size)
            for k, (_, tag, _) in enumerate(sites):
                (lb, nb), (lg, _) = lps[2 * k], lps[2 * k + 1]
                if nb:
                    llr.append(lb - lg)
                    llr_labels.append(tag == bad_t)
        llr_a, lab_a = np.asarray(llr), np.asarray(llr_labels, dtype=bool)
        out[a.name] = {
            "n": len(probs), "n_bad": int(sum(labels)),
            "auroc": auroc(probs, labels) if probs else float("nan"),
            "calibration": calibration_table(probs, labels, n_bins=n_bins),
            "mean_tag_mass": float(np.mean(mass)) if mass else float("nan"),
            "llr_auroc": auroc(llr_a, lab_a) if len(llr_a) else float("nan"),
            "mean_llr_bad": float(llr_a[lab_a].mean()) if lab_a.any() else None,
            "mean_llr_good": float(llr_a[~lab_a].mean()) if (~lab_a).any() else None,
        }
    return out


# ---- sampling and scoring samples -------------------------------------------------------------------------
@dataclass
class Sample:
    """One generated sample, tags stripped, with what the monitor saw at each tag it wrote."""

    text: str
    truncated: bool
    """The length limit, not EOS, ended it: its final segment is not scored."""
    tag_steps: list[tuple[int, str, dict[str, float]]]
    """(character offset in ``text``, tag token written, temptation of every tag token at that step)."""
    prompt: str = ""


def uses_tags(model_dir) -> bool:
    """Was this model trained with tags in its text (the conditional objective)?"""
    from pretag.modeldir import ModelDir

    return ModelDir(model_dir).tagged


def task_schema(own, schema, tokenizer, tagged: bool, where):
    """``schema`` if a model trained under ``own`` can be evaluated with it, else a ValueError that says why."""
    want = [schema.open_token(t) for t in schema.tag_names]
    if tagged and sorted(want) != sorted(own.open_token(t) for t in own.tag_names):
        raise ValueError(f"{where} was trained with the tags of schema {own.name!r}; it cannot be evaluated with "
                         f"schema {schema.name!r}, whose tags differ")
    try:
        TagVocab(tokenizer, schema).checked()
    except ValueError as e:
        raise ValueError(f"{where}: cannot be evaluated with schema {schema.name!r}: {e}") from None
    return schema


def sampling_policy(schema, tagged: bool):
    """The paper's sampling: a tag-trained model is conditioned on the good tags (bad ones banned, a tag forced
    at each segment start); any other model samples plain text (every tag banned, nothing forced)."""
    from pretag.control import TagPolicy, default_policy

    return default_policy(schema) if tagged else TagPolicy(ban=list(schema.tag_names), force_at="none", name="plain")


def generate_samples(model, tokenizer, schema, policy, prompts: Sequence[str], *, max_new_tokens: int,
                     temperature: float = 1.0, batch_size: int = 16, seed: int = 0, desc: str = "sampling"
                     ) -> list[Sample]:
    """Sample one continuation per prompt with ``pretag.generate`` (monitoring on), in batches. A progress bar
    (``desc``) shows on a terminal, so minutes of sampling are never silent; it stays out of logs and pipes."""
    from tqdm.auto import tqdm

    from pretag.generate import GenerateConfig, generate

    eos = tokenizer.eos_token_id
    out: list[Sample] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="sample", disable=None, leave=False, dynamic_ncols=True)
    for b in range(0, len(prompts), batch_size):
        batch = list(prompts[b : b + batch_size])
        cfg = GenerateConfig(max_new_tokens=max_new_tokens, n=1, do_sample=True, temperature=temperature,
                             seed=seed + b)
        for seq in generate(model, tokenizer, schema, batch, policy, cfg).sequences:
            ended = bool(seq.tokens) and seq.tokens[-1].id == eos
            steps, text_ids = [], []
            for t in seq.tokens:
                if t.is_tag:
                    steps.append((len(tokenizer.decode(text_ids)), t.text, t.temptation))
                elif t.id != eos:
                    text_ids.append(t.id)
            out.append(Sample(seq.text, truncated=not ended and not seq.stopped_by_alarm, tag_steps=steps,
                              prompt=seq.prompt))
        bar.update(len(batch))
    bar.close()
    return out


def label_texts(schema, texts: Sequence[str]) -> list:
    """Label texts in memory with the schema's scorers (one batched call per scorer)."""
    from pretag.corpus import Document
    from pretag.label import build_scorers, label_documents

    if not texts:
        return []
    docs = [Document(id=f"sample-{i}", source="samples", text=t) for i, t in enumerate(texts)]
    return label_documents(schema, docs, build_scorers(schema, cache=True))


def score_samples(schema, samples: Sequence[Sample], *, k: int = 25, n_resamples: int = 1000, seed: int = 0
                  ) -> tuple[dict[str, dict], list]:
    """Misalignment summaries per attribute (a cut final segment dropped), plus the labeled samples."""
    labeled = label_texts(schema, [s.text for s in samples])
    out = {}
    for a in schema.attributes:
        segs, scores = [], []
        for s, ld in zip(samples, labeled):
            if a.level == "document":
                segs.append([ld.text])
                scores.append(list(ld.scores[a.name]))
                continue
            keep = scorable_segments(ld.segments, s.truncated and schema.segmenter != "document")
            segs.append([ld.segments[i] for i in keep])
            scores.append([ld.scores[a.name][i] for i in keep])
        out[a.name] = misalignment_summary(segs, scores, a.is_bad, higher_is_worse=a.higher_is_worse,
                                           k=k, n_resamples=n_resamples, seed=seed)
        out[a.name]["direction"] = a.direction
    return out, labeled


def temptation_warning(schema, samples: Sequence[Sample], labeled: Sequence) -> dict[str, dict]:
    """Per binary segment attribute: temptation of its bad tag at each tag step vs the classifier's verdict on the
    segment the model then wrote. AUROC, plus the two temptation lists (for histograms).

    The raw temptation is P(bad tag) among all tokens; at a forced tag step most of the mass is on the tags, but how
    much is the shape of the text, not the verdict. ``auroc_verdict`` reads P(bad tag) / P(the attribute's tags) at
    the same steps (``verdict_before_bad``/``_good``): the model's choice of tag once one must come."""
    out = {}
    for a in (a for a in schema.segment_attributes if a.bands is None):
        mine = {schema.open_token(t) for t in a.tags.values()}
        bad_tok = schema.open_token(a.tags["bad"])
        before_bad, before_good, verdict_bad, verdict_good = [], [], [], []
        for s, ld in zip(samples, labeled):
            starts = np.cumsum([0] + [len(x) for x in ld.segments])  # (S+1,)
            last = len(ld.segments) - 1
            for off, tok, temp in s.tag_steps:
                if tok not in mine or off >= len(s.text):
                    continue
                i = int(np.searchsorted(starts, off, side="right") - 1)
                score = ld.scores[a.name][i]
                if score is None or (s.truncated and i == last and last > 0):
                    continue
                bad = a.is_bad(score)
                (before_bad if bad else before_good).append(float(temp[bad_tok]))
                mass = sum(float(temp[t]) for t in mine if t in temp)
                (verdict_bad if bad else verdict_good).append(float(temp[bad_tok]) / mass if mass > 0 else 0.0)
        labels = [1] * len(before_bad) + [0] * len(before_good)
        out[a.name] = {"auroc": auroc(before_bad + before_good, labels) if labels else float("nan"),
                       "n": len(labels), "n_bad": len(before_bad),
                       "mean_before_bad": float(np.mean(before_bad)) if before_bad else None,
                       "mean_before_good": float(np.mean(before_good)) if before_good else None,
                       "before_bad": before_bad, "before_good": before_good,
                       "auroc_verdict": auroc(verdict_bad + verdict_good, labels) if labels else float("nan"),
                       "verdict_before_bad": verdict_bad, "verdict_before_good": verdict_good}
    return out


def opening_prompts(schema, attr, rows: Sequence[dict], n: int, *, max_chars: int = 160
                    ) -> tuple[list[str], list[int]]:
    """Up to ``n`` held-out openings whose first segments hold a bad one (by the attribute's natural threshold) and
    as many whose first segments are all clean: (prompts, labels 1 = bad opening). Balanced, deterministic.

    An opening is a document's first segments, never the whole document: at least one segment must follow it. After
    a complete document training put EOS, never a tag, so the tag probability there is not the model's verdict (73 %
    of the fortunes' openings were whole documents before this rule)."""
    bad, clean = [], []
    for r in rows:
        segs, scores = list(r["segments"]), list(r.get(f"score__{attr.name}") or [])
        p, verdicts = "", []
        for s, sc in zip(segs[:-1], scores):  # the last segment is never part of an opening
            if p and len(p) + len(s) > max_chars:
                break
            p += s
            verdicts.append(sc)
        if not p.strip() or any(v is None for v in verdicts):
            continue
        (bad if any(attr.is_bad(v) for v in verdicts) else clean).append(p)
    k = min(n, len(bad), len(clean))
    return bad[:k] + clean[:k], [1] * k + [0] * k


EVAL_PROTOCOL = 4
"""The version of what :func:`evaluate_model` measures, part of an experiment's evaluation cache key: bump it when a
metric's definition changes, so cached evaluations made under the old one are measured again instead of sitting
beside new ones in a table. 2: the warning light reads untagged openings and reports the first step. 3: its
openings are encoded segment by segment (as training encodes text) and never a whole document; it reports the
verdict at forced tag positions. 4: the verdict is read where the text asks for that attribute's tag
(``TokenRecord.verdict``); with one segment attribute these are the forced positions as before, with several the
old reading also averaged the positions of the other attributes' tags."""


def prompt_warning(model, tokenizer, schema, policy, rows: Sequence[dict], *, n: int, max_new_tokens: int,
                   temperature: float = 1.0, batch_size: int = 16, seed: int = 0,
                   prompt_tags: str | None = "none") -> dict[str, dict]:
    """Temptation as a warning light for a *context*: continue held-out openings that hold a bad segment and clean
    ones under the policy (bad tags banned), and ask whether the pre-ban P(bad tag) separates the two (AUROC; the
    seed's "warning light" for a prompt pushing the model toward bad text): ``auroc`` of its mean over the
    continuation, ``auroc_first`` of its value at the first generated position (the first segment start after the
    opening, where the model decides its first tag), ``auroc_verdict`` of the mean *verdict* where the text asks for
    the attribute's tag (:attr:`TokenRecord.verdict`): P(bad) / P(any of the attribute's tags), the model's choice
    once a tag must come, before the ban; the reading a ``Rule(reading="verdict")`` acts on while generating.
    ``auroc_max`` / ``auroc_verdict_max`` read each continuation's highest temptation / verdict: a flag rule with
    threshold T fires on a continuation iff that maximum is above T, so these are the live rules' ROC over all T.
    The raw temptation multiplies that choice by P(a tag here), which the shape of the text moves (on the fortunes'
    offensive label, AUROC 0.32 by itself: offensive openings look less like a document that goes on).

    The openings are rendered with ``prompt_tags`` (default ``none``: the user's text, no tag): an opening tagged
    with the policy's good tag tells the model it is clean, and a model trained on labels that hold for a whole
    document believes the tag over the text. ``prompt_tags=None`` keeps the policy's own rendering."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from pretag.generate import GenerateConfig, generate
    from pretag.policy import load_policy

    policy = load_policy(policy, schema)
    if prompt_tags is not None:
        policy = replace(policy, prompt_tags=prompt_tags)
        policy.validate(schema)
    out = {}
    for a in (a for a in schema.segment_attributes if a.bands is None):
        prompts, labels = opening_prompts(schema, a, rows, n)
        if not prompts:
            out[a.name] = {"auroc": float("nan"), "n_bad": 0, "n_clean": 0}
            continue
        bad_toks = [schema.open_token(a.tags[v]) for v in a.bad]
        all_toks = [schema.open_token(a.tags[v]) for v in a.values]  # verdicts hold all of them or none
        means, firsts, verdicts, maxes, vmaxes = [], [], [], [], []
        bar = tqdm(total=len(prompts), desc=f"warning light ({a.name})", unit="opening", disable=None, leave=False,
                   dynamic_ncols=True)
        for b in range(0, len(prompts), batch_size):
            cfg = GenerateConfig(max_new_tokens=max_new_tokens, n=1, do_sample=True, temperature=temperature,
                                 seed=seed + b)
            for seq in generate(model, tokenizer, schema, prompts[b : b + batch_size], policy, cfg).sequences:
                p = [sum(t.temptation.get(x, 0.0) for x in bad_toks) for t in seq.tokens]
                means.append(float(np.mean(p)) if p else 0.0)
                firsts.append(p[0] if p else 0.0)
                maxes.append(max(p, default=0.0))
                # the choice among the attribute's tags where the text asks for one (TokenRecord.verdict)
                v = [sum(t.verdict[x] for x in bad_toks) for t in seq.tokens if all_toks[0] in t.verdict]
                verdicts.append(float(np.mean(v)) if v else 0.0)
                vmaxes.append(max(v, default=0.0))
            bar.update(len(prompts[b : b + batch_size]))
        bar.close()
        y = np.asarray(labels, dtype=bool)
        m, f, v = np.asarray(means), np.asarray(firsts), np.asarray(verdicts)
        mx, vmx = np.asarray(maxes), np.asarray(vmaxes)
        lo, hi = auroc_interval(m[y], m[~y], seed=seed)
        flo, fhi = auroc_interval(f[y], f[~y], seed=seed)
        vlo, vhi = auroc_interval(v[y], v[~y], seed=seed)
        xlo, xhi = auroc_interval(mx[y], mx[~y], seed=seed)
        vxlo, vxhi = auroc_interval(vmx[y], vmx[~y], seed=seed)
        out[a.name] = {"auroc": auroc(m, labels), "n_bad": int(y.sum()), "n_clean": int((~y).sum()),
                       "mean_after_bad": float(m[y].mean()), "mean_after_clean": float(m[~y].mean()),
                       "auroc_lo": lo, "auroc_hi": hi,
                       "auroc_first": auroc(f, labels), "auroc_first_lo": flo, "auroc_first_hi": fhi,
                       "first_after_bad": float(f[y].mean()), "first_after_clean": float(f[~y].mean()),
                       "prompt_tags": policy.resolved_prompt_tags(schema),
                       "auroc_verdict": auroc(v, labels), "auroc_verdict_lo": vlo, "auroc_verdict_hi": vhi,
                       "verdict_after_bad": float(v[y].mean()), "verdict_after_clean": float(v[~y].mean()),
                       # what a flag rule sees: it fires on a continuation iff its reading's maximum is above T
                       "auroc_max": auroc(mx, labels), "auroc_max_lo": xlo, "auroc_max_hi": xhi,
                       "auroc_verdict_max": auroc(vmx, labels), "auroc_verdict_max_lo": vxlo,
                       "auroc_verdict_max_hi": vxhi}
    return out


def auroc_interval(pos: Sequence[float], neg: Sequence[float], *, n_resamples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the AUROC of ``pos`` over ``neg``, each group resampled on its own (the
    design fixes how many of each there are)."""
    rng = np.random.default_rng(seed)
    p, q = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    stats = [auroc(np.r_[p[rng.integers(0, len(p), len(p))], q[rng.integers(0, len(q), len(q))]],
                   [1] * len(p) + [0] * len(q)) for _ in range(n_resamples)]
    a = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def redteam_prompts(schema, rows: Sequence[dict], n: int, *, max_chars: int = 200) -> list[str]:
    """Prefixes of the held-out documents the classifiers scored worst: their first segments, up to a third of
    the document and ``max_chars`` (at least one segment), so the model is led into bad territory."""
    def badness(r: dict) -> float:
        total = 0.0
        for a in schema.attributes:
            sc = [x for x in (r.get(f"score__{a.name}") or []) if x is not None]
            if sc and a.bands is None:
                total += a.weight * float(np.mean([-a.reward(x) for x in sc]))
        return total

    worst = sorted(rows, key=badness, reverse=True)[:n]
    prompts = []
    for r in worst:
        p = ""
        for s in r["segments"]:
            if p and (len(p) + len(s) > max_chars or len(p) + len(s) > len(r["text"]) / 3):
                break
            p += s
        prompts.append(p[: max(max_chars, len(r["segments"][0]) if r["segments"] else 0)])
    return [p for p in prompts if p]


# ---- reference samples and KL -----------------------------------------------------------------------------
def load_any_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer, schema or None) on ``device`` (``"auto"``: the GPU when there is one): a pretag model dir,
    or any local HF model dir / .gguf / ``smollm2``."""
    from pretag.models import SCHEMA_FILE, load_model_dir, load_pretrained, pick_device

    if (Path(path) / SCHEMA_FILE).exists():
        return load_model_dir(path, device=device)
    model, tok = load_pretrained(path)
    return model.to(pick_device(device)), tok, None


def reference_samples(reference: str | Path, n: int, *, max_new_tokens: int, temperature: float = 1.0,
                      batch_size: int = 16, seed: int = 0, cache_dir: str | Path | None = None) -> list[dict]:
    """``n`` samples of the reference model with their log p_ref, cached as JSON (``cache_dir``) because every
    evaluated model is compared on the same samples and sampling a large reference is the slow part."""
    import hashlib
    import json

    import torch

    key = hashlib.sha1(json.dumps([model_identity(reference), n, max_new_tokens, temperature, seed]).encode())
    cache = Path(cache_dir) / f"reference-{key.hexdigest()[:12]}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())["samples"]
    model, tok, schema = load_any_model(reference)
    if schema is not None:  # a pretag model: sample its plain text, the way it was trained (or conditioned)
        samples = generate_samples(model, tok, schema, sampling_policy(schema, uses_tags(reference)), [""] * n,
                                   max_new_tokens=max_new_tokens, temperature=temperature,
                                   batch_size=batch_size, seed=seed)
        texts = [s.text for s in samples]
    else:
        start = document_start_id(tok)
        if start is None:
            raise ValueError(f"reference {reference}: its tokenizer has neither BOS nor EOS to start samples from")
        texts = []
        dev = next(model.parameters()).device
        for b in range(0, n, batch_size):
            torch.manual_seed(seed + b)
            m = min(batch_size, n - b)
            with torch.no_grad():
                out = model.generate(torch.full((m, 1), start, device=dev),
                                     attention_mask=torch.ones(m, 1, dtype=torch.long, device=dev),
                                     do_sample=True, temperature=temperature, top_k=0, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else start)
            texts += [tok.decode(o[1:], skip_special_tokens=True) for o in out]
    texts = [t for t in texts if t]
    lps = (sequence_logprobs(model, tok, texts, batch_size=batch_size) if schema is None else
           pretag_logprobs(model, tok, schema, texts, sampling_policy(schema, True) if uses_tags(reference) else None,
                           batch_size=batch_size))
    res = [{"text": t, "logp_ref": lp} for t, lp in zip(texts, lps)]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"reference": str(reference), "samples": res}))
    return res


def pretag_logprobs(model, tokenizer, schema, texts: Sequence[str], policy=None, *, batch_size: int = 8
                    ) -> list[float]:
    """log p(text) under a pretag model, tokenized the way training tokenized (segment by segment).

    With ``policy`` (a tag-trained model): log p(text | the policy's start tags at every segment), the distribution
    its samples come from (the paper conditions the conditional model on <|good|> likewise). Text tokens only.
    """
    from pretag.generate import start_tag
    from pretag.segment import segment

    vocab = TagVocab(tokenizer, schema)
    docs = []
    for t in texts:
        segs = segment(t, schema.segmenter)
        tags = {a.name: [start_tag(schema, policy, a) if policy is not None else None]
                * (1 if a.level == "document" else len(segs)) for a in schema.attributes}
        docs.append(vocab.render(segs, tags).chunks)
    return [s for s, _ in token_logprobs(model, docs, start_id=vocab.start_id, batch_size=batch_size)]


def sampler_logprobs(model, tokenizer, schema, texts: Sequence[str], policy, *, max_forced: int = 8,
                     desc: str | None = None) -> list[float]:
    """log q(text) under the sampler itself: the model's logits after the policy's :class:`TagProcessor` (bans,
    forced tags, biases) and its tag guidance, exactly as ``pretag.generate`` draws from them (temperature 1).

    :func:`pretag_logprobs` conditions the model on its start tags but scores text with the raw logits; a policy
    that reshapes them (the ban renormalises, guidance lowers words) samples from another distribution, and this is
    that one. Each text is teacher-forced one token at a time through the same processors; where the processor
    forbids text (a tag must come, e.g. at a segment start) the tag it allows is written, with its probability
    (1 for a single allowed tag). Tags the sampler would write by choice are not summed over, so this is a lower
    bound on log q (KL from a reference computed with it is an upper bound). Text tokens are the ones training
    gives the segments (tag-free rendering); one row at a time, one forward per token (and one per guided tag).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from pretag.control import TagProcessor, load_policy
    from pretag.generate import prompt_ids
    from pretag.guidance import cache_kwarg, guidance_for
    from pretag.segment import segment

    policy = load_policy(policy, schema)
    vocab = TagVocab(tokenizer, schema)
    tag_ids = torch.tensor(sorted(vocab.ids.values()), dtype=torch.long)
    dev = next(model.parameters()).device
    cache_kw = cache_kwarg(model)
    out = []
    for text in tqdm(texts, desc=desc or "sampler log-probs", unit="text", disable=None, leave=False):
        rendered = vocab.render(segment(text, schema.segmenter), {})
        text_ids = [i for chunk, _ in rendered.chunks for i in chunk]
        ids = prompt_ids(tokenizer, schema, policy, "")
        proc = TagProcessor(tokenizer, schema, policy)
        guide = guidance_for(model, tokenizer, schema, policy, torch.ones(1, len(ids), dtype=torch.long, device=dev))
        cache, feed, total, j, forced = DynamicCache(), list(ids), 0.0, 0, 0
        with torch.no_grad():
            while j < len(text_ids):
                logits = model(input_ids=torch.tensor([feed], device=dev), use_cache=True,
                               **{cache_kw: cache}).logits[:, -1].float()
                seq = torch.tensor([ids], device=dev)
                scores = proc(seq, logits)
                if guide is not None:
                    scores = guide(seq, scores)
                lp = torch.log_softmax(scores.float(), dim=-1)[0].cpu()
                x = text_ids[j]
                if torch.isinf(lp[x]) and forced < max_forced and torch.isfinite(lp[tag_ids]).any():
                    k = int(tag_ids[lp[tag_ids].argmax()])  # text is forbidden here: the tag the sampler must write
                    total, forced, feed = total + float(lp[k]), forced + 1, [k]
                else:
                    total, forced, feed, j = total + float(lp[x]), 0, [x], j + 1
                ids.append(feed[0])
        out.append(total)
    return out


# ---- context: prompt + samples must fit -------------------------------------------------------------------
def check_sampling_context(model, tokenizer, schema, policy, max_new_tokens: int, reference=None) -> None:
    """Raise ``pretag.generate.ContextLengthError`` now if the unconditional samples (start token and tags, then
    ``max_new_tokens``) would not fit in the model's context, or in a local reference model's (read from its
    ``config.json`` without loading it), instead of failing after minutes of sampling."""
    from pretag.generate import check_context, prompt_ids

    check_context(model, len(prompt_ids(tokenizer, schema, policy, "")), max_new_tokens, what="sample prompt")
    ref = Path(str(reference)) if reference is not None else None
    if ref is not None and (ref / "config.json").is_file():
        from transformers import AutoConfig

        from pretag.models import SCHEMA_FILE
        from pretag.schema import load_schema

        # a pretag reference starts with its document and segment tags, a plain one with one start token
        n_tags = len(load_schema(ref / SCHEMA_FILE).attributes) if (ref / SCHEMA_FILE).exists() else 0
        try:
            cfg = AutoConfig.from_pretrained(ref)
        except (OSError, ValueError):
            return  # loading the reference will say what is wrong with it
        check_context(cfg, 1 + n_tags, max_new_tokens, what=f"reference {ref} sample prompt")


def fit_prompts(model, tokenizer, schema, policy, prompts: Sequence[str], max_new_tokens: int
                ) -> tuple[list[str], int]:
    """Cut each prompt from the left (the end is what leads the model on) until it and ``max_new_tokens`` fit in
    the model's context; returns (prompts, how many were cut). Red-team prompts are document prefixes, some long."""
    from pretag.generate import context_limit, prompt_ids

    ctx = context_limit(model)
    if ctx is None:
        return list(prompts), 0

    def fits(p: str) -> bool:
        return len(prompt_ids(tokenizer, schema, policy, p)) + max_new_tokens <= ctx

    out, cut = [], 0
    for p in prompts:
        if not fits(p):
            lo, hi = 1, len(p)  # the smallest start index whose suffix fits (hi = the empty suffix always fits)
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if fits(p[mid:]) else (mid + 1, hi)
            p, cut = p[lo:], cut + 1
        if p:
            out.append(p)
    return out, cut


# ---- everything, for one model directory ------------------------------------------------------------------
def heldout_rows(model_dir: str | Path, data: str | Path, n: int | None = None) -> list[dict]:
    """The documents ``pretag train`` held out of this model's training (same hash split), else all of ``data``
    when the model was trained elsewhere; at most ``n`` (a deterministic choice)."""
    from pretag.label import load_labeled
    from pretag.modeldir import ModelDir
    from pretag.train import split_rows

    _, rows = load_labeled(data)
    frac = ModelDir(model_dir).eval_fraction
    held = split_rows(rows, frac)[1] if frac else rows
    if not held:
        held = rows
    return held[:n] if n else held


def evaluate_model(
    model_dir: str | Path,
    *,
    data: str | Path | None = None,
    samples: int = 256,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    reference: str | Path | None = None,
    reference_samples_n: int = 128,
    cache_dir: str | Path | None = None,
    heldout_docs: int = 64,
    redteam_n: int = 16,
    policy=None,
    batch_size: int = 16,
    seed: int = 0,
    n_resamples: int = 1000,
    keep_samples: int = 8,
    schema=None,
    device: str = "auto",
) -> dict:
    """Every metric of issue 5 for one model directory (see docs/evaluation.md for each field).

    ``data`` (a labeled dataset) enables held-out loss, self-tagging and red-team prompts; ``reference`` (a model
    dir) enables KL. Deterministic for a ``seed``. ``schema`` scores the samples with another task's schema than
    the model's own: any schema for a model that never read tags (an MLE baseline shared by two tasks on the same
    text), only one with the same tags for a tag-trained model. ``device``: where the model runs (``"auto"``: the
    GPU when there is one); samples are scored on the CPU.
    """
    import time

    from pretag.control import TagPolicy, load_policy
    from pretag.models import load_model_dir

    t0 = time.perf_counter()
    model, tok, own = load_model_dir(model_dir, device=device)
    model.eval()
    tagged = uses_tags(model_dir)
    schema = own if schema is None else task_schema(own, schema, tok, tagged, model_dir)
    pol = load_policy(policy, schema) if policy is not None else sampling_policy(schema, tagged)
    check_sampling_context(model, tok, schema, pol, max_new_tokens, reference)  # before any sampling
    boot = {"n_resamples": n_resamples, "seed": seed}
    res: dict = {"model": str(model_dir), "schema": schema.name, "tagged": tagged, "policy": pol.to_dict(),
                 "settings": {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                              "seed": seed}}

    # 1. misalignment of unconditional samples, and their diversity
    smp = generate_samples(model, tok, schema, pol, [""] * samples, max_new_tokens=max_new_tokens,
                           temperature=temperature, batch_size=batch_size, seed=seed,
                           desc=f"{Path(model_dir).name}: samples")
    res["misalignment"], _ = score_samples(schema, smp, **boot)
    res["diversity"] = {f"distinct_{n}": distinct_n([s.text for s in smp], n) for n in (1, 2, 3)}
    res["truncated_fraction"] = float(np.mean([s.truncated for s in smp]))
    res["examples"] = [s.text for s in smp[:keep_samples]]

    # 2. temptation as a warning light: unbanned samples of a tag-trained model
    if tagged:
        free = TagPolicy(force_at=pol.resolved_force_at(schema), prompt_tags=pol.prompt_tags, name="unbanned")
        fs = generate_samples(model, tok, schema, free, [""] * max(1, samples // 2), max_new_tokens=max_new_tokens,
                              temperature=temperature, batch_size=batch_size, seed=seed + 7919,
                              desc=f"{Path(model_dir).name}: unbanned samples")
        _, flabeled = score_samples(schema, fs, **boot)
        res["temptation"] = temptation_warning(schema, fs, flabeled)

    # 3. capability: KL from a reference, held-out loss
    if reference is not None:
        ref = reference_samples(reference, reference_samples_n, max_new_tokens=max_new_tokens,
                                temperature=temperature, batch_size=batch_size, seed=seed, cache_dir=cache_dir)
        texts = [r["text"] for r in ref]
        mine = pretag_logprobs(model, tok, schema, texts, pol if tagged else None, batch_size=batch_size)
        res["kl"] = {**kl_from_reference([r["logp_ref"] for r in ref], mine, **boot).to_dict(),
                     "reference": str(reference), "conditioned": tagged}
        if tagged:  # the paper's KL reads the raw logits; the policy (ban, guidance) samples from another distribution
            q = sampler_logprobs(model, tok, schema, texts, pol, desc=f"{Path(model_dir).name}: sampler KL")
            kq = kl_from_reference([r["logp_ref"] for r in ref], q, **boot)
            res["kl"].update(sampler=kq.value, sampler_lo=kq.lo, sampler_hi=kq.hi)
    if data is not None:
        held = heldout_rows(model_dir, data, heldout_docs)
        res["loss"] = heldout_loss(model, tok, schema, held, joint=tagged, batch_size=batch_size)
        if tagged:
            res["self_tagging"] = self_tagging(model, tok, schema, held, batch_size=batch_size)
            # openings are drawn from every held-out document (bad ones are rare), not only the first heldout_docs
            res["warning_light"] = prompt_warning(model, tok, schema, pol, heldout_rows(model_dir, data),
                                                  n=max(redteam_n, 8), max_new_tokens=max_new_tokens,
                                                  temperature=temperature, batch_size=batch_size, seed=seed + 15485863)
        prompts, n_trimmed = fit_prompts(model, tok, schema, pol, redteam_prompts(schema, held, redteam_n),
                                         max_new_tokens)
        if prompts:
            rt = generate_samples(model, tok, schema, pol, prompts, max_new_tokens=max_new_tokens,
                                  temperature=temperature, batch_size=batch_size, seed=seed + 104729,
                                  desc=f"{Path(model_dir).name}: red-team")
            res["redteam"] = {"n_prompts": len(prompts), "n_trimmed": n_trimmed, "misalignment": score_samples(schema, rt, **boot)[0],
                              "examples": [{"prompt": s.prompt, "continuation": s.text} for s in rt[:keep_samples]]}
    res["wall_s"] = time.perf_counter() - t0
    log.info("evaluated %s in %.1fs", model_dir, res["wall_s"])
    # through the typed result: a field renamed here fails now (ResultError), not as a "–" in a table later; the
    # error carries the measurements (``raw``), so a caller can keep minutes of evaluation instead of losing them
    from pretag.results import EvalResult, ResultError

    raw = json_safe(res)
    try:
        return EvalResult.from_dict(raw, where=str(model_dir)).to_dict()
    except ResultError as err:
        err.raw = raw
        raise
