"""Which internal features drive the tag logits, and what editing them does (issue 14).

On the documents `pretag train` held out of MODEL: a probe and a difference-of-means direction per residual layer
(held-out AUROC with a 95 % interval, cosine with the bad tag's rows), direct logit attribution of
logit(bad) - logit(good) to each head / MLP / the embeddings (tempted vs not), a TopK sparse autoencoder on the
most informative layer (features ranked by correlation with P(bad tag)), and interventions (ablate, scrub, steer,
SAE features, the tag directions) with the change in temptation, misalignment score and held-out loss.

Examples:
  pretag interpret demo/checkpoints/conditional --data runs/fortunes-readability --out runs/interpret
  pretag interpret runs/pep8-cond --data runs/stdlib-pep8 --out runs/interp --docs 200 --samples 0 --json
Writes DIR/report.html, DIR/interpret.json, DIR/direction.pt (for `pretag generate --ablate-direction`), DIR/sae.pt.
"""

from __future__ import annotations

HELP = "probes, logit attribution, SAE features and interventions on the tag logits; HTML report"


def add_arguments(p) -> None:
    p.add_argument("model", help="model directory written by `pretag train` (tag-trained)")
    p.add_argument("--data", required=True, help="labeled dataset directory (its held-out split is read)")
    p.add_argument("--out", default="runs/interpret", help="output directory (report.html, interpret.json, ...)")
    p.add_argument("--attribute", default=None, help="binary segment attribute (default: the schema's first)")
    p.add_argument("--docs", type=int, default=None, help="held-out documents to read (default: all)")
    p.add_argument("--samples", type=int, default=256,
                   help="samples per intervention for the misalignment score (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--loss-docs", type=int, default=128, help="held-out documents for the loss change")
    p.add_argument("--sae-features", type=int, default=1024)
    p.add_argument("--sae-k", type=int, default=16, help="active features per token (TopK)")
    p.add_argument("--sae-steps", type=int, default=1000)
    p.add_argument("--layer", type=int, default=None, help="layer for the SAE and interventions (default: best probe)")
    p.add_argument("--no-interventions", action="store_true", help="probes, attribution and SAE only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true",
                   help="print {layers: one record per layer, interventions: one per intervention, ...}")


def run(args) -> int:
    from pathlib import Path

    from pretag.cli import UserError, print_json

    problems = [f"{what} {p!r} does not exist" for what, p in (("model directory", args.model),
                                                               ("data directory", args.data)) if not Path(p).is_dir()]
    if problems:
        raise UserError("; ".join(problems))
    from pretag.interpret import InterpretConfig, MeasureConfig, interpret

    cfg = InterpretConfig(attribute=args.attribute, heldout_docs=args.docs, sae_features=args.sae_features,
                          sae_k=args.sae_k, sae_steps=args.sae_steps, sae_layer=args.layer,
                          interventions=not args.no_interventions, loss_docs=args.loss_docs, seed=args.seed,
                          measure=MeasureConfig(samples=args.samples, max_new_tokens=args.max_new_tokens,
                                                seed=args.seed))
    try:
        res = interpret(args.model, args.data, args.out, cfg)
    except ValueError as e:
        raise UserError(str(e)) from e
    if args.json:
        print_json(res)
        return 0
    s = res["summary"]
    print(f"{s['n_contexts']} segment starts in {s['n_docs']} held-out documents ({s['n_bad']} bad); "
          f"the model's own P(bad tag) AUROC {s['model_auroc']['value']:.3f}")
    for r in res["layers"]:
        pa = r.get("probe_auroc") or {}
        if pa:
            print(f"  layer {r['layer']}: probe AUROC {pa['value']:.3f} [{pa['lo']:.3f}, {pa['hi']:.3f}], "
                  f"cos(diff-of-means, read direction) {r['cos_read_direction']:+.3f}")
    top = res["attribution"]["top"][:3]
    print("top attribution (tempted minus not): " + ", ".join(f"{t['component']} {t['diff']:+.3f}" for t in top))
    for r in res["interventions"]:
        d = r["d_temptation"]
        print(f"  {r['intervention']}: temptation {d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
              + (f", score {r['d_score']['value']:+.3f}" if r.get("d_score") else "")
              + (f", loss {r['d_loss']['value']:+.4f}" if r.get("d_loss") else ""))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
