"""Features: a TopK sparse autoencoder on one layer's residual stream, ranked against the tag and the verdict.

TopK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") keeps the k largest pre-activations of each
token, so sparsity is set directly instead of tuned through an L1 coefficient: the one knob that matters at this
scale. Decoder rows are kept at unit norm; the encoder starts as the decoder's transpose and the decoder bias at
the data mean, as in that paper. It trains on every token of the held-out documents at the chosen layer, and is
then read at the segment starts, where the tag is decided.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pretag.interpret.hooks import Recorder, on_residual
from pretag.interpret.probe import Contexts


class TopKSAE(nn.Module):
    def __init__(self, d: int, n_features: int, k: int):
        super().__init__()
        if not 0 < k <= n_features:
            raise ValueError(f"need 0 < k <= n_features, got k={k}, n_features={n_features}")
        self.k = k
        W = torch.randn(n_features, d)
        self.W_dec = nn.Parameter(W / W.norm(dim=1, keepdim=True))  # (F, d)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        pre = (h - self.b_dec) @ self.W_enc + self.b_enc  # (..., F)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.W_dec + self.b_dec

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the k active rows only (a gather, not a dense (F, d) product: the same
        numbers, ~F/k times less work for the decoder and its gradient)."""
        top = ((h - self.b_dec) @ self.W_enc + self.b_enc).topk(self.k, dim=-1)
        return torch.einsum("...k,...kd->...d", torch.relu(top.values), self.W_dec[top.indices]) + self.b_dec


def token_activations(model, ctx: Contexts, layer: int, max_tokens: int = 200_000) -> torch.Tensor:
    """(N_tokens, d): the residual stream at ``layer`` at every real token of the contexts' documents."""
    rec = Recorder([layer])
    device = next(model.parameters()).device
    n = 0
    with torch.no_grad(), on_residual(model, [layer], rec):
        for b in ctx.batches:
            rec.select = b.mask.bool().to(device)
            model.base_model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device))
            n += int(b.mask.sum())
            if n >= max_tokens:
                break
    return rec.take()[layer][:max_tokens]


def train_sae(X: torch.Tensor, *, n_features: int = 1024, k: int = 16, steps: int = 1000, batch_size: int = 512,
              lr: float = 1e-3, seed: int = 0) -> tuple[TopKSAE, dict]:
    """Fit a TopK SAE to activations ``X`` (N, d); report the fraction of variance explained on a held-out tenth
    and the fraction of features that never fire there."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = X.float()
    perm = torch.randperm(len(X), generator=g)
    n_val = max(1, len(X) // 10)
    val, tr = X[perm[:n_val]], X[perm[n_val:]]
    sae = TopKSAE(X.shape[1], n_features, k)
    with torch.no_grad():
        sae.b_dec.copy_(tr.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        xb = tr[torch.randint(0, len(tr), (min(batch_size, len(tr)),), generator=g)]
        loss = (sae(xb) - xb).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
    with torch.no_grad():
        a = sae.encode(val)
        err = (sae.decode(a) - val).pow(2).sum(-1).mean()
        var = (val - val.mean(0)).pow(2).sum(-1).mean()
        stats = {"n_tokens": len(X), "n_features": n_features, "k": k, "steps": steps,
                 "fve": float(1 - err / var), "dead_fraction": float(((a > 0).sum(0) == 0).float().mean())}
    sae.eval()
    return sae, stats


def _corr(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column of A (N, F) with y (N,); NaN for a constant column."""
    Ac, yc = A - A.mean(0), y - y.mean()
    den = np.sqrt((Ac ** 2).sum(0) * (yc ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, Ac.T @ yc / np.where(den > 0, den, 1), np.nan)


def rank_features(sae: TopKSAE, ctx: Contexts, layer: int, *, top: int = 10, examples: int = 5) -> list[dict]:
    """The features most correlated (in absolute value) with the model's P(bad tag) at segment starts, each with
    its correlation with the classifier's verdict, how often it fires, and its top-activating segments."""
    with torch.no_grad():
        A = sae.encode(ctx.acts[layer].float()).numpy().astype(np.float64)  # (N, F)
    c_p, c_v = _corr(A, ctx.p_rel), _corr(A, ctx.label.astype(float))
    order = [int(i) for i in np.argsort(-np.nan_to_num(np.abs(c_p), nan=-1.0)) if not np.isnan(c_p[i])][:top]
    out = []
    for f in order:
        best = np.argsort(-A[:, f])[:examples]
        out.append({"feature": f, "corr_p_bad": float(c_p[f]), "corr_verdict": float(c_v[f]),
                    "fires": float((A[:, f] > 0).mean()),
                    "examples": [{"activation": float(A[i, f]), "segment": ctx.text[i], "bad": bool(ctx.label[i]),
                                  "p_bad": float(ctx.p_rel[i])} for i in best if A[i, f] > 0]})
    return out
