#!/usr/bin/env python3
"""Lints the Helm chart and renders it offline (helm-python-sdk) with the default values and with
every optional resource on, writing the manifests into OUT_DIR for schema validation."""

import sys
from pathlib import Path

import helm_python

CHART = Path(__file__).resolve().parent / "helm" / "candela"
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

report = helm_python.lint(str(CHART), strict=True)
problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
for m in report["messages"]:
    print(f"helm lint: {m}")
if problems:
    sys.exit(f"helm lint found problems: {problems}")

variants = {
    "default": {},
    "full": {"serviceMonitor": {"enabled": True}, "apiKey": {"create": True, "value": "k"},
             "modelCache": {"persistent": False}, "autoscaling": {"enabled": False},
             "config": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}},
}
chart = helm_python.Chart.load(str(CHART))
for name, values in variants.items():
    rendered = chart.render(values, name="candela", namespace="default", is_install=True)
    docs = [text for path, text in sorted(rendered.items()) if path.endswith(".yaml") and text.strip()]
    (out / f"{name}.yaml").write_text("\n---\n".join(docs) + "\n")
    print(f"rendered {len(docs)} manifests ({name})")
