#!/usr/bin/env bash
# Distributed training on one node: torchrun starts one train.py process per GPU (gloo processes on a CPU).
#   launch/run.sh NGPU=8 parallel=zero2 experiment=long_32k
#   launch/run.sh NGPU=2 parallel=zero3 experiment=long_32k run_name=smol_32k checkpoint.resume=auto
#
# UPPERCASE KEY=VALUE words are launcher settings; every other word goes to train.py as a Hydra override.
#   NGPU              processes on this node (default: the visible GPUs, 1 without a GPU)
#   NNODES, MASTER_ADDR, PORT, RDZV   several nodes: see launch/multinode.sh, which sets these
#   SHUTDOWN_TIMEOUT  seconds the processes get to finish their step and checkpoint after SIGTERM / SIGUSR1
#                     before torchrun kills them (default 300), when torchrun itself is signalled
# Exit status: 0 done (final/ written), 75 stopped by a signal after every rank saved its checkpoint (resume
# with the command the run printed), anything else a failure.
#   PYTHON            interpreter (default: the repository's .venv if there is one, else python3)
#   DRY_RUN=1         print the command only
# Without run_name=..., one timestamp is chosen here, so that every rank writes into the same run directory
# (runs/<run_name>). Without parallel=..., more than one process means parallel=zero2.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NGPU="${NGPU:-}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-}"
PORT="${PORT:-29500}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-300}"
PYTHON="${PYTHON:-}"
DRY_RUN="${DRY_RUN:-0}"
RDZV="${RDZV:-0}"

overrides=()
for word in "$@"; do
    if [[ "$word" =~ ^(NGPU|NNODES|MASTER_ADDR|PORT|SHUTDOWN_TIMEOUT|PYTHON|DRY_RUN|RDZV)=(.*)$ ]]; then
        printf -v "${BASH_REMATCH[1]}" '%s' "${BASH_REMATCH[2]}"
    elif [[ "$word" =~ ^[A-Z][A-Z0-9_]*= ]]; then
        echo "launch/run.sh: unknown launcher setting '${word%%=*}' (known: NGPU NNODES MASTER_ADDR PORT" \
             "RDZV SHUTDOWN_TIMEOUT PYTHON DRY_RUN); Hydra overrides are lower-case" >&2
        exit 2
    else
        overrides+=("$word")
    fi
done

if [[ -z "$PYTHON" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "$NGPU" ]]; then
    NGPU="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || NGPU=1
fi
[[ "$NGPU" =~ ^[1-9][0-9]*$ ]] || { echo "launch/run.sh: NGPU must be a positive integer, got '$NGPU'" >&2; exit 2; }
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || { echo "launch/run.sh: NNODES must be a positive integer" >&2; exit 2; }

has_override() {  # has_override KEY: is KEY=... among the Hydra overrides?
    local o
    for o in "${overrides[@]+"${overrides[@]}"}"; do [[ "$o" == "$1="* || "$o" == "+$1="* ]] && return 0; done
    return 1
}
if ! has_override run_name; then
    if [[ "$NNODES" -gt 1 || "$RDZV" == 1 ]]; then
        echo "launch/run.sh: several nodes need one explicit run_name=... (each node's clock gives its own)" >&2
        exit 2
    fi
    overrides+=("run_name=$(date +%Y-%m-%d_%H-%M-%S)")
fi
if [[ $((NGPU * NNODES)) -gt 1 ]] && ! has_override parallel; then
    overrides+=("parallel=zero2")
fi

# CPU threads per process: the node's cores shared by its processes (torchrun would set 1), so that the
# optimizer step on CPU (offload) and the data loader are not single-threaded.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || echo 1)"
    export OMP_NUM_THREADS=$(( cores / NGPU > 0 ? cores / NGPU : 1 ))
fi
# torchrun forwards these signals to the processes, which finish their step and checkpoint; Slurm's
# pre-emption warning is SIGUSR1 (launch/slurm.sbatch). Environment variables, which older torchruns ignore.
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT"
export PYTHONUNBUFFERED=1

cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node="$NGPU")
if [[ "$NNODES" -gt 1 || "$RDZV" == 1 ]]; then
    if [[ -z "$MASTER_ADDR" ]]; then
        echo "launch/run.sh: NNODES>1 needs MASTER_ADDR (see launch/multinode.sh)" >&2
        exit 2
    fi
    # c10d rendezvous: every node runs this same command; the id keeps concurrent jobs apart.
    run_id="$(printf '%s\n' "${overrides[@]}" | sed -n 's/^+\{0,1\}run_name=//p' | tail -n 1)"
    run_id="$(printf '%s' "$run_id" | tr -c 'A-Za-z0-9_.-' '_')"
    cmd+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$PORT" --rdzv-id="$run_id")
else
    cmd+=(--standalone)
fi
cmd+=("$repo/train.py" "${overrides[@]}")

echo "+ OMP_NUM_THREADS=$OMP_NUM_THREADS ${cmd[*]}" >&2
[[ "$DRY_RUN" == 1 ]] && exit 0

# Stopping (Ctrl-C, SIGTERM, SIGUSR1, SIGHUP) ends with the status a single `python train.py` gives, 75
# ("stopped, resumable"; README, "Exit status"), without a traceback. torchrun runs in its own session, so that
# neither it nor the training processes see a terminal's Ctrl-C; this script passes the signal to the training
# processes only (torchrun's children). They finish the step, save the checkpoint together, rank 0 writes the
# resume command into the marker file, and each exits 0 (INFLLM_STOP_EXIT_CODE), which torchrun takes as a
# clean end; a second Ctrl-C aborts them at once.
stop_marker="$(mktemp "${TMPDIR:-/tmp}/infllm-stop.XXXXXX")"
trap 'rm -f "$stop_marker"' EXIT
export INFLLM_STOP_MARKER="$stop_marker" INFLLM_STOP_EXIT_CODE=0
if command -v setsid >/dev/null; then setsid "${cmd[@]}" & else "${cmd[@]}" & fi
torchrun_pid=$!
interrupted=0
forward() {
    interrupted=1
    pkill "-$1" -P "$torchrun_pid" 2>/dev/null || kill "-$1" "$torchrun_pid" 2>/dev/null || true
}
for sig in INT TERM USR1 HUP; do trap "forward $sig" "$sig"; done
# `wait` returns when a trapped signal arrives; wait again for the processes (saving their checkpoint).
while :; do
    wait "$torchrun_pid" && status=0 || status=$?
    if [[ "$interrupted" == 1 ]]; then interrupted=0; continue; fi
    break
done
if [[ "$status" == 0 && -s "$stop_marker" ]]; then
    exit 75
fi
exit "$status"
