#!/bin/sh
# `make quickstart`: a cluster, a worker and the hello call in one command.
# The worker stays up; the last lines say how to call it and how to stop it.
set -eu
cd "$(dirname "$0")/.."
if [ -d my-cluster ]; then
    echo "using the existing ./my-cluster"
else
    ./bin/admin new -cluster my-cluster
fi
if ! ./bin/admin workers -cluster=my-cluster; then
    echo "quickstart: for another port: ./bin/admin setconf -cluster=my-cluster '{\"port\": 8090}'," \
         "then make quickstart again" >&2
    exit 1
fi
# The port its template names (8080 unless `admin setconf` changed it).
port=$(python3 -c 'import json; print(json.load(open("my-cluster/config/template.json")).get("port", 8080))')
mkdir -p my-cluster/registry/hello
cp -r quickstart/handlers/hello/. my-cluster/registry/hello/
echo "\$ curl -X POST localhost:$port/runLambda/hello -d '{\"name\": \"Alice\"}'"
curl -sS -X POST "localhost:$port/runLambda/hello" -d '{"name": "Alice"}'
echo
cat <<MSG

The worker is still running on port $port.
  call it:     curl -X POST localhost:$port/run/hello -d '{"name": "Bob"}'
  see it:      ./bin/admin status -cluster=my-cluster
  stop it:     ./bin/admin kill -cluster=my-cluster
MSG
