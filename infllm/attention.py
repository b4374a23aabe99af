"""InfLLM-V2 attention inside Hugging Face decoders, with no new parameters.

The swap registers one attention function with transformers' `AttentionInterface` under two names:
"infllm_v2" (the dense/sparse switch of kernels/infllm_v2/README.md, per document by `dense_len`) and
"infllm_dense" (always dense). The model keeps its own q/k/v/o projections, RoPE and softmax scale: HF
computes q/k/v, applies RoPE, updates the KV cache, and hands us

    query [B, H_q, L_q, d], key / value [B, H_kv, L_k, d], scaling (the model's softmax scale)

We flatten to FlashAttention's varlen layout `[N = B * L, H, d]` and call the public functions of `kernels/`.
A mask function that returns no mask is registered under the same names, so transformers never builds an
[L, L] mask for these models (only a 2D [B, L_k] padding mask when a padded batch is generated). Note that
transformers itself scans `position_ids` for packing once per forward when neither an attention_mask nor a
cache is passed (`masking_utils.find_packed_sequence_indices`: one small host sync on GPU, per forward, not
per layer).

Document boundaries, in this order of preference:
  1. `cu_seq_lens_q` + `max_length_q` in the forward kwargs (`PackedBatch.model_kwargs()` passes them):
     used as is, no host sync.
  2. `position_ids`: a new document starts at each row start and wherever a position is not its
     predecessor + 1 (positions restart at 0 per packed document). Deriving the boundaries needs their count,
     so this costs one device-to-host copy per forward (cached across the layers of that forward).
  3. neither: every row is one document (no sync).
Attention never crosses a document, in dense and sparse mode alike.

Generation with a KV cache (L_q != L_k): in sparse mode each new token selects its blocks over the cache as it
would inside the whole document (`kernels.infllm_v2_attn_tail`; each row is one document), so decode steps
after a sparse prefill stay sparse; in dense mode, and for batches with padding (a 2D `attention_mask` with
zeros), dense SDPA over the cache.

Legend: B rows, L tokens per row, N = B * L, H_q / H_kv heads, G = H_q / H_kv, d head dim, T document length,
Bk = block_size, k_eff = topk + window_size // block_size.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from infllm.config import AttentionConfig, ConfigError
from infllm.modes import ATTENTION_MODES

log = logging.getLogger(__name__)

ATTN_SPARSE = "infllm_v2"
ATTN_DENSE = "infllm_dense"
MODES = ATTENTION_MODES

# The fields written to `config.sparse_config`: MiniCPM4's names, then ours.
SPARSE_CONFIG_FIELDS = ("block_size", "kernel_size", "kernel_stride", "init_blocks", "window_size", "topk",
                        "dense_len", "use_nope", "lse_approx", "impl")

_RUNTIME_ATTR = "_infllm_attention"
_warned_unprepared = False
# attention.dense_backend -> kernels.dense backend names
_DENSE_BACKENDS = {"auto": "auto", "flash_attn": "flash", "sdpa": "sdpa", "torch_varlen": "torch_varlen",
                   "triton": "triton"}


@dataclass
class SparseStats:
    """What the attention did since the last reset, summed over forwards (counted once per forward, at the
    first decoder layer: every layer sees the same documents).

    density = attended key-blocks / causal key-blocks, over all query tokens (dense documents count as fully
    attended). A token in block c of a sparse document attends min(c + 1, k_eff) blocks out of c + 1, exactly
    (the contract selects k_eff blocks whenever c + 1 > k_eff), so it is computed from document lengths.
    select_ms / attention_ms are filled only when selection timing is on (see `configure_sparse_stats`).
    """
    forwards: int = 0
    sparse_tokens: float = 0.0
    dense_tokens: float = 0.0
    attended_blocks: float = 0.0
    causal_blocks: float = 0.0
    select_ms: Optional[float] = None
    attention_ms: Optional[float] = None

    @property
    def density(self) -> float:
        return self.attended_blocks / self.causal_blocks if self.causal_blocks else 1.0

    @property
    def sparse_token_fraction(self) -> float:
        total = self.sparse_tokens + self.dense_tokens
        return self.sparse_tokens / total if total else 0.0

    @property
    def select_fraction(self) -> Optional[float]:
        if self.select_ms is None or not self.attention_ms:
            return None
        return self.select_ms / self.attention_ms

    def as_dict(self, prefix: str = "") -> Dict[str, float]:
        if not self.forwards:
            return {}
        out = {"density": self.density, "sparse_token_fraction": self.sparse_token_fraction,
               "sparse_tokens": self.sparse_tokens, "dense_tokens": self.dense_tokens}
        if self.select_ms is not None:
            out.update(select_ms=self.select_ms, attention_ms=self.attention_ms or 0.0,
                       select_fraction=self.select_fraction or 0.0)
        return {prefix + k: v for k, v in out.items()}

    # Read-only mapping view of as_dict(), so metrics code can treat it as a dict (empty = nothing counted).
    def __bool__(self) -> bool:
        return self.forwards > 0

    def keys(self):
        return self.as_dict().keys()

    def items(self):
        return self.as_dict().items()

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    def __getitem__(self, key: str) -> float:
        return self.as_dict()[key]


class _StatsAccumulator:
    """Device-side running sums: the hot path only launches a few tiny kernels, the host reads them in
    `snapshot()` (one sync, when the trainer logs)."""

    def __init__(self) -> None:
        self.enabled = True
        self.time_selection = False
        # Selection configurations already run once (compiled) by the timed path, see `_sparse_forward`.
        self.warm: set = set()
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        # [sparse_tokens, dense_tokens, attended_blocks, causal_blocks], float64 on the device of the batch
        self.sums: Optional[torch.Tensor] = None
        # (kind, start, end): CUDA events, or perf_counter floats on CPU
        self.timings: List[Tuple[str, Any, Any]] = []

    @torch.no_grad()
    def add(self, sums: torch.Tensor) -> None:
        self.forwards += 1
        if self.sums is None or self.sums.device != sums.device:
            self.sums = sums.clone() if self.sums is None else self.sums.to(sums.device) + sums
        else:
            self.sums += sums

    @contextlib.contextmanager
    def timer(self, kind: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.timings.append((kind, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.timings.append((kind, t0, time.perf_counter()))

    def snapshot(self) -> SparseStats:
        stats = SparseStats(forwards=self.forwards)
        if self.sums is not None:
            sparse_tokens, dense_tokens, attended, causal = self.sums.tolist()
            stats.sparse_tokens, stats.dense_tokens = sparse_tokens, dense_tokens
            stats.attended_blocks, stats.causal_blocks = attended, causal
        if self.timings:
            ms = {"select": 0.0, "attention": 0.0}
            for kind, start, end in self.timings:
                if isinstance(start, float):
                    ms[kind] += (end - start) * 1e3
                else:
                    end.synchronize()
                    ms[kind] += start.elapsed_time(end)
            stats.select_ms, stats.attention_ms = ms["select"], ms["attention"]
        return stats


def _block_counts(lengths: torch.Tensor, block_size: int, k_eff: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per document of length T: (sum over its tokens of min(c + 1, k_eff), sum of c + 1), c = t // Bk.
    Closed form (no per-token tensors): full blocks nf = T // Bk hold Bk tokens each, the last r = T % Bk."""
    T = lengths.to(torch.float64)
    nf = torch.div(lengths, block_size, rounding_mode="floor").to(torch.float64)
    r = T - nf * block_size
    causal = block_size * nf * (nf + 1) / 2 + r * (nf + 1)
    head = torch.clamp(nf, max=k_eff)
    capped_full = head * (head + 1) / 2 + torch.clamp(nf - k_eff, min=0) * k_eff
    attended = block_size * capped_full + r * torch.clamp(nf + 1, max=k_eff)
    return attended, causal


@dataclass
class ProbeCall:
    """What a selection probe (see `selection_probe`) receives from one sparse-path attention call: the
    layer's varlen q / k exactly as the kernels get them (after RoPE and autocast casts; detached), the document
    bounds, the model's softmax scale (None = 1/sqrt(d)), the dense_len in force (-1 in sparse mode) and the
    kernel keyword arguments of `kernels.infllm_v2_select` (block_size ... lse_approx, impl)."""
    layer_idx: Optional[int]
    q: torch.Tensor
    k: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    softmax_scale: Optional[float]
    dense_len: int
    kernel_kwargs: Dict[str, Any]


class _Runtime:
    def __init__(self, cfg: AttentionConfig) -> None:
        self.cfg = cfg
        # One of ATTENTION_MODES (infllm/modes.py), set by `attention_mode`.
        self.mode: str = "model"
        self.stats = _StatsAccumulator()
        # Diagnostics only (infllm.eval's selection probe): called with a ProbeCall before each sparse-path
        # attention; None (the default) costs one attribute check per layer.
        self.probe: Optional[Callable[[ProbeCall], None]] = None
        # Sequence parallelism that splits a query group over ranks (infllm/parallel/sequence.py): (q, k) ->
        # the whole groups' queries for the selection, or None when q holds whole groups.
        self.group_query_gather: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]] = None
        self._bounds_key: Optional[Tuple[Any, ...]] = None
        self._bounds_value: Optional[Tuple[torch.Tensor, int, bool]] = None

    def effective_mode(self) -> str:
        """What this call does: dense | sparse | switch ("model" resolved: per document by dense_len for
        InfLLM-V2, dense for a dense model)."""
        if self.mode != "model":
            return self.mode
        return "dense" if self.cfg.name == "dense" else "switch"

    def kernel_kwargs(self) -> Dict[str, Any]:
        c = self.cfg
        return dict(block_size=c.block_size, kernel_size=c.kernel_size, kernel_stride=c.kernel_stride,
                    init_blocks=c.init_blocks, window_size=c.window_size, topk=c.topk,
                    lse_approx=c.lse_approx, impl=c.impl)


def _runtime_of(module: torch.nn.Module) -> _Runtime:
    global _warned_unprepared
    rt = getattr(module, _RUNTIME_ATTR, None)
    if rt is not None:
        return rt
    # Loaded with attn_implementation="infllm_v2" without apply_attention: take the config from the
    # checkpoint's sparse_config. Mode switches and stats then act per layer; apply_attention shares them.
    config = getattr(module, "config", None)
    cfg = attention_config_from_hf(config) if config is not None else None
    if cfg is None:
        dense = getattr(config, "_attn_implementation", None) == ATTN_DENSE
        cfg = AttentionConfig(name="dense" if dense else "infllm_v2")
    if not _warned_unprepared:
        _warned_unprepared = True
        log.warning("infllm attention on a model that did not go through infllm.attention.apply_attention: "
                    "using %s per layer (attention_mode and get_sparse_stats need apply_attention)", cfg)
    rt = _Runtime(cfg)
    setattr(module, _RUNTIME_ATTR, rt)
    return rt


def _runtimes(model: torch.nn.Module) -> List[_Runtime]:
    seen: Dict[int, _Runtime] = {}
    for m in model.modules():
        rt = getattr(m, _RUNTIME_ATTR, None)
        if rt is not None:
            seen.setdefault(id(rt), rt)
    return list(seen.values())


def _model_runtime(model: torch.nn.Module) -> _Runtime:
    rts = _runtimes(model)
    if not rts:
        raise ValueError("this model has no InfLLM attention: call infllm.attention.apply_attention(model, cfg) first")
    return rts[0]


def _rows_as_documents(B: int, L: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (B + 1) * L, L, dtype=torch.int32, device=device)


def _same_key(old: Optional[Tuple[Any, ...]], new: Tuple[Any, ...]) -> bool:
    return old is not None and old[0] is new[0] and old[1:] == new[1:]


def _bounds_from_positions(rt: _Runtime, position_ids: torch.Tensor, B: int, L: int,
                           device: torch.device) -> Tuple[torch.Tensor, int, bool]:
    """(cu_seqlens, max_seqlen, one_doc_per_row) from positions; one host copy, cached for the forward (HF
    hands the same position_ids tensor to every layer)."""
    key = (position_ids, position_ids._version, B, L)
    if _same_key(rt._bounds_key, key):
        return rt._bounds_value
    pos = position_ids.expand(B, L).detach().to("cpu", torch.int64)
    starts = torch.ones(B, L, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    one_per_row = bool(starts[:, 1:].sum() == 0)
    if one_per_row:
        cu_cpu = torch.arange(0, (B + 1) * L, L, dtype=torch.int32)
    else:
        idx = starts.reshape(-1).nonzero().squeeze(1)
        cu_cpu = torch.cat([idx, torch.tensor([B * L])]).to(torch.int32)
    max_seqlen = int((cu_cpu[1:] - cu_cpu[:-1]).max())
    value = (cu_cpu.to(device, non_blocking=True), max_seqlen, one_per_row)
    rt._bounds_key, rt._bounds_value = key, value
    return value


def _document_bounds(rt: _Runtime, kwargs: Dict[str, Any], B: int, L: int,
                     device: torch.device) -> Tuple[torch.Tensor, int, bool]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            raise ValueError("cu_seq_lens_q was given without max_length_q (a Python int: the longest document)")
        if isinstance(max_len, torch.Tensor):  # a host sync; PackedBatch passes an int
            max_len = int(max_len)
        if cu.device.type == "cpu" and int(cu[-1]) != B * L:
            raise ValueError(f"cu_seq_lens_q ends at {int(cu[-1])} but the batch has B * L = {B} * {L} = {B * L} "
                             "tokens; cu_seqlens must cover the flattened batch")
        return cu.to(device=device, dtype=torch.int32, non_blocking=True), int(max_len), False
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and L > 1:
        return _bounds_from_positions(rt, position_ids, B, L, device)
    return _rows_as_documents(B, L, device), L, True


def _refuse_runtime_features(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             dropout: float, is_causal: Optional[bool], kwargs: Dict[str, Any]) -> None:
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        raise ValueError(f"InfLLM attention needs equal q/k/v head dims, got {query.shape[-1]}, "
                         f"{key.shape[-1]}, {value.shape[-1]}")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True: InfLLM attention never materialises attention weights; "
                         "use attn_implementation='eager' to inspect them")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise ValueError("non-causal attention (is_causal=False) is not supported by InfLLM attention")
    if dropout and dropout > 0:
        raise ValueError(f"attention dropout {dropout} > 0 is not supported by InfLLM attention; "
                         "set the model config's attention_dropout to 0")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"sliding-window attention (sliding_window={kwargs['sliding_window']}) is not supported "
                         "by InfLLM attention")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit softcapping is not supported by InfLLM attention")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attention sinks are not supported by InfLLM attention")


def _sdpa_with_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: Optional[float]) -> torch.Tensor:
    """Dense causal attention of L_q new tokens over L_k cached keys (generation, or padded batches).
    Query i sits at absolute position L_k - L_q + i. Returns [B, L_q, H_q, d]."""
    Lq, Lk = query.shape[2], key.shape[2]
    mask = None
    if Lq > 1:
        offset = Lk - Lq
        mask = (torch.arange(Lk, device=query.device)[None, :]
                <= torch.arange(Lq, device=query.device)[:, None] + offset)[None, None]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"expected a 2D padding mask [B, L_k] or none, got shape {tuple(attention_mask.shape)}")
        pad = attention_mask[:, -Lk:].to(torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
        if Lq > 1:
            # A padding query would see no key at all (NaN rows on some SDPA backends): let it see itself.
            rows = torch.arange(Lq, device=query.device)[:, None] + (Lk - Lq)
            own = torch.arange(Lk, device=query.device)[None, :] == rows
            mask = mask | own[None, None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _sparse_with_cache(rt: "_Runtime", query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scaling: Optional[float], dense_len: int) -> torch.Tensor:
    """The L_q newest tokens of each row over its L_k cached keys in sparse mode (generation without padding:
    each row is one document). Every query selects its blocks over the cache exactly as inside the whole
    document, so a sparse-mode eval decodes sparsely too. Returns [B, L_q, H_q, d]."""
    from kernels import infllm_v2_attn_tail

    kw = rt.kernel_kwargs()
    kw.pop("impl")
    rows = [infllm_v2_attn_tail(query[b].transpose(0, 1), key[b].transpose(0, 1), value[b].transpose(0, 1),
                                dense_len=dense_len, softmax_scale=scaling, **kw) for b in range(query.shape[0])]
    return torch.stack(rows)


def _in_backward() -> bool:
    """True while autograd runs a backward pass: activation checkpointing recomputes the forward there, which
    must not be counted twice in the stats."""
    return torch._C._current_graph_task_id() != -1


def _to_varlen(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] -> [B * L, H, d] (free when HF's tensor is a transposed view of [B, L, H, d])."""
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B * L, H, d)


def infllm_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns ([B, L, H_q, d], None)."""
    rt = _runtime_of(module)
    _refuse_runtime_features(module, query, key, value, dropout, is_causal, kwargs)
    query, key, value = _autocast_inputs(query, key, value)
    B, Hq, L, d = query.shape
    if key.shape[2] != L or attention_mask is not None:
        mode = rt.effective_mode()
        if attention_mask is None and mode != "dense":
            dense_len = -1 if mode == "sparse" else rt.cfg.dense_len
            return _sparse_with_cache(rt, query, key, value, scaling, dense_len), None
        return _sdpa_with_cache(query, key, value, attention_mask, scaling), None

    cu, max_seqlen, one_per_row = _document_bounds(rt, kwargs, B, L, query.device)
    mode, dense_len = _resolve_mode(rt, max_seqlen, query.is_cuda)
    first_layer = getattr(module, "layer_idx", 0) in (0, None) and not _in_backward()
    if rt.stats.enabled and first_layer:
        _record_density(rt, cu, mode, dense_len)
    if mode == "dense":
        out = _dense_forward(rt, query, key, value, cu, max_seqlen, one_per_row, scaling)
    else:
        out = _sparse_forward(rt, module, query, key, value, cu, max_seqlen, dense_len, scaling, first_layer)
    return out.reshape(B, L, Hq, d), None


def _autocast_inputs(query, key, value):
    """Under autocast HF's RoPE returns fp32 q/k (fp32 cos/sin) beside a bf16 v; SDPA would be cast by
    autocast, the kernels are not, so cast here the same way."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return query.to(dtype), key.to(dtype), value.to(dtype)
    return query, key, value


def _resolve_mode(rt: _Runtime, max_seqlen: int, on_cuda: bool) -> Tuple[str, int]:
    """(dense | sparse | switch, the kernels' dense_len: -1 = every document sparse)."""
    mode, cfg = rt.effective_mode(), rt.cfg
    triton_path = cfg.impl == "triton" or (cfg.impl == "auto" and on_cuda)
    if mode == "switch" and cfg.dense_len != -1 and max_seqlen < cfg.dense_len and not triton_path:
        # Every document is short: skip selection on the reference path. The Triton path keeps these rows:
        # its kernel runs dense documents itself with no host sync, where the dense fallback without flash-attn
        # loops over documents on the host (34 ms vs 3.8 ms per layer on 64 x 512 tokens, H100).
        mode = "dense"
    return mode, (-1 if mode == "sparse" else cfg.dense_len)


def _record_density(rt: _Runtime, cu: torch.Tensor, mode: str, dense_len: int) -> None:
    """Adds this forward's token and block counts to the stats (on the device, no host sync)."""
    with torch.no_grad():
        lengths = cu[1:] - cu[:-1]
        attended, causal = _block_counts(lengths, rt.cfg.block_size, rt.cfg.k_eff)
        if mode == "dense":
            is_sparse = torch.zeros_like(lengths, dtype=torch.bool)
        elif dense_len == -1:
            is_sparse = torch.ones_like(lengths, dtype=torch.bool)
        else:
            is_sparse = lengths >= dense_len
        lf = lengths.to(torch.float64)
        rt.stats.add(torch.stack([(lf * is_sparse).sum(), (lf * ~is_sparse).sum(),
                                  torch.where(is_sparse, attended, causal).sum(), causal.sum()]))


def _dense_forward(rt: _Runtime, query, key, value, cu, max_seqlen: int, one_per_row: bool,
                   scaling: Optional[float]) -> torch.Tensor:
    from kernels.dense import dense_attn_varlen, sdpa_causal

    if one_per_row:
        return sdpa_causal(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5) \
            .transpose(1, 2)
    return dense_attn_varlen(_to_varlen(query), _to_varlen(key), _to_varlen(value), cu, max_seqlen,
                             softmax_scale=scaling, backend=_DENSE_BACKENDS[rt.cfg.dense_backend])


def _sparse_forward(rt: _Runtime, module, query, key, value, cu, max_seqlen: int, dense_len: int,
                    scaling: Optional[float], first_layer: bool) -> torch.Tensor:
    from kernels import infllm_v2_attn_varlen, infllm_v2_select

    q, k, v = _to_varlen(query), _to_varlen(key), _to_varlen(value)
    kw = rt.kernel_kwargs()
    select_q = rt.group_query_gather(q, k) if rt.group_query_gather is not None else None
    if rt.probe is not None and not _in_backward():
        rt.probe(ProbeCall(layer_idx=getattr(module, "layer_idx", None), q=q.detach(), k=k.detach(),
                           cu_seqlens=cu, max_seqlen=max_seqlen, softmax_scale=scaling, dense_len=dense_len,
                           kernel_kwargs=dict(kw)))
    if not (rt.stats.time_selection and first_layer):
        return infllm_v2_attn_varlen(q, k, v, cu, max_seqlen, dense_len=dense_len, softmax_scale=scaling,
                                     select_q=select_q, **kw)
    # Measurement mode: selection is fused into infllm_v2_attn_varlen, so it is timed by one extra call. A new
    # kernel configuration compiles on its first call (seconds, which the trainer's per-layer extrapolation
    # turned into step shares of 600%): that call runs untimed first. Triton specialises ints on % 16.
    scoring_q = q if select_q is None else select_q
    warm_key = (tuple(scoring_q.shape[1:]), tuple(k.shape[1:]), scoring_q.dtype, scoring_q.shape[0] % 16 == 0,
                max_seqlen % 16 == 0, tuple(sorted(kw.items())))
    with torch.no_grad():
        if warm_key not in rt.stats.warm:
            infllm_v2_select(scoring_q, k, cu, max_seqlen, softmax_scale=scaling, **kw)
            rt.stats.warm.add(warm_key)
        with rt.stats.timer("select", query.device):
            infllm_v2_select(scoring_q, k, cu, max_seqlen, softmax_scale=scaling, **kw)
    with rt.stats.timer("attention", query.device):
        return infllm_v2_attn_varlen(q, k, v, cu, max_seqlen, dense_len=dense_len, softmax_scale=scaling,
                                     select_q=select_q, **kw)


def infllm_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                mask_function: Any = None, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
    """Never an [L, L] mask: None, or the 2D [B, L_k] padding mask when some token is padding (generation
    of padded batches; the attention then falls back to dense SDPA)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if bool(attention_mask.all()):
        return None
    return attention_mask


def register() -> None:
    """Register both names with transformers (idempotent; done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in (ATTN_SPARSE, ATTN_DENSE):
        AttentionInterface.register(name, infllm_attention_forward)
        AttentionMaskInterface.register(name, infllm_mask)


register()


def _text_configs(config: Any) -> List[Any]:
    out = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out.append(sub)
    return out


def check_supported(model: torch.nn.Module, cfg: AttentionConfig) -> None:
    """Refuse, with the reason, what the attention cannot honour (raised before anything is changed)."""
    if cfg.name == "infllm_v1":
        raise ConfigError("attention.name: infllm_v1 is applied by infllm.attention_v1.apply_infllm_v1 "
                          "(apply_attention delegates to it), not checked here")
    if cfg.use_nope:
        raise ConfigError("attention.use_nope: scoring blocks with pre-RoPE q/k is not supported yet (transformers "
                          "applies RoPE before the attention function); set use_nope: false")
    if not hasattr(model, "config") or not hasattr(model, "set_attn_implementation"):
        raise ConfigError("attention: expected a transformers PreTrainedModel")
    if not type(model)._can_set_attn_implementation():
        raise ConfigError(f"attention: {type(model).__name__} does not dispatch through transformers' "
                          "AttentionInterface, so its attention cannot be swapped")
    for c in _text_configs(model.config):
        if getattr(c, "is_encoder_decoder", False):
            raise ConfigError("attention: encoder-decoder models are not supported (causal decoders only)")
        if getattr(c, "is_causal", True) is False:
            raise ConfigError("attention: the model config sets is_causal=False; InfLLM attention is causal only")
        for key in ("attn_logit_softcapping", "attention_logit_softcapping", "attn_softcapping"):
            if getattr(c, key, None):
                raise ConfigError(f"attention: the model uses attention logit softcapping ({key}="
                                  f"{getattr(c, key)}), which InfLLM attention does not implement")
        layer_types = getattr(c, "layer_types", None)
        if layer_types:
            other = sorted({t for t in layer_types if t != "full_attention"})
            if other:
                raise ConfigError(f"attention: the model has {other} layers (config.layer_types); InfLLM attention "
                                  "replaces full attention only, sliding-window / chunked layers are not supported")
        window = getattr(c, "sliding_window", None)
        if window is not None and getattr(c, "use_sliding_window", True) and not layer_types:
            raise ConfigError(f"attention: the model uses sliding-window attention (config.sliding_window={window}); "
                              "not supported by InfLLM attention. Set sliding_window to null if the checkpoint "
                              "does not need it (e.g. Mistral v0.2+)")
        if getattr(c, "attention_dropout", 0.0):
            raise ConfigError(f"attention: config.attention_dropout={c.attention_dropout} > 0 is not supported "
                              "by InfLLM attention; set it to 0")
        if getattr(c, "output_attentions", False):
            raise ConfigError("attention: config.output_attentions=True; InfLLM attention never materialises "
                              "attention weights")
        v_dim, qk_nope = getattr(c, "v_head_dim", None), getattr(c, "qk_nope_head_dim", None)
        if v_dim is not None and qk_nope is not None:
            raise ConfigError("attention: multi-head latent attention (q/k head dim != v head dim, e.g. MiniCPM3 / "
                              "DeepSeek) is not supported; InfLLM attention needs equal q/k/v head dims")
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("sinks", "attention_sinks", "sink"):
            raise ConfigError(f"attention: the model has learned attention sinks ({name}), which InfLLM attention "
                              "does not implement")


def sparse_config_dict(cfg: AttentionConfig) -> Dict[str, Any]:
    return {name: getattr(cfg, name) for name in SPARSE_CONFIG_FIELDS}


def attention_config_from_hf(hf_config: Any) -> Optional[AttentionConfig]:
    """The AttentionConfig recorded in a saved model's `sparse_config` (MiniCPM4's field names), else None."""
    sc = getattr(hf_config, "sparse_config", None)
    if sc is None:
        return None
    sc = dict(sc)
    known = {f.name for f in fields(AttentionConfig)}
    unknown = sorted(set(sc) - known)
    if unknown:
        log.warning("sparse_config: ignoring unknown fields %s", unknown)
    values = {k: v for k, v in sc.items() if k in known and k != "name"}
    return AttentionConfig(name="infllm_v2", **values)


def apply_attention(model: torch.nn.Module, attn_cfg: AttentionConfig) -> torch.nn.Module:
    """Make `model` run InfLLM attention (in place; returns it). Parameters are untouched.

    name=dense -> "infllm_dense" (always dense; `sparse_config` removed from the config),
    name=infllm_v2 -> "infllm_v2" (switch by dense_len; `config.sparse_config` written for save_pretrained),
    name=infllm_v1 -> delegated to infllm.attention_v1.apply_infllm_v1 (eval-only context memory)."""
    if isinstance(attn_cfg, dict):
        attn_cfg = AttentionConfig(**attn_cfg)
    if attn_cfg.name == "infllm_v1":
        # Training-free context memory (eval only) lives in its own module; one entry point for load_model.
        from infllm.attention_v1 import apply_infllm_v1

        return apply_infllm_v1(model, attn_cfg)
    check_supported(model, attn_cfg)
    impl = ATTN_DENSE if attn_cfg.name == "dense" else ATTN_SPARSE
    model.set_attn_implementation(impl)
    if model.config._attn_implementation != impl:
        raise ConfigError(f"attention: transformers did not accept attn_implementation={impl!r} for "
                          f"{type(model).__name__} (got {model.config._attn_implementation!r})")
    rt = _Runtime(attn_cfg)
    for m in model.modules():
        setattr(m, _RUNTIME_ATTR, rt)
    model.config.sparse_config = sparse_config_dict(attn_cfg) if impl == ATTN_SPARSE else None
    log.info("attention: %s (%s)", impl, ", ".join(f"{k}={v}" for k, v in sparse_config_dict(attn_cfg).items())
             if impl == ATTN_SPARSE else "dense")
    return model


def attention_config_of(model: torch.nn.Module) -> AttentionConfig:
    return _model_runtime(model).cfg


@contextlib.contextmanager
def _runtime_setting(model: torch.nn.Module, name: str, value: Any, caller: str) -> Iterator[None]:
    """Sets attribute `name` of every InfLLM runtime of `model` within the block, then restores each one."""
    rts = _runtimes(model)
    if not rts:
        raise ValueError(f"{caller}: the model has no InfLLM attention; call apply_attention first")
    previous = [getattr(rt, name) for rt in rts]
    for rt in rts:
        setattr(rt, name, value)
    try:
        yield
    finally:
        for rt, prev in zip(rts, previous):
            setattr(rt, name, prev)


@contextlib.contextmanager
def attention_mode(model: torch.nn.Module, mode: str) -> Iterator[torch.nn.Module]:
    """Within the block: "dense" attends densely everywhere, "sparse" sparsely everywhere (dense_len = -1),
    "model" per config (dense_len switch, or always dense for name=dense); see infllm/modes.py. Restores the
    previous mode."""
    if mode not in MODES:
        raise ValueError(f"attention_mode: expected one of {', '.join(MODES)}, got {mode!r}")
    with _runtime_setting(model, "mode", mode, "attention_mode"):
        yield model


def set_group_query_gather(model: torch.nn.Module,
                           fn: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]]) -> None:
    """Install (or remove, with None) the function that gives the selection the whole query groups when a
    layer holds only part of a group's heads (sequence parallelism; infllm/parallel/sequence.py)."""
    for rt in _runtimes(model):
        rt.group_query_gather = fn


@contextlib.contextmanager
def selection_probe(model: torch.nn.Module, fn: Callable[[ProbeCall], None]) -> Iterator[torch.nn.Module]:
    """Within the block, every attention call that takes the sparse path (sparse mode, or the dense_len switch
    with a Triton impl or a long document) first calls `fn(ProbeCall(...))` with that layer's q / k (no
    gradient, not during a backward recompute). Dense calls and KV-cache steps (generation, chunked prefill
    after the first chunk) run no probe. For diagnostics (infllm.eval's `eval.selection_probe`); the probe may
    sync with the host. Restores the previous probe on exit."""
    with _runtime_setting(model, "probe", fn, "selection_probe"):
        yield model


def get_sparse_stats(model: torch.nn.Module, reset: bool = False) -> SparseStats:
    """Stats since the last reset (one host sync); also a read-only dict (density, sparse_token_fraction,
    sparse_tokens, dense_tokens[, select_ms, attention_ms, select_fraction]). Empty (falsy) when nothing was
    counted or the model has no InfLLM attention. With reset=True the counters restart."""
    rts = _runtimes(model)
    if not rts:
        return SparseStats()
    stats = rts[0].stats.snapshot()
    if reset:
        rts[0].stats.reset()
    return stats


def reset_sparse_stats(model: torch.nn.Module) -> None:
    for rt in _runtimes(model):
        rt.stats.reset()


def configure_sparse_stats(model: torch.nn.Module, enabled: bool = True, time_selection: bool = False) -> None:
    """enabled: count tokens / blocks (a few tiny kernels per forward, no sync). time_selection: also time
    selection and attention at the first layer (CUDA events; costs one extra selection pass per forward)."""
    for rt in _runtimes(model):
        rt.stats.enabled = enabled
        rt.stats.time_selection = time_selection


def expected_density(seq_len: int, cfg: AttentionConfig) -> float:
    """Realised density of one document of `seq_len` tokens under `cfg` (1.0 when it runs dense)."""
    if cfg.name == "dense" or (cfg.dense_len != -1 and seq_len < cfg.dense_len):
        return 1.0
    attended, causal = _block_counts(torch.tensor([seq_len]), cfg.block_size, cfg.k_eff)
    return float(attended / causal)


__all__ = ["ATTN_SPARSE", "ATTN_DENSE", "ProbeCall", "SparseStats", "apply_attention", "attention_config_from_hf",
           "attention_config_of", "attention_mode", "check_supported", "configure_sparse_stats", "expected_density",
           "set_group_query_gather", "get_sparse_stats", "infllm_attention_forward", "register", "reset_sparse_stats",
           "selection_probe", "sparse_config_dict"]
