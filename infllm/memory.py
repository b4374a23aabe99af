"""Memory options for long rows, applied once to the built model (Trainer.build, after gradient checkpointing):

    apply_memory_options(model, cfg.trainer)   # trainer.loss, trainer.tiled_mlp, trainer.activation_offload

- trainer.loss (infllm/loss.py): the loss from the hidden states, without the [tokens, vocab] logits.
- trainer.tiled_mlp: DeepSpeed's TiledMLP on every decoder layer's MLP: the MLP runs over sequence tiles of
  `hidden_size` tokens and recomputes each tile in the backward, so its [tokens, intermediate] activations
  exist for one tile at a time (at 256k tokens, Llama-3-8B's 4 of them are 28 GiB).
- trainer.activation_offload: tensors saved for the backward by the decoder (with non-reentrant gradient
  checkpointing: each layer's input, kept to recompute the layer) are copied to pinned host memory in the
  forward and back in the backward. Host memory for device memory: the residual stream of every layer
  (T x hidden in fp32) leaves the GPU.
- trainer.checkpoint_keep (with trainer.gradient_checkpointing; `enable_gradient_checkpointing`): what a
  checkpointed layer keeps from its forward, so that the backward's recompute skips it (torch's selective
  activation checkpointing, by operator): `selection` InfLLM-V2's block selection (the `infllm::infllm_v2_select`
  op: int32 [H_kv, T, k_eff] a layer, no gradient, the same ids either way), `attention` also the attention
  forward's outputs (our kernels' op, SDPA's, torch's varlen and flash-attn's ops: [T, H_q, d] + the
  log-sum-exp a layer), `none` recomputes everything, `auto` (the default) is `selection` where the Triton
  selection runs and `none` elsewhere or with activation offload: what is kept stays on the GPU (offload moves
  only the layer inputs), and the selection is int32 [H_kv, T, k_eff] a layer (1.5 GiB at 512k tokens for
  Llama-3.2-1B's shape), which offload would leave there.

Each option changes where or when things are computed, never what: loss and gradients equal the option off
(tests/test_memory.py).
"""
from __future__ import annotations

import functools
import logging
import weakref
from typing import Dict, Optional

import torch
from torch import nn

from infllm.loss import apply_loss

log = logging.getLogger(__name__)

# Saved tensors smaller than this stay where they are (positions, masks, norms' statistics): not worth a copy.
OFFLOAD_MIN_BYTES = 1 << 20


# Operators (schema names) whose outputs trainer.checkpoint_keep keeps. The attention forwards are those the dense
# and sparse paths reach: ours (the Triton kernels' op, also the dense mode), SDPA's CUDA and CPU kernels, torch's
# varlen attention, flash-attn's ops. A name missing from a torch build simply never matches.
_SELECTION_OPS = ("infllm::infllm_v2_select",)
_ATTENTION_OPS = _SELECTION_OPS + (
    "infllm::block_sparse_attn_fwd",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward", "aten::_cudnn_attention_forward",
    "torch_attn::_varlen_attn", "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
)
KEPT_OPS = {"none": (), "selection": _SELECTION_OPS, "attention": _ATTENTION_OPS}


def resolve_checkpoint_keep(trainer_cfg, attn_cfg=None, device_type: Optional[str] = None) -> str:
    """trainer.checkpoint_keep with `auto` resolved: `selection` where InfLLM-V2's Triton selection runs (given
    `attn_cfg` and `device_type`: attention.name infllm_v2 with impl triton, or auto on CUDA), `none` elsewhere
    (nothing to keep: no dispatch mode for nothing) and whenever activation offload is on."""
    keep = trainer_cfg.checkpoint_keep
    if keep != "auto":
        return keep
    if getattr(trainer_cfg, "activation_offload", False):
        return "none"
    if attn_cfg is not None:
        impl = getattr(attn_cfg, "impl", "auto")
        # The kernels' own dispatch rule (kernels._use_triton), decided from the run's device before any tensor.
        triton = impl == "triton" or (impl == "auto" and device_type == "cuda")
        if getattr(attn_cfg, "name", None) != "infllm_v2" or not triton:
            return "none"
    return "selection"


def checkpoint_context_fn(keep: str):
    """The `context_fn` of torch.utils.checkpoint (non-reentrant) that keeps the outputs of the operators of
    `keep` (KEPT_OPS) from the forward and recomputes the rest; None for `none` (plain checkpointing)."""
    if keep not in KEPT_OPS:
        raise ValueError(f"trainer.checkpoint_keep: expected one of {sorted(KEPT_OPS)}, got {keep!r}")
    names = frozenset(KEPT_OPS[keep])
    if not names:
        return None
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        schema = getattr(op, "_schema", None)
        return CheckpointPolicy.MUST_SAVE if schema is not None and schema.name in names \
            else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def enable_gradient_checkpointing(model: nn.Module, trainer_cfg, attn_cfg=None, device_type: Optional[str] = None
                                  ) -> None:
    """Non-reentrant gradient checkpointing of every decoder layer, keeping what trainer.checkpoint_keep names
    (`auto` resolved by `resolve_checkpoint_keep`)."""
    kwargs = {"use_reentrant": False}
    context_fn = checkpoint_context_fn(resolve_checkpoint_keep(trainer_cfg, attn_cfg, device_type))
    if context_fn is not None:
        kwargs["context_fn"] = context_fn
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def recomputed_selections(trainer_cfg, attn_cfg=None, device_type: Optional[str] = None) -> int:
    """How many times a training step runs each layer's block selection: twice under gradient checkpointing
    that keeps nothing (forward and recompute), else once."""
    keep = resolve_checkpoint_keep(trainer_cfg, attn_cfg, device_type)
    return 2 if trainer_cfg.gradient_checkpointing and keep == "none" else 1


def decoder_layers(model: nn.Module):
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected get_decoder().layers)")
    return layers


def _tiled_forward(mlp: nn.Module, own_forward, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    if not torch.is_grad_enabled() or x.dim() < 2:
        return own_forward(x)
    tile = mlp._infllm_tile_tokens
    shards = max(1, -(-x.shape[-2] // tile))
    if shards == 1:
        return own_forward(x)
    # TiledMLP recomputes each tile inside its backward, which the autograd engine runs outside any autocast:
    # the tile function carries the autocast state of the forward, so the recompute is the same computation.
    dev = x.device.type
    enabled = torch.is_autocast_enabled(dev)
    dtype = torch.get_autocast_dtype(dev)

    def tile_fn(_, x_tile):
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            return own_forward(x_tile)

    # Every rank sees rows of the same length (trainer.seq_len), so all agree on `shards` without a collective
    # (ZeRO-3 gathers the weights once per tile: the counts must match across ranks).
    return TiledMLP.apply(tile_fn, mlp, x, shards, [p for p in mlp.parameters() if p.requires_grad])


def apply_tiled_mlp(model: nn.Module, tile_tokens: Optional[int] = None) -> int:
    """Wrap every decoder layer's MLP in DeepSpeed's TiledMLP; tiles of `tile_tokens` tokens (default: the
    hidden size, as DeepSpeed's ALST). Returns the number of MLPs wrapped; idempotent."""
    tile = int(tile_tokens or model.config.hidden_size)
    n = 0
    for layer in decoder_layers(model):
        mlp = layer.mlp
        mlp._infllm_tile_tokens = tile
        if not getattr(mlp, "_infllm_tiled", False):
            mlp.forward = functools.partial(_tiled_forward, mlp, type(mlp).forward.__get__(mlp))
            mlp._infllm_tiled = True
        n += 1
    return n


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of at least `min_bytes` (parameters excepted) go to pinned host memory when saved and come
    back when the backward unpacks them. Copies are queued on the current stream, which orders them against
    the compute that produced and the compute that reads them. A tensor saved twice (a norm's input) is copied
    once. Counts what it moved (`stats`)."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES, stats: Optional[Dict[str, int]] = None):
        self.min_bytes = min_bytes
        self.stats = stats if stats is not None else {"tensors": 0, "bytes": 0}
        # (data_ptr, dtype, shape, stride) -> (weakref to the device tensor, host copy): a live weakref means the
        # very same tensor, whose memory no other tensor can hold meanwhile.
        self._copies: Dict[tuple, tuple] = {}
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes or t.layout != torch.strided:
            return t
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        seen = self._copies.get(key)
        if seen is not None and seen[0]() is t:
            return (t.device, seen[1])
        pin = t.device.type == "cuda"
        host = torch.empty(t.size(), dtype=t.dtype, pin_memory=pin)
        host.copy_(t, non_blocking=pin)
        self._copies[key] = (weakref.ref(t), host)
        self.stats["tensors"] += 1
        self.stats["bytes"] += host.numel() * host.element_size()
        return (t.device, host)

    def __exit__(self, *exc):
        # The table only serves the packing inside the block. The hooks hold a bound method of self (a reference
        # cycle), so a table kept past the block would hold every forward's host copies until Python's cycle
        # collector ran, rather than letting them go with the autograd graph after the backward: pinned host
        # memory grew by one step's offload per step (a host OOM after 7 steps of 8 layers at 256k tokens).
        self._copies.clear()
        return super().__exit__(*exc)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=device.type == "cuda")


def _offloaded_forward(module: nn.Module, own_forward, *args, **kwargs):
    if not (module.training and torch.is_grad_enabled()):
        return own_forward(*args, **kwargs)
    with HostOffload(module._infllm_offload_min_bytes, module._infllm_offload_stats):
        return own_forward(*args, **kwargs)


def apply_activation_offload(model: nn.Module, min_bytes: int = OFFLOAD_MIN_BYTES) -> Dict[str, int]:
    """Offload what the decoder saves for the backward (training only) to host memory. Returns the counters
    (tensors, bytes moved so far), which the caller may read or reset; idempotent (a later call only sets
    min_bytes)."""
    decoder = model.get_decoder()
    decoder._infllm_offload_min_bytes = min_bytes
    if not getattr(decoder, "_infllm_offload", False):
        decoder._infllm_offload_stats = {"tensors": 0, "bytes": 0}
        decoder.forward = functools.partial(_offloaded_forward, decoder, type(decoder).forward.__get__(decoder))
        decoder._infllm_offload = True
    return decoder._infllm_offload_stats


def apply_memory_options(model: nn.Module, trainer_cfg, device_type: Optional[str] = None) -> Dict[str, object]:
    """trainer.loss, trainer.tiled_mlp and trainer.activation_offload on `model` (before the engine wraps it).
    Returns what was applied, for the log."""
    applied: Dict[str, object] = {"loss": apply_loss(model, trainer_cfg, device_type)}
    if trainer_cfg.tiled_mlp:
        applied["tiled_mlp"] = apply_tiled_mlp(model)
    if trainer_cfg.activation_offload:
        if not trainer_cfg.gradient_checkpointing:
            log.warning("trainer.activation_offload without trainer.gradient_checkpointing: every activation of "
                        "every layer goes to host memory and back (slow); enable gradient checkpointing")
        apply_activation_offload(model)
        applied["activation_offload"] = True
    log.info("memory options: %s", applied)
    return applied
