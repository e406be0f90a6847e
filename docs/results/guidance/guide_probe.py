"""Tag guidance on a tag-trained model: the misalignment score of its samples under the plain ban and under
``guide: {bad: w}`` for each weight, on the same seeds (docs/results/guidance/README.md).

    python docs/results/guidance/guide_probe.py MODEL_DIR SCHEMA N [W ...]
"""

from __future__ import annotations

import json
import sys
import time

from pretag.control import TagPolicy, default_policy
from pretag.evaluate import generate_samples, score_samples
from pretag.models import load_model_dir
from pretag.schema import load_schema


def main() -> None:
    model_dir, schema_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    weights = [float(w) for w in sys.argv[4:]] or [0.0, 1.0, 2.0]
    model, tok, own = load_model_dir(model_dir)
    schema = load_schema(schema_path)
    base = default_policy(own)
    rows = []
    for w in weights:
        pol = TagPolicy(ban=list(base.ban), guide={t: w for t in base.ban} if w else {}, name=f"guide{w:g}")
        t0 = time.time()
        samples = generate_samples(model, tok, own, pol, [""] * n, max_new_tokens=48, batch_size=32, seed=0)
        summ, _ = score_samples(schema, samples)
        a = schema.attributes[0].name
        s = summ[a]
        row = {"guide": w, "score": s["score"], "frac_bad_segments": s.get("frac_bad_segments"),
               "wall_s": round(time.time() - t0, 1), "samples": [x.text for x in samples[:4]]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
        for x in samples[:3]:
            print("   ", repr(x.text[:160]), flush=True)
    json.dump(rows, sys.stdout if len(sys.argv) < 0 else open(f"{model_dir.rstrip('/').replace('/', '_')}-guide.json", "w"),
              indent=1)


if __name__ == "__main__":
    main()
