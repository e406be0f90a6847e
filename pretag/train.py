"""Training: the config (task file + method overlay + overrides), data preparation, and the trainer.

The trainer is a small subclass of HF ``Trainer`` whose only job is ``compute_loss``: run the model, shift once
(``pretag.objectives.shift``) and apply the chosen objective. Everything else — warm-up + cosine schedule, gradient
clipping, evaluation, bf16 autocast, DDP/FSDP/DeepSpeed under ``accelerate launch``/``torchrun`` — is the HF
machinery, so scaling up is a launcher change, not a code change. Two things are added on top:

* checkpoints are written into a staging folder and renamed into place, so a SIGKILL never leaves a half-written
  ``checkpoint-N`` for the next run to resume from; re-running the same command resumes from the last complete one,
  with the same data order (accelerate's seedable sampler plus the saved RNG states);
* a CSV of every logged metric and TensorBoard logs in the output directory, tokens/s in the progress bar.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pretag.objectives import (
    FILTERS_DATA,
    NEEDS_COUNTERFACTUAL,
    NEEDS_VALUES,
    OBJECTIVES,
    USES_TAGS,
    ObjectiveConfig,
)
from pretag.problems import Problems

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs" / "train"
CHECKPOINTS = "checkpoints"
LOSSES_FILE = "pretag_losses.json"  # in each checkpoint: {step: loss}, so a resumed run reports the full mean


@dataclass
class TrainConfig:
    """Every knob of ``pretag train``; each can be set in a task file, a method overlay, --config or --set."""

    method: str = "mle"
    """One of mle, filter, conditional, unlikelihood, rwr, awr."""
    model: str = "tiny"
    """A size preset (micro, tiny, tiny-llama, small, gpt2-small), a HF model dir, a .gguf file, or smollm2."""
    task: str = "auto"
    """Task preset in configs/train/tasks (auto: the dataset's schema name, else 'default')."""
    tokens: int = 2_000_000
    """Training budget in tokens; steps = ceil(tokens / (batch_size * grad_accum * block_size))."""
    tokenizer: str | None = None
    """An existing HF tokenizer dir; default: the pretrained model's own, or a BPE trained on the data."""
    vocab_size: int = 8192
    """Vocabulary of a freshly trained tokenizer (tag tokens included)."""
    block_size: int = 256
    batch_size: int = 16
    """Blocks per micro-batch for the whole job: N processes (torchrun/accelerate) take batch_size / N each, so one
    command trains the same steps on the same blocks on any number of processes (it must divide by N)."""
    grad_accum: int = 1
    lr: float | None = None
    """Peak learning rate; default 1e-3 for a fresh preset, 1e-4 for a pretrained model, 2e-4 with LoRA."""
    warmup: float = 0.05
    """Warm-up: a fraction of the steps if < 1, else a number of steps."""
    schedule: str = "cosine"
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    adam_beta2: float = 0.95
    eval_fraction: float = 0.05
    """Fraction of documents held out (chosen by a hash of the id, so stable across runs) for the eval loss."""
    eval_steps: int = 200
    eval_max_blocks: int = 64
    """Cap on held-out blocks, so evaluation stays cheap on CPU."""
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 0
    precision: str = "bf16"
    """bf16 (autocast; CPU and GPU), fp16 (GPU only) or fp32."""
    device: str = "auto"
    """auto (GPU if present, else CPU) or cpu."""
    tag_dropout: float = 0.0
    """conditional: fraction of segments left untagged (paper: 0.01 toxicity, 0.1 PEP8)."""
    untagged_openings: float = 0.0
    """conditional: fraction of documents whose first k segments are left untagged (k uniform in 1..n-1), so the
    model learns to read the next tag from untagged text, as it must after a user's prompt (``prompt_tags: none``;
    the warning light). Labels that hold for a whole document otherwise only teach it to copy the previous tag."""
    threshold: float | None = None
    """filter/unlikelihood: score threshold overriding the schema's (0 means 0: any violation is bad)."""
    filter_drop: float | None = None
    """filter: drop this fraction of the worst documents by average score (the paper's percentile filter,
    e.g. 0.1); overrides ``threshold`` for filtering."""
    alpha: float = 1.0
    beta: float | str = 1.0
    """rwr/awr temperature of exp(R / beta); ``auto``: the standard deviation of the per-token reward in the
    training data, so the weights do not depend on the reward's units (a grade level, a violation rate)."""
    weight_clip: float = 1000.0
    tag_weight: float = 1.0
    """conditional/conditional_ul: weight of the loss on tag targets (1 = the paper). Upweighting teaches the
    model's verdict p(tag | prefix), which the temptation monitor reads, faster than the ~1-in-20 share of targets
    that tags are; text tokens keep weight 1."""
    lora: bool = False
    """Train LoRA adapters (peft) on a pretrained model; the model dir holds the adapter and the tag rows (a few MB),
    rebuilt over the base by ``pretag.models.load_model_dir``; ``pretag.models.export_merged`` writes a full copy."""
    lora_r: int = 8
    lora_alpha: int = 16
    tag_init: str = "words"
    """Pretrained models: a new tag's embedding starts from the mean of words that mean it (``words``: ``<|bad|>``
    from " bad", " offensive", ...; ``pretag.models.TAG_WORDS``), else from the mean of all rows (``mean``)."""
    tag_words: dict[str, list[str]] | None = None
    """``tag_init: words``: per-tag word lists overriding the built-in ones, e.g. ``{bad: [rude, crude]}``."""
    num_workers: int = 0
    sources: list[str] = field(default_factory=list)
    """Where the values came from, in order (filled in by resolve_config; informational)."""

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(alpha=self.alpha, beta=self.beta, weight_clip=self.weight_clip,
                               tag_weight=self.tag_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- config resolution -----------------------------------------------------------------------------------------
def _fields() -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig) if f.name != "sources"}


_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_ok(value: Any, annotation: str) -> Any:
    """Coerce/check one value against a field annotation such as ``float | None``; raise ValueError if wrong."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError("may not be null")
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
        raise ValueError(f"must be {annotation}, got a boolean")
    if "int" in kinds and isinstance(value, int):
        return value
    if "int" in kinds and isinstance(value, float) and value.is_integer() and "float" not in kinds:
        return int(value)
    if "float" in kinds and isinstance(value, int | float):
        return float(value)
    if "float" in kinds and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if "str" in kinds and isinstance(value, str):
        return value
    if any(k.startswith("dict") for k in kinds) and isinstance(value, dict):
        return value
    raise ValueError(f"must be {annotation}, got {value!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a training config must be a mapping")
    return d


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["lr=3e-4", "threshold=0"]`` -> ``{"lr": 0.0003, "threshold": 0}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v) if v.strip() else None
    return out


def resolve_config(method: str | None = None, *, schema_name: str | None = None, config_file: str | Path | None = None,
                   sets: dict[str, Any] | None = None, sets_name: str = "--set", **explicit: Any) -> TrainConfig:
    """Layer: defaults < methods/<m>.yaml < task file < task's ``methods.<m>`` < --config (same shape) < --set <
    explicit arguments. Every problem (unknown key, wrong type, bad value) is collected and raised at once.
    ``sets_name`` names where ``sets`` came from in those problems (an experiment passes its ``train:``)."""
    problems = Problems()
    fields = _fields()
    layers: list[tuple[str, dict[str, Any]]] = []
    user = _read_yaml(Path(config_file)) if config_file else {}
    sets = dict(sets or {})
    explicit = {k: v for k, v in explicit.items() if v is not None}
    m = explicit.get("method") or sets.get("method") or user.get("method") or method or "mle"
    if m not in OBJECTIVES:
        raise ValueError(f"unknown method {m!r}; methods: {', '.join(OBJECTIVES)}")
    overlay = CONFIG_DIR / "methods" / f"{m}.yaml"
    if overlay.exists():
        layers.append((str(overlay.relative_to(CONFIG_DIR.parent.parent)), _read_yaml(overlay)))
    task = explicit.get("task") or sets.get("task") or user.get("task") or "auto"
    if task == "auto":
        task = schema_name if schema_name and (CONFIG_DIR / "tasks" / f"{schema_name}.yaml").exists() else "default"
    task_file = CONFIG_DIR / "tasks" / f"{task}.yaml"
    if not task_file.exists():
        p = Path(task)
        if not p.exists():
            shipped = sorted(x.stem for x in (CONFIG_DIR / "tasks").glob("*.yaml"))
            raise ValueError(f"task {task!r} is neither a file nor a shipped task ({', '.join(shipped)})")
        task_file = p
    for name, d in ((str(task_file.name), _read_yaml(task_file)), (str(config_file), user)):
        if not d:
            continue
        per_method = d.get("methods") or {}
        if not isinstance(per_method, dict):
            problems.append(f"{name}: 'methods' must map method names to settings")
            per_method = {}
        for k in per_method:
            if k not in OBJECTIVES:
                problems.append(f"{name}: methods.{k} is not a method ({', '.join(OBJECTIVES)})")
        layers.append((name, {k: v for k, v in d.items() if k != "methods"}))
        if isinstance(per_method.get(m), dict):
            layers.append((f"{name}:methods.{m}", per_method[m]))
    layers += [(sets_name, sets), ("arguments", explicit)]
    values: dict[str, Any] = {"method": m, "task": task}
    sources = []
    for name, d in layers:
        if not d:
            continue
        sources.append(name)
        for k, v in d.items():
            if k not in fields:
                problems.append(f"{name}: unknown key {k!r} (known: {', '.join(sorted(fields))})")
                continue
            try:
                values[k] = _type_ok(v, fields[k])
            except ValueError as e:
                problems.append(f"{name}: {k} {e}")
    values["method"], values["task"] = m, task
    cfg = TrainConfig(**values, sources=sources)
    problems += validate(cfg)
    problems.check(ValueError, of="the training config")
    return cfg


def validate(cfg: TrainConfig) -> list[str]:
    from pretag.models import PRESETS

    p = []
    if cfg.tokens <= 0:
        p.append(f"tokens must be > 0, got {cfg.tokens}")
    for k in ("block_size", "batch_size", "grad_accum", "eval_steps", "save_steps", "logging_steps"):
        if getattr(cfg, k) < 1:
            p.append(f"{k} must be >= 1, got {getattr(cfg, k)}")
    if cfg.block_size < 2:
        p.append("block_size must be >= 2 (one token predicts the next)")
    if cfg.model in PRESETS and cfg.block_size > PRESETS[cfg.model].ctx:
        p.append(f"block_size {cfg.block_size} exceeds preset {cfg.model!r}'s context of {PRESETS[cfg.model].ctx}")
    if cfg.lr is not None and cfg.lr <= 0:
        p.append(f"lr must be > 0, got {cfg.lr}")
    if not 0.0 <= cfg.tag_dropout <= 1.0:
        p.append(f"tag_dropout must be in [0, 1], got {cfg.tag_dropout}")
    if not 0.0 <= cfg.untagged_openings <= 1.0:
        p.append(f"untagged_openings must be in [0, 1], got {cfg.untagged_openings}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        p.append(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.method == "awr" and not 0.0 <= cfg.alpha <= 1.0:
        p.append(f"awr: alpha mixes LM and value loss and must be in [0, 1], got {cfg.alpha}")
    if cfg.alpha < 0:
        p.append(f"alpha must be >= 0, got {cfg.alpha}")
    if isinstance(cfg.beta, str) and cfg.beta != "auto" or not isinstance(cfg.beta, str) and cfg.beta <= 0:
        p.append(f"beta must be > 0 or 'auto', got {cfg.beta!r}")
    if cfg.weight_clip <= 0:
        p.append(f"weight_clip must be > 0, got {cfg.weight_clip}")
    if cfg.tag_weight <= 0:
        p.append(f"tag_weight must be > 0, got {cfg.tag_weight}")
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        p.append(f"precision must be bf16, fp16 or fp32, got {cfg.precision!r}")
    if cfg.device not in ("auto", "cpu"):
        p.append(f"device must be auto or cpu, got {cfg.device!r}")
    if cfg.schedule not in ("cosine", "linear", "constant_with_warmup"):
        p.append(f"schedule must be cosine, linear or constant_with_warmup, got {cfg.schedule!r}")
    if cfg.tag_init not in ("words", "mean"):
        p.append(f"tag_init must be words or mean, got {cfg.tag_init!r}")
    if cfg.tag_words is not None and not all(isinstance(w, list) and all(isinstance(x, str) for x in w)
                                             for w in cfg.tag_words.values()):
        p.append(f"tag_words must map tag names to lists of words, got {cfg.tag_words!r}")
    if cfg.lora and cfg.model in PRESETS:
        p.append(f"lora needs a pretrained model (a dir, .gguf or smollm2), not the fresh preset {cfg.model!r}")
    for knob, default in (("tag_dropout", 0.0), ("untagged_openings", 0.0), ("tag_weight", 1.0)):
        if getattr(cfg, knob) != default and cfg.method not in USES_TAGS:
            logger.warning("%s is ignored by %s (only %s puts tags in the text)", knob, cfg.method, sorted(USES_TAGS))
    return p


# ---- data --------------------------------------------------------------------------------------------------------
def split_rows(rows: list[dict[str, Any]], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out documents by a hash of their id: stable across runs and independent of row order."""
    if eval_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    keyed = sorted(rows, key=lambda r: zlib.crc32(str(r.get("id", r["text"])).encode()))
    n_eval = max(1, round(eval_fraction * len(rows)))
    held = {id(r) for r in keyed[:n_eval]}
    return [r for r in rows if id(r) not in held], [r for r in rows if id(r) in held]


@dataclass
class Prepared:
    model: Any
    tokenizer: Any
    schema: Any
    train: Any  # pretag.tokens.Blocks
    eval: Any | None
    stats: dict[str, Any]


def prepare(cfg: TrainConfig, data: str | Path, resume_from: Path | None = None) -> Prepared:
    """Read the labeled data, get a tokenizer and a model with the tag tokens, pack train/eval blocks."""
    from transformers import AutoTokenizer

    from pretag import models
    from pretag.tokens import (
        Blocks,
        document_misaligned,
        pack,
        percentile_filter,
        read_labeled,
        train_tokenizer,
    )

    schema, rows = read_labeled(data)
    train_rows, eval_rows = split_rows(rows, cfg.eval_fraction)
    stats: dict[str, Any] = {"documents": len(rows), "eval_documents": len(eval_rows)}
    fresh = cfg.model in models.PRESETS
    if resume_from is not None and (resume_from / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(resume_from)  # the very tokenizer the checkpoint was trained with
        model = None
    elif cfg.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        model = None
    elif fresh:
        tokenizer = train_tokenizer((r["text"] for r in train_rows), schema, vocab_size=cfg.vocab_size)
        model = None
    else:
        model, tokenizer = models.load_pretrained(cfg.model)
    if fresh:
        from pretag.tokens import add_tag_tokens

        add_tag_tokens(tokenizer, schema)
        model = models.build_model(cfg.model, len(tokenizer), eos_id=tokenizer.eos_token_id,
                                   pad_id=tokenizer.pad_token_id, seed=cfg.seed)
    else:
        if model is None:
            model, _ = models.load_pretrained(cfg.model)
        models.add_tags_to_model(model, tokenizer, schema, init=cfg.tag_init, words=cfg.tag_words)
    tags = cfg.method in USES_TAGS
    # Filtering drops documents only after the tokenizer is trained on all of them, so every objective of an
    # experiment shares one vocabulary (and KL / loss comparisons are not confounded by the tokenizer).
    if cfg.method in FILTERS_DATA:
        kept = (percentile_filter(schema, train_rows, cfg.filter_drop) if cfg.filter_drop is not None
                else [r for r in train_rows if not document_misaligned(schema, r, cfg.threshold)])
        stats["filtered_out"] = len(train_rows) - len(kept)
        logger.info("filter: dropped %d of %d training documents as misaligned", stats["filtered_out"],
                    len(train_rows))
        if not kept:
            raise ValueError("filter: every training document is misaligned at this threshold; nothing to train on")
        train_rows = kept
    train_blocks = pack(tokenizer, schema, train_rows, cfg.block_size, tags=tags, tag_dropout=cfg.tag_dropout,
                        untagged_openings=cfg.untagged_openings, threshold=cfg.threshold, seed=cfg.seed)
    eval_blocks: Blocks | None = None
    if eval_rows:
        eval_blocks = pack(tokenizer, schema, eval_rows, cfg.block_size, tags=tags, threshold=cfg.threshold,
                           seed=cfg.seed)
        if len(eval_blocks) > cfg.eval_max_blocks:
            eval_blocks = Blocks(*(getattr(eval_blocks, f.name)[: cfg.eval_max_blocks]
                                   for f in dataclasses.fields(Blocks) if f.name != "attributes"),
                                 attributes=eval_blocks.attributes)
    if cfg.beta == "auto":
        stats["beta"] = auto_beta(train_blocks)
        logger.info("beta: auto = %.4g (standard deviation of the per-token reward)", stats["beta"])
    stats.update(train_tokens=train_blocks.n_tokens, train_blocks=len(train_blocks),
                 bad_token_fraction=float(train_blocks.bad[train_blocks.mask].mean()),
                 tag_tokens=int(train_blocks.is_tag.sum()))
    return Prepared(model, tokenizer, schema, train_blocks, eval_blocks, stats)


def auto_beta(blocks) -> float:
    """The standard deviation of the reward over the text tokens (1.0 when the reward is constant)."""
    r = blocks.reward[blocks.mask & ~blocks.is_tag]
    r = r[np.isfinite(r)]
    sd = float(r.std()) if r.size else 0.0
    return sd if sd > 0 else 1.0


class BlockDataset:
    """A torch map-style dataset over packed blocks (one dict of tensors per block)."""

    def __init__(self, blocks):
        import torch

        self.t = {
            "input_ids": torch.from_numpy(blocks.input_ids), "reward": torch.from_numpy(blocks.reward),
            "bad": torch.from_numpy(blocks.bad), "is_tag": torch.from_numpy(blocks.is_tag),
            "mask": torch.from_numpy(blocks.mask),
        }

    def __len__(self) -> int:
        return len(self.t["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.t.items()}
        item["labels"] = item["input_ids"]  # tells HF's evaluation loop there is a loss to compute
        return item


# ---- the trainer -------------------------------------------------------------------------------------------------
def last_checkpoint(folder: Path) -> Path | None:
    """The highest complete ``checkpoint-N`` (complete = renamed into place from staging)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
            and p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _trainer_class():
    """Build the Trainer subclass lazily (transformers is heavy; ``import pretag.train`` stays light)."""
    import torch
    from transformers import Trainer, TrainerCallback

    from pretag.models import VALUE_HEAD
    from pretag.objectives import shift, text_nll

    class PretagTrainer(Trainer):
        def __init__(self, *args, pretag_cfg: TrainConfig, tokens_per_step: int, good_swap: dict | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.swap = None  # conditional_ul: a (V,) id map that swaps every bad tag for its good one
            if good_swap:
                self.swap = torch.arange(len(self.processing_class))
                for k, v in good_swap.items():
                    self.swap[k] = v
            self.pretag_cfg = pretag_cfg
            self.objective = OBJECTIVES[pretag_cfg.method]
            self.objective_cfg = pretag_cfg.objective_config()
            self.tokens_per_step = tokens_per_step
            self.loss_is_scaled_for_ga = False  # our losses are per-batch means
            self._logs: dict[str, list[float]] = {}
            self._clock: tuple[float, int] | None = None
            self.step_losses: dict[int, Any] = {}  # step -> its loss (summed over micro-batches), kept across resume
            self.add_callback(_StartClock(self))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            need_values = self.pretag_cfg.method in NEEDS_VALUES
            # packed blocks hold no padding (a short last block's tail is masked out of the loss and, being last,
            # never attended to); saying so keeps transformers' "may be padded" warning off the console
            ones = torch.ones_like(inputs["input_ids"])
            out = model(input_ids=inputs["input_ids"], attention_mask=ones, output_hidden_states=need_values,
                        use_cache=False)
            values = None
            if need_values:
                head = getattr(self.accelerator.unwrap_model(model), VALUE_HEAD)
                values = head(out.hidden_states[-1]).squeeze(-1)  # (B, T)
            cf_logits = None
            if model.training and self.pretag_cfg.method in NEEDS_COUNTERFACTUAL:
                if self.swap.device != inputs["input_ids"].device:  # moved once, not copied every step
                    self.swap = self.swap.to(inputs["input_ids"].device)
                cf_ids = self.swap[inputs["input_ids"]]
                cf_logits = model(input_ids=cf_ids, attention_mask=ones, use_cache=False).logits
            tb = shift(out.logits, inputs, values, cf_logits)
            if model.training:
                loss, logs = self.objective(tb, self.objective_cfg)
                for k, v in logs.items():
                    self._logs.setdefault(k, []).append(v)
            else:
                loss = text_nll(tb)  # held-out loss: text NLL, comparable across objectives
            return (loss, out) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            step = self.state.global_step + 1  # every micro-batch of step s+1 runs while global_step == s
            self.step_losses[step] = loss if step not in self.step_losses else self.step_losses[step] + loss
            return loss

        def losses_as_floats(self) -> dict[int, float]:
            """The per-step losses as floats, each the mean over the processes (one sync, at save/end time: not per
            step). Every process must call it (an all-reduce under a launcher)."""
            import torch

            todo = sorted(s for s, v in self.step_losses.items() if not isinstance(v, float))
            if todo:
                local = torch.stack([torch.as_tensor(self.step_losses[s], dtype=torch.float64).detach().cpu()
                                     for s in todo])
                mean = _mean_over_ranks(local)
                self.step_losses.update({s: float(v) for s, v in zip(todo, mean.tolist())})
            return self.step_losses

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                now, step = time.perf_counter(), self.state.global_step
                if self._clock is not None and step > self._clock[1]:
                    logs["tokens_per_s"] = (step - self._clock[1]) * self.tokens_per_step / (now - self._clock[0])
                self._clock = (now, step)
                logs.update(_gather_logs(self._logs))  # the mean over every process's micro-batches
                self._logs.clear()
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial) -> None:
            # Write into <out>/.staging, then rename: a checkpoint-N that exists is complete.
            real = self.args.output_dir
            staging = os.path.join(real, ".staging")
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()  # nobody writes into .staging before it is emptied
            name = f"checkpoint-{self.state.global_step}"
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, trial)  # rank 0: model, optimizer, state; each rank its RNG
            finally:
                self.args.output_dir = real
            step = self.state.global_step  # the losses so far travel with the checkpoint (resume's summary)
            losses = {s: v for s, v in self.losses_as_floats().items() if s <= step}
            self.accelerator.wait_for_everyone()  # every rank's rng_state_<rank>.pth is in before the rename
            if self.args.should_save:
                Path(staging, name, LOSSES_FILE).write_text(json.dumps(losses))
                final = os.path.join(real, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(os.path.join(staging, name), final)
                shutil.rmtree(staging, ignore_errors=True)
                done = sorted((p for p in Path(real).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                              key=lambda p: int(p.name.split("-")[-1]))
                for old in done[: max(0, len(done) - (self.args.save_total_limit or len(done)))]:
                    shutil.rmtree(old, ignore_errors=True)

    class _StartClock(TrainerCallback):
        """Start the tokens/s clock when training (or a resumed run) starts, so the first logged step of either
        gets its throughput row too."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_begin(self, args, state, control, **kw):
            self.trainer._clock = (time.perf_counter(), state.global_step)

    return PretagTrainer


def end_distributed() -> None:
    """Tear down the process group a launched run (torchrun, accelerate launch) trained in, once its last training
    is done: left to the interpreter's exit, gloo's threads can abort the process ("terminate called without an
    active exception") after everything was saved, and the launcher then reports a failed rank. A no-op in one
    process. Call it at the end of a script that calls :func:`train` under a launcher; ``pretag train`` does."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _mean_over_ranks(x):
    """The element-wise mean of a CPU tensor over the launched processes (itself in a single process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    y = x.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y)
    return y.cpu() / dist.get_world_size()


def _gather_logs(logs: dict[str, list]) -> dict[str, float]:
    """``{name: [per micro-batch values]}`` of this process -> ``{obj/name: mean over every process's
    micro-batches}``. Called at log time only (one object all-gather), never per step."""
    import torch.distributed as dist

    local = {k: (float(sum(float(v) for v in vs)), len(vs)) for k, vs in logs.items()}
    parts = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    total: dict[str, list[float]] = {}
    for part in parts:
        for k, (s, n) in part.items():
            t = total.setdefault(k, [0.0, 0])
            t[0] += s
            t[1] += n
    return {f"obj/{k}": s / n for k, (s, n) in total.items() if n}


def mean_step_loss(losses: dict[int, float], steps: int) -> float | None:
    """The mean training loss over every step, the resumed ones included; None if a step's loss is unknown.

    HF's ``training_loss`` averages only the steps of the last ``train()`` call, so a resumed run reported
    another number than an uninterrupted one although every step was the same."""
    if steps < 1 or any(s not in losses for s in range(1, steps + 1)):
        return None
    return math.fsum(losses[s] for s in range(1, steps + 1)) / steps


def _callbacks(out: Path):
    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import ProgressCallback

    class MetricsCSV(TrainerCallback):
        """Every logged number as a tidy row (step, name, value) in <out>/metrics.csv; resume truncates."""

        path = out / "metrics.csv"

        def on_train_begin(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            rows = []
            if self.path.exists():
                with self.path.open() as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= state.global_step]
            with self.path.open("w", newline="") as f:
                w = csv.DictWriter(f, ["step", "name", "value"])
                w.writeheader()
                w.writerows(rows)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            with self.path.open("a", newline="") as f:
                w = csv.writer(f)
                for k, v in logs.items():
                    if isinstance(v, int | float):
                        w.writerow([state.global_step, k, v])

    class Postfix(ProgressCallback):
        """HF's bar, with loss and tokens/s in its postfix instead of a printed dict per log."""

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
                post = {"loss": f"{logs['loss']:.3f}"}
                if "tokens_per_s" in logs:
                    post["tok/s"] = f"{logs['tokens_per_s']:.0f}"
                self.training_bar.set_postfix(post)
            elif logs and "eval_loss" in logs and state.is_world_process_zero:
                logger.info("step %d: eval_loss %.4f", state.global_step, logs["eval_loss"])

    tb = TensorBoardCallback()
    tb.logging_dir = str(out / "tensorboard")  # not <out>/checkpoints/runs/<date>; reopened here after train end
    return [MetricsCSV(), tb], Postfix


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    params: int
    resumed_from: str | None
    stats: dict[str, Any]


def check_out(cfg: TrainConfig, out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an ``out`` that is not writable, holds a dataset or an experiment, or holds a
    model of another run (another config, or a plain HF model); ``overwrite`` replaces a model instead. The same
    config resumes (or, finished, re-saves) the same run."""
    from pretag import folders
    from pretag.modeldir import ModelDir, ModelDirError

    folders.check_dir(out)
    folders.refuse_foreign(out, "model")
    kind = folders.holds(out)
    if kind is None:
        return
    if overwrite:
        logger.warning("--overwrite: removing %s from %s", kind, out)
        folders.clear_model_dir(out)
        return
    md = ModelDir(out)
    if not md.is_pretag:
        raise folders.FolderError(f"--out {str(out)!r} already holds {kind}, not a run of this command; use "
                                  "--overwrite to replace it, or pick another --out")
    try:
        before = md.config
    except ModelDirError as e:
        raise folders.FolderError(f"{e}; use --overwrite to replace the model") from e
    now = {k: v for k, v in cfg.to_dict().items() if k != "sources"}
    diff = [f"{k} {before.get(k)!r} -> {now[k]!r}" for k in now if before.get(k) != now[k]]
    if diff:
        raise folders.FolderError(f"--out {str(out)!r} holds a run with a different config ({', '.join(diff)}); "
                                  "resume needs the same command; use --overwrite to replace it, or pick a new --out")


@contextlib.contextmanager
def _main_process_first(world: int, use_cpu: bool):
    """Under a launcher (``world`` > 1), rank 0 runs the block before the other ranks (it yields whether this
    process is rank 0): the folder checks, ``--overwrite`` and the choice of checkpoint must not race."""
    if world == 1:
        yield True
        return
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu)  # starts the process group (gloo on CPU, NCCL on GPUs); HF reuses it
    with state.main_process_first():
        yield state.is_main_process


PRESET_LR = 1e-3  # a fresh model of a size preset; a pretrained model is fine-tuned more gently


def effective_lr(lr: float | None, model: str | None, lora: bool = False) -> float:
    """The learning rate a run uses: ``lr`` if set, else PRESET_LR for a fresh preset, 2e-4 for LoRA, 1e-4 for a
    full fine-tune of a pretrained model. Saved as ``resolved.lr`` in ``pretag_train.yaml``."""
    from pretag.models import PRESETS

    if lr is not None:
        return float(lr)
    return PRESET_LR if model in PRESETS else 2e-4 if lora else 1e-4


def train(cfg: TrainConfig, data: str | Path, out: str | Path, *, overwrite: bool = False) -> TrainResult:
    """Train ``cfg.model`` on the labeled dataset ``data`` with ``cfg.method``; write a model dir to ``out``.

    Running the same call again after a crash resumes from the last complete checkpoint in ``out/checkpoints``.
    A folder holding anything else is refused (``overwrite=True`` replaces a previous model).
    """
    import torch
    from transformers import TrainingArguments, default_data_collator
    from transformers.trainer_callback import ProgressCallback

    from pretag import models
    from pretag.tokens import good_swap

    t_start = time.perf_counter()
    out = Path(out)
    use_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is the whole job's; it must divide by the {world} processes")
    with _main_process_first(world, use_cpu) as is_main:  # rank 0 checks (and --overwrite clears) first
        check_out(cfg, out, overwrite and is_main)
        ckpt_dir = out / CHECKPOINTS
        resume = last_checkpoint(ckpt_dir)
        saved = out / models.TRAIN_FILE
        out.mkdir(parents=True, exist_ok=True)
    prep = prepare(cfg, data, resume_from=resume)
    model, tokenizer = prep.model, prep.tokenizer
    run_cfg = cfg if cfg.beta != "auto" else dataclasses.replace(cfg, beta=prep.stats["beta"])  # beta: auto resolved
    if cfg.lora:
        model = models.apply_lora(model, tokenizer, prep.schema, r=cfg.lora_r, alpha=cfg.lora_alpha)
    if cfg.method in NEEDS_VALUES:
        models.attach_value_head(model)
    lr = effective_lr(cfg.lr, cfg.model, cfg.lora)
    resolved = {"lr": lr, "beta": run_cfg.beta}  # what the run really used: read back by pretag.modeldir.ModelDir
    if is_main:
        saved.write_text(yaml.safe_dump({"config": {k: v for k, v in cfg.to_dict().items() if k != "sources"},
                                         "sources": cfg.sources, "resolved": resolved, "status": "running"},
                                        sort_keys=False))

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size  # the whole job's, on any world size
    steps = math.ceil(cfg.tokens / tokens_per_step)
    warmup = int(cfg.warmup * steps) if cfg.warmup < 1 else int(cfg.warmup)
    eval_on = prep.eval is not None
    if cfg.precision == "fp16" and use_cpu:
        raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=steps, per_device_train_batch_size=cfg.batch_size // world,
        per_device_eval_batch_size=cfg.batch_size // world, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.schedule, warmup_steps=warmup, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, adam_beta2=cfg.adam_beta2, logging_steps=cfg.logging_steps,
        eval_strategy="steps" if eval_on else "no", eval_steps=cfg.eval_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", use_cpu=use_cpu, report_to="none",
        dataloader_num_workers=cfg.num_workers, remove_unused_columns=False, prediction_loss_only=True,
        save_only_model=False, disable_tqdm=False,
        ddp_find_unused_parameters=False,  # AWR's value head runs outside the DDP forward; every parameter gets a grad
    )
    callbacks, progress = _callbacks(out)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=BlockDataset(prep.train),
        eval_dataset=BlockDataset(prep.eval) if eval_on else None, data_collator=default_data_collator,
        processing_class=tokenizer, callbacks=callbacks, pretag_cfg=run_cfg, tokens_per_step=tokens_per_step,
        good_swap=good_swap(tokenizer, prep.schema) if cfg.method in NEEDS_COUNTERFACTUAL else None,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(progress)
    if resume is not None and (resume / LOSSES_FILE).exists():
        trainer.step_losses = {int(k): v for k, v in json.loads((resume / LOSSES_FILE).read_text()).items()}
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %s (%.2fM params) with %s for %d steps (%d tokens/step, %.1f epochs of %d tokens)%s",
                cfg.model, n_params / 1e6, cfg.method, steps, tokens_per_step,
                steps * tokens_per_step / max(1, prep.train.n_tokens), prep.train.n_tokens,
                f", resuming from {resume.name}" if resume else "")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_on else None
    speeds = [h["tokens_per_s"] for h in trainer.state.log_history if "tokens_per_s" in h]
    train_loss = mean_step_loss(trainer.losses_as_floats(), trainer.state.global_step)
    if train_loss is None:  # resumed from a checkpoint written before per-step losses were saved
        train_loss = result.training_loss
        logger.warning("train_loss: the mean of this session's steps only (%s has no %s)", resume, LOSSES_FILE)
    res = TrainResult(out=out, steps=trainer.state.global_step, train_loss=train_loss, eval_loss=eval_loss,
                      tokens_per_s=sum(speeds) / len(speeds) if speeds else None, params=n_params,
                      resumed_from=resume.name if resume else None, stats=prep.stats)
    if trainer.is_world_process_zero():
        final = {"config": {k: v for k, v in cfg.to_dict().items() if k != "sources"}, "sources": cfg.sources,
                 "resolved": resolved, "status": "done", "result": {"steps": res.steps, "train_loss": res.train_loss,
                                              "eval_loss": res.eval_loss, "tokens_per_s": res.tokens_per_s,
                                              "wall_s": time.perf_counter() - t_start,
                                              "params": n_params, **prep.stats}}
        models.save_model_dir(trainer.accelerator.unwrap_model(trainer.model), tokenizer, prep.schema, final, out)
    return res
