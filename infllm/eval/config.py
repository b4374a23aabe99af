"""Schema of the `eval` config group (owned by infllm.eval).

Lengths are in tokens of the model's tokenizer. A sample's depth is where its (first) needle sits inside the
haystack: 0.0 = right after the task header, 1.0 = right before the question.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from infllm.errors import ConfigError
from infllm.eval.ruler import RULER_TASK_NAMES, min_length as ruler_min_length
from infllm.modes import ATTENTION_MODES

# The built-in generators (infllm/eval/tasks.py), then real RULER's 13 tasks (infllm/eval/ruler.py).
TASK_NAMES = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
              "variable_tracking", "common_words") + RULER_TASK_NAMES
MODES = ATTENTION_MODES


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class EvalConfig:
    # Run the suite every N optimizer steps during training (0 = never).
    every_steps: int = 0
    # Any of TASK_NAMES. Perplexity is switched by `perplexity`, not listed here.
    tasks: List[str] = field(default_factory=lambda: ["passkey", "niah_single"])
    lengths: List[int] = field(default_factory=lambda: [2048])
    depths: List[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    # Samples per (task, length, depth); each has its own needle values and haystack offset.
    samples: int = 2
    seed: int = 0
    # Haystack of the needle tasks: filler (repeated sentences) | corpus (held-out real text of cfg.data,
    # stdlib sources when the data pipeline is absent) | auto (passkey: filler, the others: corpus).
    haystack: str = "auto"
    # Real text for haystacks and perplexity: data (held-out documents of cfg.data, topped up with stdlib
    # packages when too few are long enough) | stdlib (stdlib packages only; no corpus preparation, for tests).
    corpus: str = "data"
    # Per-task overrides of the generator's knobs (see infllm/eval/tasks.py), e.g. {niah_multikey: {num_keys: 8}};
    # on the command line: +eval.task_params.niah_multikey.num_keys=8
    task_params: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # teacher_forced (one forward, argmax + log-prob of the answer tokens) | generate (greedy) | both
    scoring: str = "teacher_forced"
    # generate: wrap context + question in the tokenizer's chat template (instruct models).
    chat_template: bool = False
    # generate: new tokens beyond the answer's own length.
    extra_new_tokens: int = 16
    # dense | sparse (InfLLM-V2 forced on) | model (as loaded: sparse past attention.dense_len)
    modes: List[str] = field(default_factory=lambda: ["dense"])
    # Perplexity by position on held-out documents of at least ppl_length tokens.
    perplexity: bool = True
    # 0 = the largest of `lengths`.
    ppl_length: int = 0
    ppl_docs: int = 1
    # Position bucket width; 0 = auto (length // 4, between 256 and 4096).
    ppl_bucket: int = 0
    # Run the model over the context in pieces of this many tokens with a KV cache (0 = one forward).
    prefill_chunk: int = 0
    # Rows of hidden states sent through lm_head at once when every position's logits are needed.
    logits_chunk: int = 1024
    # Standalone eval.py: a Hugging Face model directory to evaluate (null = cfg.model as configured).
    checkpoint: Optional[str] = None
    # Where eval.py writes the report (null = the Hydra run directory).
    out_dir: Optional[str] = None
    # A trainer's metrics.jsonl for the loss-curve plot (null = look beside the checkpoint).
    metrics_file: Optional[str] = None
    plots: bool = True
    # Diagnostic for sparse mode (infllm/eval/probe.py): per sample, does InfLLM-V2's block selection for the
    # query that predicts the answer contain the target needle's key block(s), at every layer and KV head?
    # Adds needle_block_recall / needle_block_rank to the records, metrics and report. Off: no cost at all.
    selection_probe: bool = False

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {self.every_steps}")
        for t in self.tasks:
            _check(t in TASK_NAMES, "eval.tasks", f"unknown task {t!r}; expected any of {TASK_NAMES}")
        for t in (t for t in self.tasks if t in RULER_TASK_NAMES):
            _check(min(self.lengths, default=0) >= ruler_min_length(t), "eval.lengths",
                   f"{t} needs lengths >= {ruler_min_length(t)} tokens (RULER's generator), got {list(self.lengths)}")
        for t in self.task_params:
            _check(t in TASK_NAMES, "eval.task_params", f"unknown task {t!r}; expected any of {TASK_NAMES}")
        _check(len(self.lengths) > 0 and all(n >= 64 for n in self.lengths), "eval.lengths",
               f"expected at least one length >= 64 tokens, got {list(self.lengths)}")
        _check(len(self.depths) > 0 and all(0.0 <= d <= 1.0 for d in self.depths), "eval.depths",
               f"expected depths in [0, 1], got {list(self.depths)}")
        _check(self.samples >= 1, "eval.samples", f"must be >= 1, got {self.samples}")
        _check(self.haystack in ("auto", "filler", "corpus"), "eval.haystack",
               f"expected auto, filler or corpus, got {self.haystack!r}")
        _check(self.corpus in ("data", "stdlib"), "eval.corpus", f"expected data or stdlib, got {self.corpus!r}")
        _check(self.scoring in ("teacher_forced", "generate", "both"), "eval.scoring",
               f"expected teacher_forced, generate or both, got {self.scoring!r}")
        _check(len(self.modes) > 0 and all(m in MODES for m in self.modes), "eval.modes",
               f"expected a non-empty list of {MODES}, got {list(self.modes)}")
        _check(self.ppl_length >= 0, "eval.ppl_length", f"must be >= 0, got {self.ppl_length}")
        _check(self.ppl_docs >= 1, "eval.ppl_docs", f"must be >= 1, got {self.ppl_docs}")
        _check(self.ppl_bucket >= 0, "eval.ppl_bucket", f"must be >= 0, got {self.ppl_bucket}")
        _check(self.prefill_chunk >= 0, "eval.prefill_chunk", f"must be >= 0, got {self.prefill_chunk}")
        _check(self.logits_chunk >= 1, "eval.logits_chunk", f"must be >= 1, got {self.logits_chunk}")
        _check(self.extra_new_tokens >= 0, "eval.extra_new_tokens", f"must be >= 0, got {self.extra_new_tokens}")

    @property
    def resolved_ppl_length(self) -> int:
        return self.ppl_length or max(self.lengths)
