"""Run one worker in the foreground: python -m worker -c CONFIG.json"""
import signal
import sys

# Ctrl-C while the modules below load (a few hundred ms): stop quietly, as
# after it, not with a traceback from the middle of an import.  `admin
# worker-exec` blocks it until here, so one pressed while the interpreter
# itself started is taken now.
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

import argparse  # noqa: E402
import logging  # noqa: E402

import uvloop  # noqa: E402

from .cluster import Cluster, ClusterError  # noqa: E402
from .config import ConfigError, load  # noqa: E402
from .server import StartError, run  # noqa: E402


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("-c", "--config", required=True, help="the worker's JSON config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(message)s")
    try:
        config = load(args.config)
    except ConfigError as e:
        print("worker: %s" % e, file=sys.stderr)
        return 1
    cluster = Cluster(config.cluster)
    try:
        claimed = cluster.claim_port(config.port)
    except ClusterError as e:
        print("worker: %s" % e, file=sys.stderr)
        return 1
    if claimed is None:
        print("worker: a worker of cluster %s already runs on port %d"
              % (cluster.path, config.port), file=sys.stderr)
        return 1
    try:
        uvloop.run(run(config))
    except StartError as e:
        print("worker: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        cluster.forget_worker(config.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
