"""What a model directory says about itself: how it was trained, with which tags, and whether it is finished.

``pretag train`` writes ``pretag_train.yaml`` beside the weights (``config``: the resolved training config;
``resolved``: the hyperparameters the run really used, e.g. the default learning rate a preset picked and the value
``beta: auto`` became; ``status``: running or done; ``result``: steps, losses, wall time) and ``pretag_schema.yaml``.
:class:`ModelDir` is the one reader of that file, so evaluation, the experiment and the demo ask it rather than
parse YAML by hand. It imports no torch: reading a model's metadata must not pay for loading one.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

SCHEMA_FILE = "pretag_schema.yaml"
TRAIN_FILE = "pretag_train.yaml"
ADAPTER_FILE = "adapter_config.json"  # peft's name; its presence makes a model dir an adapter dir (LoRA saved small)


class ModelDirError(ValueError):
    """A ``pretag_train.yaml`` that is not valid YAML (or not a mapping)."""


class ModelDir:
    """A model directory written by ``pretag train`` (or anything else: then it has no training metadata).

    Examples:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / TRAIN_FILE).write_text("config: {method: conditional, model: micro}\\nstatus: done\\n")
        >>> md = ModelDir(d)
        >>> md.method, md.tagged, md.done, md.lr
        ('conditional', True, True, 0.001)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r})"

    @property
    def train_file(self) -> Path:
        return self.path / TRAIN_FILE

    @property
    def schema_file(self) -> Path:
        return self.path / SCHEMA_FILE

    @property
    def is_pretag(self) -> bool:
        """Was it written by ``pretag train`` (it has a ``pretag_train.yaml``)?"""
        return self.train_file.exists()

    @functools.cached_property
    def saved(self) -> dict[str, Any]:
        """The whole ``pretag_train.yaml`` ({} when there is none); ModelDirError when it cannot be read."""
        if not self.train_file.exists():
            return {}
        try:
            saved = yaml.safe_load(self.train_file.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ModelDirError(f"{self.train_file}: unreadable ({e})") from e
        if not isinstance(saved, dict):
            raise ModelDirError(f"{self.train_file}: not a mapping")
        return saved

    @property
    def config(self) -> dict[str, Any]:
        """The training config the run resolved (``TrainConfig.to_dict`` without ``sources``)."""
        return self.saved.get("config") or {}

    @property
    def result(self) -> dict[str, Any]:
        """Steps, losses, wall time and data statistics of a finished run ({} before it finished)."""
        return self.saved.get("result") or {}

    @property
    def status(self) -> str | None:
        return self.saved.get("status")

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    @property
    def tagged(self) -> bool:
        """Was it trained with tags in its text (the conditional objectives)?"""
        from pretag.objectives import USES_TAGS

        return self.method in USES_TAGS

    @property
    def eval_fraction(self) -> float:
        """The fraction of documents ``pretag train`` held out (0: none, or not trained by pretag)."""
        return self.config.get("eval_fraction", 0) or 0

    @property
    def lr(self) -> float | None:
        """The learning rate the run used: saved at train time (``resolved.lr``); a directory trained before it was
        saved falls back to the default ``pretag train`` picks for its config. None: no training config."""
        saved = (self.saved.get("resolved") or {}).get("lr")
        if saved is not None:
            return float(saved)
        if not self.config:
            return None
        from pretag.train import effective_lr

        return effective_lr(self.config.get("lr"), self.config.get("model"), bool(self.config.get("lora")))

    @property
    def beta(self) -> float | str | None:
        """RWR/AWR's temperature as used: ``beta: auto`` resolved to a number (saved, or in the run's statistics)."""
        for where in (self.saved.get("resolved") or {}, self.result):
            if where.get("beta") is not None:
                return where["beta"]
        return self.config.get("beta")

    def load_schema(self):
        from pretag.schema import load_schema

        return load_schema(self.schema_file)
