"""Tag guidance: steer the text away from what a banned tag announces, not only away from the tag.

Banning ``<|bad|>`` removes the tag, then renormalises: whatever mass the model still puts on bad *words* without
their tag (a model that has not fully learned "a bad word always follows its tag") is sampled as before. Guidance
uses the tag as the model itself reads it. At every step it also asks the model what would follow if the tag were
written now, and lowers each token by how much more likely that tag makes it:

    logit'(x) = logit(x) - w * max(0, log p(x | context, <|bad|>) - log p(x | context))

This is classifier-free guidance (Ho & Salimans 2022; for language models Sanchez et al. 2023) with a control tag as
the negative condition, and only its penalty half (a token the tag makes *less* likely is left alone, so guidance
never invents a boost). A mid-word position is left nearly untouched: after a tag the model expects a word start,
which a mid-word position already rates low.

It costs one extra forward of two tokens per step and guided tag (its own KV cache: the newest real token, then
the tag, which is cropped off again). The tag's temptation is measured before guidance, as without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, LogitsProcessor

MAX_GUIDE = 10.0


def cache_kwarg(model) -> str:
    """The name ``model.forward`` takes a KV cache under: transformers renamed ``past_key_values`` to ``cache`` (5.2x);
    older 5.x (the GPU machine's) take the old name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TagGuidance(LogitsProcessor):
    """HF ``LogitsProcessor`` (put it after :class:`pretag.control.TagProcessor`): the penalty above, one KV cache
    per guided tag. ``prompt_mask`` (B, P) is the prompts' attention mask (left padding), one row per sequence
    generated (prompts repeated ``n`` times), so positions match ``generate``'s own."""

    def __init__(self, model, tags: dict[int, float], prompt_mask: torch.Tensor):
        if not tags:
            raise ValueError("guidance needs at least one tag id with a weight")
        self.model = model
        self.tags = dict(tags)
        self.prompt_mask = prompt_mask
        self.caches: dict[int, DynamicCache] = {}
        self.seen = 0  # positions of input_ids already in every cache
        self.cache_kw = cache_kwarg(model)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, T = input_ids.shape
        dev = input_ids.device
        P = self.prompt_mask.shape[1]
        if self.prompt_mask.shape[0] != B or T < P:
            raise ValueError(f"tag guidance: {B} rows of {T} ids do not extend the prompt mask {tuple(self.prompt_mask.shape)} "
                             "(beam search reorders rows: guidance works with sampling and greedy decoding)")
        mask = torch.cat([self.prompt_mask.to(dev), torch.ones(B, T - P + 1, dtype=self.prompt_mask.dtype, device=dev)], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T+1): left padding does not shift positions
        logp = torch.log_softmax(scores.float(), dim=-1)
        penalty = torch.zeros_like(logp)
        for tag, w in self.tags.items():
            cache = self.caches.setdefault(tag, DynamicCache())
            x = torch.cat([input_ids[:, self.seen :], torch.full((B, 1), tag, dtype=input_ids.dtype, device=dev)], 1)
            out = self.model(input_ids=x, attention_mask=mask, position_ids=pos[:, self.seen :], use_cache=True,
                             **{self.cache_kw: cache})
            cache.crop(-1)  # drop the tag again: it was a question, not part of the text
            after = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            penalty += w * (after - logp).clamp(min=0).nan_to_num(posinf=0.0)
        self.seen = T
        return (scores.float() - penalty).to(scores.dtype)


def guidance_for(model, tokenizer, schema, policy, prompt_mask: torch.Tensor) -> TagGuidance | None:
    """The policy's ``guide`` (tag name -> weight) as a processor, or None when it guides nothing."""
    if not policy.guide:
        return None
    from pretag.tokens import tag_ids

    ids = tag_ids(tokenizer, schema)
    return TagGuidance(model, {ids[schema.open_token(t)]: float(w) for t, w in policy.guide.items()}, prompt_mask)


def refuse_guidance(policy, where: str) -> None:
    """Generation paths without guidance say so instead of quietly sampling unguided."""
    if getattr(policy, "guide", None):
        from pretag.policy import PolicyError

        raise PolicyError(f"{where}: tag guidance (guide: {dict(policy.guide)}) is not supported here; "
                          "use pretag.generate.generate (sampling or greedy)")


__all__: Sequence[str] = ("TagGuidance", "cache_kwarg", "guidance_for", "refuse_guidance", "MAX_GUIDE")
