"""Write a PEFT-format LoRA adapter with seeded random weights for a Gemma 2 model folder (no peft needed):
``adapter_config.json`` and ``adapter_model.safetensors`` with the tensor names PEFT writes. For tests
(the tiny model) and benchmarks (the GaMS-shaped models): vLLM's cost depends on the shapes, not the values.

    python -m builder.lora_adapter MODEL_DIR OUT_DIR [--rank 16] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP


def build(model_dir: str, out: str, rank: int = 8, seed: int = 0, targets: Sequence[str] = ALL_LINEAR,
          base_model: Optional[str] = None, scale: float = 1.0) -> Path:
    """The adapter folder ``out``; ``scale`` multiplies the B matrices (how far the adapter moves the output)."""
    import torch
    from safetensors.torch import save_file

    from gams_worker.memory import lora_shapes_of

    config = json.loads((Path(model_dir) / "config.json").read_text())
    shapes = lora_shapes_of(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            in_features, out_features = shapes[module]
            part = "self_attn" if module in ATTENTION else "mlp"
            name = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator)
                                                / in_features ** 0.5).to(torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator)
                                                * scale / rank ** 0.5).to(torch.bfloat16)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                      "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
                      "base_model_name_or_path": base_model or str(model_dir), "fan_in_fan_out": False,
                      "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.model_dir, args.out, args.rank, args.seed))
