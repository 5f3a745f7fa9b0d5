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
}

PROMPT_LENGTHS = [1, 6, 19, 45]


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
def make_variant(name, spec):
    spec = dict(spec)
    old_rope = spec.pop("_old_rope_format", False)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{**BASE, **spec})
    cfg._attn_implementation = "eager"
    for seed in range(100):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        ps = prompts(1000 + seed)
        runs = [greedy(model, p, GREEDY_TOKENS) for p in ps[1:3]]
        margin = min(m for _, m in runs)
        if margin >= MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed with a greedy margin >= {MARGIN}")
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
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


def main():
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, spec in VARIANTS.items():
        make_variant(name, spec)
    make_stories_golden()


if __name__ == "__main__":
    main()
