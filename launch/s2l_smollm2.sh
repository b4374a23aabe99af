#!/usr/bin/env bash
# The short-to-long experiment on the embedded SmolLM2-135M (8k native) -> 32k, every arm with one command:
#   launch/s2l_smollm2.sh                   # one GPU: the arms one after another
#   GPUS="0 1" launch/s2l_smollm2.sh        # two GPUs: dense arm on the first, InfLLM-V2 arm + baselines on the second
# Arms (launch/LOG.md has the table):
#   base        no continued training, native RoPE (theta 1e5)
#   base_theta  no continued training, RoPE theta 1e6 (the trained arms' RoPE)
#   base_yarn   no continued training, YaRN x4
#   dense       experiment=s2l_dense  (dense continued training at 32k)
#   sparse      experiment=s2l_sparse (InfLLM-V2 continued training at 32k)
# Each arm is evaluated with eval=s2l at 8k / 16k / 32k in dense mode and in InfLLM-V2 sparse mode
# (attention=infllm_v2_smollm2), then launch/s2l_table.py prints the markdown table (quality and cost).
# Settings (environment): PYTHON (default .venv/bin/python or python3), ROOT (runs/s2l), GPUS (default "0"),
# TRAIN_ARGS / EVAL_ARGS (extra Hydra overrides for every training / eval run), VARIANTS (more InfLLM-V2 arms,
# "NAME:override,override NAME2:..." -> arm sparse_NAME, e.g. VARIANTS="k64:attention.topk=56"), ONLY_VARIANTS=1 to
# train and evaluate just those (the other arms of an earlier run stay in the table), V1=1 to add the training-free
# InfLLM (v1) passkey baseline (bench/infllm_v1_longctx.py). A finished step is skipped on a re-run, a
# training run that was cut resumes from its last checkpoint (checkpoint.resume=auto).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/s2l_env.sh"
ROOT="${ROOT:-runs/s2l}"
mkdir -p "$ROOT/logs"

train() {  # train ARM GPU [EXPERIMENT [overrides...]]
    local arm=$1 gpu=$2 experiment=${3:-s2l_$1}; shift 2; (( $# )) && shift
    if [[ -f "$ROOT/$arm/final/config.json" ]]; then echo "[s2l] $arm: trained already"; return; fi
    echo "[s2l] $arm: training on GPU $gpu ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" train.py experiment="$experiment" run_name="s2l_$arm" \
        hydra.run.dir="$ROOT/$arm" trainer.progress_bar=false "$@" "${train_args[@]}" > "$ROOT/logs/train_$arm.log" 2>&1
}

evaluate() {  # evaluate ARM GPU [overrides...]
    local arm=$1 gpu=$2; shift 2
    local out="$ROOT/eval/$arm"
    if [[ -f "$out/.done" ]]; then echo "[s2l] eval $arm: done already"; return; fi
    echo "[s2l] eval $arm on GPU $gpu ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" eval.py eval=s2l attention=infllm_v2_smollm2 run_name="s2l_eval_$arm" \
        hydra.run.dir="$ROOT/eval_logs/$arm" eval.out_dir="$out" "$@" "${eval_args[@]}" > "$ROOT/logs/eval_$arm.log" 2>&1
    touch "$out/.done"
}

v1_baseline() {  # the training-free InfLLM (v1) context memory on passkey / niah_single
    local gpu=$1
    [[ "${V1:-0}" == 1 ]] || return 0
    echo "[s2l] InfLLM (v1) baseline on GPU $gpu ($(date +%T))"
    CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" bench/infllm_v1_longctx.py --attention infllm_v1_small \
        --lengths 8192 16384 32768 --tasks passkey niah_single --depths 0.1 0.3 0.5 0.7 0.9 --samples 1 \
        --device cuda --scoring teacher_forced --out "$ROOT/eval/v1" > "$ROOT/logs/v1.log" 2>&1
}

dense_lane() {
    local gpu=$1
    train dense "$gpu"
    evaluate dense "$gpu" eval.checkpoint="$ROOT/dense"
}

sparse_lane() {
    local gpu=$1
    train sparse "$gpu"
    evaluate sparse "$gpu" eval.checkpoint="$ROOT/sparse"
}

variant_lane() {  # variant_lane GPU NAME:override,override ...
    local gpu=$1 spec name; shift
    for spec in "$@"; do
        name=${spec%%:*}
        IFS=, read -r -a ovr <<< "${spec#*:}"
        train "sparse_$name" "$gpu" s2l_sparse "${ovr[@]}"
        evaluate "sparse_$name" "$gpu" eval.checkpoint="$ROOT/sparse_$name"
    done
}

base_lane() {
    local gpu=$1
    evaluate base "$gpu"
    evaluate base_theta "$gpu" model.rope_theta=1000000.0
    evaluate base_yarn "$gpu" model.rope_scaling.type=yarn model.rope_scaling.factor=4.0
    v1_baseline "$gpu"
}

read -r -a variants <<< "${VARIANTS:-}"
if [[ "${ONLY_VARIANTS:-0}" == 1 ]]; then
    # one variant per GPU, round robin
    pids=()
    for i in "${!gpus[@]}"; do
        mine=()
        for j in "${!variants[@]}"; do (( j % ${#gpus[@]} == i )) && mine+=("${variants[$j]}"); done
        (( ${#mine[@]} )) && { variant_lane "${gpus[$i]}" "${mine[@]}" & pids+=($!); }
    done
    status=0
    for p in "${pids[@]}"; do wait "$p" || status=$?; done
    (( status == 0 )) || { echo "[s2l] a lane failed (logs in $ROOT/logs)" >&2; exit "$status"; }
elif (( ${#gpus[@]} >= 2 )); then
    dense_lane "${gpus[0]}" & pid_dense=$!
    { sparse_lane "${gpus[1]}"; variant_lane "${gpus[1]}" "${variants[@]}"; base_lane "${gpus[1]}"; } & pid_sparse=$!
    status=0
    wait "$pid_dense" || status=$?
    wait "$pid_sparse" || status=$?
    (( status == 0 )) || { echo "[s2l] a lane failed (logs in $ROOT/logs)" >&2; exit "$status"; }
else
    sparse_lane "${gpus[0]}"
    dense_lane "${gpus[0]}"
    variant_lane "${gpus[0]}" "${variants[@]}"
    base_lane "${gpus[0]}"
fi
"$PYTHON" launch/s2l_table.py "$ROOT" | tee "$ROOT/table.md"
