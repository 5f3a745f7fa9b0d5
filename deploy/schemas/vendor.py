#!/usr/bin/env python3
"""Extracts the OpenAPI schemas of the CRDs that deploy/gateway/ uses into JSON files here, with
their descriptions dropped (deploy/check.sh validates the manifests against them offline).

Run by hand with checkouts of the two projects (Apache-2.0, see LICENSE here):

    python3 deploy/schemas/vendor.py GATEWAY_API_DIR INFERENCE_EXTENSION_DIR
"""

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = [
    ("gateway-api", "config/crd/standard/gateway.networking.k8s.io_gateways.yaml", "v1"),
    ("gateway-api", "config/crd/standard/gateway.networking.k8s.io_httproutes.yaml", "v1"),
    ("inference-extension", "config/crd/bases/inference.networking.k8s.io_inferencepools.yaml", "v1"),
]


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main():
    roots = {"gateway-api": Path(sys.argv[1]), "inference-extension": Path(sys.argv[2])}
    for project, rel, version in CRDS:
        crd = yaml.safe_load((roots[project] / rel).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        out = {
            "apiVersion": f"{group}/{version}",
            "kind": kind,
            "source": f"{project}: {rel}",
            "schema": strip(served["schema"]["openAPIV3Schema"]),
        }
        path = HERE / f"{kind.lower()}-{version}.json"
        path.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{path.name}: {group}/{version} {kind}, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
