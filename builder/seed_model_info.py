"""Seeds vLLM's model-info cache for the GaMS architectures, once, when the image is built.

When the ``modelinfos/`` folder under VLLM_CACHE_ROOT has no entry for the model's class, vLLM
inspects the class in a fresh Python subprocess, which imports torch and vLLM again: about 20 s
on the H100, paid by every worker without a network volume and by the first one on a new volume
(each compile cache folder is a VLLM_CACHE_ROOT of its own). The entry depends only on vLLM's
model module, whose hash vLLM stores in it and checks, so the image computes it once:

    python -m builder.seed_model_info --out /opt/gams-worker/model-info

and the worker copies what is missing into the compile cache folder it chooses
(gams_worker/startup/compile_cache.py). A seed from another vLLM is a miss, never a wrong answer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

# The classes of the GaMS presets (gams_worker/presets.py), with their config model_type.
ARCHITECTURES: Dict[str, str] = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}


def seed(out: Path, architectures: Dict[str, str] = ARCHITECTURES) -> List[Path]:
    """Let vLLM inspect each architecture with ``out`` as its cache root; the files it wrote."""
    os.environ["VLLM_CACHE_ROOT"] = str(out)  # before vLLM reads it; this process does nothing else
    from transformers import AutoConfig
    from vllm.config import ModelConfig

    with tempfile.TemporaryDirectory() as folder:
        for architecture, model_type in architectures.items():
            model_dir = Path(folder) / architecture
            # A config.json is all vLLM reads to find and inspect the class: no weights, no tokenizer.
            AutoConfig.for_model(model_type, architectures=[architecture]).save_pretrained(model_dir)
            ModelConfig(model=str(model_dir))
    written = sorted((out / "modelinfos").glob("*.json"))
    missing = [name for name in architectures if not any(path.name.endswith(f"-{name}.json") for path in written)]
    if missing:
        raise SystemExit(f"vLLM cached no model info for {', '.join(missing)} in {out / 'modelinfos'}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder that gets modelinfos/")
    args = parser.parse_args()
    for path in seed(args.out):
        print(f"seeded {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
