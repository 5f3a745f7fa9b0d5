#!/usr/bin/env python3
"""Writes a random-weight bfloat16 Hugging Face folder (config.json, model.safetensors,
tokenizer.json) with Llama-3.2-1B's or Llama-3.1-8B's shapes, for measuring how Candela loads
16-bit safetensors (`--dtype bfloat16`, `--quantization q8_0 | q4_k`): load time, peak RSS and
decode speed. Same weights as bench/make_llama_gguf.py draws (normal(0, 0.02), one draw per tensor
shared by every layer); the tokenizer is stories260K's (the vocabulary table keeps Llama 3's size).

    bench/.venv/bin/python bench/make_llama_safetensors.py 1b OUT_DIR
"""

import json
import os
import shutil
import struct
import sys

import numpy as np

from make_llama_gguf import SHAPES, VOCAB


def bf16(a):
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    b = a.astype(np.float32).view(np.uint32)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.astype(np.uint16)


def main(shape, out):
    hidden, inter, layers, heads, kv_heads, tied = SHAPES[shape]
    head_dim = hidden // heads
    rng = np.random.default_rng(0)
    draw = lambda *s: bf16(rng.normal(0, 0.02, size=s))
    shared = {
        "q": draw(hidden, hidden),
        "k": draw(kv_heads * head_dim, hidden),
        "v": draw(kv_heads * head_dim, hidden),
        "o": draw(hidden, hidden),
        "gate": draw(inter, hidden),
        "up": draw(inter, hidden),
        "down": draw(hidden, inter),
        "norm": bf16(np.ones(hidden)),
    }
    tensors = [("model.embed_tokens.weight", draw(VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", shared["q"]),
            (p + "self_attn.k_proj.weight", shared["k"]),
            (p + "self_attn.v_proj.weight", shared["v"]),
            (p + "self_attn.o_proj.weight", shared["o"]),
            (p + "mlp.gate_proj.weight", shared["gate"]),
            (p + "mlp.up_proj.weight", shared["up"]),
            (p + "mlp.down_proj.weight", shared["down"]),
            (p + "input_layernorm.weight", shared["norm"]),
            (p + "post_attention_layernorm.weight", shared["norm"]),
        ]
    tensors.append(("model.norm.weight", shared["norm"]))
    if not tied:
        tensors.append(("lm_head.weight", draw(VOCAB, hidden)))
    header, offset = {}, 0
    for name, t in tensors:
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in tensors:
            f.write(t.tobytes())
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": VOCAB,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "..", "models", "stories260K", "tokenizer.json"), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
