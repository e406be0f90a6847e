"""Each objective against its closed form on a two-token vocabulary."""

import math

import pytest
import torch

from pretag.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    awr,
    conditional,
    conditional_ul,
    mle,
    rwr,
    shift,
    text_nll,
    unlikelihood,
)

LOG2 = math.log(2.0)


def batch(ids, reward=None, bad=None, is_tag=None, mask=None):
    ids = torch.tensor([ids])
    z = torch.zeros_like(ids)
    return {"input_ids": ids, "reward": torch.tensor([reward]).float() if reward else z.float(),
            "bad": torch.tensor([bad]) if bad else z.bool(), "is_tag": torch.tensor([is_tag]) if is_tag else z.bool(),
            "mask": torch.tensor([mask]) if mask else torch.ones_like(ids).bool()}


def logits_for(a: list[float]):
    """(1, T, 2) logits whose position i gives token 0 probability sigmoid(a_i)."""
    a = torch.tensor(a)
    return torch.stack([a, torch.zeros_like(a)], -1).unsqueeze(0)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_shift_aligns_targets_with_their_metadata():
    b = batch([0, 1, 0, 1], reward=[9.0, 1.0, 2.0, 3.0], bad=[True, False, True, False])
    tb = shift(logits_for([0.0, 1.0, 2.0, 3.0]), b)
    assert tb.logp.shape == (1, 3)
    # position 0's logits (p0 = 0.5) predict token 1 -> log 0.5; position 1's predict token 0 -> log sigmoid(1)
    assert tb.logp[0, 0].item() == pytest.approx(-LOG2)
    assert tb.logp[0, 1].item() == pytest.approx(math.log(sig(1.0)), rel=1e-5)
    assert tb.reward.tolist() == [[1.0, 2.0, 3.0]]  # metadata of the target, not of the input
    assert tb.bad.tolist() == [[False, True, False]]


def test_mle_equal_logits_is_log2_and_padding_is_ignored():
    cfg = ObjectiveConfig()
    loss, logs = mle(shift(torch.zeros(1, 5, 2), batch([0, 1, 1, 0, 1])), cfg)
    assert loss.item() == pytest.approx(LOG2)
    # a padded target with a terrible prediction must not count
    lg = logits_for([0.0, 0.0, 0.0, 50.0])
    loss, _ = mle(shift(lg, batch([0, 1, 0, 1], mask=[True, True, True, False])), cfg)
    assert loss.item() == pytest.approx(LOG2)


def test_conditional_counts_tags_and_text_and_splits_the_logs():
    b = batch([0, 1, 0, 1], is_tag=[False, True, False, False])
    a = [2.0, 0.0, 0.0, 0.0]  # position 0 predicts the tag (token 1) with p = 1 - sigmoid(2)
    loss, logs = conditional(shift(logits_for(a), b), ObjectiveConfig())
    tag_nll = -math.log(1 - sig(2.0))
    assert loss.item() == pytest.approx((tag_nll + 2 * LOG2) / 3, rel=1e-5)
    assert logs["nll_tag"] == pytest.approx(tag_nll, rel=1e-5)
    assert logs["nll_text"] == pytest.approx(LOG2, rel=1e-5)
    assert text_nll(shift(logits_for(a), b)).item() == pytest.approx(LOG2, rel=1e-5)


def test_tag_weight_scales_only_the_tag_targets_and_reaches_the_gradient():
    b = batch([0, 1, 0, 1], is_tag=[False, True, False, False])
    a = torch.tensor([2.0, 0.0, 0.0, 0.0], requires_grad=True)
    tag_nll = -math.log(1 - sig(2.0))
    for objective in (conditional, conditional_ul):
        lg = torch.stack([a, torch.zeros(4)], -1).unsqueeze(0)
        tb = shift(lg, b, cf_logits=lg.detach())  # no bad text: conditional_ul's UL term is 0
        loss, logs = objective(tb, ObjectiveConfig(tag_weight=5.0))
        assert loss.item() == pytest.approx((5.0 * tag_nll + 2 * LOG2) / 3, rel=1e-5)  # still a mean over 3 targets
        assert logs["nll_tag"] == pytest.approx(tag_nll, rel=1e-5)  # the logs report the unweighted NLL
        (g,) = torch.autograd.grad(loss, a)
        # d/da0 of -log(1 - sigmoid(a0)) = sigmoid(a0); only position 0 predicts the tag, weighted 5/3
        assert g[0].item() == pytest.approx(5.0 * sig(2.0) / 3, rel=1e-5)
        assert g[1].item() == pytest.approx(-(1 - sig(0.0)) / 3, rel=1e-5)  # text (token 0) at weight 1


@pytest.mark.parametrize("alpha", [1.0, 0.01])
def test_unlikelihood_closed_form(alpha):
    # targets: token1 (good, p=1-sigmoid(a0)), token0 (bad, p=sigmoid(a1)), token0 (bad, p=sigmoid(a2))
    a = [0.0, 1.5, -2.0, 0.0]
    b = batch([0, 1, 0, 0], bad=[False, False, True, True])
    loss, logs = unlikelihood(shift(logits_for(a), b), ObjectiveConfig(alpha=alpha))
    good = -math.log(1 - sig(0.0))
    ul = -math.log(1 - sig(1.5)) - math.log(1 - sig(-2.0))
    assert loss.item() == pytest.approx((good + alpha * ul) / 3, rel=1e-5)
    assert logs["bad_frac"] == pytest.approx(2 / 3)


def test_unlikelihood_with_all_good_segments_equals_mle():
    torch.manual_seed(0)
    lg = torch.randn(2, 7, 5)
    ids = torch.randint(0, 5, (2, 7))
    b = {"input_ids": ids, "reward": torch.zeros(2, 7), "bad": torch.zeros(2, 7, dtype=torch.bool),
         "is_tag": torch.zeros(2, 7, dtype=torch.bool), "mask": torch.ones(2, 7, dtype=torch.bool)}
    ul, _ = unlikelihood(shift(lg, b), ObjectiveConfig(alpha=0.3))
    ml, _ = mle(shift(lg, b), ObjectiveConfig())
    assert ul.item() == pytest.approx(ml.item(), rel=1e-6)


def test_unlikelihood_of_a_certain_bad_token_stays_finite():
    loss, _ = unlikelihood(shift(logits_for([80.0, 0.0]), batch([0, 0], bad=[True, True])), ObjectiveConfig())
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(-math.log(1e-5), rel=1e-4)


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_rwr_closed_form(beta):
    b = batch([0, 1, 0], reward=[0.0, -1.0, -0.2])
    loss, logs = rwr(shift(torch.zeros(1, 3, 2), b), ObjectiveConfig(beta=beta))
    w = [math.exp(-1.0 / beta), math.exp(-0.2 / beta)]
    assert loss.item() == pytest.approx(sum(w) * LOG2 / 2, rel=1e-6)
    assert logs["weight"] == pytest.approx(sum(w) / 2, rel=1e-6)


def test_rwr_weights_are_clipped():
    b = batch([0, 1], reward=[0.0, 100.0])
    loss, _ = rwr(shift(torch.zeros(1, 2, 2), b), ObjectiveConfig(beta=1.0, weight_clip=5.0))
    assert loss.item() == pytest.approx(5.0 * LOG2, rel=1e-6)


def test_awr_closed_form_and_zero_advantage_gives_weight_one():
    b = batch([0, 1, 0], reward=[0.0, -1.0, 0.5])
    values = torch.tensor([[-1.0, 0.5, 123.0]])  # V(x_<i) read at positions 0, 1 (the last is unused)
    cfg = ObjectiveConfig(alpha=0.3, beta=2.0)
    loss, logs = awr(shift(torch.zeros(1, 3, 2), b, values), cfg)
    assert logs["weight"] == pytest.approx(1.0)  # R == V everywhere: advantage 0
    assert logs["value_loss"] == pytest.approx(0.0)
    assert loss.item() == pytest.approx(0.3 * LOG2, rel=1e-6)
    values = torch.tensor([[0.0, 0.0, 0.0]])
    loss, logs = awr(shift(torch.zeros(1, 3, 2), b, values), cfg)
    w = [math.exp(-1.0 / 2), math.exp(0.5 / 2)]
    v = (1.0 + 0.25) / 2
    assert loss.item() == pytest.approx(0.3 * sum(w) * LOG2 / 2 + 0.7 * v, rel=1e-6)


def test_rwr_is_awr_with_alpha_one_and_a_zero_value_head():
    torch.manual_seed(1)
    lg = torch.randn(2, 6, 4)
    b = {"input_ids": torch.randint(0, 4, (2, 6)), "reward": -torch.rand(2, 6), "bad": torch.zeros(2, 6).bool(),
         "is_tag": torch.zeros(2, 6).bool(), "mask": torch.ones(2, 6).bool()}
    cfg = ObjectiveConfig(alpha=1.0, beta=0.5)
    a, _ = awr(shift(lg, b, torch.zeros(2, 6)), cfg)
    r, _ = rwr(shift(lg, b), cfg)
    assert a.item() == pytest.approx(r.item(), rel=1e-6)


def test_awr_value_head_learns_only_from_the_value_loss():
    b = batch([0, 1, 0], reward=[0.0, 1.0, 1.0])
    values = torch.zeros(1, 3, requires_grad=True)
    loss, _ = awr(shift(torch.zeros(1, 3, 2), b, values), ObjectiveConfig(alpha=1.0))
    loss.backward()
    assert values.grad is None or torch.all(values.grad == 0)  # advantage is detached; alpha=1: no value loss
    with pytest.raises(ValueError, match="value head"):
        awr(shift(torch.zeros(1, 3, 2), b), ObjectiveConfig())


def test_every_objective_returns_a_scalar_and_float_logs():
    b = batch([0, 1, 1, 0], reward=[0, -0.5, 0.0, -1.0], bad=[False, True, False, True])
    for name, fn in OBJECTIVES.items():
        loss, logs = fn(shift(torch.zeros(1, 4, 2), b, torch.zeros(1, 4), torch.zeros(1, 4, 2)), ObjectiveConfig())
        assert loss.dim() == 0 and math.isfinite(loss.item()), name
        assert all(isinstance(v, float) for v in logs.values()), name


def test_cli_and_experiment_offer_exactly_the_registered_objectives():
    from pretag.commands.train import METHODS as CLI_METHODS
    from pretag.experiment import METHODS
    from pretag.objectives import OBJECTIVES, PAPER_OBJECTIVES

    assert tuple(OBJECTIVES) == CLI_METHODS
    assert METHODS == PAPER_OBJECTIVES == tuple(OBJECTIVES)[:6]  # an experiment runs the paper's six by default


def test_conditional_ul_closed_form_bad_text_is_pushed_down_under_the_counterfactual_prefix():
    # tokens: 0 = text, 1 = tag. Targets 1..3: a tag, then two text tokens of a bad segment, then good text.
    b = batch([0, 1, 0, 0, 0], bad=[False, True, True, True, False], is_tag=[False, True, False, False, False])
    real = logits_for([0.0, 0.0, 0.0, 0.0, 0.0])  # p(token 0) = 0.5 everywhere
    cf = logits_for([0.0, 0.0, math.log(3.0), 0.0, 0.0])  # under <|good|>: p(0) = 0.75 at position 2, else 0.5
    loss, logs = conditional_ul(shift(real, b, cf_logits=cf), ObjectiveConfig(alpha=2.0))
    # NLL: 4 targets at log 2. UL: bad *text* targets are positions 2 and 3 (the tag at 1 is excluded):
    # -log(1 - 0.75) at target 3 (predicted from position 2), -log(1 - 0.5) at target 2 (from position 1)
    ul = -math.log(0.25) - math.log(0.5)
    assert loss.item() == pytest.approx((4 * LOG2 + 2.0 * ul) / 4, rel=1e-5)
    assert logs["ul_bad_under_good"] == pytest.approx(ul / 2, rel=1e-5)
    # with alpha = 0 it is conditional training exactly
    l0, _ = conditional_ul(shift(real, b, cf_logits=cf), ObjectiveConfig(alpha=0.0))
    assert l0.item() == pytest.approx(conditional(shift(real, b), ObjectiveConfig())[0].item())
    with pytest.raises(ValueError, match="counterfactual"):
        conditional_ul(shift(real, b), ObjectiveConfig())
