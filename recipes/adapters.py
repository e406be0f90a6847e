"""Copy every LoRA model directory of the GPU recipe's jobs (``WORK/<job>/models/<run>/``) to ``DEST/<job>/<run>/``,
with the adapter weights in bf16 and without training checkpoints: what comes back from the device and can ship in
the demo (``pretag.models.load_model_dir`` rebuilds each over the installed SmolLM2 base).

    python recipes/adapters.py WORK DEST
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    work, dest = Path(sys.argv[1]), Path(sys.argv[2])
    for weights in sorted(work.glob("*/models/*/adapter_model.safetensors")):
        src = weights.parent
        to = dest / src.parent.parent.name / src.name
        shutil.copytree(src, to, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "adapter_model.safetensors"))
        tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(tensors, to / "adapter_model.safetensors", metadata={"format": "pt"})
        print(f"{to}: {(to / 'adapter_model.safetensors').stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
