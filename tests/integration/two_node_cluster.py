"""A two-node Ray cluster on 127.0.0.1 in its own process, for test_multinode.py.

    python two_node_cluster.py DASHBOARD_PORT AGENT_PORT TEMP_DIR WORKER_MEMORY_BYTES

`ray start` refuses a second node in Ray's local-only mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which keeps every address on loopback), so the nodes are started with ray.cluster_utils.Cluster:
a head (2 CPUs, dashboard + job server) and a worker node (1 CPU, little `memory`), each its
own raylet. Prints one JSON line {"dashboard_url", "gcs_address", "worker_node_id"}, then obeys
stdin: "kill" SIGKILLs every process of the worker node (raylet included) and prints "killed";
end of input shuts the cluster down.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    dash_port, agent_port, temp_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    worker_memory = int(sys.argv[4])
    from ray.cluster_utils import Cluster

    # The head's dashboard agent (which runs jobs) must not take Ray's default port 52365:
    # another cluster on this machine may hold it, and then no job can be submitted.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash_port, "dashboard_agent_listen_port": agent_port,
        "temp_dir": temp_dir})
    # A job's driver finds its cluster through <head temp dir>/ray_current_cluster (else it
    # joins the newest Ray started on this machine, maybe another test's): write it there, as
    # `ray start --head --temp-dir` does. Cluster writes it only under the default temp dir.
    from ray._private.utils import write_ray_address

    write_ray_address(cluster.gcs_address, temp_dir)
    # Its own temp dir, as a separate machine would have: nodes sharing one would share
    # runtime_resources/, and the worker node's agent deletes the job's working_dir package
    # (the job driver's cwd on the head) once its Train workers are done with it.
    # With its own temp dir it needs its own log monitor, or its workers' logs never reach
    # the job's log (Cluster starts one per machine by default).
    worker = cluster.add_node(num_cpus=1, memory=worker_memory, temp_dir=f"{temp_dir}w",
                              include_log_monitor=True)
    print(json.dumps({"dashboard_url": f"http://127.0.0.1:{dash_port}",
                      "gcs_address": cluster.gcs_address,
                      "worker_node_id": worker.node_id}), flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "kill":
                cluster.remove_node(worker, allow_graceful=False)
                print("killed", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
