#!/usr/bin/env bash
# Issue 16's experiment: SmolLM2-135M (8k native) -> 32k on real long prose (data=prose_mix), a dense arm and an
# InfLLM-V2 arm on the same data and steps, each evaluated every 100 steps in dense and sparse mode (RULER needles,
# teacher-forced needles, perplexity by position), plus the untrained model (RoPE theta 1e6) as step 0. Then the
# retention-vs-tokens table and plot (launch/s2l_retention.py).
#   launch/s2l_prose.sh                        # one GPU: both arms side by side on it (a 135M model leaves most
#                                              # of an H200 idle), the base eval beside them
#   GPUS="0 1" launch/s2l_prose.sh             # two GPUs: one arm each
#   TRAIN_TIMEOUT=500 launch/s2l_prose.sh      # stop the arms (SIGTERM: checkpoint, exit 75) after 500 s;
#                                              # the same command again resumes them where they stopped
# Settings: PYTHON, ROOT (runs/s2l_prose), GPUS, TRAIN_ARGS / EVAL_ARGS (extra Hydra overrides), TRAIN_TIMEOUT.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/s2l_env.sh"
ROOT="${ROOT:-runs/s2l_prose}"
limit=()
[[ -n "${TRAIN_TIMEOUT:-}" ]] && limit=(timeout -s TERM -k 90 "$TRAIN_TIMEOUT")
mkdir -p "$ROOT/logs"

train() {  # train ARM GPU: 0 = finished, 75 = stopped and resumable, else failed
    local arm=$1 gpu=$2 rc=0
    if [[ -f "$ROOT/$arm/final/config.json" ]]; then echo "[s2l_prose] $arm: trained already"; return 0; fi
    echo "[s2l_prose] $arm: training on GPU $gpu ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpu "${limit[@]}" "$PYTHON" train.py experiment="s2l_prose_$arm" run_name="s2l_prose_$arm" \
        hydra.run.dir="$ROOT/$arm" trainer.progress_bar=false "${train_args[@]}" >> "$ROOT/logs/train_$arm.log" 2>&1 \
        || rc=$?
    if (( rc == 75 || rc == 124 )); then
        echo "[s2l_prose] $arm: stopped at its time limit, resumable ($(date +%T))"; return 75
    fi
    (( rc == 0 )) && echo "[s2l_prose] $arm: done ($(date +%T))"
    return "$rc"
}

base_eval() {  # the untrained model with the trained arms' RoPE, through the same eval
    local gpu=$1 out="$ROOT/base/eval/step_00000000"
    if [[ -f "$out/.done" ]]; then echo "[s2l_prose] base eval: done already"; return 0; fi
    echo "[s2l_prose] base eval on GPU $gpu ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" eval.py experiment=s2l_prose_sparse run_name=s2l_prose_base \
        hydra.run.dir="$ROOT/eval_logs/base" eval.out_dir="$out" "${eval_args[@]}" > "$ROOT/logs/eval_base.log" 2>&1
    touch "$out/.done"
}

train dense "${gpus[0]}" & pid_dense=$!
train sparse "${gpus[-1]}" & pid_sparse=$!
base_eval "${gpus[-1]}" & pid_base=$!
status=0
for p in $pid_dense $pid_sparse $pid_base; do
    rc=0; wait "$p" || rc=$?
    (( rc == 0 || rc == 75 )) || status=$rc
    (( rc == 75 && status == 0 )) && status=75
done
"$PYTHON" launch/s2l_retention.py "$ROOT" || true
exit "$status"
