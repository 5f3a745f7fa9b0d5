#!/usr/bin/env python3
"""Embedding throughput: all-MiniLM-L6-v2 through sentence-transformers (PyTorch, in process)
and through a running `candela serve` (/v1/embeddings over HTTP), on the same 1,000 sentences of
8-128 words.

sentence-transformers runs as its users run it: `model.encode(sentences, batch_size=B)`, which
sorts the sentences by length so that each padded batch wastes little, with torch limited to
THREADS threads. Candela gets the same sentences as requests of B inputs each, CLIENTS of them
in flight (a client batching its corpus), and batches whatever it has queued into one forward
pass. Both see every sentence once after a warm-up; the vectors are compared (cosine) so that a
fast wrong answer cannot win.

    bench/embeddings.py --candela http://127.0.0.1:18559 --model models-cache/all-MiniLM-L6-v2
"""

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np


def sentences(n, seed=0):
    """n sentences of 8-128 words drawn from a fixed vocabulary (with some punctuation,
    capitals and non-ASCII words so that the tokenizer has real work)."""
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her they this which "
             "model server token vector search retrieval engine request batch memory cache "
             "weather river mountain city library music garden kitchen window morning evening "
             "quickly slowly bright quiet ancient modern électrique café Zürich naïve 東京 мир "
             "approximately understanding responsibilities internationalization").split()
    out = []
    for _ in range(n):
        k = rng.randint(8, 128)
        text = " ".join(rng.choice(words) for _ in range(k))
        out.append(text[0].upper() + text[1:] + ".")
    return out


def run_sentence_transformers(model_dir, texts, batch_size, threads):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64], batch_size=batch_size)
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return time.perf_counter() - start, vectors


async def run_candela(base, texts, batch_size, clients):
    batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
    vectors = [None] * len(batches)
    tokens = 0
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        async def one(i):
            nonlocal tokens
            r = await client.post(base + "/v1/embeddings",
                                  json={"input": batches[i], "truncate_prompt_tokens": -1})
            r.raise_for_status()
            body = r.json()
            tokens += body["usage"]["prompt_tokens"]
            vectors[i] = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]

        queue = list(range(len(batches)))

        async def worker():
            while queue:
                await one(queue.pop(0))

        await one(0)  # warm-up
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return elapsed, np.array([v for b in vectors for v in b], dtype=np.float32), tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models-cache/all-MiniLM-L6-v2")
    ap.add_argument("--candela", help="base URL of a running candela serve (omit: baseline only)")
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    texts = sentences(args.sentences)
    rows = []
    ref = None
    if not args.skip_baseline:
        t, ref = run_sentence_transformers(args.model, texts, args.batch_size, args.threads)
        rows.append({"server": "sentence-transformers", "threads": args.threads,
                     "batch_size": args.batch_size, "seconds": round(t, 3),
                     "embeddings_per_s": round(len(texts) / t, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if args.candela:
        t, got, tokens = asyncio.run(run_candela(args.candela, texts, args.batch_size, args.clients))
        row = {"server": "candela", "batch_size": args.batch_size, "clients": args.clients,
               "seconds": round(t, 3), "embeddings_per_s": round(len(texts) / t, 1),
               "prompt_tokens": tokens}
        if ref is not None:
            cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
            row["min_cosine_vs_sentence_transformers"] = round(float(cos.min()), 7)
            row["speedup"] = round(rows[0]["seconds"] / t, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
