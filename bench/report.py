#!/usr/bin/env python3
"""Turns a bench/run.sh results folder into the Markdown tables of docs/benchmarks.md."""

import json
import sys
from pathlib import Path


def lines(p):
    return [json.loads(l) for l in Path(p).read_text().splitlines() if l.strip()]


def main(out):
    out = Path(out)
    ceil = json.loads((out / "ceilings.json").read_text())
    print(f"Machine ceilings (numpy, 2 threads): f32 matmul {ceil['matmul_gflops_m1']:.0f} / "
          f"{ceil['matmul_gflops_m32']:.0f} / {ceil['matmul_gflops_m256']:.0f} GFLOP/s at m = 1 / 32 / 256 "
          f"(576x1536); memory read {ceil['read_gbs']:.1f} GB/s, copy {ceil['copy_gbs']:.1f} GB/s.\n")
    servers = {"candela": "Candela", "llamacpp": "llama.cpp server"}
    rows = {k: {r["concurrency"]: r for r in lines(out / f"{k}.jsonl")} for k in servers}
    rss = {k: json.loads((out / f"{k}.rss.json").read_text())["peak_rss_mib"] for k in servers}
    hf = lines(out / "transformers.jsonl") if (out / "transformers.jsonl").exists() else []
    print("| server | conc. | output tok/s | req/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | ITL p50 / p99 ms | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, name in servers.items():
        for c, r in sorted(rows[k].items()):
            print(f"| {name} | {c} | {r['output_tok_s']:.1f} | {r['req_s']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} "
                  f"| {r['tpot_p50']*1e3:.1f} / {r['tpot_p99']*1e3:.1f} | {r['itl_p50']*1e3:.1f} / {r['itl_p99']*1e3:.1f} "
                  f"| {rss[k]} |")
    for h in hf:
        print(f"| transformers ({h['mode']}) | {h['concurrency']} | {h['output_tok_s']:.1f} | | | | | |")
    print("\nRatios (Candela / peer, output tok/s):")
    seq = next((h["output_tok_s"] for h in hf if h["mode"] == "sequential"), None)
    for c in sorted(rows["candela"]):
        cand = rows["candela"][c]["output_tok_s"]
        llama = rows["llamacpp"].get(c, {}).get("output_tok_s")
        parts = []
        if llama:
            parts.append(f"{cand / llama:.2f}x llama.cpp")
        if seq:
            parts.append(f"{cand / seq:.1f}x transformers sequential")
        print(f"- concurrency {c}: " + ", ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])
