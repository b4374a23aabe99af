"""InfLLM (v1) context-memory attention in plain PyTorch: forward only, one sequence (batch size 1).

The math, conventions and a worked example are in README.md beside this file; in short, the new queries are
processed in chunks of `exc_block_size`, and query i (absolute position i) attends, with one softmax:

  local   keys j in [lo_i, i], lo_i = max(0, i - n_local + 1), at their true distance i - j;
  initial keys j < min(n_init, lo_i) (attention sinks), at the memory distance n_local (sink_position="memory")
          or at their true distance (sink_position="true");
  memory  the tokens of the topk units its chunk retrieved, and the tokens of the "gap" [mem_end, lo_i) that
          have left i's local window but belong to no finished unit yet, all at the memory distance n_local.

Positions enter only through RoPE (HF's rotate_half convention, cos/sin = cos/sin(position * inv_freq) *
attention_scaling): a local pair is rotated at (i, j), a memory pair at (n_local, 0), so every memory key is
exactly n_local tokens before every query whatever its true position.

Legend: T keys so far (all tokens of the sequence), L new queries (the last L of them), C queries of one chunk,
H_q / H_kv heads, G = H_q // H_kv, d head dim, Bk = block_size, U finished units, r = repr_topk, K keys of a
chunk. Shapes in names: `q_HGCd` is [H_kv, G, C, d].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

SINK_POSITIONS = ("memory", "true")


@dataclass
class ContextMemory:
    """What InfLLM remembers about a sequence between calls (a prefill in pieces, then one call per decoded
    token). The keys and values themselves are not here: the caller keeps them (HF's KV cache) and passes all T
    of them to every call.

    token_score [H_kv, T] float32: the attention each key received while it was inside the local window of a
      query, summed over those queries and over the G query heads of its KV head.
    repr_idx [H_kv, U, r] int64: absolute positions of the representative keys of each finished unit.
    unit_repr [H_kv, U, d] float32: the mean of those (pre-RoPE) keys, what retrieval scores against.
    """
    token_score: torch.Tensor
    repr_idx: torch.Tensor
    unit_repr: torch.Tensor

    @classmethod
    def empty(cls, num_kv_heads: int, head_dim: int, repr_topk: int, device: torch.device) -> "ContextMemory":
        return cls(token_score=torch.zeros(num_kv_heads, 0, dtype=torch.float32, device=device),
                   repr_idx=torch.zeros(num_kv_heads, 0, repr_topk, dtype=torch.long, device=device),
                   unit_repr=torch.zeros(num_kv_heads, 0, head_dim, dtype=torch.float32, device=device))

    @property
    def length(self) -> int:
        return self.token_score.shape[1]

    @property
    def num_units(self) -> int:
        return self.unit_repr.shape[1]


@dataclass
class ChunkSelection:
    """The memory units one chunk of queries [start, end) retrieved: unit u holds tokens
    [n_init + u * Bk, n_init + (u + 1) * Bk). units int64 [H_kv, k_sel], ascending; k_sel = min(topk, U)."""
    start: int
    end: int
    num_units: int
    units: torch.Tensor


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0
         ) -> torch.Tensor:
    """Rotate x [..., n, d] to positions [n] (HF's convention: the two halves of d pair up, cos/sin computed in
    float32 as position * inv_freq and multiplied by attention_scaling). Returns float32."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos() * attention_scaling, angles.sin() * attention_scaling
    x = x.to(torch.float32)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def check_v1_config(block_size: int, n_init: int, n_local: int, topk: int, repr_topk: int, exc_block_size: int,
                    sink_position: str) -> None:
    for name, value in (("block_size", block_size), ("n_local", n_local), ("repr_topk", repr_topk),
                        ("exc_block_size", exc_block_size)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value in (("n_init", n_init), ("topk", topk)):
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if repr_topk > block_size:
        raise ValueError(f"repr_topk must be <= block_size={block_size}, got {repr_topk}")
    if sink_position not in SINK_POSITIONS:
        raise ValueError(f"sink_position must be one of {SINK_POSITIONS}, got {sink_position!r}")


def _finish_units(memory: ContextMemory, k_HTd: torch.Tensor, num_units: int, *, n_init: int, block_size: int,
                  repr_topk: int) -> None:
    """Close units up to `num_units`: their keys have left every future local window, so their scores are final.
    A unit's representatives are its repr_topk keys of highest token_score (per KV head)."""
    done = memory.num_units
    if num_units <= done:
        return
    H = k_HTd.shape[0]
    new = num_units - done
    start, end = n_init + done * block_size, n_init + num_units * block_size
    score_HUB = memory.token_score[:, start:end].reshape(H, new, block_size)
    top_HUr = score_HUB.topk(repr_topk, dim=-1).indices
    unit_start = start + torch.arange(new, device=top_HUr.device) * block_size
    idx_HUr = unit_start[None, :, None] + top_HUr
    heads = torch.arange(H, device=k_HTd.device)[:, None]
    keys_HUrd = k_HTd[heads, idx_HUr.reshape(H, -1)].reshape(H, new, repr_topk, -1).to(torch.float32)
    memory.repr_idx = torch.cat([memory.repr_idx, idx_HUr], dim=1)
    memory.unit_repr = torch.cat([memory.unit_repr, keys_HUrd.mean(dim=2)], dim=1)


def _attend_chunk(q_HGCd: torch.Tensor, k_HTd: torch.Tensor, v_HTd: torch.Tensor, memory: ContextMemory,
                  start: int, end: int, inv_freq: torch.Tensor, attention_scaling: float, scale: float, *,
                  block_size: int, n_init: int, n_local: int, topk: int, repr_topk: int, sink_position: str
                  ) -> Tuple[torch.Tensor, ChunkSelection]:
    """Queries [start, end) over keys [0, end). Returns ([H_kv, G, C, d] float32, the chunk's selection)."""
    H, G, C, d = q_HGCd.shape
    device = q_HGCd.device
    pos_q = torch.arange(start, end, device=device)
    lo_q = (pos_q - n_local + 1).clamp(min=0)
    lo_first, lo_last = max(0, start - n_local + 1), max(0, end - n_local)
    # Units wholly before the first query's local window are in memory for the whole chunk.
    num_units = max(0, (lo_first - n_init) // block_size)
    mem_end = n_init + num_units * block_size
    _finish_units(memory, k_HTd, num_units, n_init=n_init, block_size=block_size, repr_topk=repr_topk)

    # Query rotations: own position for local pairs, n_local for memory pairs (memory keys sit at position 0).
    q_local_HGCd = rope(q_HGCd, pos_q, inv_freq, attention_scaling)
    q_mem_HGCd = rope(q_HGCd, torch.full((C,), n_local, device=device), inv_freq, attention_scaling)

    units = torch.zeros(H, 0, dtype=torch.long, device=device)
    if num_units > 0 and topk > 0:
        # Retrieval: mean over the chunk's queries (and the group's heads) of their memory-rotated vectors,
        # dotted with the mean of each unit's representative keys rotated to position 0 (= times scaling).
        q_mean_Hd = q_mem_HGCd.mean(dim=(1, 2))
        unit_score_HU = torch.einsum("hd,hud->hu", q_mean_Hd, memory.unit_repr[:, :num_units] * attention_scaling)
        units = unit_score_HU.topk(min(topk, num_units), dim=-1).indices.sort(dim=-1).values

    # Keys at the memory distance: initial tokens (sink_position="memory"), retrieved units, the gap.
    init_idx = torch.arange(min(n_init, lo_last), device=device)
    gap_idx = torch.arange(mem_end, max(mem_end, lo_last), device=device)
    unit_tok_idx = (n_init + units[:, :, None] * block_size
                    + torch.arange(block_size, device=device)).reshape(H, -1)
    mem_parts = [unit_tok_idx, gap_idx.expand(H, -1)]
    if sink_position == "memory":
        mem_parts.insert(0, init_idx.expand(H, -1))
    mem_idx_HK = torch.cat(mem_parts, dim=1)
    heads = torch.arange(H, device=device)[:, None]
    k_mem_HKd = k_HTd[heads, mem_idx_HK].to(torch.float32) * attention_scaling
    v_mem_HKd = v_HTd[heads, mem_idx_HK]
    # A memory key is visible to query i iff it is older than i's local window (always true for unit tokens).
    mem_visible_CK = mem_idx_HK[:, None, :] < lo_q[None, :, None]

    # Keys at their true distance: the local span [lo_first, end) (and the initial tokens if sink_position=true).
    span_idx = torch.arange(lo_first, end, device=device)
    if sink_position == "true":
        true_idx = torch.cat([init_idx, span_idx])
    else:
        true_idx = span_idx
    n_true_init = true_idx.shape[0] - span_idx.shape[0]
    k_true_HKd = rope(k_HTd[:, true_idx], true_idx, inv_freq, attention_scaling)
    v_true_HKd = v_HTd[:, true_idx]
    in_window_CK = (true_idx[None, :] >= lo_q[:, None]) & (true_idx[None, :] <= pos_q[:, None])
    if n_true_init:
        in_window_CK[:, :n_true_init] = init_idx[None, :] < lo_q[:, None]

    # Logits with the visibility masks folded in as additive -inf biases (one baddbmm per part). Rows are
    # (g, c) pairs: [H_kv, G * C, K].
    neg_inf = torch.tensor(float("-inf"), device=device)
    zero = torch.tensor(0.0, device=device)
    bias_mem = torch.where(mem_visible_CK, zero, neg_inf)[:, None].expand(H, G, C, -1).reshape(H, G * C, -1)
    bias_true = torch.where(in_window_CK, zero, neg_inf)[None].expand(G, C, -1).reshape(1, G * C, -1)
    logits_mem = torch.baddbmm(bias_mem, q_mem_HGCd.reshape(H, G * C, d), k_mem_HKd.transpose(1, 2), alpha=scale)
    logits_true = torch.baddbmm(bias_true, q_local_HGCd.reshape(H, G * C, d), k_true_HKd.transpose(1, 2),
                                alpha=scale)
    # One softmax over both parts, without concatenating them: a shared row maximum (every query sees at least
    # itself among the true-distance keys, so it is finite), exponentials in place, one denominator.
    row_max = logits_true.amax(dim=-1, keepdim=True)
    if logits_mem.shape[-1]:
        row_max = torch.maximum(row_max, logits_mem.amax(dim=-1, keepdim=True))
    p_mem = logits_mem.sub_(row_max).exp_()
    p_true = logits_true.sub_(row_max).exp_()
    inv_denom = 1.0 / (p_mem.sum(dim=-1, keepdim=True) + p_true.sum(dim=-1, keepdim=True))
    out = torch.bmm(p_mem, v_mem_HKd.to(torch.float32)) + torch.bmm(p_true, v_true_HKd.to(torch.float32))
    out_HGCd = (out * inv_denom).reshape(H, G, C, d)

    with torch.no_grad():
        # token_score += sum over the chunk's rows of the probabilities p_true / denominator (local span only).
        received = torch.bmm(inv_denom.transpose(1, 2), p_true[..., n_true_init:])[:, 0]
        memory.token_score[:, lo_first:end] += received
    return out_HGCd, ChunkSelection(start, end, num_units, units)


def infllm_v1_attn_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_freq: torch.Tensor, *,
                         memory: Optional[ContextMemory] = None, attention_scaling: float = 1.0,
                         block_size: int = 128, n_init: int = 128, n_local: int = 4096, topk: int = 16,
                         repr_topk: int = 4, exc_block_size: int = 512, sink_position: str = "memory",
                         softmax_scale: Optional[float] = None, return_selection: bool = False):
    """InfLLM (v1) attention of L new queries over all T keys of one sequence.

    q [L, H_q, d], k / v [T, H_kv, d] (T >= L), all before RoPE; query t sits at absolute position T - L + t, key
    j at position j. inv_freq [d / 2] and attention_scaling are the model's RoPE (its rotary embedding's
    `inv_freq` / `attention_scaling`). `memory` is None for a fresh sequence (then T must equal L), else the
    ContextMemory returned by the previous call on the same sequence (its length must be T - L).

    Returns (out [L, H_q, d] in q's dtype, memory) and, with return_selection, a list of ChunkSelection.
    Inference only: computed in float32 with in-place softmax steps, not meant for autograd.
    """
    check_v1_config(block_size, n_init, n_local, topk, repr_topk, exc_block_size, sink_position)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q [L, H_q, d], k / v [T, H_kv, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    L, Hq, d = q.shape
    T, Hkv, dk = k.shape
    if v.shape != k.shape or dk != d:
        raise ValueError(f"k and v must be [T, H_kv, d] with q's d={d}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv}")
    if T < L:
        raise ValueError(f"k / v hold T={T} keys but there are L={L} new queries; T must be >= L")
    if inv_freq.shape != (d // 2,):
        raise ValueError(f"inv_freq must be [d / 2] = [{d // 2}], got {tuple(inv_freq.shape)}")
    past = T - L
    if memory is None:
        if past:
            raise ValueError(f"memory=None means a fresh sequence, but k / v hold {past} keys before the {L} new "
                             "queries; pass the ContextMemory of the previous call")
        memory = ContextMemory.empty(Hkv, d, repr_topk, q.device)
    elif memory.length != past:
        raise ValueError(f"the ContextMemory has seen {memory.length} tokens but k / v hold {past} before the "
                         f"{L} new queries; a memory belongs to one sequence and its calls must follow each other")
    scale = d ** -0.5 if softmax_scale is None else float(softmax_scale)
    G = Hq // Hkv
    memory.token_score = torch.cat([memory.token_score,
                                    torch.zeros(Hkv, L, dtype=torch.float32, device=q.device)], dim=1)
    # Query head h reads KV head h // G (HF's repeat_kv order).
    q_HGLd = q.reshape(L, Hkv, G, d).permute(1, 2, 0, 3)
    k_HTd, v_HTd = k.transpose(0, 1), v.transpose(0, 1)
    outs: List[torch.Tensor] = []
    selections: List[ChunkSelection] = []
    # float32 throughout, also under an autocast region (eval.py runs bf16 autocast on GPU).
    with torch.autocast(q.device.type, enabled=False):
        for start in range(past, T, exc_block_size):
            end = min(start + exc_block_size, T)
            out, sel = _attend_chunk(q_HGLd[:, :, start - past:end - past], k_HTd[:, :end], v_HTd[:, :end],
                                     memory, start, end, inv_freq, attention_scaling, scale, block_size=block_size,
                                     n_init=n_init, n_local=n_local, topk=topk, repr_topk=repr_topk,
                                     sink_position=sink_position)
            outs.append(out)
            selections.append(sel)
    out = torch.cat(outs, dim=2).permute(2, 0, 1, 3).reshape(L, Hq, d).to(q.dtype)
    if return_selection:
        return out, memory, selections
    return out, memory
