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

from .cluster import ALREADY_RUNNING, Cluster, ClusterError  # noqa: E402
from .config import ConfigError, load  # noqa: E402
from .server import StartError, run  # noqa: E402

LOG_FORMAT = "%(asctime)s worker[%(process)d] %(message)s"


def _failed(why, status=1):
    """Say why the worker does not start, as its log lines are (workers
    share their port's log: `admin` finds this one by the pid); its exit
    status."""
    logging.error("cannot start: %s", why)
    return status


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(prog="worker", description=__doc__)
    parser.add_argument("-c", "--config", required=True, help="the worker's JSON config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    try:
        config = load(args.config)
    except ConfigError as e:
        return _failed(e)
    cluster = Cluster(config.cluster)
    try:
        claimed = cluster.claim_port(config.port)
    except ClusterError as e:
        return _failed(e)
    if claimed is None:
        return _failed("a worker of cluster %s already runs on port %d"
                       % (cluster.path, config.port), ALREADY_RUNNING)
    try:
        uvloop.run(run(config))
    except StartError as e:
        return _failed(e)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.forget_worker(config.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
