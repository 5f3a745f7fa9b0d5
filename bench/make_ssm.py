#!/usr/bin/env python3
"""Writes two random-weight float32 Hugging Face folders for bench/ssm.sh: a Mamba with
state-spaces/mamba-130m-hf's config (768 wide, 24 layers, state 16, expand 2, conv 4, rank 48,
vocabulary 50280, tied head) and a Llama with SmolLM2-135M's shape (576 wide, 30 layers, 9 heads,
3 KV heads, MLP 1536, vocabulary 49152, tied head), so that a state-space model and a transformer
of the same size are measured side by side. Weights are normal(0, 0.02) (Mamba's A_log, D and
dt bias as its initialization sets them); the vocabulary tables (of their real sizes) get a word-level tokenizer with one word per id, so that every generated token
streams as text and the load generator times each one).

    bench/.venv/bin/python bench/make_ssm.py OUT_DIR     # writes OUT_DIR/mamba-130m, OUT_DIR/smollm2-135m

It also writes OUT_DIR/mamba-130m-f32.gguf: the same Mamba in llama.cpp's `mamba` layout, as its
converter writes it (A = -exp(A_log), the convolution squeezed to [d_inner, d_conv], the tied head
omitted), with SmolLM2's tokenizer padded to the vocabulary (models-cache, scripts/fetch_models.sh),
for serving the same weights with llama.cpp's server and with Candela.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safetensors.numpy import save_file



def folder(out, config, tensors):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Metaspace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}) + "\n")


def mamba(out, rng):
    hidden, layers, state, vocab, kernel, rank = 768, 24, 16, 50280, 4, 48
    inner = 2 * hidden
    draw = lambda *s: rng.normal(0, 0.02, size=s).astype(np.float32)
    t = {"backbone.embeddings.weight": draw(vocab, hidden), "backbone.norm_f.weight": np.ones(hidden, np.float32)}
    dt = np.exp(rng.random(inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    for i in range(layers):
        p = f"backbone.layers.{i}"
        t[f"{p}.norm.weight"] = np.ones(hidden, np.float32)
        t[f"{p}.mixer.in_proj.weight"] = draw(2 * inner, hidden)
        t[f"{p}.mixer.conv1d.weight"] = draw(inner, 1, kernel) * 10
        t[f"{p}.mixer.conv1d.bias"] = draw(inner)
        t[f"{p}.mixer.x_proj.weight"] = draw(rank + 2 * state, inner)
        t[f"{p}.mixer.dt_proj.weight"] = draw(inner, rank)
        t[f"{p}.mixer.dt_proj.bias"] = (dt + np.log(-np.expm1(-dt))).astype(np.float32)
        t[f"{p}.mixer.A_log"] = np.log(np.tile(np.arange(1, state + 1, dtype=np.float32), (inner, 1)))
        t[f"{p}.mixer.D"] = np.ones(inner, np.float32)
        t[f"{p}.mixer.out_proj.weight"] = draw(hidden, inner)
    config = {
        "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": hidden,
        "num_hidden_layers": layers, "state_size": state, "vocab_size": vocab, "expand": 2,
        "intermediate_size": inner, "conv_kernel": kernel, "time_step_rank": rank,
        "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    folder(out, config, t)
    return config, t


def mamba_gguf(dst, config, t):
    import gguf

    from make_llama_gguf import add_tokenizer

    w = gguf.GGUFWriter(str(dst), "mamba")
    w.add_name("random Mamba 130m")
    w.add_context_length(2**20)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(config["num_hidden_layers"])
    w.add_ssm_conv_kernel(config["conv_kernel"])
    w.add_ssm_inner_size(config["intermediate_size"])
    w.add_ssm_state_size(config["state_size"])
    w.add_ssm_time_step_rank(config["time_step_rank"])
    w.add_layer_norm_rms_eps(config["layer_norm_epsilon"])
    w.add_ssm_dt_b_c_rms(False)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_tokenizer(w, config["vocab_size"])
    names = {
        "norm.weight": "attn_norm.weight", "mixer.in_proj.weight": "ssm_in.weight",
        "mixer.conv1d.weight": "ssm_conv1d.weight", "mixer.conv1d.bias": "ssm_conv1d.bias",
        "mixer.x_proj.weight": "ssm_x.weight", "mixer.dt_proj.weight": "ssm_dt.weight",
        "mixer.dt_proj.bias": "ssm_dt.bias", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d",
        "mixer.out_proj.weight": "ssm_out.weight",
    }
    w.add_tensor("token_embd.weight", t["backbone.embeddings.weight"])
    w.add_tensor("output_norm.weight", t["backbone.norm_f.weight"])
    for i in range(config["num_hidden_layers"]):
        for hf, g in names.items():
            v = t[f"backbone.layers.{i}.{hf}"]
            if hf == "mixer.A_log":
                v = -np.exp(v)
            if hf == "mixer.conv1d.weight":
                v = v.squeeze(1)
            w.add_tensor(f"blk.{i}.{g}", np.ascontiguousarray(v))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def smollm2(out, rng):
    hidden, inter, layers, heads, kv, vocab = 576, 1536, 30, 9, 3, 49152
    hd = hidden // heads
    draw = lambda *s: rng.normal(0, 0.02, size=s).astype(np.float32)
    t = {"model.embed_tokens.weight": draw(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = np.ones(hidden, np.float32)
        t[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        t[f"{p}.self_attn.q_proj.weight"] = draw(heads * hd, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = draw(kv * hd, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = draw(kv * hd, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = draw(hidden, heads * hd)
        t[f"{p}.mlp.gate_proj.weight"] = draw(inter, hidden)
        t[f"{p}.mlp.up_proj.weight"] = draw(inter, hidden)
        t[f"{p}.mlp.down_proj.weight"] = draw(hidden, inter)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    folder(out, config, t)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    config, tensors = mamba(out / "mamba-130m", np.random.default_rng(0))
    mamba_gguf(out / "mamba-130m-f32.gguf", config, tensors)
    smollm2(out / "smollm2-135m", np.random.default_rng(1))
