#!/usr/bin/env python3
"""Writes a random-weight f16 GGUF with the shapes of Llama-3.2-1B or Llama-3.1-8B, for the
real-size benchmark (bench/realsize.sh quantizes it with llama.cpp's own llama-quantize).

The tokenizer is SmolLM2's (GPT-2-style BPE, from the GGUF the tests use), padded with unused
tokens to Llama 3's 128,256-entry vocabulary so that the embedding table and output head have
Llama 3's size. Weights are normal(0, 0.02); to keep this script's memory small, every layer
shares one random draw of each tensor (the file still stores each layer separately, so reading
and multiplying them costs what a real model costs).

    bench/.venv/bin/python bench/make_llama_gguf.py 1b OUT.gguf
"""

import sys

import gguf
import numpy as np

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, tied embeddings
    "1b": (2048, 8192, 16, 32, 8, True),
    "8b": (4096, 14336, 32, 32, 8, False),
}
VOCAB = 128256
TOKENIZER_FROM = "models-cache/SmolLM2-135M-Instruct.Q4_1.gguf"


def add_tokenizer(w, vocab=None):
    """SmolLM2's tokenizer (from the GGUF the tests use) into writer `w`, padded with unused tokens
    to `vocab` entries if given; returns the vocabulary size."""
    src = gguf.GGUFReader(TOKENIZER_FROM)
    tokens = list(src.fields["tokenizer.ggml.tokens"].contents())
    types = list(src.fields["tokenizer.ggml.token_type"].contents())
    pad = (vocab or len(tokens)) - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(src.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(src.fields["tokenizer.chat_template"].contents())
    return len(tokens)


def main(shape, dst):
    hidden, inter, layers, heads, kv_heads, tied = SHAPES[shape]
    head_dim = hidden // heads
    w = gguf.GGUFWriter(dst, "llama")
    w.add_name(f"random Llama {shape}")
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # The tokenizer: SmolLM2's, padded to VOCAB entries.
    add_tokenizer(w, VOCAB)

    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(hidden, dtype=np.float32)
    w.add_tensor("token_embd.weight", rand(VOCAB, hidden))
    layer = {
        "attn_q.weight": rand(hidden, hidden),
        "attn_k.weight": rand(kv_heads * head_dim, hidden),
        "attn_v.weight": rand(kv_heads * head_dim, hidden),
        "attn_output.weight": rand(hidden, hidden),
        "ffn_gate.weight": rand(inter, hidden),
        "ffn_up.weight": rand(inter, hidden),
        "ffn_down.weight": rand(hidden, inter),
    }
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for name, t in layer.items():
            w.add_tensor(f"blk.{i}.{name}", t)
    w.add_tensor("output_norm.weight", ones)
    if not tied:
        w.add_tensor("output.weight", rand(VOCAB, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
