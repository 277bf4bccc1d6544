#!/usr/bin/env bash
# Train ChuXin on one node with every local device (GPUs, or CPU processes with gloo).
#   projects/chuxin/run_single_node.sh CONFIG NPROC [-o Section.key=value ...]
# e.g. projects/chuxin/run_single_node.sh configs/chuxin/tiny.yaml 2 -o Distributed.dp_degree=2
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:?usage: run_single_node.sh CONFIG NPROC [-o K=V ...]}
nproc=${2:?usage: run_single_node.sh CONFIG NPROC [-o K=V ...]}
shift 2
python=${PYTHON:-.venv/bin/python}
exec "$python" -m paddle.distributed.launch --nproc_per_node "$nproc" --log_dir "${LOG_DIR:-output/launch_logs}" \
    tools/train.py -c "$config" "$@"
