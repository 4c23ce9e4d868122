"""Start a multi-node Ray cluster on this one machine, to try the multi-node path without a cluster.

    .venv/bin/python cluster/local_cluster.py --nodes 2 --cpus-per-node 1
    # in another shell, with the address it prints:
    .venv/bin/groupdir train --data demo/shards --address 127.0.0.1:PORT workers=2 placement=SPREAD

The head gets no CPUs, so every worker runs on a worker node, as on a real cluster. Each node is a
separate raylet with its own resources (Ray's own multi-node tests use the same mechanism). Ctrl-C
stops the cluster.
"""

import argparse
import signal
import time

from ray.cluster_utils import Cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus-per-node", type=float, default=1)
    parser.add_argument("--gpus-per-node", type=float, default=0)
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node, num_gpus=args.gpus_per_node)
    cluster.wait_for_nodes()
    print(f"Ray cluster: a head and {args.nodes} worker node(s) of {args.cpus_per_node:g} CPU(s) each", flush=True)
    print(f"address: {cluster.address}", flush=True)
    print(f"  groupdir train --address {cluster.address} --data SHARDS workers={args.nodes} placement=SPREAD",
          flush=True)
    print("Ctrl-C stops it.", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
