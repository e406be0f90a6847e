"""Where the residual stream is, how to read it, and how to edit it: plain PyTorch forward hooks on HF models.

pretag's models are HF ``AutoModelForCausalLM`` of two families (GPT-2, and Llama-style: Llama, SmolLM2, Mistral,
Qwen2), so a small :class:`Layout` names the few modules interpretation needs in each, and everything else is a
hook on the unmodified model: no weight conversion, no wrapper, the same object ``generate`` runs.

Residual-stream *layer* ``l`` (0..L) is the input of block ``l`` (``l = 0``: the embeddings) and, for ``l = L``,
the input of the final norm. Reading it is a forward hook that keeps only the rows asked for (a boolean mask
over (batch, time)); editing it is a hook that returns a new tensor. An edit that changes nothing returns the
same values bit for bit (``h - 0 * d`` is ``h`` in IEEE arithmetic), which the tests check against plain passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class Layout:
    """The modules of one decoder-only transformer that interpretation touches."""

    arch: str
    blocks: list[nn.Module]
    attn_out: list[nn.Module]
    """Each block's attention output projection; its input is the heads' outputs side by side, (B, T, H * dh)."""
    mlps: list[nn.Module]
    final_norm: nn.Module
    norm: str
    """``layer`` (LayerNorm: centre, scale, bias) or ``rms`` (RMSNorm: scale only)."""
    n_heads: int
    head_dim: int

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def out_weight(self, layer: int) -> torch.Tensor:
        """Attention output projection of ``layer`` as a (H * dh, d) matrix, ``out = z @ W (+ b)``."""
        m = self.attn_out[layer]
        return m.weight if type(m).__name__ == "Conv1D" else m.weight.T  # GPT-2's Conv1D stores W transposed

    def out_bias(self, layer: int) -> torch.Tensor | None:
        return getattr(self.attn_out[layer], "bias", None)

    def norm_bias(self) -> torch.Tensor | None:
        return getattr(self.final_norm, "bias", None)


def layout(model) -> Layout:
    """The :class:`Layout` of a GPT-2 or Llama-family HF causal LM (a ``ValueError`` naming them otherwise)."""
    cfg = model.config.get_text_config()
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h"):  # GPT2LMHeadModel
        blocks = list(tr.h)
        return Layout("gpt2", blocks, [b.attn.c_proj for b in blocks], [b.mlp for b in blocks], tr.ln_f, "layer",
                      cfg.num_attention_heads, blocks[0].attn.head_dim)
    base = getattr(model, "model", None)
    if base is not None and hasattr(base, "layers") and hasattr(base, "norm"):  # Llama, SmolLM2, Mistral, Qwen2
        blocks = list(base.layers)
        norm = "layer" if isinstance(base.norm, nn.LayerNorm) else "rms"
        return Layout(cfg.model_type, blocks, [b.self_attn.o_proj for b in blocks], [b.mlp for b in blocks],
                      base.norm, norm, cfg.num_attention_heads, blocks[0].self_attn.head_dim)
    raise ValueError(f"interpretation supports GPT-2 and Llama-style HF models; got {type(model).__name__} "
                     f"(model_type {cfg.model_type!r})")


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _replace_first(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


@contextlib.contextmanager
def on_residual(model, layers: Sequence[int], fn) -> Iterator[None]:
    """Call ``fn(layer, h) -> h | None`` on residual-stream layer(s) during every forward pass inside the block;
    a returned tensor replaces the stream there (``None`` leaves it)."""
    lay = layout(model)
    handles = []
    try:
        for layer in sorted(set(layers)):
            if not 0 <= layer <= lay.n_layers:
                raise ValueError(f"residual layer {layer} out of range 0..{lay.n_layers}")
            if layer == 0:  # the input of block 0: a pre-hook that may replace the first argument
                def pre(mod, args, kwargs, _l=layer):
                    if args:
                        new = fn(_l, args[0])
                        return None if new is None else ((new, *args[1:]), kwargs)
                    new = fn(_l, kwargs["hidden_states"])
                    return None if new is None else (args, {**kwargs, "hidden_states": new})
                handles.append(lay.blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:  # the output of block layer-1
                def post(mod, args, out, _l=layer):
                    new = fn(_l, _first(out))
                    return None if new is None else _replace_first(out, new)
                handles.append(lay.blocks[layer - 1].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


class Recorder:
    """Reads residual-stream rows during forward passes: ``rec.select = mask`` (B, T) bool before each pass, then
    ``rec.take()`` -> {layer: (N, d) float32} for the rows the mask selected (only those rows are copied)."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)
        self.select: torch.Tensor | None = None
        self.rows: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}

    def __call__(self, layer: int, h: torch.Tensor) -> None:
        sel = h.detach()[self.select] if self.select is not None else h.detach().reshape(-1, h.shape[-1])
        self.rows[layer].append(sel.float().cpu())  # (N, d)
        return None

    def take(self) -> dict[int, torch.Tensor]:
        out = {i: torch.cat(v) if v else torch.empty(0) for i, v in self.rows.items()}
        self.rows = {i: [] for i in self.layers}
        return out


# ---- edits of the residual stream ---------------------------------------------------------------------------------
@dataclass
class Edit:
    """Change the residual stream along one direction at some layers.

    ``ablate``: remove the component along ``direction`` (project it out); ``scrub``: set that component to
    ``value`` (its mean over contexts: mean-ablation); ``steer``: add ``value * direction``. ``direction`` is
    made unit length for ablate/scrub; for steer it is used as given (so ``value = 1`` adds the vector itself).
    """

    direction: torch.Tensor
    layers: tuple[int, ...]
    mode: str = "ablate"
    value: float = 0.0
    label: str = ""

    def __post_init__(self):
        if self.mode not in ("ablate", "scrub", "steer"):
            raise ValueError(f"edit mode must be ablate, scrub or steer, got {self.mode!r}")
        d = self.direction.detach().float().reshape(-1)
        if self.mode != "steer":
            n = d.norm()
            d = d / n if n > 0 else d
        self.direction = d

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        d = self.direction.to(h.dtype).to(h.device)
        if self.mode == "steer":
            return h + self.value * d
        coef = h @ d  # (B, T): the component along d
        target = 0.0 if self.mode == "ablate" else self.value
        return h - (coef - target).unsqueeze(-1) * d


@dataclass
class FeatureEdit:
    """Remove chosen sparse-autoencoder features from the residual stream at ``layer``: h - sum_f a_f(h) W_dec[f]
    (the SAE's reconstruction error stays, so features outside the list are untouched)."""

    sae: nn.Module
    features: list[int]
    layers: tuple[int, ...]
    label: str = ""

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        acts = self.sae.encode(h.float())[..., self.features]  # (B, T, k)
        return h - (acts @ self.sae.W_dec[self.features]).to(h.dtype)


@contextlib.contextmanager
def intervene(model, edits: Sequence[Edit | FeatureEdit]) -> Iterator[None]:
    """Apply ``edits`` (in order, at their layers) to every forward pass inside the block, generation included."""
    by_layer: dict[int, list] = {}
    for e in edits:
        for layer in e.layers:
            by_layer.setdefault(layer, []).append(e)

    def fn(layer, h):
        for e in by_layer[layer]:
            h = e(layer, h)
        return h

    with on_residual(model, list(by_layer), fn):
        yield


# ---- the tag directions: what "block the direction of <|bad|>" means --------------------------------------------
def tag_rows(model, tokenizer, schema, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, unembedding) difference vectors of ``tag`` against the mean of its attribute's other values."""
    attr, _ = schema.attribute_of_tag(tag)
    others = [attr.tags[v] for v in attr.values if attr.tags[v] != tag]
    if not others:
        raise ValueError(f"tag {tag!r} is its attribute's only value; there is no direction to contrast it with")
    tid = tokenizer.convert_tokens_to_ids
    me, rest = tid(schema.open_token(tag)), [tid(schema.open_token(t)) for t in others]
    emb, unemb = model.get_input_embeddings().weight, model.get_output_embeddings().weight  # (V, d)
    return (emb[me] - emb[rest].mean(0)).detach().float(), (unemb[me] - unemb[rest].mean(0)).detach().float()


def read_direction(model, tokenizer, schema, tag: str) -> torch.Tensor:
    """The residual-stream direction the final norm and unembedding read the logit of ``tag`` (minus its rivals)
    from: ``g * dW`` (centred for LayerNorm). Projecting it out of the last layer's stream makes that logit
    difference the same in every context (only the norm's bias term remains)."""
    lay = layout(model)
    _, dw = tag_rows(model, tokenizer, schema, tag)
    u = lay.final_norm.weight.detach().float() * dw
    return u - u.mean() if lay.norm == "layer" else u


def direction_edit(model, tokenizer, schema, spec: str) -> Edit:
    """The generation-time ablation ``spec``: ``TAG`` (the read direction of the tag's logit, at every layer),
    ``embed:TAG`` (the tag's input-embedding row against its rivals, every layer), or a ``.pt`` file written by
    ``pretag interpret`` (``{"direction": (d,), "layers": [...]}``)."""
    n = layout(model).n_layers
    every = tuple(range(n + 1))
    if spec.endswith(".pt") or Path(spec).is_file():
        saved = torch.load(spec, map_location="cpu", weights_only=True)
        return Edit(saved["direction"], tuple(int(x) for x in saved.get("layers", every)), "ablate", label=spec)
    kind, _, tag = spec.rpartition(":")
    if tag not in schema.tag_names:
        raise ValueError(f"--ablate-direction {spec!r}: {tag!r} is not a tag of schema {schema.name!r} "
                         f"({', '.join(schema.tag_names)}), nor a direction file")
    if kind == "embed":
        return Edit(tag_rows(model, tokenizer, schema, tag)[0], every, "ablate", label=spec)
    if kind:
        raise ValueError(f"--ablate-direction {spec!r}: prefix must be 'embed:' or nothing")
    return Edit(read_direction(model, tokenizer, schema, tag), every, "ablate", label=spec)


def ablation(model, tokenizer, schema, spec: str | None):
    """A context manager for ``GenerateConfig.ablate_direction``: nothing when ``spec`` is None."""
    if not spec:
        return contextlib.nullcontext()
    return intervene(model, [direction_edit(model, tokenizer, schema, spec)])
