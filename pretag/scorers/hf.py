"""``hf``: any local Hugging Face text-classification model directory, loaded offline and run in batches.

This is how users bring their own classifier (a Detoxify-like toxicity model, an emotion model, ...): point the
spec at a directory saved with ``save_pretrained``. Nothing is downloaded: loading uses ``local_files_only``.
The score is the probability of one label: ``label`` (an index or a name from ``config.id2label``), by default
label 1 of a two-label model or the single output of a one-label model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pretag.scorers import Scorer, ScorerError

logger = logging.getLogger(__name__)


class HFScorer(Scorer):
    name = "hf"
    meaning = "probability of the chosen label under a local text-classification model; direction per the model"
    options = {
        "model": "path of a local model directory (required)",
        "label": "label index or name to score (default: 1 of two labels, 0 of one)",
        "activation": "softmax | sigmoid (default: sigmoid for one-label or multi-label models, else softmax)",
        "batch_size": "segments per forward pass (default 32)",
        "max_length": "truncate segments to this many tokens (default 512)",
        "device": "cpu | cuda | ... (default: cuda if available)",
    }
    required = ("model",)

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        path = Path(str(opts["model"]))
        if not (path / "config.json").exists():
            raise ScorerError(f"hf: {str(path)!r} is not a local model directory (no config.json in it)")
        self.path = path
        self.batch_size = int(opts.get("batch_size", 32))
        self.max_length = int(opts.get("max_length", 512))
        if opts.get("activation") not in (None, "softmax", "sigmoid"):
            raise ScorerError(f"hf: activation must be softmax or sigmoid, got {opts['activation']!r}")
        self._model = self._tok = None

    def _load(self):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self._model = AutoModelForSequenceClassification.from_pretrained(self.path, local_files_only=True).eval()
        dev = self.opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model.to(dev)
        cfg = self._model.config
        n = cfg.num_labels
        label = self.opts.get("label", 1 if n == 2 else 0)
        if isinstance(label, str):
            names = {v: int(k) for k, v in cfg.id2label.items()}
            if label not in names:
                raise ScorerError(f"hf: model has no label {label!r} (labels: {sorted(names)})")
            label = names[label]
        if not 0 <= int(label) < n:
            raise ScorerError(f"hf: label index {label} out of range for a model with {n} labels")
        self.label = int(label)
        multi = n == 1 or cfg.problem_type == "multi_label_classification"
        self.activation = self.opts.get("activation") or ("sigmoid" if multi else "softmax")
        if self._tok.pad_token is None:  # GPT-2-like tokenizers: pad with EOS, the model masks it anyway
            self._tok.pad_token = self._tok.eos_token
            self._model.config.pad_token_id = self._tok.pad_token_id
        logger.info("hf scorer: %s, label %d, %s", self.path, self.label, self.activation)

    def score_texts(self, texts: list[str]) -> list[float]:
        import torch

        if self._model is None:
            self._load()
        out: list[float] = []
        dev = next(self._model.parameters()).device
        for i in range(0, len(texts), self.batch_size):
            batch = self._tok(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt").to(dev)
            with torch.no_grad():
                logits = self._model(**batch).logits.float()  # (B, num_labels)
            probs = logits.sigmoid() if self.activation == "sigmoid" else logits.softmax(-1)
            out += probs[:, self.label].tolist()
        return out

    def __getstate__(self):
        return {**self.__dict__, "_model": None, "_tok": None}
