"""Beam search with a ``stop`` rule, end to end through ``pretag.generate.generate``.

HF's beam search does not consult stopping criteria per beam, so the processor ends a stopped beam itself: from the
step its stop rule fires, the beam may write only EOS.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pretag.generate import GenerateConfig, generate  # noqa: E402
from pretag.schema import load_schema  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """A random 1-layer GPT-2 (width 16) over a tiny tokenizer with the pep8 tags: weights do not matter here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretag.tokens import train_tokenizer

    schema = load_schema("pep8")
    tok = train_tokenizer(["x = 1\n", "def f(a, b):\n    return a + b\n"] * 10, schema, vocab_size=300,
                          min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).eval()
    return model, tok, schema


def test_a_stop_rule_ends_every_beam_at_the_step_it_fires(tiny):
    model, tok, schema = tiny
    cfg = GenerateConfig(num_beams=3, n=2, max_new_tokens=8)
    # the temptation of <|bad|> is always > 0, so the rule fires at its first allowed step, 3, in every beam
    res = generate(model, tok, schema, ["x = 1\n", ""], "force_at:none,alarm:bad>0.0@3=stop", cfg)
    assert len(res.sequences) == 4
    for s in res.sequences:
        assert len(s.tokens) == 4, [t.text for t in s.tokens]
        assert s.tokens[-1].id == tok.eos_token_id  # the stopped beam could write only EOS
        assert s.stopped_by_alarm
        assert all(t.id != tok.eos_token_id for t in s.tokens[:-1])


def test_a_rule_that_never_fires_leaves_beams_alone(tiny):
    model, tok, schema = tiny
    cfg = GenerateConfig(num_beams=3, n=2, max_new_tokens=8)
    res = generate(model, tok, schema, ["x = 1\n", ""], "force_at:none,alarm:bad>1.0@3=stop", cfg)
    assert any(len(s.tokens) > 4 for s in res.sequences)
    assert not any(s.stopped_by_alarm for s in res.sequences)
