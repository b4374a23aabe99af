"""Ulysses sequence parallelism (`parallel.sp_size`): each packed row is split along the sequence over the
`sp_size` consecutive ranks of one sequence-parallel group; around every attention call DeepSpeed's
`UlyssesSPAttentionHF` exchanges (all-to-all) the local sequence slices of all heads for the whole sequence of
`H / sp_size` heads, runs our attention function (dense or InfLLM-V2) on whole documents, and exchanges back.
Everything outside attention (embeddings, MLPs, norms, the loss) is per token and runs on the local slice.

Data. Every rank of a group builds the same loader (data-parallel rank `rank // sp_size`), so the group reads one
row stream with one resumable state and no communication: `shard_batch` cuts each rank's slice. `cu_seqlens`
and `max_seqlen` stay global (they describe the whole row the attention sees after the exchange), positions
restart per document as in the unsplit row (a document may span the slice boundary), and the labels are shifted
by one on the whole row before it is cut (`shift_labels`), so the token after a slice boundary is still the
target of the token before it.

Gradients. DeepSpeed reduces over every rank and divides by the number of data-parallel replicas (`mpu`:
DeepSpeed's `parallel_state_sp`); the trainer normalises each rank's summed loss by the window's target count
divided by that number, so the update equals the one-process update over the same rows.

Exact selection when a query group is split. InfLLM-V2 scores blocks with the sum of the softmax probabilities
of the G query heads that share a KV head. With `H_kv < sp_size` the exchange replicates each KV head on
`r = sp_size / H_kv` ranks, each holding `G / r` of its query heads, so no rank alone sees the whole sum. The
group's ranks all-gather their query slices for the selection only (no gradient flows through selection): each
then selects with all G heads, the same blocks as one process, and attends with its own heads. The other
design, exchanging partial group scores, would move [tokens, compressed keys] floats per group (4 GiB at 128k
tokens with stride 16) where the queries are [tokens, G - G / r, d] (kernels/infllm_v2/README.md).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch

from data.batch import IGNORE_INDEX, PackedBatch
from infllm.errors import ConfigError

log = logging.getLogger(__name__)


def check_sequence_parallel(cfg, world_size: int) -> None:
    """The settings that can be checked before the model exists; each failure names the setting."""
    sp = cfg.parallel.sp_size
    if sp == 1:
        return
    if cfg.parallel.engine != "deepspeed":
        raise ConfigError(f"parallel.sp_size={sp} needs parallel.engine=deepspeed (e.g. parallel=zero2 or zero3), "
                          f"got parallel.engine={cfg.parallel.engine}")
    if world_size % sp:
        raise ConfigError(f"parallel.sp_size={sp} must divide the world size {world_size} (ranks started by the "
                          "launcher)")
    if cfg.trainer.seq_len % sp:
        raise ConfigError(f"trainer.seq_len={cfg.trainer.seq_len} must be divisible by parallel.sp_size={sp} "
                          "(each rank holds seq_len / sp_size tokens of a row)")
    if cfg.attention.name not in ("dense", "infllm_v2"):
        raise ConfigError(f"parallel.sp_size={sp} works with attention.name=dense or infllm_v2, got "
                          f"{cfg.attention.name}")


def init_sequence_parallel(sp_size: int) -> None:
    """The sequence-parallel and sequence-data-parallel groups (DeepSpeed's `parallel_state_sp`, the `mpu` that
    `deepspeed.initialize` reduces gradients with). Collective: every rank calls it once."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=sp_size)


def sequence_parallel_mpu():
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    return mpu


def _head_counts(model: torch.nn.Module):
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h_q = text.num_attention_heads
    h_kv = getattr(text, "num_key_value_heads", None) or h_q
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // h_q
    return text, h_q, h_kv, head_dim


def apply_sequence_parallel(model: torch.nn.Module, sp_size: int, micro_batch_size: int) -> None:
    """Wrap the model's attention function with DeepSpeed's Ulysses exchange (process-wide: transformers looks
    attention functions up by name) and, where a query group is split, install the all-gather of the group's
    queries for the selection. Collective (creates process groups); after `init_sequence_parallel`."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from infllm.attention import ATTN_DENSE, ATTN_SPARSE, set_group_query_gather

    text, h_q, h_kv, head_dim = _head_counts(model)
    if h_q % sp_size:
        raise ConfigError(f"parallel.sp_size={sp_size} must divide the model's {h_q} attention heads")
    if h_kv % sp_size and sp_size % h_kv:
        raise ConfigError(f"parallel.sp_size={sp_size} and the model's {h_kv} KV heads: one must divide the other "
                          "(each rank holds whole KV heads, or one KV head replicated on sp_size / H_kv ranks)")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (ATTN_SPARSE, ATTN_DENSE):
        raise ConfigError(f"parallel.sp_size={sp_size} needs the model's attention to be infllm's (dense or "
                          f"infllm_v2, set by attention.name), got attn_implementation={impl!r}")
    mpu = sequence_parallel_mpu()
    sp_group = mpu.get_sequence_parallel_group()
    # A second model in the same process (tests, notebooks) wraps the same core function again.
    core = ALL_ATTENTION_FUNCTIONS[impl]
    core = getattr(core, "_infllm_core", core)
    ulysses = UlyssesSPAttentionHF(
        attn=core, batch_size=micro_batch_size, attn_head_count=h_q, attn_head_size=head_dim,
        kv_head_count=h_kv, num_hidden_layers=text.num_hidden_layers, process_group=sp_group,
        seq_length_is_variable=True,
        # Eval runs on rank 0 alone (the others wait): no exchange there, the whole row is local.
        disable_in_eval=True)
    ulysses.core_attn_implementation = impl

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # The exchange rebuilds whole sequences; a mask built for the local slice would not fit them, and ours
        # returns none anyway (documents come from cu_seqlens).
        return ulysses(module, query, key, value, None, *args, **kwargs)

    attention._infllm_core = core
    ALL_ATTENTION_FUNCTIONS[impl] = attention

    replicas = sp_size // h_kv if sp_size > h_kv else 1
    if replicas > 1:
        set_group_query_gather(model, _group_query_gather(sp_group, sp_size, replicas, h_q // h_kv))
    log.info("Ulysses sequence parallelism over %d ranks: %d of %d query heads and %s per rank%s", sp_size,
             h_q // sp_size, h_q, f"{h_kv // sp_size} of {h_kv} KV heads" if replicas == 1 else
             f"1 KV head (replicated on {replicas} ranks)",
             f"; query groups split over {replicas} ranks, gathered for the selection" if replicas > 1 else "")


def _group_query_gather(sp_group, sp_size: int, replicas: int, group_size: int) -> Callable:
    """A function (q [N, h, d], k [N, h_kv, d]) -> the whole query groups of k's heads [N, G * h_kv, d], or None
    when q already holds whole groups (eval, where the exchange is off). The `replicas` consecutive ranks of the
    SP group that share a KV head hold consecutive slices of its query heads (DeepSpeed's head layout), so their
    all-gather in rank order is the group in head order."""
    import torch.distributed as dist

    sp_ranks = dist.get_process_group_ranks(sp_group)
    my_rank = dist.get_rank()
    subgroup = None
    # Collective: every rank creates every subgroup, in the same order.
    for g in range(0, sp_size, replicas):
        ranks = sp_ranks[g:g + replicas]
        pg = dist.new_group(ranks)
        if my_rank in ranks:
            subgroup = pg

    def gather(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
        if q.shape[1] == group_size * k.shape[1]:
            return None
        if q.shape[1] * replicas != group_size * k.shape[1]:
            raise RuntimeError(f"sequence parallelism: expected {group_size // replicas} query heads per rank for "
                               f"a split group of {group_size}, got {q.shape[1]} with {k.shape[1]} KV heads")
        parts = [torch.empty_like(q) for _ in range(replicas)]
        dist.all_gather(parts, q.detach().contiguous(), group=subgroup)
        return torch.cat(parts, dim=1)

    return gather


def shard_batch(batch: PackedBatch, sp_rank: int, sp_size: int) -> Dict[str, Any]:
    """This rank's model inputs for one whole-row batch: its slice of the tokens, positions and shifted labels,
    the global document bounds. With sp_size 1, the whole row (labels shifted the same way)."""
    # Shifted on the whole row: the target of the last token of a slice is the first token of the next one.
    shift = torch.nn.functional.pad(batch.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    L = batch.input_ids.shape[1]
    n = L // sp_size
    sl = slice(sp_rank * n, (sp_rank + 1) * n)
    return dict(input_ids=batch.input_ids[:, sl], position_ids=batch.position_ids[:, sl],
                shift_labels=shift[:, sl].contiguous(), cu_seq_lens_q=batch.cu_seqlens,
                cu_seq_lens_k=batch.cu_seqlens, max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)


def target_count(inputs: List[Dict[str, Any]]) -> int:
    """Target tokens in this rank's slices (host tensors, no device sync)."""
    return sum(int((x["shift_labels"] != IGNORE_INDEX).sum()) for x in inputs)
