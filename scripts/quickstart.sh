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
./bin/admin workers -cluster=my-cluster
mkdir -p my-cluster/registry/hello
cp -r quickstart/handlers/hello/. my-cluster/registry/hello/
echo "\$ curl -X POST localhost:8080/runLambda/hello -d '{\"name\": \"Alice\"}'"
curl -sS -X POST localhost:8080/runLambda/hello -d '{"name": "Alice"}'
echo
cat <<'MSG'

The worker is still running on port 8080.
  call it:     curl -X POST localhost:8080/run/hello -d '{"name": "Bob"}'
  see it:      ./bin/admin status -cluster=my-cluster
  stop it:     ./bin/admin kill -cluster=my-cluster
MSG
