"""A tiny, untrained model directory for tests, benchmarks and offline demos of the server.

Built with the project's own pieces (``pretag.tokens.train_tokenizer``, ``pretag.models.build_model("micro")``,
``pretag.models.save_model_dir``), so it is exactly the model-directory contract of docs/CONTRACTS.md. Nothing is
downloaded: the byte-level BPE tokenizer is trained in memory on a few sentences and the model is randomly
initialised (seeded). It builds in about a second; its text is gibberish, its tag probabilities are honest.
"""

from __future__ import annotations

from pathlib import Path

from pretag.schema import Schema, load_schema

_TEXT = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Tag control steers what a model writes, and temptation shows what it wanted to write.",
] * 4


def build_tiny_model_dir(out: str | Path, schema: Schema | str = "toxicity", *, seed: int = 0,
                         preset: str = "micro", vocab_size: int = 320) -> Path:
    """Write a tiny randomly initialised model directory for ``schema`` to ``out`` and return its path."""
    from pretag.models import build_model, save_model_dir
    from pretag.tokens import train_tokenizer

    schema = load_schema(schema) if isinstance(schema, str) else schema
    tok = train_tokenizer(_TEXT, schema, vocab_size=vocab_size, min_frequency=1)
    model = build_model(preset, len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed)
    return save_model_dir(model, tok, schema, {"note": "pretag.serve.tiny: untrained, for tests"}, out)
