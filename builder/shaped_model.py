"""Write a random-weight checkpoint with the exact architecture of a GaMS model.

For benchmarks where the real weights cannot be downloaded: vLLM's speed and memory
depend on the shapes, not on the values. Tensors are generated on ``--device``
(``cuda`` writes GaMS-9B's 18.5 GB in well under a minute) and saved as safetensors
shards with an index, next to a Gemma-style tokenizer padded to the real vocabulary
size (256000) and Gemma's chat template.

    python -m builder.shaped_model gams-9b /tmp/gams-9b-shaped --device cuda
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from builder import tiny_model

# Gemma 2 architectures of the GaMS family (from their config.json files).
PRESETS = {
    "gams-2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gams-9b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gams-27b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                     num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
    # GaMS-9B's layout at a size this CPU machine can load, to test this script.
    "small-test": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64),
}
COMMON = dict(vocab_size=256000, max_position_embeddings=8192, sliding_window=4096, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
              rope_theta=10000.0, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
              torch_dtype="bfloat16", architectures=["Gemma2ForCausalLM"])
SHARD_BYTES = 5 * 2**30


def write(preset: str, out: Path, device: str) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = Gemma2Config(**COMMON, **PRESETS[preset])
    config.save_pretrained(out)
    tiny_model.build_tokenizer(out, vocab_size=config.vocab_size)
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in Gemma2ForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied to the embeddings

    generator = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(0.02)
        shard[name] = tensor.to(torch.bfloat16).cpu()
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(write(args.preset, args.out, args.device))


if __name__ == "__main__":
    main()
