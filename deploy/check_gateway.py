#!/usr/bin/env python3
"""Checks deploy/gateway offline (run by deploy/check.sh):

1. renders the kustomization as kustomize would for what it uses (the base's resources, the
   overlay's files, JSON 6902 patches and `$patch: delete`) into OUT_DIR, for
   kubernetes-validate to check the built-in kinds;
2. validates every InferencePool, Gateway and HTTPRoute against the CRD schemas vendored in
   deploy/schemas (from the projects' own CRDs);
3. checks what ties the pieces together: the pool selects the Candela pods and targets their
   port, its picker is the EPP Service and port, the route's backend is the pool, the EPP's
   plugin config is consistent and its metric flags name metrics Candela exports.
"""

import json
import re
import sys
from pathlib import Path

import jsonpatch
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "deploy" / "gateway"


def load_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resources(kdir):
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    docs = []
    for r in k.get("resources", []):
        p = (kdir / r).resolve()
        docs += resources(p) if p.is_dir() else load_docs(p)
    for patch in k.get("patches", []):
        t = patch["target"]
        body = yaml.safe_load(patch["patch"])
        matches = [d for d in docs if d["kind"] == t["kind"] and d["metadata"]["name"] == t["name"]]
        assert matches, f"{kdir}: a patch targets no resource: {t}"
        for d in matches:
            if isinstance(body, dict) and body.get("$patch") == "delete":
                docs.remove(d)
            else:
                docs[docs.index(d)] = jsonpatch.apply_patch(d, body)
    return docs


def schemas():
    out = {}
    for p in (ROOT / "deploy" / "schemas").glob("*.json"):
        s = json.loads(p.read_text())
        out[(s["apiVersion"], s["kind"])] = s["schema"]
    return out


def main(out_dir):
    docs = resources(GATEWAY)
    out_dir = Path(out_dir)
    for i, d in enumerate(docs):
        (out_dir / f"{i:02d}-{d['kind'].lower()}-{d['metadata']['name']}.yaml").write_text(yaml.safe_dump(d))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}

    crds = schemas()
    for d in docs:
        schema = crds.get((d["apiVersion"], d["kind"]))
        if schema:
            jsonschema.validate(d, schema)
            print(f"{d['kind']} {d['metadata']['name']}: valid against the vendored CRD schema")

    # The pieces fit together.
    deploy, pool = by[("Deployment", "candela")], by[("InferencePool", "candela")]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    for k, v in pool["spec"]["selector"]["matchLabels"].items():
        assert pod_labels.get(k) == v, f"the pool's selector {k}={v} misses the Candela pods"
    ports = {p["containerPort"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= ports, "the pool targets a port the pods lack"
    assert deploy["spec"]["replicas"] > 1, "the gateway path runs several replicas"
    assert "preStop" in deploy["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
    assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs), "replicas cannot share one RWO claim"
    ref = pool["spec"]["endpointPickerRef"]
    svc = by[("Service", ref["name"])]
    assert ref["port"]["number"] in {p["port"] for p in svc["spec"]["ports"]}, "picker port not on its Service"
    epp = by[("Deployment", ref["name"])]
    assert all(svc["spec"]["selector"][k] == epp["spec"]["template"]["metadata"]["labels"][k] for k in svc["spec"]["selector"])
    route = by[("HTTPRoute", "candela")]
    backends = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    assert any(b.get("kind") == "InferencePool" and b["name"] == "candela" for b in backends)
    gw = by[("Gateway", route["spec"]["parentRefs"][0]["name"])]
    assert gw["spec"]["listeners"], "the gateway has no listener"

    # The EPP's plugin config and metric flags.
    cfg = yaml.safe_load(by[("ConfigMap", "candela-epp")]["data"]["plugins.yaml"])
    assert cfg["kind"] == "EndpointPickerConfig"
    names = {p.get("name", p["type"]) for p in cfg["plugins"]}
    for prof in cfg["schedulingProfiles"]:
        for p in prof["plugins"]:
            assert p["pluginRef"] in names, f"profile {prof['name']} refers to an undefined plugin {p['pluginRef']}"
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--pool-name={pool['metadata']['name']}" in args
    flags = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    exported = exported_metrics()
    for flag in ["total-queued-requests-metric", "total-running-requests-metric",
                 "kv-cache-usage-percentage-metric", "cache-info-metric"]:
        name = flags[flag]
        assert name.split(":", 1)[1] in exported, f"--{flag}={name}: Candela exports no such metric"
    print(f"gateway overlay: {len(docs)} resources rendered into {out_dir}; references consistent")


def exported_metrics():
    """The metric names (without prefix) that src/metrics.rs registers."""
    text = (ROOT / "src" / "metrics.rs").read_text()
    return set(re.findall(r'"([a-z_]+)",\s*"[A-Z]', text)) | set(re.findall(r'name\("([a-z_]+)"\)', text))


if __name__ == "__main__":
    main(sys.argv[1])
