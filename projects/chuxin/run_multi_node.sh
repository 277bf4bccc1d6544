#!/usr/bin/env bash
# Train ChuXin on N nodes (what `fleetrun` runs). Start the same command on every node; all of them name
# the first node's address as the master.
#   projects/chuxin/run_multi_node.sh MASTER_IP:PORT NNODES NPROC_PER_NODE CONFIG [-o Section.key=value ...]
# e.g. on each of 4 nodes: projects/chuxin/run_multi_node.sh 10.0.0.1:6170 4 8 configs/chuxin/chuxin_1.6b.yaml
set -euo pipefail
cd "$(dirname "$0")/../.."
usage="usage: run_multi_node.sh MASTER_IP:PORT NNODES NPROC_PER_NODE CONFIG [-o K=V ...]"
master=${1:?$usage}
nnodes=${2:?$usage}
nproc=${3:?$usage}
config=${4:?$usage}
shift 4
python=${PYTHON:-.venv/bin/python}
exec "$python" -m paddle.distributed.launch --master "$master" --nnodes "$nnodes" --nproc_per_node "$nproc" \
    --log_dir "${LOG_DIR:-output/launch_logs}" tools/train.py -c "$config" "$@"
