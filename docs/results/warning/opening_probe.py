"""Does the model's representation of an untagged opening hold a document-wide label? Logistic probes on the hidden
state (last token, and mean over tokens) at a few layers, trained on training-split openings and scored on the
held-out ones (the warning light's openings).

    python docs/results/warning/opening_probe.py MODEL_DIR DATA N_TRAIN LAYERS [FILES]   # e.g. ... 1000 8,16,24,30 6
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression

from pretag.evaluate import heldout_rows, opening_prompts
from pretag.metrics import auroc
from pretag.models import load_model_dir
from pretag.tokens import TagVocab


def main() -> None:
    model_dir, data, n_train, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    files = int(sys.argv[5]) if len(sys.argv) > 5 else None
    layers = [int(x) for x in layers.split(",")]
    model, tok, schema = load_model_dir(model_dir)
    attr, vocab = schema.segment_attributes[0], TagVocab(tok, schema)
    held = heldout_rows(model_dir, data)
    held_texts = {r["text"] for r in held}
    test_p, test_y = opening_prompts(schema, attr, held, 128)
    rows = [r for f in sorted(Path(data).glob("part-*.parquet"))[:files] for r in pq.read_table(f).to_pylist()
            if r["text"] not in held_texts]
    train_p, train_y = opening_prompts(schema, attr, rows, n_train // 2)

    @torch.no_grad()
    def features(prompts):
        out = {layer: [] for layer in layers}
        for p in prompts:
            hs = model(input_ids=torch.tensor([vocab.prompt_ids(p, None)]), output_hidden_states=True).hidden_states
            for layer in layers:
                h = hs[layer][0]
                out[layer].append(torch.cat([h[-1], h.mean(0)]).float().numpy())
        return {layer: np.stack(v) for layer, v in out.items()}

    f_train, f_test = features(train_p), features(test_p)
    for layer in layers:
        d = f_train[layer].shape[1] // 2
        for name, cols in (("last-token", slice(0, d)), ("mean-token", slice(d, None))):
            clf = LogisticRegression(C=0.1, max_iter=3000).fit(f_train[layer][:, cols], train_y)
            score = auroc(clf.predict_proba(f_test[layer][:, cols])[:, 1], test_y)
            print(f"layer {layer} {name} probe AUROC {score:.3f} (train {len(train_p)}, test {len(test_p)})")


if __name__ == "__main__":
    main()
