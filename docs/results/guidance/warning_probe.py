"""The warning light on more prompts than an experiment's evaluation uses: N held-out openings holding a bad
sentence and N clean ones, continued under a policy; AUROC of the mean pre-ban P(<|bad|>) over the continuation and
of its value at the first generated position, and of the verdict at forced tag positions (P(bad) / P(the
attribute's tags)), with their intervals; and of each continuation's highest temptation / verdict, what a live
``alarm:bad>T`` / ``verdict:bad>T`` flag rule sees (it fires iff that maximum is above T). The openings are plain text (``--prompt-tags none``); ``--prompt-tags
policy`` tags them as the policy does (before 2026-12-01 the only rendering).

    python docs/results/guidance/warning_probe.py MODEL_DIR DATA -n 128 [--policy 'ban:bad,guide:bad=3'] [--out F]
"""

from __future__ import annotations

import argparse
import json

from pretag.control import load_policy
from pretag.evaluate import heldout_rows, prompt_warning
from pretag.models import load_model_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data", help="the labeled dataset the model was trained on (its held-out split is used)")
    ap.add_argument("-n", type=int, default=128, help="openings of each kind")
    ap.add_argument("--policy", default=None, help="default: the model's default policy")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-tags", default="none", choices=["none", "first", "every", "policy"])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model, tok, schema = load_model_dir(a.model)
    pol = load_policy(a.policy, schema)
    res = prompt_warning(model, tok, schema, pol, heldout_rows(a.model, a.data), n=a.n,
                         max_new_tokens=a.max_new_tokens, batch_size=32, seed=a.seed + 15485863,
                         prompt_tags=None if a.prompt_tags == "policy" else a.prompt_tags)
    out = {"model": a.model, "policy": pol.to_dict(), "n": a.n, "warning_light": res}
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
