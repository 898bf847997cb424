"""`ray start` for a worker node joining a head that is kept on loopback (python -m cluster.ray_join start ...).

The head runs with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node address 127.0.0.1: then Ray keeps
each of its listeners that it can on loopback (metrics, dashboard agent, raylet, Ray Client). A
worker node on this machine needs the same two things for the same reason, and Ray's CLI refuses
both: with the setting at 0 it will not join a node to a cluster at all ("Multi-node Ray clusters
are not supported on Windows and OSX"), and with it at 1 it rewrites 127.0.0.1 to the machine's
outward address. This runs Ray's own CLI with the join check let through and 127.0.0.1 left as
it is, in this process only; the node's processes inherit the setting at 0 from the environment
and bind loopback as the head's do. The head is dialled as [::ffff:127.0.0.1]:<port> (where its
GCS listens).
"""

import sys

from ray._private import ray_constants, services

ray_constants.ENABLE_RAY_CLUSTER = True  # the join check of `ray start`, in this process only
services.get_node_ip_address = lambda address=None: "127.0.0.1"  # so 127.0.0.1 stays 127.0.0.1

from ray.scripts.scripts import main  # noqa: E402  (after the settings it must see)

if __name__ == "__main__":
    sys.exit(main())
