#!/usr/bin/env python3
"""Writes a random-weight f32 GGUF with Qwen3-30B-A3B's layer shape, fewer layers, for the MoE
benchmark (bench/realsize.sh serves it, and the Q8_0 file llama.cpp's llama-quantize makes from it,
with Candela and with llama.cpp's server).

Qwen3-30B-A3B's layer: hidden 2048, 32 query heads and 4 key/value heads of 128 (q/k RMS norms),
128 experts of intermediate 768, 8 routed per token (renormalized), no shared expert. It has 48
such layers (30.5B parameters, 3.3B active per token); this file has LAYERS (default 4: 2.6B
parameters, 0.33B active, 10.5 GB in f32), so that the f32 file fits in this machine's memory beside
the other server's page cache. The tokenizer is SmolLM2's unpadded (vocab 49,152, not Qwen's
151,936): with 4 layers instead of 48, a full-size output head would take most of each token's
bytes, which in the real model it does not.

Tensors are laid out as llama.cpp's converter writes a Qwen3-MoE (`qwen3moe`): each projection of
a layer's experts stacked in one [experts, out, in] tensor (ffn_gate_exps, ffn_up_exps,
ffn_down_exps), the router as ffn_gate_inp. The converter itself needs a Hugging Face tokenizer
whose pre-tokenizer it recognizes, which a random model with SmolLM2's GGUF tokenizer lacks.
Weights are normal(0, 0.02), one draw per tensor shared by every layer (the file still stores each
layer separately, so reading them costs what a real model costs); the router's draw makes the
routing close to uniform, as a trained router's load balancing aims for.

    bench/.venv/bin/python bench/make_moe_gguf.py OUT.gguf [LAYERS]
"""

import sys

import gguf
import numpy as np

from make_llama_gguf import add_tokenizer

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 2048, 32, 4, 128
EXPERTS, TOP_K, EXPERT_FF = 128, 8, 768


def main(dst, layers=4):
    w = gguf.GGUFWriter(dst, "qwen3moe")
    w.add_name(f"random Qwen3-30B-A3B shape, {layers} layers")
    w.add_context_length(40960)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(6144)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_expert_count(EXPERTS)
    w.add_expert_used_count(TOP_K)
    w.add_expert_feed_forward_length(EXPERT_FF)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = add_tokenizer(w)

    rng = np.random.default_rng(0)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    w.add_tensor("token_embd.weight", rand(vocab, HIDDEN))
    layer = {
        "attn_q.weight": rand(HEADS * HEAD_DIM, HIDDEN),
        "attn_k.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_v.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
        "attn_output.weight": rand(HIDDEN, HEADS * HEAD_DIM),
        "ffn_gate_inp.weight": rand(EXPERTS, HIDDEN),
        "ffn_gate_exps.weight": rand(EXPERTS, EXPERT_FF, HIDDEN),
        "ffn_up_exps.weight": rand(EXPERTS, EXPERT_FF, HIDDEN),
        "ffn_down_exps.weight": rand(EXPERTS, HIDDEN, EXPERT_FF),
    }
    ones = np.ones(HIDDEN, dtype=np.float32)
    head_ones = np.ones(HEAD_DIM, dtype=np.float32)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q_norm.weight", head_ones)
        w.add_tensor(f"blk.{i}.attn_k_norm.weight", head_ones)
        for name, t in layer.items():
            w.add_tensor(f"blk.{i}.{name}", t)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", rand(vocab, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
