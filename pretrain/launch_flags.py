"""Print the `deepspeed` runner flags for a config, one per line (used by launch/pretrain.sh).

Sources, highest first: environment (HOSTFILE, NUM_NODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT),
then the config's `launch:` section.
"""

import os
import socket
import sys

from .config import ConfigError, load_config


def runner_flags(cfg, env=os.environ) -> list[str]:
    launch = cfg.launch
    hostfile = env.get("HOSTFILE", launch.hostfile)
    nodes = int(env.get("NUM_NODES", launch.num_nodes))
    gpus = env.get("GPUS_PER_NODE", launch.gpus_per_node)
    flags = []
    if hostfile:
        if not os.path.exists(hostfile):
            raise ConfigError(f"hostfile {hostfile} (launch.hostfile / HOSTFILE) does not exist")
        flags += ["--hostfile", hostfile]
    if nodes > 1 or hostfile:
        flags += ["--num_nodes", str(nodes)]
    if gpus is not None:
        flags += ["--num_gpus", str(gpus)]
    if env.get("MASTER_ADDR"):
        flags += ["--master_addr", env["MASTER_ADDR"]]
    port = env.get("MASTER_PORT") or launch.master_port
    if port is None:  # two single-node jobs on one machine must not both take 29500
        port = free_port() if nodes == 1 and not hostfile else 29500
    flags += ["--master_port", str(port)]
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cls = None
    if argv[:1] == ["--script"]:
        script, argv = argv[1], argv[2:]
        if script.endswith("posttrain.sh"):
            from posttrain.config import PostConfig as cls
    try:
        cfg = load_config(argv[0], argv[1:], cls=cls)
        print("\n".join(runner_flags(cfg)))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
