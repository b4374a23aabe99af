"""Selection probe (`eval.selection_probe`): does InfLLM-V2's block selection pick the needle?

A model can fail a needle task in sparse mode for two reasons: the block selection never offers the needle's
key block to the query that must produce the answer, or it does and the attention still fails to copy it.
With the probe on, every sample scored in `sparse` mode records, at every decoder layer and every KV head,
the blocks that InfLLM-V2 selects for the teacher-forced positions that predict the target value's tokens.

Definitions (P = len(prompt_ids), B = the model's block_size, positions are token indices of the forward's
input prompt + answer[:-1], which is one document starting at 0):
  - needle blocks: p // B for p in value_positions[target] .. + len(the target value's tokens) - 1;
  - answer queries: P - 1 + i for i in value_spans[target] (the logits row that predicts answer token i);
    the first one is "the query";
  - a (layer, KV head) pair hits when its selection I(query) contains every needle block;
  - needle_block_recall: share of (layer, KV head) pairs that hit, for the first answer query;
    needle_block_recall_answer: the same over every answer query of the target value;
  - rank of a needle block: 1 + the number of non-forced candidate blocks (0 .. c = query // B, minus the
    init blocks and the local window) whose block score is strictly higher; 0 when the block is forced (init or
    local). Scores are the reference's steps 1-5 (`kernels.infllm_v2.naive.block_scores_doc`, the one
    implementation) on the layer's q / k, fp32. A sample's rank is the worst rank over its needle blocks;
    needle_block_rank is the median over (layer, KV head) pairs, needle_block_rank_best the minimum. A
    non-forced block is selected when its rank is within the free slots (k_eff minus the forced blocks:
    topk - init_blocks - 1 once the query is past the window), up to ties between nearly equal scores.

The selection itself is the public `kernels.infllm_v2_select` with the model's own config and impl (the
Triton kernel on CUDA), run once per layer on the layer's q / k as the attention received them. Costs one
extra selection and one reference block-score pass per layer, and a few host syncs per sample; nothing when
the option is off.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch

from infllm.eval.report import PROBE_METRICS
from infllm.eval.tasks import Sample

log = logging.getLogger(__name__)

# Keys a probed record gains; PROBE_METRICS of them also go to the flat metrics (report.flat_metrics).
PROBE_RECORD_KEYS = ("needle_block_recall", "needle_block_recall_answer", "needle_block_rank",
                     "needle_block_rank_best", "selection_probe")


@dataclass
class NeedleTarget:
    value_start: int   # position of the target value's first token
    value_len: int     # its number of tokens
    queries: List[int]  # positions whose logits predict the value's tokens (teacher forced), in order

    def blocks(self, block_size: int) -> List[int]:
        return sorted({p // block_size for p in range(self.value_start, self.value_start + self.value_len)})


def needle_target(sample: Sample) -> Optional[NeedleTarget]:
    """Where the target needle's value sits and which positions must produce it; None when the value is not
    copied from the context (common_words)."""
    if not sample.value_positions or not sample.value_spans:
        return None
    start = sample.value_positions[sample.target]
    if start < 0:
        return None
    a, b = sample.value_spans[sample.target]
    P = len(sample.prompt_ids)
    return NeedleTarget(value_start=start, value_len=b - a, queries=[P - 1 + i for i in range(a, b)])


def forced_blocks(query: int, block_size: int, init_blocks: int, n_local: int) -> List[bool]:
    """Step 6 for one query: forced[b] for b = 0 .. c (init blocks and the local window, the own block
    included)."""
    c = query // block_size
    return [b < init_blocks or b >= c - n_local for b in range(c + 1)]


def needle_rank(scores_B: torch.Tensor, query: int, needle_blocks: List[int], block_size: int, init_blocks: int,
                n_local: int) -> int:
    """Worst rank of the needle blocks among the non-forced candidates of `query` (0 = all forced)."""
    forced = forced_blocks(query, block_size, init_blocks, n_local)
    c = len(forced) - 1
    key = scores_B[:c + 1].float().masked_fill(scores_B[:c + 1] == float("-inf"), -1.0).tolist()
    free = [key[b] for b in range(c + 1) if not forced[b]]
    worst = 0
    for nb in needle_blocks:
        if nb <= c and not forced[nb]:
            worst = max(worst, 1 + sum(1 for x in free if x > key[nb]))
    return worst


class SelectionRecorder:
    """The probe callback (`infllm.attention.selection_probe(model, recorder)`) for one sample: on the first
    sparse call of each layer whose input holds the first answer query, it runs the model's selection and
    keeps the selected blocks and the block scores of the answer queries (on the host)."""

    def __init__(self, target: NeedleTarget):
        self.target = target
        self.selected: Dict[int, torch.Tensor] = {}  # layer -> int32 [H_kv, Q, k_eff]
        self.scores: Dict[int, torch.Tensor] = {}    # layer -> fp32 [H_kv, Q, NB]
        self.queries: List[int] = []
        self.kernel_kwargs: Optional[Dict[str, Any]] = None
        self.seconds = 0.0
        self._order = 0

    def __call__(self, call) -> None:
        from kernels import infllm_v2_select
        from kernels.infllm_v2.naive import block_scores_doc, check_sparse_config

        layer = call.layer_idx if call.layer_idx is not None else self._order
        self._order += 1
        if layer in self.selected:
            return  # a later forward (e.g. generation's) of a layer already recorded
        cu = call.cu_seqlens.tolist()
        doc_end = cu[1]
        if cu[0] != 0 or self.target.queries[0] >= doc_end:
            return  # not the sample's forward (or a prefill chunk before the answer)
        if call.dense_len != -1 and doc_end < call.dense_len:
            return  # this document attended densely
        t0 = time.perf_counter()
        kw = dict(call.kernel_kwargs)
        queries = [t for t in self.target.queries if t < doc_end]
        idx = infllm_v2_select(call.q, call.k, call.cu_seqlens, call.max_seqlen, softmax_scale=call.softmax_scale,
                               **kw)
        rows = torch.tensor(queries, device=idx.device)
        self.selected[layer] = idx[:, rows].cpu()
        scale = call.softmax_scale if call.softmax_scale is not None else call.q.shape[-1] ** -0.5
        # The reference's block scores of the whole document (the answer queries are at its end, so computing
        # fewer rows would save little), kept for the answer queries only.
        sparse_cfg = check_sparse_config(kw["block_size"], kw["kernel_size"], kw["kernel_stride"],
                                         kw["init_blocks"], kw["window_size"], kw["topk"])
        scores_HTB = block_scores_doc(call.q[:doc_end], call.k[:doc_end], sparse_cfg, scale, kw["lse_approx"])
        self.scores[layer] = scores_HTB[:, rows].float().cpu()
        self.queries, self.kernel_kwargs = queries, kw
        self.seconds += time.perf_counter() - t0

    def metrics(self) -> Dict[str, Any]:
        """The record's probe fields ({} when nothing was recorded)."""
        if not self.selected:
            return {}
        kw = self.kernel_kwargs
        B, init, n_local = kw["block_size"], kw["init_blocks"], kw["window_size"] // kw["block_size"]
        k_eff = kw["topk"] + n_local
        needle = self.target.blocks(B)
        layers = sorted(self.selected)
        q0 = self.queries[0]
        n_forced = sum(forced_blocks(q0, B, init, n_local))
        hits_first, hits_all, ranks, layer_recall = [], [], [], []
        for layer in layers:
            sel = self.selected[layer]
            h_kv = sel.shape[0]
            hl = []
            for h in range(h_kv):
                for j in range(sel.shape[1]):
                    chosen = set(sel[h, j].tolist())
                    hit = all(b in chosen for b in needle)
                    hits_all.append(hit)
                    if j == 0:
                        hl.append(hit)
            hits_first += hl
            layer_recall.append(sum(hl) / len(hl))
            ranks.append([needle_rank(self.scores[layer][h, 0], q0, needle, B, init, n_local)
                          for h in range(h_kv)])
        flat_ranks = [r for row in ranks for r in row]
        return {
            "needle_block_recall": sum(hits_first) / len(hits_first),
            "needle_block_recall_answer": sum(hits_all) / len(hits_all),
            "needle_block_rank": float(statistics.median(flat_ranks)),
            "needle_block_rank_best": float(min(flat_ranks)),
            "selection_probe": {
                "needle_blocks": needle, "query": q0, "query_block": q0 // B, "answer_queries": self.queries,
                "candidates": q0 // B + 1, "forced": n_forced, "free_slots": max(0, k_eff - n_forced),
                "layers": layers, "layer_recall": layer_recall, "ranks": ranks, "seconds": self.seconds,
            },
        }


def sample_recorder(sample: Sample, mode: str, enabled: bool) -> Optional[SelectionRecorder]:
    """A recorder for `sample` when the probe is on and the mode is sparse (None otherwise)."""
    if not enabled or mode != "sparse":
        return None
    target = needle_target(sample)
    return SelectionRecorder(target) if target is not None else None


@contextlib.contextmanager
def recording(model, recorder: Optional[SelectionRecorder]) -> Iterator[None]:
    """Install `recorder` as the model's selection probe for the block (nothing when None)."""
    if recorder is None:
        yield
        return
    from infllm.attention import selection_probe

    with selection_probe(model, recorder):
        yield


__all__ = ["PROBE_METRICS", "PROBE_RECORD_KEYS", "NeedleTarget", "SelectionRecorder", "needle_rank", "needle_target",
           "recording", "sample_recorder"]
