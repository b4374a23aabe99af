#!/usr/bin/env bash
# Several nodes: run the same command on every node (launch/slurm.sbatch does it under Slurm). torchrun's c10d
# rendezvous at MASTER_ADDR:PORT (default 29500) gathers the nodes; ranks are assigned as they join.
#   node A:  launch/multinode.sh NNODES=2 MASTER_ADDR=nodeA NGPU=8 parallel=zero3 experiment=long_32k run_name=long32k_a
#   node B:  launch/multinode.sh NNODES=2 MASTER_ADDR=nodeA NGPU=8 parallel=zero3 experiment=long_32k run_name=long32k_a
# run_name is required (each node's clock would give its own) and names the rendezvous too. The run directory
# (runs/<run_name>, or hydra.run.dir=...) must be on a filesystem that every node sees: all ranks write their
# checkpoint shards into it. Other settings as in launch/run.sh (NGPU, PORT, SHUTDOWN_TIMEOUT, PYTHON, DRY_RUN).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nnodes="${NNODES:-}"
master="${MASTER_ADDR:-}"
named=0
for word in "$@"; do
    case "$word" in
        NNODES=*) nnodes="${word#NNODES=}" ;;
        MASTER_ADDR=*) master="${word#MASTER_ADDR=}" ;;
        run_name=*|+run_name=*) named=1 ;;
    esac
done
[[ -n "$nnodes" ]] || { echo "launch/multinode.sh: set NNODES=<number of nodes>" >&2; exit 2; }
[[ -n "$master" ]] || { echo "launch/multinode.sh: set MASTER_ADDR=<rendezvous host, e.g. node 0>" >&2; exit 2; }
[[ "$named" == 1 ]] || { echo "launch/multinode.sh: pass run_name=... (the same on every node)" >&2; exit 2; }
# NNODES=1 still goes through the rendezvous, which is what a one-node Slurm job of this script wants.
NNODES="$nnodes" MASTER_ADDR="$master" RDZV=1 exec bash "$here/run.sh" "$@"
