#!/usr/bin/env python3
"""OpenAI-compatible load generator: streaming /v1/completions at fixed concurrency.

Each request sends PROMPT_LEN random token ids (after a SHARED_PREFIX_LEN-token prefix that
every request of the run shares, like a system prompt; none by default) and asks for exactly
OUTPUT_LEN tokens (ignore_eos), streamed. For each concurrency level, `concurrency` workers each run
`requests_per_worker` requests back to back (closed loop). Reports output tokens/s,
requests/s, TTFT p50/p99 and ITL/TPOT p50/p99 as JSON on stdout.
"""

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_request(client, url, model, prompt, output_len):
    # A server may close an idle keep-alive connection just as the next request goes out on it
    # (llama.cpp's server did, once in a run): that request never reached it, so it is sent again on
    # a fresh connection, as the OpenAI SDK retries connection errors.
    for attempt in range(3):
        try:
            return await attempt_request(client, url, model, prompt, output_len)
        except httpx.RemoteProtocolError as e:
            if getattr(e, "started", False) or attempt == 2:
                raise


async def attempt_request(client, url, model, prompt, output_len):
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals = []
    tokens = 0
    started = False
    try:
        async with client.stream("POST", url, json=body, timeout=600) as r:
            started = True
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
    except httpx.RemoteProtocolError as e:
        e.started = started  # whether the server had answered (then it is not retried)
        raise
    end = time.perf_counter()
    ttft = arrivals[0] - start if arrivals else end - start
    itls = [b - a for a, b in zip(arrivals, arrivals[1:])]
    n = tokens or len(arrivals)
    tpot = (end - arrivals[0]) / max(n - 1, 1) if arrivals else float("nan")
    return {"tokens": n, "ttft": ttft, "itls": itls, "tpot": tpot, "latency": end - start}


async def level(base, model, concurrency, prompt_len, output_len, vocab, requests_per_worker, seed,
                shared_prefix_len=0):
    rng = random.Random(seed)
    prefix = [random.Random(12345).randrange(100, vocab) for _ in range(shared_prefix_len)]
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        url = base + "/v1/completions"
        # Warm-up, not measured (with a shared prefix, it also computes the prefix once).
        await one_request(client, url, model,
                          prefix + [rng.randrange(100, vocab) for _ in range(prompt_len)], 4)
        results = []

        async def worker():
            for _ in range(requests_per_worker):
                prompt = prefix + [rng.randrange(100, vocab) for _ in range(prompt_len)]
                results.append(await one_request(client, url, model, prompt, output_len))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    itls = [x for r in results for x in r["itls"]]
    ttfts = [r["ttft"] for r in results]
    tpots = [r["tpot"] for r in results]
    return {
        "concurrency": concurrency, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
        "output_tok_s": tokens / wall, "req_s": len(results) / wall,
        "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
        "tpot_p50": pct(tpots, 50), "tpot_p99": pct(tpots, 99),
        "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99),
        "mean_tpot": statistics.fmean(tpots) if tpots else float("nan"),
    }


async def repeat_ttft(base, model, n, vocab):
    """The same prompt twice: the first computes it, the second may find it cached."""
    prompt = [random.Random(n).randrange(100, vocab) for _ in range(n)]
    async with httpx.AsyncClient(timeout=600) as client:
        url = base + "/v1/completions"
        first = await one_request(client, url, model, prompt, 2)
        second = await one_request(client, url, model, prompt, 2)
    return {"prompt_len": n, "ttft_first_s": first["ttft"], "ttft_repeat_s": second["ttft"],
            "speedup": first["ttft"] / second["ttft"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--model", default="model")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--requests-per-worker", type=int, default=1)
    ap.add_argument("--shared-prefix-len", type=int, default=0)
    ap.add_argument("--repeat-ttft", type=int, default=0,
                    help="instead: time to first token of one N-token prompt, sent twice in a row")
    args = ap.parse_args()
    if args.repeat_ttft:
        print(json.dumps(asyncio.run(repeat_ttft(args.base, args.model, args.repeat_ttft, args.vocab))))
        return
    out = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        r = asyncio.run(level(args.base, args.model, c, args.prompt_len, args.output_len, args.vocab,
                              args.requests_per_worker, seed=c, shared_prefix_len=args.shared_prefix_len))
        print(json.dumps(r), flush=True)
        out.append(r)


if __name__ == "__main__":
    main()
