"""ZeRO-3: the model built already partitioned over the ranks (deepspeed.zero.Init, entered through
transformers' HfDeepSpeedConfig), so that no rank ever holds all of its weights."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import torch

from infllm.parallel.ds_config import is_zero3


class ZeroInit:
    """The zero.Init hook of `infllm.model.load_model` (ZeRO-3 with parallel.zero_init): models that transformers
    builds within `building()` are partitioned over the ranks as they are constructed (transformers enters
    `deepspeed.zero.Init` itself when an HfDeepSpeedConfig of stage 3 is alive). Collective: every rank builds
    the same model.

    transformers holds the HfDeepSpeedConfig by a weak reference only; this object keeps it alive. ZeRO-3 is
    visible to transformers only within `building()`: before it (the embedded GGUF conversion, the tokenizer, a
    random model's full draw) and after it (the rank-0 eval, `generate` included, which would otherwise wait for
    the other ranks at every token) models are plain."""

    def __init__(self, ds_config: Dict[str, Any], device: torch.device):
        if not is_zero3(ds_config):
            raise ValueError("ZeroInit needs a ZeRO stage 3 DeepSpeed config")
        self.ds_config = ds_config
        self.device = device
        self.hf_config = None

    @property
    def used(self) -> bool:
        """Whether a model was built within `building()`."""
        return self.hf_config is not None

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """transformers' `from_pretrained` / `from_config` build partitioned models within. RNG-neutral: the
        torch RNG leaves as it came, whatever the construction drew (rank 0 alone initialises weights there)."""
        from transformers.integrations import HfDeepSpeedConfig, set_hf_deepspeed_config, \
            unset_hf_deepspeed_config

        if self.hf_config is None:
            self.hf_config = HfDeepSpeedConfig(self.ds_config)  # registers itself
        set_hf_deepspeed_config(self.hf_config)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                yield
        finally:
            unset_hf_deepspeed_config()

    @staticmethod
    def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
        """Copy the full model `src` (the same on every rank) into its partitioned twin `dst`, one module's
        parameters gathered at a time; rank 0's copy is broadcast. Collective."""
        import deepspeed
        import torch.distributed as dist

        full = dict(src.named_parameters(remove_duplicate=False))
        rank0 = dist.get_rank() == 0
        with torch.no_grad():
            for mod_name, module in dst.named_modules():
                named = list(module.named_parameters(recurse=False))
                if not named:
                    continue
                with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
                    if rank0:
                        for name, param in named:
                            param.data.copy_(full[f"{mod_name}.{name}" if mod_name else name].data)
            buffers = dict(src.named_buffers())
            for name, buf in dst.named_buffers():  # never partitioned: copied whole
                if name in buffers and buffers[name].shape == buf.shape:
                    buf.copy_(buffers[name])


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full data is not on this rank now (only its `ds_tensor` partition is)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return hasattr(param, "ds_id") and param.ds_status == ZeroParamStatus.NOT_AVAILABLE
