# Sourced by the short-to-long launchers (launch/s2l_smollm2.sh, launch/s2l_prose.sh): the repository root as
# working directory, PYTHON (default .venv/bin/python, else python3), and the settings GPUS (default "0"),
# TRAIN_ARGS and EVAL_ARGS as the arrays gpus, train_args and eval_args.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a gpus <<< "${GPUS:-0}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
