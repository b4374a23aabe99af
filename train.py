"""Continued training entry point: compose the config -> build model, data, engine -> fit.

    python train.py                                  # embedded default (SmolLM2 + InfLLM-V2, see conf/)
    python train.py experiment=debug                 # tiny random model, seconds
    python train.py model.path=/my/model experiment=long_32k run_name=my_run checkpoint.resume=auto
    launch/run.sh NGPU=8 parallel=zero2 experiment=long_32k     # distributed (see launch/README.md)
"""
import logging
import sys

import hydra
from omegaconf import DictConfig

from infllm.config import to_object
from infllm.parallel import launcher_argv
from infllm.trainer import Trainer, stop_exit_code


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_object(dcfg)
    logging.getLogger(__name__).info("run directory: %s", cfg.output_dir)
    trainer = Trainer.build(cfg)
    trainer.argv = sys.argv
    trainer.fit()
    if trainer.stopped:
        # Stopped by a signal, checkpoint saved: "stopped, resumable" (75), not success (README, "Exit status").
        sys.exit(stop_exit_code())


if __name__ == "__main__":
    sys.argv = launcher_argv(sys.argv)  # launchers' --local_rank; Hydra's files written by rank 0 only
    main()
