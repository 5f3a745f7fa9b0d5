#!/usr/bin/env python3
"""Checks deploy/compose offline (run by deploy/check.sh): every compose file against the Compose
Specification's JSON schema (vendored in deploy/schemas/compose), the files they mount exist, and
in replicas.yml LiteLLM's deployments and Prometheus' targets are the Candela services."""

import json
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import yaml

COMPOSE = Path(__file__).resolve().parent / "compose"
SCHEMA = json.loads((COMPOSE.parent / "schemas" / "compose" / "compose-spec.json").read_text())


def check_file(path):
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    for name, svc in doc["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (path.parent / src).exists(), f"{path.name}: {name} mounts missing {src}"
        for dep in svc.get("depends_on", []):
            assert dep in doc["services"], f"{path.name}: {name} depends on unknown {dep}"
    print(f"{path.name}: valid compose file, {len(doc['services'])} services")
    return doc


def main():
    for p in sorted(COMPOSE.glob("*.yml")):
        if p.name.startswith("prometheus"):
            continue
        doc = check_file(p)
        if p.name != "replicas.yml":
            continue
        candelas = {n for n, s in doc["services"].items() if s["image"].startswith("candela:")}
        assert len(candelas) >= 2, "replicas.yml runs at least two Candela replicas"
        litellm = yaml.safe_load((COMPOSE / "litellm.yaml").read_text())
        hosts = {urlparse(m["litellm_params"]["api_base"]).hostname for m in litellm["model_list"]}
        assert hosts == candelas, f"LiteLLM routes to {hosts}, the replicas are {candelas}"
        assert len({m["model_name"] for m in litellm["model_list"]}) == 1, "one model name for all"
        prom = yaml.safe_load((COMPOSE / "prometheus-replicas.yml").read_text())
        targets = {t.split(":")[0] for c in prom["scrape_configs"] for s in c["static_configs"] for t in s["targets"]}
        assert targets == candelas, f"Prometheus scrapes {targets}, the replicas are {candelas}"
        print(f"replicas.yml: LiteLLM and Prometheus both cover {sorted(candelas)}")


if __name__ == "__main__":
    main()
