#!/usr/bin/env python3
"""Generate the test fixtures under tests/fixtures/ with Hugging Face transformers.

Run by hand (not by CI), in a virtual environment with scripts/requirements-fixtures.txt:

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fx/bin/python scripts/make_fixtures.py

For every variant it writes a small random-weight model (config.json, model.safetensors,
the stories260K tokenizer) and golden.json: the last-position logits of several prompts and
32-token greedy continuations, computed by transformers in float32 with eager attention.
It also writes models/stories260K/golden.json: the real model's greedy continuation of
"Once upon a time".

Random weights give near-ties between top tokens; a seed whose greedy run has a top-2 logit
margin under MARGIN anywhere is rejected and the next seed tried, so the goldens do not
depend on float rounding.
"""

import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
STORIES = ROOT / "models" / "stories260K"
VOCAB = 512
MARGIN = 2e-3
# MoE fixtures: the smallest gap between the k-th and (k+1)-th expert probability of any token.
ROUTING_MARGIN = 1e-4
GREEDY_TOKENS = 32

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
)

VARIANTS = {
    # Grouped-query attention, untied output head.
    "llama_gqa": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False),
    # Multi-head attention, tied embeddings, three layers.
    "llama_mha_tied": dict(model_type="llama", num_key_value_heads=4, num_hidden_layers=3, tie_word_embeddings=True),
    # Multi-query attention with head_dim != hidden / heads.
    "llama_mqa_headdim": dict(model_type="llama", num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
    # Llama 3 RoPE scaling; written in the pre-v5 config format (rope_theta + rope_scaling).
    "llama3_rope": dict(
        model_type="llama",
        num_key_value_heads=2,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16,
        ),
        _old_rope_format=True,
    ),
    # Linear RoPE scaling, new config format.
    "llama_linear_rope": dict(
        model_type="llama", num_key_value_heads=2,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    ),
    # Sliding window shorter than the test sequences.
    "mistral_window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=8, head_dim=16),
    # q/k/v biases, tied embeddings.
    "qwen2_bias": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False),
    # Per-head q/k RMS norms, explicit head_dim != hidden / heads.
    "qwen3_qknorm": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    # YaRN RoPE scaling (the original context shorter than the test sequences).
    "llama_yarn_rope": dict(
        model_type="llama", num_key_value_heads=2,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16),
    ),
    # Mixtral: 4 experts, top 2 (renormalized), sliding window 8.
    "mixtral_window": dict(
        model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        intermediate_size=96, sliding_window=8, tie_word_embeddings=False,
    ),
    # Mixtral: 8 experts, top 2, no window; also as GGUF files (llama.cpp's `llama` layout).
    "mixtral_8e": dict(
        model_type="mixtral", num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        intermediate_size=64, sliding_window=None, tie_word_embeddings=False,
    ),
    # Qwen2-MoE: 6 experts, top 2 not renormalized, a shared expert with its sigmoid gate, q/k/v
    # biases; also as GGUF files.
    "qwen2_moe_shared": dict(
        model_type="qwen2_moe", num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=96, norm_topk_prob=False,
        use_sliding_window=False, tie_word_embeddings=False,
    ),
    # Qwen2-MoE: 8 experts, top 3 renormalized; of 4 layers only the last is sparse (decoder_sparse_step
    # 2 makes layers 1 and 3 sparse, mlp_only_layers keeps 1 dense); tied embeddings.
    "qwen2_moe_step": dict(
        model_type="qwen2_moe", num_key_value_heads=4, num_hidden_layers=4, num_experts=8,
        num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[1], use_sliding_window=False,
        tie_word_embeddings=True,
    ),
    # Qwen3-MoE: 8 experts, top 2 renormalized, q/k norms, head_dim 32; also as GGUF files.
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, norm_topk_prob=True, tie_word_embeddings=False,
    ),
    # DeepSeek-V2-Lite layout: multi-head latent attention with queries straight from q_proj, 8 experts
    # top 2 (greedy, not renormalized), one shared expert, the first layer dense.
    "deepseek_v2_lite": dict(
        model_type="deepseek_v2", num_key_value_heads=4, num_hidden_layers=3, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
        topk_method="greedy", tie_word_embeddings=False,
    ),
    # DeepSeek-V2 layout: low-rank queries (q_lora_rank), v_head_dim != qk_nope_head_dim, attention
    # biases, group-limited routing (4 groups, 2 kept, top 3), routed_scaling_factor 2.5, two shared
    # experts, YaRN with mscale / mscale_all_dim (original context 16, shorter than the prompts).
    "deepseek_v2_yarn": dict(
        model_type="deepseek_v2", num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, attention_bias=True, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, moe_intermediate_size=24, first_k_dense_replace=0,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            mscale=0.707, mscale_all_dim=0.707, beta_fast=32.0, beta_slow=1.0,
        ),
        tie_word_embeddings=False,
    ),
    # Gemma 3: multi-query attention, a window (8) shorter than the prompts, local and global
    # layers with their own RoPE (linear scaling on the global one), query_pre_attn_scalar
    # != head_dim, final logit soft-capping.
    "gemma3_mqa_window": dict(
        model_type="gemma3_text", num_key_value_heads=1, head_dim=32, num_hidden_layers=3,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1000000.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
        },
        query_pre_attn_scalar=24, final_logit_softcapping=30.0,
    ),
    # Gemma 3: grouped-query attention, a global layer first, tied head.
    "gemma3_gqa": dict(
        model_type="gemma3_text", num_key_value_heads=2, head_dim=16,
        sliding_window=16, layer_types=["full_attention", "sliding_attention"], query_pre_attn_scalar=16,
    ),
}

# GPT-2 names its sizes differently; these replace BASE.
GPT2_BASE = dict(
    vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.25,
    bos_token_id=1, eos_token_id=2,
)
GPT2_VARIANTS = {
    # Four heads, two layers.
    "gpt2_4heads": dict(),
    # Eight heads, three layers, a narrower MLP, attention scaled by the inverse layer index.
    "gpt2_8heads": dict(n_head=8, n_layer=3, n_inner=96, scale_attn_by_inverse_layer_idx=True),
}

# State-space models name their sizes differently; these replace BASE. The prompts (up to 45 tokens)
# run past Mamba-2's chunk_size, so transformers' chunked SSD path is what the goldens come from.
SSM_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, layer_norm_epsilon=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
SSM_VARIANTS = {
    # Mamba: state 16, kernel 4, time_step_rank "auto" (4), tied head.
    "mamba_tied": dict(model_type="mamba", state_size=16, conv_kernel=4, expand=2),
    # Mamba: state 8, kernel 3, expand 3, explicit rank, biases on the projections, none on the
    # convolution, own head, three layers.
    "mamba_bias": dict(
        model_type="mamba", state_size=8, conv_kernel=3, expand=3, time_step_rank=8, use_bias=True,
        use_conv_bias=False, tie_word_embeddings=False, num_hidden_layers=3,
    ),
    # Mamba-2: 8 heads of 16 in 2 groups, state 16, kernel 4, chunks of 16.
    "mamba2_groups": dict(
        model_type="mamba2", num_heads=8, head_dim=16, state_size=16, n_groups=2, conv_kernel=4,
        chunk_size=16, expand=2,
    ),
    # Mamba-2: 4 heads of 32 in one group, state 32, kernel 2, chunks of 8, biases, tied head,
    # three layers.
    "mamba2_onegroup": dict(
        model_type="mamba2", num_heads=4, head_dim=32, state_size=32, n_groups=1, conv_kernel=2,
        chunk_size=8, expand=2, use_bias=True, tie_word_embeddings=True, num_hidden_layers=3,
    ),
}

PROMPT_LENGTHS = [1, 6, 19, 45]


def fresh_dir(name):
    """`tests/fixtures/<name>`, emptied."""
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    return out


def prompts(seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in PROMPT_LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append([1] + ids[: n - 1])
    return out


@torch.no_grad()
def greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out, margins = [], []
    for _ in range(n):
        logits = model(ids).logits[0, -1]
        top = torch.topk(logits, 2)
        margins.append(float(top.values[0] - top.values[1]))
        nxt = int(top.indices[0])
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, min(margins)


@torch.no_grad()
def routing_margin(model, sequences):
    """The smallest gap, over every token and MoE layer, between the probability of the last expert
    a token is routed to and the next one (inf for a dense model): a near tie would let float
    rounding pick a different expert."""
    cfg = model.config
    k = getattr(cfg, "num_experts_per_tok", None)
    if k is None:
        return float("inf")
    grouped = getattr(cfg, "topk_method", None) == "group_limited_greedy"
    gap = float("inf")
    for seq in sequences:
        for logits in model(torch.tensor([seq]), output_router_logits=True).router_logits:
            probs = torch.softmax(logits.float(), dim=-1)
            if grouped:
                # The kept groups' best experts must also stand clear of the next group's.
                best = probs.view(probs.shape[0], cfg.n_group, -1).max(dim=-1).values
                best = best.sort(dim=-1, descending=True).values
                if best.shape[-1] > cfg.topk_group:
                    g = cfg.topk_group
                    gap = min(gap, float((best[:, g - 1] - best[:, g]).min()))
                keep = best[:, cfg.topk_group - 1 : cfg.topk_group]
                group_best = probs.view(probs.shape[0], cfg.n_group, -1).max(dim=-1, keepdim=True).values
                mask = (group_best >= keep.unsqueeze(-1)).expand(-1, -1, probs.shape[-1] // cfg.n_group)
                probs = probs.masked_fill(~mask.reshape(probs.shape), 0.0)
            probs = probs.sort(dim=-1, descending=True).values
            if probs.shape[-1] > k:
                gap = min(gap, float((probs[:, k - 1] - probs[:, k]).min()))
    return gap


@torch.no_grad()
def make_variant(name, spec, base=BASE):
    spec = dict(spec)
    old_rope = spec.pop("_old_rope_format", False)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{**base, **spec})
    cfg._attn_implementation = "eager"
    for seed in range(100):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        ps = prompts(1000 + seed)
        runs = [greedy(model, p, GREEDY_TOKENS) for p in ps[1:3]]
        margin = min(m for _, m in runs)
        routing = routing_margin(model, ps + [p + toks for p, (toks, _) in zip(ps[1:3], runs)])
        if margin >= MARGIN and routing >= ROUTING_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed with a greedy margin >= {MARGIN}")
    out = fresh_dir(name)
    model.save_pretrained(out, safe_serialization=True)
    if old_rope:
        c = json.loads((out / "config.json").read_text())
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = rp
        (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "seed": seed,
        "min_greedy_margin": margin,
        **({"min_routing_margin": routing} if routing != float("inf") else {}),
        "logits": [
            {"prompt": p, "last_logits": model(torch.tensor([p])).logits[0, -1].tolist()} for p in ps
        ],
        "greedy": [{"prompt": p, "tokens": toks} for p, (toks, _) in zip(ps[1:3], runs)],
    }
    (out / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"{name}: seed {seed}, min greedy margin {margin:.4f}")


@torch.no_grad()
def make_stories_golden():
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    prompt = "Once upon a time"
    ids = tok(prompt).input_ids
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[0, len(ids):].tolist()
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "prompt": prompt,
        "prompt_ids": ids,
        "tokens": out,
        "text": tok.decode(out, skip_special_tokens=True),
    }
    (STORIES / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("stories260K:", repr(prompt + golden["text"]))


def make_gpt2_gguf(name):
    """A GGUF of a GPT-2 fixture in llama.cpp's `gpt2` layout (standard [out, in] weights,
    f32), carrying the stories260K tokenizer's metadata, for the GGUF loader tests."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    src = FIXTURES / name
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(src / "model.safetensors")
    out = gguf.GGUFWriter(str(FIXTURES / f"{name}.gguf"), "gpt2")
    out.add_context_length(cfg["n_positions"])
    out.add_embedding_length(cfg["n_embd"])
    out.add_block_count(cfg["n_layer"])
    out.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
    out.add_head_count(cfg["n_head"])
    out.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    stories = gguf.GGUFReader(str(FIXTURES / "stories260K-f32.gguf"))
    for key, field in stories.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            out.add_array(key, field.contents())
        else:
            out.add_key_value(key, field.contents(), vt)
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for key, t in w.items():
        k = key.removeprefix("transformer.")
        base, kind = k.rsplit(".", 1)
        if base in names:
            gname = f"{names[base]}.{kind}"
        else:
            _, layer, part = base.split(".", 2)
            gname = f"blk.{layer}.{parts[part]}.{kind}"
            if kind == "weight" and "." in part:
                t = np.ascontiguousarray(t.T)  # Conv1D [in, out] -> [out, in]
        out.add_tensor(gname, t.astype(np.float32))
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    print(f"{name}.gguf written")


# MoE fixtures also written as GGUF files: fixture -> llama.cpp architecture.
MOE_GGUF = {"mixtral_8e": "llama", "qwen2_moe_shared": "qwen2moe", "qwen3_moe": "qwen3moe"}


def make_moe_gguf(name, arch):
    """GGUF files of an MoE fixture in llama.cpp's layout, as its converter writes them: each
    projection of a layer's experts stacked into one [experts, out, in] tensor (ffn_*_exps), the
    router as ffn_gate_inp, Qwen2-MoE's shared expert as ffn_*_shexp with its [1, hidden] gate
    squeezed to a vector, and for the `llama` architecture (Mixtral) q/k rows permuted for
    llama.cpp's RoPE. One file in f32 (`NAME.gguf`) and one with every matrix in Q8_0 but the
    router and the norms (`NAME-q8_0.gguf`, as llama-quantize leaves ffn_gate_inp), each with the
    stories260K tokenizer's metadata."""
    import numpy as np
    from safetensors.numpy import load_file

    src = FIXTURES / name
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(src / "model.safetensors")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    block = "block_sparse_moe" if arch == "llama" else "mlp"
    proj = {"llama": ("w1", "w3", "w2")}.get(arch, ("gate_proj", "up_proj", "down_proj"))

    def permute(t, n):  # llama.cpp's LlamaModel.permute
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    tensors = {
        "token_embd.weight": w["model.embed_tokens.weight"],
        "output_norm.weight": w["model.norm.weight"],
        "output.weight": w["lm_head.weight"],
    }
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", f"{block}.gate": "ffn_gate_inp",
             "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
             "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for hf, g in parts.items():
            for kind in ["weight", "bias"]:
                t = w.get(f"{pre}{hf}.{kind}")
                if t is None:
                    continue
                if arch == "llama" and hf == "self_attn.q_proj":
                    t = permute(t, heads)
                if arch == "llama" and hf == "self_attn.k_proj":
                    t = permute(t, kv_heads)
                if g == "ffn_gate_inp_shexp":
                    t = t.reshape(-1)
                tensors[f"blk.{i}.{g}.{kind}"] = t
        for p, g in zip(proj, ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]):
            tensors[f"blk.{i}.{g}.weight"] = np.stack(
                [w[f"{pre}{block}.experts.{e}.{p}.weight"] for e in range(experts)])

    def metadata(out):
        out.add_context_length(cfg["max_position_embeddings"])
        out.add_embedding_length(cfg["hidden_size"])
        out.add_block_count(cfg["num_hidden_layers"])
        out.add_feed_forward_length(cfg["intermediate_size"])
        out.add_head_count(heads)
        out.add_head_count_kv(kv_heads)
        out.add_key_length(head_dim)
        out.add_value_length(head_dim)
        out.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        rope = cfg.get("rope_parameters") or {}
        out.add_rope_freq_base(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0))
        out.add_expert_count(experts)
        out.add_expert_used_count(cfg["num_experts_per_tok"])
        if arch != "llama":
            out.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if arch == "qwen2moe":
            out.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])

    write_gguf_pair(name, arch, metadata, tensors)


def write_gguf_pair(name, arch, metadata, tensors):
    """`NAME.gguf` (f32) and `NAME-q8_0.gguf` (every matrix whose rows are whole 32-value blocks in
    Q8_0, but the router, which llama-quantize leaves in f32), each with the stories260K tokenizer's
    metadata. `metadata(writer)` adds the architecture's keys."""
    import gguf
    import numpy as np

    stories = gguf.GGUFReader(str(FIXTURES / "stories260K-f32.gguf"))
    for suffix, quantize in [("", False), ("-q8_0", True)]:
        out = gguf.GGUFWriter(str(FIXTURES / f"{name}{suffix}.gguf"), arch)
        metadata(out)
        for key, field in stories.fields.items():
            if not key.startswith("tokenizer."):
                continue
            vt = field.types[0]
            if vt == gguf.GGUFValueType.ARRAY:
                out.add_array(key, field.contents())
            else:
                out.add_key_value(key, field.contents(), vt)
        for gname, t in tensors.items():
            t = np.ascontiguousarray(t, dtype=np.float32)
            if quantize and t.ndim >= 2 and t.shape[-1] % 32 == 0 and "ffn_gate_inp" not in gname:
                q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
                out.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                out.add_tensor(gname, t)
        out.write_header_to_file()
        out.write_kv_data_to_file()
        out.write_tensors_to_file()
        out.close()
        print(f"{name}{suffix}.gguf written")


# BERT encoders for /v1/embeddings, each with sentence-transformers' module files: pooling mode and
# whether a Normalize module follows.
BERT_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=128, initializer_range=0.25, pad_token_id=0,
)
BERT_VARIANTS = {
    # Mean pooling, normalized (all-MiniLM-L6-v2's arrangement).
    "bert_mean": (dict(), "mean", True),
    # Eight heads, three layers, gelu_new, one token type, [CLS] pooling, not normalized.
    "bert_cls": (dict(num_attention_heads=8, num_hidden_layers=3, hidden_act="gelu_new", type_vocab_size=1), "cls", False),
}


# RoBERTa-family encoders: BERT's layers with positions counted from the pad id + 1 (pad tokens
# themselves at the pad id) and one token type; 130 positions leave 128 usable.
ROBERTA_VARIANTS = {
    # XLM-RoBERTa (multilingual-e5's, paraphrase-multilingual's): mean pooling, normalized.
    "xlmr_mean": ("xlm-roberta", dict(pad_token_id=1, max_position_embeddings=130, type_vocab_size=1), "mean", True),
    # RoBERTa with [CLS] (<s>) pooling and another pad id.
    "roberta_cls": ("roberta", dict(pad_token_id=2, max_position_embeddings=131, type_vocab_size=1,
                                    num_attention_heads=8), "cls", False),
}


def write_sentence_transformers(out, dim, pooling, normalize):
    """sentence-transformers' module files: Transformer, Pooling, optionally Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 96}) + "\n")


def write_encoder_golden(out, model, pooling, normalize, edit_ids=lambda n, ids: ids):
    """Pooled vectors of random inputs of 1 to 96 tokens, each encoded alone."""
    g = torch.Generator().manual_seed(7)
    cases = []
    for n in [1, 5, 17, 60, 96]:
        ids = edit_ids(n, torch.randint(3, VOCAB, (n,), generator=g).tolist())
        h = model(torch.tensor([ids])).last_hidden_state[0]
        v = h.mean(0) if pooling == "mean" else h[0]
        if normalize:
            v = torch.nn.functional.normalize(v, dim=0)
        cases.append({"input": ids, "embedding": v.tolist()})
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "pooling": pooling, "normalize": normalize, "embeddings": cases,
    }
    (out / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"{out.name}: {pooling} pooling, normalize {normalize}")


@torch.no_grad()
def make_bert(name, spec, pooling, normalize, family="bert"):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel, XLMRobertaConfig, XLMRobertaModel

    config_cls, model_cls = {
        "bert": (BertConfig, BertModel),
        "roberta": (RobertaConfig, RobertaModel),
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel),
    }[family]
    cfg = config_cls(**{**BERT_BASE, **spec})
    torch.manual_seed(0)
    model = model_cls(cfg, add_pooling_layer=False).float().eval()
    out = fresh_dir(name)
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)
    write_sentence_transformers(out, cfg.hidden_size, pooling, normalize)

    def edit(n, ids):
        if family != "bert" and n == 17:
            # A pad id inside the input: RoBERTa gives it the pad's position and does not
            # count it for the tokens after it.
            ids[4] = ids[9] = cfg.pad_token_id
        return ids

    write_encoder_golden(out, model, pooling, normalize, edit)


# ModernBERT encoders (modernbert-embed-base's, gte-modernbert-base's architecture): RoPE with
# one base for the global layers and another for the local ones, local layers seeing only
# keys at most `local_attention / 2` positions away on either side (16 and 10 here, so the
# 60- and 96-token inputs cross the band), a GeGLU MLP from one fused `Wi`, pre-LayerNorms
# (none before the first layer's attention), a final norm.
MODERNBERT_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
    max_position_embeddings=128, initializer_range=0.25, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, cls_token_id=1, sep_token_id=2,
)
MODERNBERT_VARIANTS = {
    # Layers 0 and 3 global, 1 and 2 local; no biases; mean pooling, normalized; the config as
    # transformers 5 writes it (layer_types, rope_parameters per layer type).
    "modernbert_mean": (dict(local_attention=16), "mean", True, False),
    # Biases in every linear layer and norm, eight heads, every other layer global, other RoPE
    # bases; [CLS] pooling, not normalized; the config rewritten in the form the published
    # checkpoints have (global_attn_every_n_layers, global/local_rope_theta, local_attention).
    "modernbert_cls": (dict(num_hidden_layers=3, num_attention_heads=8, global_attn_every_n_layers=2,
                            local_attention=10, attention_bias=True, mlp_bias=True, norm_bias=True,
                            global_rope_theta=1000.0, local_rope_theta=500.0), "cls", False, True),
}


@torch.no_grad()
def make_modernbert(name, spec, pooling, normalize, legacy_config):
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(**{**MODERNBERT_BASE, **spec}, attn_implementation="eager")
    torch.manual_seed(0)
    model = ModernBertModel(cfg).float().eval()
    # Norm weights start at one and biases at zero: move them so that a norm or bias read
    # wrongly shows in the output.
    for pname, p in model.named_parameters():
        if "norm" in pname or pname.endswith("bias"):
            p.add_(torch.randn_like(p) * 0.2)
    out = fresh_dir(name)
    model.save_pretrained(out, safe_serialization=True)
    if legacy_config:
        c = json.loads((out / "config.json").read_text())
        c.pop("layer_types")
        c.pop("rope_parameters")
        c.update(global_attn_every_n_layers=spec["global_attn_every_n_layers"],
                 global_rope_theta=spec["global_rope_theta"], local_rope_theta=spec["local_rope_theta"],
                 local_attention=spec["local_attention"])
        (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        # The rewritten config must mean the same model.
        again = ModernBertConfig.from_pretrained(out)
        assert again.layer_types == cfg.layer_types, (again.layer_types, cfg.layer_types)
        assert again.rope_parameters == cfg.rope_parameters, (again.rope_parameters, cfg.rope_parameters)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)
    write_sentence_transformers(out, cfg.hidden_size, pooling, normalize)
    write_encoder_golden(out, model, pooling, normalize)


# NomicBERT (nomic-embed-text-v1/v1.5): BERT's post-norm layers with RoPE instead of a position
# table, a SwiGLU MLP and no linear biases. The published checkpoints are transformers' remote
# code's layout (GPT-2-style config names, `encoder.layers.N.attn.Wqkv`, `mlp.fc11`/`fc12`/`fc2`,
# `norm1`/`norm2`, `emb_ln`); transformers' own NomicBertModel (the reference here) renames those
# when it loads them. The fixture is written in the published layout.
NOMIC_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
    max_position_embeddings=128, initializer_range=0.25, pad_token_id=0, type_vocab_size=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)


@torch.no_grad()
def make_nomic(name="nomic_mean"):
    from safetensors.torch import save_file
    from transformers import NomicBertConfig, NomicBertModel

    cfg = NomicBertConfig(**NOMIC_BASE, attn_implementation="eager")
    torch.manual_seed(0)
    model = NomicBertModel(cfg).float().eval()
    for pname, p in model.named_parameters():
        if "norm" in pname.lower():
            p.add_(torch.randn_like(p) * 0.2)
    out = fresh_dir(name)
    out.mkdir(parents=True)
    sd = model.state_dict()
    published = {
        "embeddings.word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        "embeddings.token_type_embeddings.weight": sd["embeddings.token_type_embeddings.weight"],
        "emb_ln.weight": sd["embeddings.LayerNorm.weight"],
        "emb_ln.bias": sd["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.num_hidden_layers):
        t, o = f"layers.{i}.", f"encoder.layers.{i}."
        published[o + "attn.Wqkv.weight"] = torch.cat(
            [sd[t + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        published[o + "attn.out_proj.weight"] = sd[t + "self_attn.o_proj.weight"]
        published[o + "mlp.fc11.weight"] = sd[t + "mlp.up_proj.weight"]
        published[o + "mlp.fc12.weight"] = sd[t + "mlp.gate_proj.weight"]
        published[o + "mlp.fc2.weight"] = sd[t + "mlp.down_proj.weight"]
        for a, b in [("norm1", "post_attention_layernorm"), ("norm2", "post_mlp_layernorm")]:
            for w in ["weight", "bias"]:
                published[o + f"{a}.{w}"] = sd[t + f"{b}.{w}"]
    weights = [k for k in sd if not any(b in k for b in ["rotary", "position_ids", "token_type_ids"])]
    assert len(published) + 2 * cfg.num_hidden_layers == len(weights), sorted(weights)  # q, k, v fused
    save_file({k: v.contiguous() for k, v in published.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    # nomic-embed-text-v1.5's config.json, shrunk.
    (out / "config.json").write_text(json.dumps({
        "architectures": ["NomicBertModel"], "model_type": "nomic_bert", "activation_function": "swiglu",
        "bos_token_id": None, "eos_token_id": None, "causal": False, "layer_norm_epsilon": cfg.layer_norm_eps,
        "max_trained_positions": 128, "n_embd": cfg.hidden_size, "n_head": cfg.num_attention_heads,
        "n_inner": cfg.intermediate_size, "n_layer": cfg.num_hidden_layers, "n_positions": 128,
        "pad_vocab_size_multiple": 64, "parallel_block": False, "prenorm": False, "qkv_proj_bias": False,
        "mlp_fc1_bias": False, "mlp_fc2_bias": False, "rotary_emb_base": 1000, "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False, "rotary_emb_scale_base": None, "rotary_scaling_factor": None,
        "type_vocab_size": cfg.type_vocab_size, "use_rms_norm": False, "vocab_size": cfg.vocab_size,
    }, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)
    write_sentence_transformers(out, cfg.hidden_size, "mean", True)
    write_encoder_golden(out, model, "mean", True)


# Decoders serving embeddings (`--runner pooling`): the final norm's states pooled per sequence.
DECODER_EMBED_VARIANTS = {
    # Qwen3-Embedding's arrangement: saved from the bare Qwen3Model (no `model.` prefix, no head),
    # architectures still Qwen3ForCausalLM, sentence-transformers files with last-token pooling
    # and Normalize; declared Matryoshka.
    "qwen3_embed": (dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         is_matryoshka=True), "lasttoken", True),
    # A LlamaForCausalLM checkpoint (head and all) with no sentence-transformers files: the
    # defaults, last token and normalized.
    "llama_embed": (dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False), None, True),
}


@torch.no_grad()
def make_decoder_embed(name, spec, pooling, normalize):
    from transformers import AutoModel

    spec = dict(spec)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{**BASE, **spec})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    out = fresh_dir(name)
    if pooling is None:
        lm.save_pretrained(out, safe_serialization=True)
    else:
        bare = AutoModel.from_config(cfg, attn_implementation="eager").float().eval()
        bare.load_state_dict(lm.model.state_dict())
        bare.save_pretrained(out, safe_serialization=True)
        c = json.loads((out / "config.json").read_text())
        c["architectures"] = [type(lm).__name__]
        (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (out / "1_Pooling").mkdir()
        (out / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": cfg.hidden_size, "pooling_mode_lasttoken": True,
            "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        }, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)
    g = torch.Generator().manual_seed(7)
    cases = []
    for n in [1, 5, 17, 60, 96]:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        v = lm.model(torch.tensor([ids])).last_hidden_state[0, -1]
        if normalize:
            v = torch.nn.functional.normalize(v, dim=0)
        cases.append({"input": ids, "embedding": v.tolist()})
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "pooling": "lasttoken", "normalize": normalize, "embeddings": cases,
    }
    (out / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"{name}: last-token pooling of {type(lm).__name__}")


def make_mamba_gguf(name):
    """GGUF files of a Mamba fixture in llama.cpp's `mamba` layout, as its converter writes them:
    `ssm_a` holds A = -exp(A_log), the convolution is squeezed to [d_inner, d_conv], a tied head is
    omitted."""
    import numpy as np
    from safetensors.numpy import load_file

    src = FIXTURES / name
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(str(src / "model.safetensors"))
    parts = {
        "norm.weight": "attn_norm.weight", "mixer.in_proj.weight": "ssm_in.weight",
        "mixer.in_proj.bias": "ssm_in.bias", "mixer.conv1d.weight": "ssm_conv1d.weight",
        "mixer.conv1d.bias": "ssm_conv1d.bias", "mixer.x_proj.weight": "ssm_x.weight",
        "mixer.dt_proj.weight": "ssm_dt.weight", "mixer.dt_proj.bias": "ssm_dt.bias",
        "mixer.A_log": "ssm_a", "mixer.D": "ssm_d", "mixer.out_proj.weight": "ssm_out.weight",
        "mixer.out_proj.bias": "ssm_out.bias",
    }
    tensors = {"token_embd.weight": w["backbone.embeddings.weight"], "output_norm.weight": w["backbone.norm_f.weight"]}
    if not cfg["tie_word_embeddings"]:
        tensors["output.weight"] = w["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in parts.items():
            key = f"backbone.layers.{i}.{hf}"
            if key not in w:
                continue
            t = w[key]
            if hf == "mixer.A_log":
                t = -np.exp(t)
            if hf == "mixer.conv1d.weight":
                t = t.squeeze(1)
            tensors[f"blk.{i}.{g}"] = t

    def metadata(out):
        out.add_context_length(2**20)
        out.add_embedding_length(cfg["hidden_size"])
        out.add_feed_forward_length(0)
        out.add_head_count(0)
        out.add_block_count(cfg["num_hidden_layers"])
        out.add_ssm_conv_kernel(cfg["conv_kernel"])
        out.add_ssm_inner_size(cfg["intermediate_size"])
        out.add_ssm_state_size(cfg["state_size"])
        out.add_ssm_time_step_rank(cfg["time_step_rank"])
        out.add_layer_norm_rms_eps(cfg["layer_norm_epsilon"])
        out.add_ssm_dt_b_c_rms(False)

    write_gguf_pair(name, "mamba", metadata, tensors)


def make_deepseek_gguf(name):
    """GGUF files of a DeepSeek-V2 fixture in llama.cpp's `deepseek2` layout, as its converter writes
    them: kv_b_proj split per head into attn_k_b (transposed, [heads, kv_lora_rank, qk_nope]) and
    attn_v_b, experts stacked (ffn_*_exps), shared experts as ffn_*_shexp, the rotary rows left
    interleaved, one key/value head, YaRN's mscale_all_dim as 0.1 * it in yarn_log_multiplier."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    src = FIXTURES / name
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(src / "model.safetensors")
    heads, nope, rope_dim, v_dim = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"],
                                    cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    lora = cfg["kv_lora_rank"]
    experts = cfg["n_routed_experts"]
    tensors = {
        "token_embd.weight": w["model.embed_tokens.weight"],
        "output_norm.weight": w["model.norm.weight"],
        "output.weight": w["lm_head.weight"],
    }
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
             "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
             "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
             "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
             "mlp.shared_experts.down_proj": "ffn_down_shexp"}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for hf, g in parts.items():
            for kind in ["weight", "bias"]:
                t = w.get(f"{pre}{hf}.{kind}")
                if t is not None:
                    tensors[f"blk.{i}.{g}.{kind}"] = t
        kv_b = w[f"{pre}self_attn.kv_b_proj.weight"].reshape(heads, nope + v_dim, lora)
        tensors[f"blk.{i}.attn_k_b.weight"] = kv_b[:, :nope, :].transpose(0, 2, 1)
        tensors[f"blk.{i}.attn_v_b.weight"] = kv_b[:, nope:, :]
        if f"{pre}mlp.experts.0.gate_proj.weight" in w:
            for p, g in zip(["gate_proj", "up_proj", "down_proj"], ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]):
                tensors[f"blk.{i}.{g}.weight"] = np.stack(
                    [w[f"{pre}mlp.experts.{e}.{p}.weight"] for e in range(experts)])
    rope = cfg.get("rope_parameters") or {}

    def metadata(out):
        out.add_context_length(cfg["max_position_embeddings"])
        out.add_embedding_length(cfg["hidden_size"])
        out.add_block_count(cfg["num_hidden_layers"])
        out.add_feed_forward_length(cfg["intermediate_size"])
        out.add_head_count(heads)
        out.add_head_count_kv(1)
        out.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        out.add_rope_freq_base(rope.get("rope_theta", 10000.0))
        out.add_rope_dimension_count(rope_dim)
        out.add_leading_dense_block_count(cfg["first_k_dense_replace"])
        out.add_vocab_size(cfg["vocab_size"])
        if cfg.get("q_lora_rank") is not None:
            out.add_q_lora_rank(cfg["q_lora_rank"])
        out.add_kv_lora_rank(lora)
        out.add_key_length(lora + rope_dim)
        out.add_value_length(lora)
        out.add_key_length_mla(nope + rope_dim)
        out.add_value_length_mla(v_dim)
        out.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        out.add_expert_count(experts)
        out.add_expert_used_count(cfg["num_experts_per_tok"])
        out.add_expert_shared_count(cfg["n_shared_experts"])
        out.add_expert_weights_scale(cfg["routed_scaling_factor"])
        out.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
        if cfg.get("topk_method") == "group_limited_greedy":
            out.add_expert_group_count(cfg["n_group"])
            out.add_expert_group_used_count(cfg["topk_group"])
        if rope.get("rope_type") == "yarn":
            out.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            out.add_rope_scaling_factor(rope["factor"])
            out.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            out.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])

    write_gguf_pair(name, "deepseek2", metadata, tensors)


GEMMA_GGUF = ROOT / "models-cache" / "gemma-3-270m-q4_k_m.gguf"
GEMMA_PROMPT = "The capital of France is"


@torch.no_grad()
def make_gemma3_270m_golden():
    """The real Gemma 3 270M from its GGUF (scripts/fetch_models.sh), through
    transformers' own GGUF loader (dequantized, float32)."""
    from transformers import AutoTokenizer

    kw = dict(gguf_file=GEMMA_GGUF.name)
    tok = AutoTokenizer.from_pretrained(GEMMA_GGUF.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(GEMMA_GGUF.parent, dtype=torch.float32, **kw).eval()
    ids = tok(GEMMA_PROMPT).input_ids
    logits = model(torch.tensor([ids])).logits[0, -1]
    top = torch.topk(logits, 20)
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "gguf": GEMMA_GGUF.name,
        "prompt": GEMMA_PROMPT,
        "prompt_ids": ids,
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.tolist(),
        "tokens": out,
        "text": tok.decode(out),
    }
    (FIXTURES / "gemma3_270m_golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("gemma3 270M:", repr(GEMMA_PROMPT + golden["text"]))

MINILM = ROOT / "models-cache" / "all-MiniLM-L6-v2"
MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage.",
    " ",
    "Straße, café, naïve façade: déjà vu in Zürich.",
    "東京は日本の首都です。 Привет, мир! 🦙 مرحبا",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "   leading and trailing whitespace, UPPER and lower Case   ",
    # Longer than the model's 512 positions (and its 256-token max_seq_length): truncated.
    " ".join(f"Sentence {i} talks about retrieval, vectors and the weather in town number {i}."
             for i in range(60)),
]


@torch.no_grad()
def make_minilm_golden():
    """all-MiniLM-L6-v2 (scripts/fetch_models.sh) through sentence-transformers itself:
    its tokenizer, its truncation to max_seq_length, mean pooling and Normalize."""
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MINILM), device="cpu")
    vectors = model.encode(MINILM_SENTENCES, convert_to_tensor=True, batch_size=4).float()
    tokens = [len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length).input_ids)
              for s in MINILM_SENTENCES]
    golden = {
        "generator": f"scripts/make_fixtures.py, sentence-transformers {sentence_transformers.__version__}, "
                     f"transformers {transformers.__version__}, torch {torch.__version__}",
        "max_seq_length": model.max_seq_length,
        "cases": [{"input": s, "prompt_tokens": n, "embedding": v.tolist()}
                  for s, n, v in zip(MINILM_SENTENCES, tokens, vectors)],
    }
    (FIXTURES / "minilm_golden.json").write_text(json.dumps(golden) + "\n")
    print("minilm:", len(MINILM_SENTENCES), "sentences, tokens", tokens)


T5_BASE = dict(
    vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
    eos_token_id=1, dropout_rate=0.0, n_positions=512,
)
T5_VARIANTS = {
    # T5 v1.0: ReLU feed-forward, head tied to the embeddings (scaled by d_model^-0.5).
    "t5_relu_tied": dict(),
    # T5 v1.1 / Flan-T5: gated GELU (tanh), untied head, a deeper encoder than decoder, six heads
    # of 8 (inner width 48 != d_model), few buckets and a short max distance so that the prompts
    # reach the logarithmic and the clamped buckets.
    "t5_gated_untied": dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3, num_decoder_layers=2,
        num_heads=6, d_kv=8, relative_attention_num_buckets=8, relative_attention_max_distance=16,
    ),
    # A decoder deeper than the encoder, gated SiLU, 16 buckets up to 32 positions.
    "t5_deep_decoder": dict(
        feed_forward_proj="gated-silu", num_layers=1, num_decoder_layers=3,
        relative_attention_num_buckets=16, relative_attention_max_distance=32,
    ),
}
T5_PROMPT_LENGTHS = [1, 6, 19, 45, 150]


@torch.no_grad()
def make_t5(name, spec):
    """T5ForConditionalGeneration with random weights. Golden: for each encoder input (random ids
    ending in EOS, as T5's tokenizer ends them), the decoder's logits at its start token, 32 greedy
    tokens (EOS ignored) and the logits at the last of them; and transformers' relative-position
    buckets for distances -300..300 (both directions)."""
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = T5Config(**{**T5_BASE, **spec})
    # transformers 5 always ties T5's head to the embeddings and reads an untied config as "do not
    # scale the decoder's output" (`scale_decoder_outputs`); checkpoints of T5 v1.1 / Flan-T5 have
    # their own `lm_head.weight` and `tie_word_embeddings: false`. An untied variant gets a head
    # of its own here, saved as those checkpoints have it.
    untied = spec.get("tie_word_embeddings") is False
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() + [1] for n in T5_PROMPT_LENGTHS]
    for seed in range(100):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(cfg).float().eval()
        if untied:
            model.lm_head = torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            torch.nn.init.normal_(model.lm_head.weight, std=cfg.initializer_factor)
            assert not model.config.scale_decoder_outputs
        runs, margin = [], float("inf")
        for ids in inputs[1:4]:
            enc = model.get_encoder()(input_ids=torch.tensor([ids]))
            dec = [cfg.decoder_start_token_id]
            for _ in range(GREEDY_TOKENS):
                logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([dec])).logits[0, -1]
                top = torch.topk(logits, 2)
                margin = min(margin, float(top.values[0] - top.values[1]))
                dec.append(int(top.indices[0]))
            runs.append(dec[1:])
        if margin >= MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed with a greedy margin >= {MARGIN}")
    out = fresh_dir(name)
    model.save_pretrained(out, safe_serialization=True)
    if untied:
        from safetensors.torch import load_file, save_file

        tensors = load_file(out / "model.safetensors")
        tensors["lm_head.weight"] = model.lm_head.weight.detach().clone().contiguous()
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
        c = json.loads((out / "config.json").read_text())
        c["tie_word_embeddings"] = False
        c.pop("scale_decoder_outputs", None)
        (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(STORIES / f, out / f)

    def logits_after(ids, dec):
        return model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([dec])).logits[0, -1].tolist()

    rel = torch.arange(-300, 301)
    buckets = {
        direction: T5Attention._relative_position_bucket(
            rel, bidirectional=direction == "bidirectional", num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance).tolist()
        for direction in ["bidirectional", "unidirectional"]
    }
    golden = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "seed": seed,
        "min_greedy_margin": margin,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "relative_positions": {"from": -300, **buckets},
        "logits": [{"input": ids, "first_logits": logits_after(ids, [cfg.decoder_start_token_id])}
                   for ids in inputs],
        "greedy": [{"input": ids, "tokens": toks,
                    "last_logits": logits_after(ids, [cfg.decoder_start_token_id] + toks[:-1])}
                   for ids, toks in zip(inputs[1:4], runs)],
    }
    (out / "golden.json").write_text(json.dumps(golden) + "\n")
    print(f"{name}: seed {seed}, min greedy margin {margin:.4f}")


def main():
    """All fixtures, or those named on the command line (also `stories`, `gemma3_270m`, `minilm`)."""
    import sys

    only = set(sys.argv[1:])
    want = lambda name: not only or name in only
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, spec in VARIANTS.items():
        if want(name):
            make_variant(name, spec)
    for name, spec in GPT2_VARIANTS.items():
        if want(name):
            make_variant(name, {"model_type": "gpt2", **spec}, base=GPT2_BASE)
    for name, spec in SSM_VARIANTS.items():
        if want(name):
            make_variant(name, spec, base=SSM_BASE)
    if want("gpt2_4heads") or want("gpt2_gguf"):
        make_gpt2_gguf("gpt2_4heads")
    for name, arch in MOE_GGUF.items():
        if want(name) or want("moe_gguf"):
            make_moe_gguf(name, arch)
    for name in ["deepseek_v2_lite", "deepseek_v2_yarn"]:
        if want(name) or want("moe_gguf"):
            make_deepseek_gguf(name)
    for name, (spec, pooling, normalize) in BERT_VARIANTS.items():
        if want(name):
            make_bert(name, spec, pooling, normalize)
    for name, (spec, pooling, normalize) in DECODER_EMBED_VARIANTS.items():
        if want(name) or want("decoder_embed"):
            make_decoder_embed(name, spec, pooling, normalize)
    for name, (family, spec, pooling, normalize) in ROBERTA_VARIANTS.items():
        if want(name) or want("roberta"):
            make_bert(name, spec, pooling, normalize, family)
    for name, (spec, pooling, normalize, legacy) in MODERNBERT_VARIANTS.items():
        if want(name) or want("modernbert"):
            make_modernbert(name, spec, pooling, normalize, legacy)
    if want("nomic_mean"):
        make_nomic()
    for name, spec in T5_VARIANTS.items():
        if want(name) or want("t5"):
            make_t5(name, spec)
    for name in ["mamba_tied", "mamba_bias"]:
        if want(name) or want("mamba_gguf"):
            make_mamba_gguf(name)
    if want("stories"):
        make_stories_golden()
    if want("gemma3_270m"):
        make_gemma3_270m_golden()
    if want("minilm"):
        make_minilm_golden()


if __name__ == "__main__":
    main()
