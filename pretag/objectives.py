"""The six training objectives of Korbak et al. 2023, "Pretraining Language Models with Human Preferences".

Every objective is a small pure function with one signature, ``objective(tb: TokenBatch, cfg) -> (loss, logs)``.
The label shift happens once, in :func:`shift`: position ``i`` of a ``TokenBatch`` describes the *target* token
``x_i`` (its log-probability given ``x_<i``, its segment's reward and badness, whether it is a tag) and the value
``V(x_<i)`` predicted from the prefix. Losses are means over the counted target tokens of the batch.

Notation (paper §2): ``π`` is the LM, ``R(x_i)`` the reward of the segment holding token ``x_i`` (here the negative
misalignment score, weighted over attributes), ``t`` the threshold that makes a segment bad.

No logging backend is imported here: logs are plain floats, the trainer decides where they go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class ObjectiveConfig:
    """Hyperparameters of the objectives (the paper's per-task values ship in pretag/configs/train/tasks)."""

    alpha: float = 1.0
    """unlikelihood: weight of the log(1 - p) term on bad tokens. awr: weight of the LM term (1 - alpha: value)."""
    beta: float = 1.0
    """rwr/awr: temperature of the exponential weights exp(R/beta) / exp(A/beta)."""
    weight_clip: float = 1000.0
    """rwr/awr: upper clip of the token weights (the paper's clip_weight_max), so one token cannot dominate."""
    tag_weight: float = 1.0
    """conditional/conditional_ul: weight of a tag target's NLL (1 = the paper's Eq. 5). A tag is one target in
    ~20, so its prediction, the model's own verdict that the monitor reads, gets a small share of the gradient."""


@dataclass
class TokenBatch:
    """Target-aligned view of a batch; every tensor is (B, T-1)."""

    logp: Tensor  # log π(x_i | x_<i) of each target token, float32
    mask: Tensor  # 1.0 where the target counts (not padding), float32
    reward: Tensor  # R(x_i): reward of the target's segment
    bad: Tensor  # bool: the target's segment is misaligned (R(x_i) beyond the threshold t)
    is_tag: Tensor  # bool: the target is a tag token
    values: Tensor | None = None  # V(x_<i) from the value head (awr only)
    cf_logp: Tensor | None = None  # log π(x_i | x'_<i), the prefix with every bad tag swapped for good (cond_ul)

    @property
    def n(self) -> Tensor:
        return self.mask.sum().clamp(min=1.0)


def target_logp(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log π(x_i | x_<i) for i >= 1: (B, T, V) logits and (B, T) ids -> (B, T-1)."""
    # The targets are shifted (and the last position ignored) rather than the logits sliced: logits[:, :-1] is not
    # contiguous, and flattening it copies the whole (B, T, V) tensor again, forward and backward (~10 % of a tiny
    # model's step). cross_entropy is the fused log_softmax + gather: -log π(x_i | x_<i).
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T): position t predicts token t+1
    logp = -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none",
                            ignore_index=-100)
    return logp.view(targets.shape)[:, :-1]


def shift(logits: Tensor, batch: dict[str, Tensor], values: Tensor | None = None,
          cf_logits: Tensor | None = None) -> TokenBatch:
    """The one label shift: the logits at position i-1 predict token i; metadata follows the target.

    ``logits`` (B, T, V); ``batch`` holds ``input_ids``, ``reward``, ``bad``, ``is_tag``, ``mask`` as (B, T);
    ``values`` (B, T) is the value head read at every position. ``cf_logits`` (B, T, V): the model's logits on the
    counterfactual input (bad tags swapped for good ones), scored against the *original* targets.
    """
    return TokenBatch(
        logp=target_logp(logits, batch["input_ids"]),
        mask=batch["mask"][:, 1:].float(),
        reward=batch["reward"][:, 1:].float(),
        bad=batch["bad"][:, 1:].bool(),
        is_tag=batch["is_tag"][:, 1:].bool(),
        values=None if values is None else values[:, :-1].float(),
        cf_logp=None if cf_logits is None else target_logp(cf_logits, batch["input_ids"]),
    )


def _nll(tb: TokenBatch, select: Tensor | None = None) -> Tensor:
    m = tb.mask if select is None else tb.mask * select.float()
    return -(tb.logp * m).sum() / m.sum().clamp(min=1.0)


def _tagged_nll_sum(tb: TokenBatch, cfg: ObjectiveConfig) -> Tensor:
    """-Σ_i w_i log π(x_i | x_<i) with w = ``cfg.tag_weight`` on tag targets and 1 on text (Eq. 5 when w = 1)."""
    w = tb.mask if cfg.tag_weight == 1.0 else tb.mask * torch.where(tb.is_tag, cfg.tag_weight, 1.0)
    return -(tb.logp * w).sum()


def mle(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Maximum likelihood, the control (paper Eq. 3): L = -Σ_i log π(x_i | x_<i)."""
    loss = _nll(tb)
    return loss, {"nll": loss.item()}


def filtering(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Filtering (paper Eq. 4): MLE on documents whose average score is within the threshold.

    L = -Σ_i log π(x_i | x_<i) over x with score(x) <= t. The selection is a property of the data, so it happens
    once, before packing (``pretag.tokens.document_misaligned``); the loss itself is MLE.
    """
    return mle(tb, cfg)


def conditional(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Conditional training (paper Eq. 5): MLE over text with control tags, L = -Σ_i log π(c_i, x_i | ...).

    Tags are ordinary targets here: the model learns p(tag | prefix) as well as p(text | tag), which is what lets
    generation condition on <|good|> and lets the monitor read the "temptation" p(<|bad|>). ``cfg.tag_weight``
    (ours) scales the tag targets' terms; the mean is still over the counted tokens, so text keeps its scale.
    """
    loss = _tagged_nll_sum(tb, cfg) / tb.n
    return loss, {"nll": _nll(tb).item(), "nll_text": _nll(tb, ~tb.is_tag).item(), "nll_tag": _nll(tb, tb.is_tag).item()}


def unlikelihood(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Unlikelihood (paper Eq. 6): MLE on good segments, unlikelihood on every token of bad ones.

    L = -Σ_{i: R(x_i) > t} log π(x_i | x_<i) - α Σ_{i: R(x_i) <= t} log(1 - π(x_i | x_<i)).
    log(1 - p) is computed as log(-expm1(log p)), clamped at 1e-5 so a near-certain bad token has a finite gradient.
    """
    good = tb.mask * (~tb.bad).float()
    badm = tb.mask * tb.bad.float()
    log1mp = torch.log(torch.clamp(-torch.expm1(tb.logp), min=1e-5))
    mle_sum = -(tb.logp * good).sum()
    ul_sum = -(log1mp * badm).sum()
    loss = (mle_sum + cfg.alpha * ul_sum) / tb.n
    return loss, {"nll_good": (mle_sum / good.sum().clamp(min=1)).item(),
                  "ul_bad": (ul_sum / badm.sum().clamp(min=1)).item(), "bad_frac": (badm.sum() / tb.n).item()}


def _log1mp(logp: Tensor) -> Tensor:
    """log(1 - p) from log p, as log(-expm1(log p)), clamped at 1e-5 so a near-certain token keeps a finite gradient."""
    return torch.log(torch.clamp(-torch.expm1(logp), min=1e-5))


def conditional_ul(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Conditional training plus a counterfactual unlikelihood term (ours; no paper has tried it).

    L = -Σ_i log π(c_i, x_i | ...) - α Σ_{i: x_i text of a bad segment} log(1 - π(x_i | x'_<i)), where x' is the
    same prefix with every bad tag replaced by its attribute's good tag. The first term is Eq. 5 unchanged, so the
    model still learns what bad text looks like after <|bad|> (and the monitor can read its temptation); the second
    pushes the same bad tokens away *under <|good|>*, the context generation uses, instead of waiting for the tag to
    be learned from the marginal ("marginals before conditionals"). Costs a second forward pass.
    """
    if tb.cf_logp is None:
        raise ValueError("conditional_ul needs the counterfactual log-probabilities (TokenBatch.cf_logp is None)")
    nll_sum = _tagged_nll_sum(tb, cfg)
    badm = tb.mask * (tb.bad & ~tb.is_tag).float()
    ul_sum = -(_log1mp(tb.cf_logp) * badm).sum()
    loss = (nll_sum + cfg.alpha * ul_sum) / tb.n
    return loss, {"nll": (nll_sum / tb.n).item(), "ul_bad_under_good": (ul_sum / badm.sum().clamp(min=1)).item(),
                  "nll_tag": _nll(tb, tb.is_tag).item()}


def rwr(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Reward-weighted regression (paper Eq. 7): L = -Σ_i log π(x_i | x_<i) exp(R(x_i) / β), weights clipped."""
    w = torch.clamp(torch.exp(tb.reward / cfg.beta), max=cfg.weight_clip)
    loss = -(w * tb.logp * tb.mask).sum() / tb.n
    return loss, {"nll": _nll(tb).item(), "weight": ((w * tb.mask).sum() / tb.n).item()}


def awr(tb: TokenBatch, cfg: ObjectiveConfig) -> tuple[Tensor, dict[str, float]]:
    """Advantage-weighted regression (paper Eq. 8) with a learned value head V.

    A(x_<i, x_i) = R(x_i) - V(x_<i);  L_LM = -Σ_i log π(x_i | x_<i) clip(exp(A / β));  L_V = Σ_i (V(x_<i) - R(x_i))²;
    L = α L_LM + (1 - α) L_V. The advantage is detached: the value head learns only from L_V.
    With V ≡ 0 and α = 1 this is exactly RWR.
    """
    if tb.values is None:
        raise ValueError("awr needs values from a value head (TokenBatch.values is None)")
    adv = tb.reward - tb.values.detach()
    w = torch.clamp(torch.exp(adv / cfg.beta), max=cfg.weight_clip)
    lm = -(w * tb.logp * tb.mask).sum() / tb.n
    value_loss = ((tb.values - tb.reward) ** 2 * tb.mask).sum() / tb.n
    loss = cfg.alpha * lm + (1.0 - cfg.alpha) * value_loss
    return loss, {"nll": _nll(tb).item(), "lm": lm.item(), "value_loss": value_loss.item(),
                  "weight": ((w * tb.mask).sum() / tb.n).item(), "advantage": ((adv * tb.mask).sum() / tb.n).item()}


Objective = Callable[[TokenBatch, ObjectiveConfig], tuple[Tensor, dict[str, float]]]
OBJECTIVES: dict[str, Objective] = {
    "mle": mle, "filter": filtering, "conditional": conditional,
    "unlikelihood": unlikelihood, "rwr": rwr, "awr": awr, "conditional_ul": conditional_ul,
}
PAPER_OBJECTIVES = ("mle", "filter", "conditional", "unlikelihood", "rwr", "awr")  # the paper's six (Fig. 2)
USES_TAGS = {"conditional", "conditional_ul"}  # tag ids go into the training text only for these
NEEDS_COUNTERFACTUAL = {"conditional_ul"}  # these also run the model on the input with bad tags swapped for good
NEEDS_VALUES = {"awr"}  # these need a value head
FILTERS_DATA = {"filter"}  # these drop misaligned documents before packing


def text_nll(tb: TokenBatch) -> Tensor:
    """Mean NLL of the text tokens (tags excluded): the evaluation loss, comparable across objectives."""
    return _nll(tb, ~tb.is_tag)
