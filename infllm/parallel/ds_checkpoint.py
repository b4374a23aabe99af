"""DeepSpeed checkpoints read without unpickling arbitrary objects: `torch.load(weights_only=True)` allowing only
the few DeepSpeed classes its checkpoints hold."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch


def safe_deepspeed_globals() -> List[Any]:
    """The non-tensor classes DeepSpeed 0.19 puts into its checkpoints (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` for ZeRO-1/2/3, fp32 and bf16, with and without
    offload): the loss scaler, the ZeRO stage enum, and the fragment addresses of the ZeRO-1/2 optimizer state.
    Everything else is tensors, numbers, strings and containers, which `weights_only=True` reads by itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(base_engine):
    """A DeepSpeed checkpoint engine whose `load` is `torch.load(weights_only=True)` with only DeepSpeed's own
    checkpoint classes allowed; saving is DeepSpeed's. `preload` reads a file ahead of DeepSpeed (which then
    gets the same object), so that a rank that cannot read its part is known before any collective."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, base):
            self.__dict__.update(base.__dict__)
            self.preloaded: Dict[str, Any] = {}

        def preload(self, path: str) -> None:
            self.preloaded[os.path.realpath(path)] = self._read(path, "cpu")

        def load(self, path: str, map_location=None):
            if os.path.realpath(path) in self.preloaded:
                return self.preloaded.pop(os.path.realpath(path))
            return self._read(path, map_location)

        @staticmethod
        def _read(path: str, map_location):
            with torch.serialization.safe_globals(safe_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(base_engine)
