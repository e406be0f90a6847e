"""What writes the tag logit: direct logit attribution of logit(bad) - logit(good) at segment starts.

The final residual stream is a sum of what each part wrote: the embeddings, every attention head (its slice of
the output projection), every MLP, and the biases. The final norm is linear once its scale is frozen at the value
the whole stream gives it (LayerNorm also centres, which moves the read direction to ``u - mean(u)``), so

    logit(bad) - logit(good) = sum_c  x_c . u / sigma  +  norm_bias . dW,     u = g * (W_U[bad] - W_U[good]),

exactly, context by context; the tests check that the parts add up to the model's own logit difference. Direct
means what a part writes straight to the logit, not what it does through later layers.
"""

from __future__ import annotations

import numpy as np
import torch

from pretag.interpret.hooks import Recorder, layout, on_residual
from pretag.interpret.probe import Contexts, site_logits


def component_names(model) -> list[str]:
    lay = layout(model)
    names = ["embed"]
    for layer in range(lay.n_layers):
        names += [f"L{layer}.H{h}" for h in range(lay.n_heads)] + [f"L{layer}.mlp"]
    return names + ["bias"]


def logit_attribution(model, ctx: Contexts) -> dict[str, np.ndarray]:
    """Per context (N) and component (C, ``component_names``): the direct contribution to
    logit(bad) - logit(good); also the model's own difference (``actual``) and the parts' sum (``total``)."""
    lay = layout(model)
    L, H, dh = lay.n_layers, lay.n_heads, lay.head_dim
    W_U = model.get_output_embeddings().weight.detach().float()
    dw = W_U[ctx.bad_id] - W_U[ctx.good_id]  # (d,)
    u = lay.final_norm.weight.detach().float() * dw
    if lay.norm == "layer":
        u = u - u.mean()
    eps = float(getattr(lay.final_norm, "eps", getattr(lay.final_norm, "variance_epsilon", 1e-5)))
    rec = Recorder([0, L])
    heads: dict[int, list[torch.Tensor]] = {i: [] for i in range(L)}
    mlps: dict[int, list[torch.Tensor]] = {i: [] for i in range(L)}

    def grab_heads(i):
        def pre(mod, args):
            heads[i].append(args[0].detach()[rec.select].float().cpu())  # (n, H * dh)
        return pre

    def grab_mlp(i):
        def post(mod, args, out):
            mlps[i].append((out[0] if isinstance(out, tuple) else out).detach()[rec.select].float().cpu())  # (n, d)
        return post

    handles = [lay.attn_out[i].register_forward_pre_hook(grab_heads(i)) for i in range(L)]
    handles += [lay.mlps[i].register_forward_hook(grab_mlp(i)) for i in range(L)]
    device = next(model.parameters()).device
    actual = []
    try:
        with torch.no_grad(), on_residual(model, [0, L], rec):
            for b in ctx.batches:
                rec.select = b.sites.to(device)
                sel = site_logits(model, b, rec.select).float()  # (n, V)
                actual.append((sel[:, ctx.bad_id] - sel[:, ctx.good_id]).cpu())
    finally:
        for h in handles:
            h.remove()
    res = rec.take()
    x0, xL = res[0], res[L]  # (N, d)
    if lay.norm == "layer":
        sigma = torch.sqrt(xL.var(-1, unbiased=False) + eps)  # (N,)
    else:
        sigma = torch.sqrt(xL.pow(2).mean(-1) + eps)
    cols = [x0 @ u]
    bias = torch.zeros(())
    with torch.no_grad():
        for i in range(L):
            W_O = lay.out_weight(i).detach().float()  # (H * dh, d)
            wu = (W_O @ u).reshape(H, dh)  # (H, dh): each head's read-out of u
            z = torch.cat(heads[i]).reshape(-1, H, dh)  # (N, H, dh)
            cols += list(torch.einsum("nhd,hd->nh", z, wu).T)
            cols.append(torch.cat(mlps[i]) @ u)
            b_o = lay.out_bias(i)
            if b_o is not None:
                bias = bias + b_o.detach().float() @ u
    contrib = torch.stack(cols, 1) / sigma[:, None]  # (N, C-1)
    const = bias / sigma  # (N,): the attention output biases, scaled like everything else
    nb = lay.norm_bias()
    if nb is not None:
        const = const + nb.detach().float() @ dw
    head_b = getattr(model.get_output_embeddings(), "bias", None)
    if head_b is not None:
        const = const + (head_b[ctx.bad_id] - head_b[ctx.good_id]).detach().float()
    contrib = torch.cat([contrib, const.reshape(-1, 1).expand(len(contrib), 1)], 1)  # (N, C)
    return {"names": np.array(component_names(model)), "contrib": contrib.numpy(),
            "total": contrib.sum(1).numpy(), "actual": torch.cat(actual).numpy()}


def tempted_mask(ctx: Contexts, min_group: int = 10) -> tuple[np.ndarray, str]:
    """(N,) bool: contexts where the model is tempted, i.e. prefers the bad tag to the good one; if fewer than
    ``min_group`` are, the top decile of P(bad) instead (the rule used is returned with the mask)."""
    pref = ctx.p_bad > ctx.p_good
    if min_group <= pref.sum() <= len(pref) - min_group:
        return pref, "P(bad tag) > P(good tag)"
    cut = np.quantile(ctx.p_bad, 0.9)
    return ctx.p_bad >= cut, f"top decile of P(bad tag) (>= {cut:.3g}; only {int(pref.sum())} prefer bad)"


def group_means(contrib: np.ndarray, mask: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean contribution of each component in the two groups and their difference with a 95 % interval (the
    groups resampled independently)."""
    a, b = contrib[mask], contrib[~mask]
    out = {"mean_in": a.mean(0).tolist() if len(a) else None, "mean_out": b.mean(0).tolist() if len(b) else None,
           "n_in": int(len(a)), "n_out": int(len(b))}
    if len(a) and len(b):
        rng = np.random.default_rng(seed)
        diffs = np.stack([a[rng.integers(0, len(a), len(a))].mean(0) - b[rng.integers(0, len(b), len(b))].mean(0)
                          for _ in range(n_resamples)])  # (R, C)
        out["diff"] = (a.mean(0) - b.mean(0)).tolist()
        out["diff_lo"], out["diff_hi"] = (np.quantile(diffs, q, axis=0).tolist() for q in (0.025, 0.975))
    return out


def attribution_summary(model, ctx: Contexts, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Mean direct attribution per component: tempted vs not, and bad vs good segments (classifier verdict),
    plus the largest check error between the parts' sum and the model's logit difference."""
    att = logit_attribution(model, ctx)
    tempted, rule = tempted_mask(ctx)
    names = att["names"].tolist()
    tmp = group_means(att["contrib"], tempted, n_resamples=n_resamples, seed=seed)
    ver = group_means(att["contrib"], ctx.label, n_resamples=n_resamples, seed=seed)
    diff = np.asarray(tmp.get("diff") or [0.0] * len(names))
    order = np.argsort(-np.abs(diff))
    return {"components": names, "tempted": tmp, "verdict": ver, "tempted_rule": rule,
            "mean_logit_diff": float(att["actual"].mean()),
            "max_sum_error": float(np.abs(att["total"] - att["actual"]).max()),
            "top": [{"component": names[i], "diff": float(diff[i]), "lo": tmp["diff_lo"][i],
                     "hi": tmp["diff_hi"][i]} for i in order[:8]] if "diff" in tmp else []}
