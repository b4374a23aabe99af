"""The language-model loss without the full logits: [tokens, vocab] is made and consumed a chunk at a time.

At 128k tokens and a 49k vocab the fp32 logits alone are 24 GiB (64 GiB at Llama-3's 128k vocab), plus their
gradient: the largest single allocation of a long-context step. `apply_loss(model, trainer_cfg)` makes the
Hugging Face model compute its training loss from the last hidden states and the lm_head weight directly:

    out = model(input_ids=..., position_ids=..., labels=labels, num_items_in_batch=n)   # or shift_labels=
    out.loss      # sum of the token losses / n (mean over the target tokens without n), as transformers
    out.logits    # None: never built

Only while the model is in training mode and labels are given; eval, generation and `logits_to_keep` scoring
run the model's own forward unchanged. The loss runs inside the lm_head module's forward, so DeepSpeed
ZeRO-3's hooks gather its (possibly tied, partitioned) weight around it as for any linear layer.

Implementations (`linear_cross_entropy_sum(..., impl=)`), compared in bench/long_context.py --loss
(bench/README.md, "Long context on one GPU"; Liger is the fastest and CUDA_IMPL):
- chunked: ours, plain PyTorch, any device. The forward keeps one fp32 log-sum-exp per token; the backward
  recomputes each chunk's logits (one matmul more than the plain loss, no [tokens, vocab] tensor ever).
- cce: Apple's cut-cross-entropy (Triton, CUDA only): logits never leave SRAM; gradient entries below the
  bf16 resolution are skipped.
- liger: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only): gradients computed in the forward.
- deepspeed: DeepSpeed's TiledFusedLogitsLoss (ALST): plain PyTorch per tile, gradients in the forward.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from infllm.config import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMPLS = ("chunked", "cce", "liger", "deepspeed")
# What `auto`/`fused` use on CUDA (measured: bench/README.md "Long context"); elsewhere the chunked loss.
CUDA_IMPL = "liger"
# Logits of one chunk, in fp32 bytes, when trainer.loss_chunk_tokens is 0 (auto).
CHUNK_BYTES = 1 << 30
# Model types whose causal-LM head is exactly `lm_head(last_hidden_state)` followed by ForCausalLMLoss (no
# logit scaling or soft-capping in between), so the fused loss computes the very same function.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3", "gemma")
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES (between 256 and 32768)."""
    n = CHUNK_BYTES // (4 * max(vocab_size, 1))
    return int(min(32768, max(256, 1 << max(n, 1).bit_length() - 1)))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) over targets != IGNORE_INDEX, in fp32 (at least), by chunks.

    hidden [N, H] and weight [V, H] in one dtype (the matmuls run in it, the softmax in fp32, exactly as the
    plain loss upcasts its logits); targets [N] int64. Saves hidden, weight, targets and lse [N] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).to(acc)  # [C, V]
            lse_c = torch.logsumexp(logits, dim=-1)
            lse[s:s + chunk] = lse_c
            target_logit = logits.gather(1, safe[s:s + chunk, None])[:, 0]
            total += ((lse_c - target_logit) * valid[s:s + chunk]).sum()
            del logits
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Summed over every chunk: fp32, so many chunks add up as exactly as one matmul would.
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            logits = (h @ weight.t()).to(lse.dtype)
            # d CE / d logits = softmax - onehot, for the valid rows only, times the incoming gradient.
            g = torch.exp_(logits.sub_(lse[s:s + ctx.chunk, None]))
            rows = torch.arange(h.shape[0], device=h.device)
            g[rows, safe[s:s + ctx.chunk]] -= 1.0
            g.mul_((valid[s:s + ctx.chunk] * grad_total)[:, None])
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[s:s + ctx.chunk] = g @ weight
            if need_w:
                if g.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), h)
                else:
                    grad_w += (g.t() @ h).to(grad_w.dtype)
            del logits, g
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def _deepspeed_sum(hidden, weight, targets, chunk: int, scale):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    # TiledFusedLogitsLoss runs the backward of each tile inside its forward with an incoming gradient of 1:
    # the weight's gradient lands in .grad there and then, so the normalisation must happen inside the tile.
    def tile_loss(_, x, y):
        logits = (x @ weight.t()).to(torch.promote_types(x.dtype, torch.float32))
        return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum") * scale

    shards = max(1, -(-hidden.shape[0] // chunk))
    return TiledFusedLogitsLoss.apply(tile_loss, None, hidden[None], targets[None], None, shards, [weight], "sum")


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             impl: str = "chunked", chunk_tokens: int = 0, scale=1.0) -> torch.Tensor:
    """scale * the sum over the targets != IGNORE_INDEX of the cross-entropy of logits = hidden @ weight.T, an
    fp32 scalar. hidden [N, H], weight [V, H] in one dtype, targets [N] int64, already aligned (shifted) with
    hidden; scale a number or a scalar tensor.

    impl=deepspeed puts the weight's gradient into weight.grad during this call (DeepSpeed's design), at an
    incoming gradient of 1: differentiate its result only by calling .backward() on it, unscaled."""
    chunk = chunk_tokens or auto_chunk_tokens(weight.shape[0])
    if impl == "chunked":
        total = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy

        total = linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum").float()
    elif impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        total = liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                                 reduction="sum", accum_dtype=torch.float32).float()
    elif impl == "deepspeed":
        return _deepspeed_sum(hidden, weight, targets, chunk, scale)
    else:
        raise ValueError(f"linear_cross_entropy_sum: impl must be one of {IMPLS}, got {impl!r}")
    return total * scale


def shifted_targets(labels: Optional[torch.Tensor], shift_labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Position t predicts token t+1 (transformers' ForCausalLMLoss): the last position has no target.
    `shift_labels`, when given, are already aligned (sequence parallelism shards them pre-shifted)."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor] = None,
                   shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None, impl: str = "chunked",
                   chunk_tokens: int = 0) -> torch.Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels) without the logits: the summed token loss over
    num_items_in_batch (a number or a tensor), or the mean over the target tokens when it is None.
    Under autocast, the matmuls run in its dtype (as the plain lm_head would), the softmax in fp32."""
    targets = shifted_targets(labels, shift_labels).reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        h, weight = h.to(dtype), weight.to(dtype)
    elif h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    if num_items_in_batch is None:
        scale = 1.0 / (targets != IGNORE_INDEX).sum()
    elif torch.is_tensor(num_items_in_batch):
        scale = 1.0 / num_items_in_batch.to(h.device)
    else:
        scale = 1.0 / num_items_in_batch
    with torch.autocast(dev, enabled=False):
        return linear_cross_entropy_sum(h, weight, targets, impl=impl, chunk_tokens=chunk_tokens, scale=scale)


class FusedLossLMHead(nn.Linear):
    """The model's lm_head (same module, same weight, tied or not): called with the hidden states alone it is
    the plain linear layer; with labels or shift_labels it returns the loss (see `causal_lm_loss`)."""

    loss_impl: str = "chunked"
    loss_chunk_tokens: int = 0

    def forward(self, input, labels=None, shift_labels=None, num_items_in_batch=None):
        if labels is None and shift_labels is None:
            return super().forward(input)
        return causal_lm_loss(input, self.weight, labels, shift_labels, num_items_in_batch,
                              impl=self.loss_impl, chunk_tokens=self.loss_chunk_tokens)


def fused_loss_unsupported(model: nn.Module) -> Optional[str]:
    """Why the fused loss cannot stand in for this model's own loss, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model type {model_type!r} is not known to compute its logits as lm_head(hidden states) "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1.0):
            return f"the model transforms its logits ({name}={getattr(config, name)})"
    head = model.get_output_embeddings()
    if type(head) not in (nn.Linear, FusedLossLMHead) or head.bias is not None:
        return f"its output layer is {type(head).__name__}{' with a bias' if head.bias is not None else ''}, " \
               "not a bias-free nn.Linear"
    return None


def resolve_loss(model: nn.Module, trainer_cfg) -> str:
    """trainer.loss -> plain | fused, or a ConfigError when fused was asked for and cannot be exact."""
    why = fused_loss_unsupported(model)
    if trainer_cfg.loss == "plain":
        return "plain"
    if why is None:
        return "fused"
    if trainer_cfg.loss == "fused":
        raise ConfigError(f"trainer.loss: fused cannot replace this model's loss: {why}; use trainer.loss=plain "
                          "(or auto, which falls back to it)")
    log.info("trainer.loss=auto: plain loss, since %s", why)
    return "plain"


def _fused_forward(model: nn.Module, own_forward):
    def forward(*args, **kwargs):
        labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
        if args or not model.training or (labels is None and shift_labels is None):
            return own_forward(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        for name in ("labels", "shift_labels", "logits_to_keep", "return_dict"):
            kwargs.pop(name, None)
        num_items = kwargs.pop("num_items_in_batch", None)
        out = model.get_decoder()(**kwargs)
        loss = model.get_output_embeddings()(out[0], labels=labels, shift_labels=shift_labels,
                                             num_items_in_batch=num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    return forward


def apply_loss(model: nn.Module, trainer_cfg, device_type: Optional[str] = None) -> str:
    """Make `model`'s training loss the fused one when trainer.loss asks for it (auto: where it is exact).
    Returns the loss in use (plain | fused); idempotent. `device_type` (default: trainer.device, auto = cuda when
    one is available) picks the implementation: CUDA_IMPL on CUDA, chunked elsewhere."""
    kind = resolve_loss(model, trainer_cfg)
    if kind == "plain":
        return kind
    head = model.get_output_embeddings()
    if device_type is None:
        device_type = getattr(trainer_cfg, "device", "auto")
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
    impl = CUDA_IMPL if device_type == "cuda" else "chunked"
    package = {"cce": "cut_cross_entropy", "liger": "liger_kernel", "deepspeed": "deepspeed"}.get(impl)
    if package is not None and importlib.util.find_spec(package) is None:
        log.warning("trainer.loss: %s is not installed; the fused loss uses the chunked implementation", package)
        impl = "chunked"
    head.__class__ = FusedLossLMHead
    head.loss_impl = impl
    head.loss_chunk_tokens = int(getattr(trainer_cfg, "loss_chunk_tokens", 0) or 0)
    if not getattr(model, "_infllm_fused_loss", False):
        # An instance attribute: the class (and so config.architectures in save_pretrained) stays the model's.
        model.forward = _fused_forward(model, type(model).forward.__get__(model))
        model._infllm_fused_loss = True
    if impl in ("chunked", "deepspeed"):
        vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]
        log.info("trainer.loss: fused (%s, %s tokens per chunk)", impl,
                 head.loss_chunk_tokens or f"auto={auto_chunk_tokens(vocab)}")
    else:
        log.info("trainer.loss: fused (%s)", impl)
    return kind
