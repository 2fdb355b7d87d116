"""The launchers' registry and the `deepspeed` runner flags of a config.

`launch/<name>.sh` (one file; posttrain.sh links to pretrain.sh) asks this module for the runner
flags before any rank starts, which also checks the whole config, and each rank then runs the
registered entry point:

    python -m runtime.launch flags pretrain configs/smoke.yaml train.max_steps=4   # one flag per line
    python -m runtime.launch entry pretrain                                         # pretrain.train

Flag sources, highest first: environment (HOSTFILE, NUM_NODES, GPUS_PER_NODE, MASTER_ADDR,
MASTER_PORT), then the config's `launch:` section.
"""

import importlib
import os
import socket
import sys
from pathlib import Path

from .config import ConfigError, load_config

# launcher name -> (entry module with main(argv), "module:ConfigClass" of its run config)
LAUNCHERS = {
    "pretrain": ("pretrain.train", "pretrain.config:RunConfig"),
    "posttrain": ("posttrain.train", "posttrain.config:PostConfig"),
}


def launcher(name: str) -> tuple[str, type]:
    """(entry module, config class) of a registered launcher."""
    if name not in LAUNCHERS:
        raise ConfigError(f"no launcher named {name!r}; registered: {sorted(LAUNCHERS)} (runtime/launch.py)")
    entry, config = LAUNCHERS[name]
    module, cls = config.split(":")
    return entry, getattr(importlib.import_module(module), cls)


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


def deepspeed_command(world: int) -> list[str]:
    """The DeepSpeed runner next to this Python, `world` ranks on this machine, on a free port (tests,
    benchmarks); append the launcher script and its arguments."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world), "--master_port", str(free_port())]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) >= 2 and argv[0] == "entry":
            print(launcher(argv[1])[0])
        elif len(argv) >= 3 and argv[0] == "flags":
            _, cls = launcher(argv[1])
            print("\n".join(runner_flags(load_config(argv[2], argv[3:], cls))))
        else:
            raise ConfigError("usage: python -m runtime.launch flags LAUNCHER CONFIG [overrides] | entry LAUNCHER")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
