"""The tiny model, changed to test the end-of-turn stop (tests/test_end_of_turn.py).

Two changes to builder/tiny_model.py's model:

- generation_config.json lists only ``<eos>`` (``eos_token_id: 1``), as a GaMS repo, fine-tune
  or local copy would that lacks Gemma's ``[1, 107]``;
- the weights make ``<end_of_turn>`` the greedy token after every ``.``: hidden dimension 0
  becomes a private channel from the ``.`` embedding to the ``<end_of_turn>`` logit (the
  embeddings are tied, so the bias goes through both rows). Every other token's embedding is
  0 there, and no layer reads or writes it, so the residual stream carries exactly what the
  input token put in, and the final norm passes it to the logits.

The trained model already ends answers with ``.<end_of_turn>``; the channel makes that a
wide margin, and also makes ``<end_of_turn>`` beat ``<eos>`` after a sentence outside a chat,
so that a job not stopped at the end of its turn runs on into the next one until max_tokens.
The build checks both with a greedy run of ``PROBE_QUESTION`` and writes what it saw to
``end_of_turn_probe.json``.

    python -m builder.end_of_turn_model [OUT_DIR]    # prints the model directory
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from pathlib import Path

from builder import tiny_model

RECIPE_VERSION = "1"
CHANNEL = 0  # the hidden dimension used as the channel
CHANNEL_VALUE = 1.0  # embedding value of "." and <end_of_turn> there; about +5 on the logit
PROBE_QUESTION = "Kaj je vredno videti v Ljubljani?"
PROBE_FILE = "end_of_turn_probe.json"
RUN_ON_TOKENS = 48


def default_dir() -> Path:
    base = tiny_model.default_dir()
    return base.with_name(f"{base.name}-eot{RECIPE_VERSION}")


def open_the_channel(model, trigger_id: int, end_of_turn_id: int) -> None:
    import torch

    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, CHANNEL] = 0
        embedding[trigger_id, CHANNEL] = CHANNEL_VALUE
        embedding[end_of_turn_id, CHANNEL] = CHANNEL_VALUE
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for reads in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                reads.weight[:, CHANNEL] = 0
            for writes in (attention.o_proj, mlp.down_proj):
                writes.weight[CHANNEL, :] = 0
        model.model.norm.weight[CHANNEL] = 0  # Gemma's norm scales by 1 + weight


def probe(model, tokenizer) -> dict:
    """Greedy answer to PROBE_QUESTION, split at the first <end_of_turn>, and what follows."""
    end_of_turn_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(prompt["input_ids"], max_new_tokens=RUN_ON_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, prompt["input_ids"].shape[1]:].tolist()
    if end_of_turn_id not in generated[1:]:
        raise RuntimeError(f"the probe answer never ends its turn: {tokenizer.decode(generated)!r}")
    end = generated.index(end_of_turn_id, 1)
    after = generated[end + 1:]
    run_on = tokenizer.decode(after, skip_special_tokens=True)
    if tokenizer.eos_token_id in after or not run_on.strip():
        raise RuntimeError(f"nothing runs on past the turn: {tokenizer.decode(after)!r}")
    return {"question": PROBE_QUESTION, "answer": tokenizer.decode(generated[:end], skip_special_tokens=True),
            "answer_tokens": end, "run_on": run_on}


def build(out: Path | None = None) -> Path:
    """Build the variant into ``out`` (default: next to the tiny model's cache) unless it is there."""
    import torch
    from transformers import AutoTokenizer, Gemma2ForCausalLM, GenerationConfig

    base = tiny_model.build()
    out = Path(out) if out else default_dir()
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / PROBE_FILE).exists():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(base, tmp)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            model = Gemma2ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            open_the_channel(model, tokenizer.convert_tokens_to_ids("."),
                             tokenizer.convert_tokens_to_ids("<end_of_turn>"))
            model = model.to(torch.bfloat16)  # probe the weights as they are saved
            model.save_pretrained(tmp, safe_serialization=True)
            GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0).save_pretrained(tmp)
            (tmp / PROBE_FILE).write_text(json.dumps(probe(model, tokenizer), ensure_ascii=False, indent=1))
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
