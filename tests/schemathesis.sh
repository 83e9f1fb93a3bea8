#!/usr/bin/env bash
# Runs schemathesis (PyPI) against a live botvisor with the OpenAPI document it serves:
# every operation, generated requests, all checks, a bounded number of examples.
# Usage: tests/schemathesis.sh BOTVISOR_BINARY [MAX_EXAMPLES]
set -euo pipefail
bin=$1
examples=${2:-25}
work=$(mktemp -d)
repo=$(cd "$(dirname "$0")/.." && pwd)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
key="schemathesis-k3y-0123456789abcdef"
API_KEY=$key "$bin" serve --link sim --bind 127.0.0.1 --port "$port" --data-dir "$work/data" \
    --sim-pair-delay 200ms --shutdown-timeout 2s --media-fetch-timeout 2s > "$work/out" 2> "$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; cp "$work/server.log" "${SCHEMATHESIS_SERVER_LOG:-/dev/null}" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q listening "$work/out" && break; sleep 0.1; done
cd "$work"  # schemathesis writes a .schemathesis/ cache into the working directory
# /api/events is a stream that never ends; stopping a hung session waits out
# --shutdown-timeout (2 s here, then a kill), well inside the 10 s response-time check.
schemathesis --config-file "$repo/tests/schemathesis.toml" run "http://127.0.0.1:$port/openapi.json" \
    -H "X-API-Key: $key" --checks all --max-examples "$examples" \
    --exclude-path /api/events --request-timeout 30 --generation-database none --seed 1
