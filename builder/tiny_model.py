"""Build a tiny GaMS-shaped model for local runs and tests (no hub access needed).

It is a ``Gemma2ForCausalLM`` with GaMS-9B's traits scaled down: sliding-window and
global layers, attention and final logit softcapping, ``query_pre_attn_scalar``,
tied embeddings, bf16. head_dim is 64 because vLLM's CPU attention rejects 16.
Weights start random (seeded) and get a few seconds of training on the corpus; the tokenizer is a Gemma-style BPE with byte
fallback trained on ``tiny_corpus.txt``, and the chat template is Gemma's, which
refuses a ``system`` role as the real one does.

    python -m builder.tiny_model [OUT_DIR]    # prints the model directory

The result is cached: a directory keyed by RECIPE_VERSION and the corpus.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "tiny_corpus.txt"
# Bump when a change here changes the built model, so cached copies are rebuilt.
RECIPE_VERSION = "3"
VOCAB_SIZE = 1024
TRAIN_STEPS = 300
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 2's chat template (as in GaMS-9B-Instruct): no system role, strict alternation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def default_dir() -> Path:
    digest = hashlib.sha256(RECIPE_VERSION.encode() + CORPUS.read_bytes()).hexdigest()[:12]
    return Path.home() / ".cache" / "gams-worker" / f"tiny-gams-{digest}"


def build_tokenizer(out: Path, vocab_size: int = VOCAB_SIZE) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Train merges on the corpus, then lay the vocabulary out as Gemma does:
    # special tokens, the 256 byte-fallback tokens, then the learned pieces.
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - 256, show_progress=False
    )
    trainer_tok.train([str(CORPUS)], trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    while len(vocab) < vocab_size:  # Gemma pads its vocabulary with unused tokens too
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    # BOS is added by the post-processor, as Gemma's tokenizer does.
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.save(str(out / "tokenizer.json"))


def build_model(out: Path) -> None:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

    config = Gemma2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=8192,
        sliding_window=128,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=64,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    train_briefly(model, out)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0).save_pretrained(out)


def train_briefly(model, tokenizer_dir: Path, steps: int = TRAIN_STEPS) -> None:
    """A few seconds of next-token training on the corpus, so outputs read like Slovene.

    Pure random weights tend to repeat one token forever, which shows nothing about
    streaming, UTF-8 or stop handling.
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids: list = []
    for line in lines:  # each line as plain text and as a chat answer, so both prompt styles work
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": line.split(".")[0]}], tokenize=False, add_generation_prompt=True
        )
        ids += tokenizer.encode(line) + [tokenizer.eos_token_id]
        ids += tokenizer.encode(chat + line + "<end_of_turn>\n", add_special_tokens=False)
    data = torch.tensor(ids)
    window, batch = 64, 16
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
        x = torch.stack([data[s : s + window] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build(out: Path | None = None) -> Path:
    """Build the tiny model into ``out`` (default: the cache) unless it is there already."""
    out = Path(out) if out else default_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs wait for one build
        if not (out / "model.safetensors").exists():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            build_tokenizer(tmp)
            build_model(tmp)
            tmp.replace(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
