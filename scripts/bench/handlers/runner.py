"""Run one handler once and print its JSON result: what the peers (chroot,
bwrap, crun, runc) execute with the rootfs's python3, so that they do the
same work as a cold start of ours."""
import importlib
import json
import sys

sys.path.insert(0, "/handler/" + sys.argv[1])
handler = importlib.import_module("lambda_func").handler
print(json.dumps(handler(json.loads(sys.argv[2]))))
