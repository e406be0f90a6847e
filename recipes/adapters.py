"""Copy every LoRA model directory of the GPU recipe's jobs (``WORK/<job>/models/<run>/``) to ``DEST/<job>/<run>/``,
with the adapter weights in bf16 and without training checkpoints: what comes back from the device and can ship in
the demo (``pretag.models.load_model_dir`` rebuilds each over the installed SmolLM2 base).

    python recipes/adapters.py WORK DEST
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    from pretag.demo import save_adapter_bf16

    work, dest = Path(sys.argv[1]), Path(sys.argv[2])
    for weights in sorted(work.glob("*/models/*/adapter_model.safetensors")):
        src = weights.parent
        to = save_adapter_bf16(src, dest / src.parent.parent.name / src.name)
        print(f"{to}: {(to / weights.name).stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
