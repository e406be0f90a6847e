"""Copy every LoRA model directory of the GPU recipe's jobs (``WORK/<job>/models/<run>/``) to ``DEST/<job>/<run>/``,
with the adapter weights in bf16 and without training checkpoints: what comes back from the device and can ship in
the demo (``pretag.models.load_model_dir`` rebuilds each over the installed SmolLM2 base).

    python recipes/adapters.py WORK DEST [PATTERN ...]

PATTERNs (shell globs on ``<job>/<run>``, e.g. ``smol-toxicity-*/*`` ``*/conditional_ul``; default: all) pick which,
so that they and the results stay under what one device call brings back.
"""

from __future__ import annotations

import sys
from fnmatch import fnmatch
from pathlib import Path


def main() -> None:
    from pretag.demo import save_adapter_bf16

    work, dest, patterns = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or ["*/*"]
    for weights in sorted(work.glob("*/models/*/adapter_model.safetensors")):
        src = weights.parent
        name = f"{src.parent.parent.name}/{src.name}"
        if not any(fnmatch(name, p) for p in patterns):
            continue
        to = save_adapter_bf16(src, dest / name)
        print(f"{to}: {(to / weights.name).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
