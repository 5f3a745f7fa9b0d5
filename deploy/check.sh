#!/usr/bin/env bash
# Deployment checks, run by .ci/run:
#   hadolint on the Dockerfile; yamllint on every YAML file; Kubernetes schema validation of the
#   manifests, of the gateway overlay rendered offline (its InferencePool, Gateway and HTTPRoute
#   against the CRD schemas vendored in deploy/schemas), of the compose files (against the Compose
#   Specification's schema) and of the Helm chart rendered offline (after helm lint); the TOML in the ConfigMaps
#   uses only known keys; and, where podman is present, an image build + run + /health + a completion.
# Tools come from PyPI into deploy/.venv (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=deploy/.venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import helm_python, kubernetes_validate, yaml, jsonpatch, jsonschema" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r deploy/requirements.txt
fi
export PATH="$PWD/$VENV/bin:$PATH"

echo "== hadolint"
hadolint Dockerfile

echo "== yamllint"
yamllint -c deploy/yamllint.yaml deploy/kubernetes deploy/gateway deploy/compose deploy/helm/candela/values.yaml deploy/helm/candela/Chart.yaml

# Kinds without bundled schemas (Kustomization, ServiceMonitor) only warn; any ERROR fails.
validate() {
    local log
    log=$(kubernetes-validate "$@" 2>&1 || true)
    echo "$log"
    ! grep -q "^ERROR" <<<"$log"
}

echo "== manifests"
validate deploy/kubernetes/*.yaml

echo "== gateway overlay (N replicas behind the Gateway API Inference Extension)"
RENDER=$(mktemp -d)
GATEWAY=$(mktemp -d)
trap 'rm -rf "$RENDER" "$GATEWAY"' EXIT
python deploy/check_gateway.py "$GATEWAY"
validate "$GATEWAY"/*.yaml

echo "== compose files"
python deploy/check_compose.py

echo "== helm chart"
python deploy/render_chart.py "$RENDER"
validate "$RENDER"/*.yaml

echo "== config keys"
python - "$RENDER"/*.yaml deploy/kubernetes/configmap.yaml <<'PY'
import re, sys, tomllib, yaml
known = set(re.findall(r"^#?\s*([a-z_]+) =", open("config/default.toml").read(), re.M))
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap":
            cfg = tomllib.loads(doc["data"]["config.toml"])
            unknown = set(cfg) - known
            assert not unknown, f"{path}: unknown config keys {unknown}"
            print(f"{path}: config.toml keys {sorted(cfg)} ok")
PY

if command -v podman >/dev/null 2>&1; then
    echo "== container image"
    podman build --format docker --network=host -t candela:check . >/dev/null
    podman rm -f -t 2 candela-check >/dev/null 2>&1 || true
    PORT=18765
    podman run -d --init --network=host --name candela-check candela:check --port "$PORT" >/dev/null
    trap 'podman rm -f -t 2 candela-check >/dev/null 2>&1 || true; rm -rf "$RENDER" "$GATEWAY"' EXIT
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 0.2
    done
    curl -sf "http://127.0.0.1:$PORT/health"
    out=$(curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}')
    echo "$out"
    echo "$out" | grep -q '"text":", there was a little girl' || { echo "unexpected completion"; exit 1; }
    [ "$(podman inspect -f '{{.Config.User}}' candela:check)" = "10001" ] || { echo "image must run as non-root"; exit 1; }
    echo "image ok: $(podman image inspect -f '{{.Size}}' candela:check) bytes"
else
    echo "== container image: podman not installed, skipped (shared/tools/container-bases.sh installs it)"
fi
echo "deploy checks passed"
