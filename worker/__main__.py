"""Run one worker in the foreground: python -m worker -c CONFIG.json"""
import argparse
import logging
import sys

import uvloop

from .cluster import Cluster, ClusterError
from .config import ConfigError, load
from .server import StartError, run


def main(argv=None):
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
