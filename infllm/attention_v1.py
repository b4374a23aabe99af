"""InfLLM (v1) training-free context memory inside Hugging Face decoders: eval and generation only.

InfLLM needs the keys before RoPE and its own positions (memory tokens sit at one fixed distance from every
query), while transformers applies RoPE before it calls a registered attention function. So instead of the
AttentionInterface, `apply_infllm_v1` replaces the forward of each decoder layer's self-attention module with
`v1_self_attention_forward`, which runs the module's own projections (q_proj / k_proj / v_proj, the optional
per-head q_norm / k_norm of Qwen3, o_proj), keeps q / k / v before RoPE, and calls
`kernels.infllm_v1.infllm_v1_attn` with the model's RoPE (`inv_freq` and `attention_scaling` of
`model.model.rotary_emb`, read at every call so dynamic RoPE types stay right). Parameters are untouched.

The KV cache: HF's cache (when the model uses one: generation, or any forward with use_cache=True) stores the
keys *before* RoPE; the retrieval state (`ContextMemory`: per-token attention scores, representative keys) is
attached to the same cache object, per layer. So `model.generate` works unchanged: the prompt is prefilled in
chunks of exc_block_size, then every new token is one chunk of one query. Without a cache every forward is a
fresh sequence.

Supported: causal decoders whose attention is LlamaAttention, MistralAttention (no sliding window),
Qwen2Attention or Qwen3Attention; batch size 1; positions 0, 1, 2, ... continuing the cache (no packed
documents, no padding). Refused with an error: training (module.training with grad enabled: InfLLM is
training-free by design), other architectures, sliding-window / softcapping / attention-dropout configs,
batch size > 1, a custom attention mask, output_attentions.
"""
from __future__ import annotations

import dataclasses
import logging
import types
from typing import Any, Dict, List, Optional, Tuple

import torch

from infllm.config import AttentionConfig, ConfigError, InfLLMv1Config
from kernels.infllm_v1 import ContextMemory, infllm_v1_attn

log = logging.getLogger(__name__)

ATTN_V1 = "infllm_v1"
SUPPORTED_ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")

_RUNTIME_ATTR = "_infllm_v1"
_CACHE_ATTR = "_infllm_v1_memory"


class _V1Runtime:
    """Shared by all patched layers of one model: the v1 settings and the model's rotary embedding (kept in a
    plain object so it is not registered as a second parent of the rotary module)."""

    def __init__(self, cfg: InfLLMv1Config, rotary_emb: torch.nn.Module) -> None:
        self.cfg = cfg
        self.rotary_emb = rotary_emb

    def kernel_kwargs(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.cfg)


def _v1_config(attn_cfg: AttentionConfig | InfLLMv1Config | Dict[str, Any]) -> InfLLMv1Config:
    if isinstance(attn_cfg, InfLLMv1Config):
        return attn_cfg
    if isinstance(attn_cfg, dict):
        attn_cfg = AttentionConfig(**attn_cfg)
    if attn_cfg.name != ATTN_V1:
        raise ConfigError(f"attention.name: apply_infllm_v1 needs name=infllm_v1, got {attn_cfg.name!r}")
    v1 = attn_cfg.v1
    if isinstance(v1, dict):
        unknown = sorted(set(v1) - {f.name for f in dataclasses.fields(InfLLMv1Config)})
        if unknown:
            raise ConfigError(f"attention.v1: unknown field(s) {unknown}; expected any of "
                              f"{[f.name for f in dataclasses.fields(InfLLMv1Config)]}")
        v1 = InfLLMv1Config(**v1)
    return v1


def _decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers"):
        raise ConfigError(f"attention.name: infllm_v1 needs a causal LM with .model.layers (Llama / Mistral / Qwen2 / "
                          f"Qwen3 style); {type(model).__name__} has none")
    return decoder


def check_v1_supported(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The self-attention modules to patch; raises ConfigError naming what is unsupported."""
    decoder = _decoder_of(model)
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq") or not hasattr(rotary, "attention_scaling"):
        raise ConfigError(f"attention.name: infllm_v1 reads RoPE from model.model.rotary_emb (inv_freq, "
                          f"attention_scaling); {type(model).__name__} has no such module")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError("attention.name: infllm_v1 supports causal decoders only, not encoder-decoder models")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"attention.name: infllm_v1 replaces full attention only; config.layer_types has "
                          f"{sorted(set(layer_types))}")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise ConfigError(f"attention.name: infllm_v1 does not combine with sliding-window attention "
                          f"(config.sliding_window={config.sliding_window}); set it to null if the checkpoint does "
                          "not need it")
    if getattr(config, "attention_dropout", 0.0):
        raise ConfigError(f"attention.name: infllm_v1 needs config.attention_dropout=0, got {config.attention_dropout}")
    modules = []
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        name = type(attn).__name__
        if name not in SUPPORTED_ATTENTION_CLASSES:
            raise ConfigError(f"attention.name: infllm_v1 supports the attention modules {SUPPORTED_ATTENTION_CLASSES}; "
                              f"layer {i} of {type(model).__name__} has {name}")
        if getattr(attn, "sliding_window", None) is not None:
            raise ConfigError(f"attention.name: infllm_v1: layer {i} uses sliding-window attention "
                              f"(sliding_window={attn.sliding_window}), which it does not support")
        modules.append(attn)
    return modules


def _refuse_v1_call(*args: Any, **kwargs: Any):
    raise RuntimeError("the 'infllm_v1' attention function is a placeholder: InfLLM (v1) runs inside the patched "
                       "self-attention forward (infllm.attention_v1.apply_infllm_v1), never through transformers' "
                       "AttentionInterface")


def _register() -> None:
    # Registered with AttentionInterface only (not with the mask interface), so that transformers builds no
    # attention mask at all for this implementation: the patched forward never reads one.
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_V1, _refuse_v1_call)


def apply_infllm_v1(model: torch.nn.Module, attn_cfg: AttentionConfig | InfLLMv1Config | Dict[str, Any]
                    ) -> torch.nn.Module:
    """Make `model` run InfLLM (v1) context memory in every layer (in place; returns it). Eval / generation only."""
    cfg = _v1_config(attn_cfg)
    modules = check_v1_supported(model)
    _register()
    model.set_attn_implementation(ATTN_V1)
    rt = _V1Runtime(cfg, _decoder_of(model).rotary_emb)
    for attn in modules:
        setattr(attn, _RUNTIME_ATTR, rt)
        attn.forward = types.MethodType(v1_self_attention_forward, attn)
    log.info("attention: infllm_v1 (%s)", ", ".join(f"{k}={v}" for k, v in rt.kernel_kwargs().items()))
    return model


def infllm_v1_config_of(model: torch.nn.Module) -> Optional[InfLLMv1Config]:
    """The v1 settings of a model patched by apply_infllm_v1, else None."""
    for m in model.modules():
        rt = getattr(m, _RUNTIME_ATTR, None)
        if rt is not None:
            return rt.cfg
    return None


def _check_cache(cache: Any, layer_idx: int) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", [])
    layer = layers[layer_idx] if layer_idx < len(layers) else None
    if not isinstance(cache, DynamicCache) or (layer is not None and type(layer) is not DynamicLayer):
        raise ValueError(f"infllm_v1 keeps its keys in a growing DynamicCache; got {type(cache).__name__} "
                         f"(layer {type(layer).__name__}). Use the default cache (no cache_implementation)")


def _memory_for(cache: Any, layer_idx: int, past: int) -> Optional[ContextMemory]:
    store = getattr(cache, _CACHE_ATTR, None)
    if store is None:
        store = {}
        setattr(cache, _CACHE_ATTR, store)
    memory = store.get(layer_idx)
    if memory is None and past:
        raise ValueError(f"infllm_v1: the KV cache already holds {past} tokens for layer {layer_idx} that did not go "
                         "through InfLLM (v1) (a cache filled by another attention, or copied without its memory); "
                         "start from an empty cache")
    return memory


def _check_positions(position_ids: Optional[torch.Tensor], past: int, L: int) -> None:
    if position_ids is None:
        return
    first, last = position_ids.reshape(-1)[[0, -1]].tolist()
    if first != past or last != past + L - 1:
        raise ValueError(f"infllm_v1 needs positions {past}..{past + L - 1} (continuing the cache, one sequence); got "
                         f"position_ids from {first} to {last}. Packed documents and left padding are not supported")


def v1_self_attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor,
                              position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                              attention_mask: Optional[torch.Tensor] = None, past_key_values: Any = None,
                              **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """Replaces `forward` of a Llama / Mistral / Qwen2 / Qwen3 self-attention module (bound to it)."""
    rt: _V1Runtime = getattr(self, _RUNTIME_ATTR)
    if self.training and torch.is_grad_enabled():
        raise RuntimeError("attention.name=infllm_v1 is training-free by design (forward only, for evaluation and "
                           "generation): call model.eval() or run under torch.no_grad(); train with dense or "
                           "infllm_v2")
    B, L, _ = hidden_states.shape
    if B != 1:
        raise ValueError(f"infllm_v1 supports batch size 1 only (one sequence and its context memory), got {B}; "
                         "run the samples one at a time")
    if attention_mask is not None:
        raise ValueError("infllm_v1 builds its own attention pattern; a custom attention mask is not supported")
    if kwargs.get("output_attentions"):
        raise ValueError("infllm_v1 never materialises attention weights (output_attentions=True)")

    d = self.head_dim
    q = self.q_proj(hidden_states).view(B, L, -1, d)
    k = self.k_proj(hidden_states).view(B, L, -1, d)
    v = self.v_proj(hidden_states).view(B, L, -1, d)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)

    if past_key_values is not None:
        _check_cache(past_key_values, self.layer_idx)
        past = past_key_values.get_seq_length(self.layer_idx)
        memory = _memory_for(past_key_values, self.layer_idx, past)
        if self.layer_idx == 0:
            _check_positions(kwargs.get("position_ids"), past, L)
        # The cache keeps [B, H_kv, T, d] keys before RoPE.
        k_all, v_all = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
        k_all, v_all = k_all[0].transpose(0, 1), v_all[0].transpose(0, 1)
    else:
        memory = None
        if self.layer_idx == 0:
            _check_positions(kwargs.get("position_ids"), 0, L)
        k_all, v_all = k[0], v[0]

    rotary = rt.rotary_emb
    out, memory = infllm_v1_attn(q[0], k_all, v_all, rotary.inv_freq, memory=memory,
                                 attention_scaling=float(rotary.attention_scaling), softmax_scale=self.scaling,
                                 **rt.kernel_kwargs())
    if past_key_values is not None:
        getattr(past_key_values, _CACHE_ATTR)[self.layer_idx] = memory
    return self.o_proj(out.reshape(B, L, -1)), None
