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
# The call below goes to this host: not through a proxy the shell names.
no_proxy="localhost,127.0.0.1${no_proxy:+,$no_proxy}"
export no_proxy
# The port its template names (8080 unless `admin setconf` changed it).
port=$(python3 -c 'import json; print(json.load(open("my-cluster/config/template.json")).get("port", 8080))')
if ! ./bin/admin workers -cluster=my-cluster; then
    # A port above it that nothing listens on, to suggest.
    free=$(python3 -c '
import socket, sys
for port in range(int(sys.argv[1]) + 1, 65536):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break' "$port")
    echo "quickstart: for another port: ./bin/admin setconf -cluster=my-cluster '{\"port\": $free}'," \
         "then make quickstart again" >&2
    exit 1
fi
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
