"""The interpretability bridge (issue 14): which internal features drive the tag logits, and what editing them does.

    from pretag.interpret import InterpretConfig, interpret
    res = interpret("demo/checkpoints/conditional", "runs/demo/data-inline", out="runs/interpret")
    res["layers"]          # one record per residual layer: probe AUROC [95 %], cosines with the tag rows
    res["attribution"]     # direct logit attribution of logit(bad) - logit(good) per head / MLP / embedding
    res["features"]        # SAE features ranked by correlation with P(bad tag), with their top segments
    res["interventions"]   # ablate / scrub / steer: change in temptation, misalignment, held-out loss [95 %]

Generation-time ablation is one field: ``GenerateConfig(ablate_direction="bad")`` (``pretag generate
--ablate-direction bad``). Built on plain PyTorch forward hooks (``hooks``); see docs/interpret.md for why.
"""

from pretag.interpret.hooks import (
           Edit,
           FeatureEdit,
           ablation,
           direction_edit,
           intervene,
           layout,
           read_direction,
)
from pretag.interpret.measure import MeasureConfig
from pretag.interpret.run import InterpretConfig, interpret, interpret_model

__all__ = ["Edit", "FeatureEdit", "InterpretConfig", "MeasureConfig", "ablation", "direction_edit", "interpret",
           "interpret_model", "intervene", "layout", "read_direction"]
