#!/usr/bin/env bash
"true" '''\'
# looplm launcher: one file, two roles; launch/<name>.sh runs the entry point registered as <name> in
# runtime/launch.py (launch/posttrain.sh is a link to this file and runs posttrain.train).
#
#  * As a shell script on a head node:  bash launch/pretrain.sh CONFIG [section.key=value ...]
#    builds the deepspeed command from the config's `launch:` section and the environment
#    (HOSTFILE, NUM_NODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT override it) and runs it.
#  * As the program the DeepSpeed runner starts on every rank:
#        deepspeed [--hostfile H] [--num_nodes N] [--num_gpus G] launch/pretrain.sh --config CONFIG [overrides]
#    The runner executes this file with Python (the first line above is a no-op string in Python
#    and `true` in the shell), which runs pretrain.train.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [ "$#" -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash $0 CONFIG [section.key=value ...]" >&2
  echo "   or: deepspeed [runner flags] $0 --config CONFIG [section.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
python="${PYTHON:-$( [ -x "$repo/.venv/bin/python" ] && echo "$repo/.venv/bin/python" || echo python3 )}"
script="launch/$(basename "$0")"
name="$(basename "$0" .sh)"  # a launcher registered in runtime/launch.py (LAUNCHERS)
# The config is checked here, before any rank starts: an error stops the launcher with its message.
flags="$(cd "$repo" && "$python" -m runtime.launch flags "$name" "$config" "$@")" || exit $?
mapfile -t runner_flags <<< "$flags"
deepspeed="$(dirname "$python")/deepspeed"
[ -x "$deepspeed" ] || deepspeed=deepspeed
cd "$repo"
echo "+ $deepspeed ${runner_flags[*]} $script --config $config $*" >&2
"$deepspeed" "${runner_flags[@]}" "$script" --config "$config" "$@" &
runner=$!

# Preemption: the single-node deepspeed runner does not pass SIGTERM on, so forward it to the
# ranks themselves (they save a checkpoint and exit cleanly); multi-node runners forward it over pdsh.
descendants() { local c; for c in $(pgrep -P "$1"); do echo "$c"; descendants "$c"; done; }
forward() {
  local p ranks=0
  for p in $(descendants "$runner"); do
    if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "--local_rank"; then kill -TERM "$p"; ranks=1; fi
  done
  [ "$ranks" = 1 ] || kill -TERM "$runner" 2>/dev/null || true
}
trap forward TERM INT
status=0
while kill -0 "$runner" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait again
  if wait "$runner"; then status=0; else status=$?; fi
done
exit "$status"
'''
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.launch import LAUNCHERS  # noqa: E402

importlib.import_module(LAUNCHERS[os.path.basename(__file__)[:-3]][0]).main(sys.argv[1:])
