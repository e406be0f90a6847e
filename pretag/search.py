"""Pruned tree search: sample branches a chunk at a time and drop the ones tempted toward a watched tag.

Generation with a ban hides the temptation but does not remove it: a branch that keeps wanting ``<|bad|>`` is
likely to write bad text that the classifier would flag. ``tree_search`` uses the monitor's measurement to prune
such branches early and continue from the survivors (``pretag generate --tree TAU``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch

from pretag.control import AlarmStop, TagProcessor, load_policy
from pretag.generate import (
    GenerateConfig,
    GenerationResult,
    SequenceResult,
    TokenRecord,
    _hf_kwargs,
    _results,
    check_context,
    classify_output,
    prompt_ids,
    summarize,
)
from pretag.schema import Schema


def tree_search(model, tokenizer, schema: Schema, prompt: str, policy=None, config: GenerateConfig | None = None, *,
                tau: float = 0.5, chunk: int = 8, watch: Sequence[str] | None = None) -> GenerationResult:
    """Sample ``n`` branches ``chunk`` tokens at a time; a branch whose temptation toward a watched tag (default:
    the banned tags) crosses ``tau`` is dropped and replaced by a copy of a surviving branch, which then diverges
    by sampling. If every branch crosses, the least tempted one survives. Results are sorted, least tempted first;
    ``settings["tree"]`` logs how many branches were pruned per round."""
    cfg = config or GenerateConfig(n=4)
    cfg.validate()
    if chunk < 1 or not 0 <= tau <= 1:
        raise ValueError(f"tree search needs chunk >= 1 and tau in [0, 1], got chunk={chunk}, tau={tau}")
    policy = load_policy(policy, schema)
    from pretag.guidance import refuse_guidance

    refuse_guidance(policy, "tree search")
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    watched = [schema.open_token(t) for t in (watch if watch is not None else policy.ban)] or \
              [schema.open_token(a.tags[v]) for a in schema.attributes for v in a.bad]
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    base = prompt_ids(tokenizer, schema, policy, prompt)
    check_context(model, len(base), cfg.max_new_tokens)
    live: list[tuple[list[int], list[TokenRecord]]] = [(list(base), []) for _ in range(cfg.n)]
    done: list[tuple[list[int], list[TokenRecord]]] = []
    log = []
    made = 0
    step_cfg = GenerateConfig(**{**asdict(cfg), "n": 1, "do_sample": True, "seed": None, "classify": False})
    while live and made < cfg.max_new_tokens:
        step_cfg.max_new_tokens = min(chunk, cfg.max_new_tokens - made)
        proc = TagProcessor(tokenizer, schema, policy, repetition_penalty=cfg.repetition_penalty)
        ids = torch.tensor([b[0] for b in live], device=device)
        from pretag.interpret.hooks import ablation

        with torch.no_grad(), ablation(model, tokenizer, schema, cfg.ablate_direction):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), logits_processor=[proc],
                                 stopping_criteria=[AlarmStop(proc)], **_hf_kwargs(step_cfg, tokenizer))
        seqs = _results(proc, tokenizer, schema, out.cpu(), ids.shape[1], [prompt] * len(live), step_cfg)
        made += step_cfg.max_new_tokens
        peak = [max((t.temptation[w] for t in s.tokens for w in watched), default=0.0) for s in seqs]
        branches = [(live[i][0] + [t.id for t in s.tokens], live[i][1] + s.tokens) for i, s in enumerate(seqs)]
        keep = [i for i, p in enumerate(peak) if p <= tau]
        if not keep:
            keep = [min(range(len(peak)), key=peak.__getitem__)]
        log.append({"round": len(log), "live": len(live), "pruned": len(live) - len(keep),
                    "peak": [round(p, 4) for p in peak]})
        survivors = []
        for i in keep:
            b = branches[i]
            (done if (b[1] and b[1][-1].id == eos) or seqs[i].stopped_by_alarm else survivors).append(b)
        want = cfg.n - len(done)
        live = [(list(survivors[j % len(survivors)][0]), list(survivors[j % len(survivors)][1]))
                for j in range(want)] if survivors and want > 0 else []
    done += live
    proc = TagProcessor(tokenizer, schema, policy)
    results = []
    for _ids, toks in done[: cfg.n]:
        text_ids = [t.id for t in toks if not t.is_tag and t.id != eos]
        results.append(SequenceResult(
            prompt=prompt, text=tokenizer.decode(text_ids), tokens=toks,
            rendered=tokenizer.decode([t.id for t in toks if t.id != eos], skip_special_tokens=False),
            alarms=[], summary=summarize(toks, proc.slots, cfg.thresholds),
            classifiers=classify_output(schema, prompt, tokenizer.decode(text_ids)) if cfg.classify else None))
    watched_peak = [max((t.temptation[w] for t in s.tokens for w in watched), default=0.0) for s in results]
    results = [r for _, r in sorted(zip(watched_peak, results), key=lambda x: x[0])]
    settings = {k: v for k, v in asdict(cfg).items() if k != "thresholds"}
    settings["tree"] = {"tau": tau, "chunk": chunk, "watch": watched, "rounds": log}
    return GenerationResult(results, policy.to_dict(), schema.name, settings)
