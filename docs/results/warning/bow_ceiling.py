"""How predictable is a document-wide label from an opening? A bag-of-words logistic regression trained on the
training split's openings (the same ``opening_prompts`` the warning light continues) and scored on the held-out
openings: the AUROC a text classifier reaches with that much data, to set the warning light's numbers against.

    python docs/results/warning/bow_ceiling.py MODEL_DIR DATA [--files K]   # K: only the first K parquet parts
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from pretag.evaluate import heldout_rows, opening_prompts
from pretag.metrics import auroc
from pretag.schema import load_schema


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a model trained on DATA (its held-out split is used)")
    ap.add_argument("data")
    ap.add_argument("--files", type=int, default=None)
    a = ap.parse_args()
    schema = load_schema(Path(a.data) / "schema.yaml")
    attr = schema.segment_attributes[0]
    held = heldout_rows(a.model, a.data)
    held_texts = {r["text"] for r in held}
    test_p, test_y = opening_prompts(schema, attr, held, 128)
    parts = sorted(Path(a.data).glob("part-*.parquet"))[: a.files]
    rows = [r for f in parts for r in pq.read_table(f).to_pylist() if r["text"] not in held_texts]
    train_p, train_y = opening_prompts(schema, attr, rows, 10 ** 9)
    vec = TfidfVectorizer(min_df=2, sublinear_tf=True)
    clf = LogisticRegression(C=4, max_iter=3000).fit(vec.fit_transform(train_p), train_y)
    print(f"{len(train_p)} training openings, {len(test_p)} held-out: AUROC "
          f"{auroc(clf.predict_proba(vec.transform(test_p))[:, 1], test_y):.3f}")


if __name__ == "__main__":
    main()
