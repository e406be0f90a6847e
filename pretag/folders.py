"""What a folder holds (a labeled dataset, a model, an experiment) and whether a command may write there.

Every stage writes into a folder the user names, so every stage first asks two questions, before any work: can
I write there, and does the folder already hold something that is not mine? A trained model replaced by a
labeling run, or a dataset mixed into a model directory, is data lost; a ``PermissionError`` after an hour of
evaluation is work lost. Light on purpose (no torch): the CLI imports it to recognise these errors.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class FolderError(ValueError):
    """A folder (or file) given by the user cannot be used: wrong kind, holds something else, or not writable."""


# What each stage writes, recognised by its marker files (the first that exists names the kind).
MODEL_FILES = ("pretag_train.yaml", "pretag_schema.yaml", "config.json", "model.safetensors",
               "model.safetensors.index.json", "pytorch_model.bin", "checkpoints")
DATASET_FILES = ("run.json", "summary.json", "schema.yaml")
EXPERIMENT_FILES = ("results.json", "experiment_run.json")


def holds(path: str | Path) -> str | None:
    """A short description of what ``path`` already holds, or None when it is missing or holds none of ours."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "pretag_train.yaml").exists():
        return "a pretag model (pretag_train.yaml)"
    if (p / "config.json").exists() and any((p / f).exists() for f in MODEL_FILES[3:6]):
        return "a Hugging Face model (config.json and weights)"
    if (p / "checkpoints").is_dir():
        return "training checkpoints (checkpoints/)"
    if any(p.glob("part-*.parquet")) or (p / "run.json").exists():
        return "a labeled dataset (part-*.parquet, run.json)"
    if (p / "results.json").exists() and (p / "config.yaml").exists():
        return "an experiment (config.yaml, results.json)"
    return None


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_dir(path: str | Path, what: str = "--out") -> Path:
    """Raise FolderError unless ``path`` is (or can be created as) a directory we can write into.

    Creates nothing: the nearest existing ancestor must be a writable directory.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise FolderError(f"{what} {str(p)!r} is a file, not a directory")
    base = _nearest_existing(p.absolute())
    if not base.is_dir():
        raise FolderError(f"{what} {str(p)!r}: {base} is a file, so no directory can be made there")
    if not os.access(base, os.W_OK | os.X_OK):
        raise FolderError(f"{what} {str(p)!r}: {base} is not writable")
    return p


def check_file(path: str | Path, what: str = "--out") -> Path:
    """Raise FolderError unless ``path`` is a file we can (over)write, in an existing or creatable directory."""
    p = Path(path)
    if p.is_dir():
        raise FolderError(f"{what} {str(p)!r} is a directory; give a file name")
    if p.exists() and not os.access(p, os.W_OK):
        raise FolderError(f"{what} {str(p)!r} is not writable")
    check_dir(p.parent, f"{what} {str(p)!r}: its folder")
    return p


def refuse_foreign(path: str | Path, mine: str, what: str = "--out") -> None:
    """Refuse a folder that holds something other than ``mine`` (``"model"``, ``"dataset"`` or ``"experiment"``)."""
    kind = holds(path)
    if kind is None:
        return
    is_mine = {"model": ("model", "checkpoints"), "dataset": ("dataset",), "experiment": ("experiment",)}[mine]
    if not any(k in kind for k in is_mine):
        raise FolderError(f"{what} {str(path)!r} already holds {kind}; pick another folder "
                          f"(writing a {mine} there would mix the two)")


# Everything ``pretag train`` writes into a model directory: what --overwrite removes (and nothing else).
TRAIN_OUTPUTS = ("checkpoints", ".staging", "tensorboard", "metrics.csv", "pretag_train.yaml", "pretag_schema.yaml",
                 "value_head.pt", "eval_cache", "experiment_run.json", "config.json", "generation_config.json",
                 "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                 "merges.txt", "chat_template.jinja", "adapter_model.safetensors",
                 "adapter_config.json")


def clear_model_dir(path: str | Path) -> None:
    """Remove a previous model (pretag's or a plain HF one) from ``path``, leaving any other file alone."""
    p = Path(path)
    for name in [*TRAIN_OUTPUTS, *(x.name for x in p.glob("model-*.safetensors"))]:
        q = p / name
        if q.is_dir():
            shutil.rmtree(q)
        elif q.exists():
            q.unlink()
