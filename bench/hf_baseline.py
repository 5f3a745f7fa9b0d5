#!/usr/bin/env python3
"""Hugging Face transformers `generate` on the same weights (the f32 GGUF), float32, 2 threads:
sequential requests, then padded batches. Prints one JSON line per mode."""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--sequential", type=int, default=3, help="requests run one after another")
    ap.add_argument("--batches", default="8,32")
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def run(batch):
        ids = torch.randint(100, vocab, (batch, args.prompt_len), generator=g)
        mask = torch.ones_like(ids)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, pad_token_id=0)
        return (out.shape[1] - args.prompt_len) * batch, time.perf_counter() - t

    run(1)  # warm-up
    tokens, secs = 0, 0.0
    for _ in range(args.sequential):
        n, s = run(1)
        tokens, secs = tokens + n, secs + s
    print(json.dumps({"mode": "sequential", "concurrency": 1, "output_tok_s": tokens / secs}), flush=True)
    for b in [int(x) for x in args.batches.split(",") if x]:
        n, s = run(b)
        print(json.dumps({"mode": "padded-batch", "concurrency": b, "output_tok_s": n / s}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
