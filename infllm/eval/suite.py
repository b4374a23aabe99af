"""run_suite: generate the samples once, score them in every attention mode, measure perplexity by position,
write the report, return flat metrics. Used by the trainer every `eval.every_steps` and by eval.py."""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from infllm.eval import report, ruler
from infllm.eval.config import EvalConfig
from infllm.eval.haystack import corpus_haystack, heldout_documents
from infllm.eval.perplexity import perplexity_by_position
from infllm.eval.probe import recording, sample_recorder
from infllm.eval.scoring import model_device, score_generate, score_teacher_forced
from infllm.eval.tasks import HaystackPool, Sample, generate_samples

log = logging.getLogger(__name__)


def mode_context(model, mode: str):
    """The attention switch for `mode`, or None when the mode cannot run on this model: without the
    InfLLM swap (infllm.attention absent, or a model that never went through apply_attention) only the
    model's own attention exists, which serves "dense" and "model" but not "sparse"."""
    from infllm.attention import attention_config_of, attention_mode

    try:
        attention_config_of(model)
    except ValueError:
        return None if mode == "sparse" else contextlib.nullcontext()
    return attention_mode(model, mode)


def _default_data_cfg():
    from data.config import DataConfig

    return DataConfig()


def build_samples(tokenizer, eval_cfg: EvalConfig, data_cfg=None) -> List[Sample]:
    # The corpus is read only if a task asks for a real-text window.
    pool = HaystackPool(tokenizer, lambda n: corpus_haystack(data_cfg, tokenizer, n))
    samples: List[Sample] = []
    for task in eval_cfg.tasks:
        if ruler.is_ruler_task(task):
            samples += ruler.generate_samples(task, tokenizer, sorted(eval_cfg.lengths), eval_cfg.samples,
                                              eval_cfg.seed, eval_cfg.task_params.get(task))
            continue
        samples += generate_samples(task, tokenizer, sorted(eval_cfg.lengths), list(eval_cfg.depths),
                                    eval_cfg.samples, eval_cfg.seed, pool, eval_cfg.haystack,
                                    eval_cfg.task_params.get(task))
    return samples


# The trainer calls run_suite every N steps with the same config: build the samples and documents once.
_INPUTS_CACHE: Dict[str, Tuple[List[Sample], List[List[int]], int]] = {}


def _inputs(tokenizer, eval_cfg: EvalConfig, data_cfg) -> Tuple[List[Sample], List[List[int]], int]:
    fields = ("tasks", "lengths", "depths", "samples", "seed", "haystack", "task_params", "corpus", "perplexity",
              "ppl_docs", "ppl_length")
    key = json.dumps([id(tokenizer), repr(data_cfg)] + [getattr(eval_cfg, f) for f in fields], default=str)
    if key not in _INPUTS_CACHE:
        samples = build_samples(tokenizer, eval_cfg, data_cfg) if eval_cfg.tasks else []
        docs, heldout = [], 0
        if eval_cfg.perplexity:
            n = eval_cfg.resolved_ppl_length
            docs, heldout = heldout_documents(data_cfg, tokenizer, n, eval_cfg.ppl_docs)
            docs = [d[:n] for d in docs]
        _INPUTS_CACHE.clear()
        _INPUTS_CACHE[key] = (samples, docs, heldout)
    return _INPUTS_CACHE[key]


def _record(sample: Sample, mode: str) -> Dict[str, Any]:
    return {"mode": mode, "task": sample.task, "length": sample.length, "depth": sample.depth,
            "index": sample.index, "tokens": sample.total_len, "actual_depth": sample.actual_depth,
            "answer": sample.values}


def _score(model, tokenizer, s: Sample, mode: str, eval_cfg: EvalConfig) -> Dict[str, Any]:
    rec = _record(s, mode)
    t0 = time.time()
    # eval.selection_probe: record InfLLM-V2's block selection for the answer queries (sparse mode only), on the
    # teacher-forced forward, else on generation's prefill (same positions unless chat-wrapped).
    recorder = sample_recorder(s, mode, eval_cfg.selection_probe)
    # RULER's tasks are scored by RULER's metric on a generation, whatever eval.scoring says.
    is_ruler = ruler.is_ruler_task(s.task)
    if is_ruler:
        rec.update(ruler.score_ruler(model, tokenizer, s, eval_cfg.chat_template))
    teacher_forced = eval_cfg.scoring in ("teacher_forced", "both") and not is_ruler
    if teacher_forced:
        with recording(model, recorder):
            rec.update(score_teacher_forced(model, s, eval_cfg.prefill_chunk))
    if eval_cfg.scoring in ("generate", "both") and not is_ruler:
        gen_recorder = None if (teacher_forced or eval_cfg.chat_template) else recorder
        with recording(model, gen_recorder):
            scores, text = score_generate(model, tokenizer, s, eval_cfg.chat_template, eval_cfg.extra_new_tokens)
        rec.update({f"gen_{k}": v for k, v in scores.items()}, gen_text=text)
        if eval_cfg.scoring == "generate":
            rec.update(exact=scores["exact"], value_acc=scores["value_acc"])
    if recorder is not None:
        probed = recorder.metrics()
        if not probed:
            log.warning("eval: the selection probe recorded nothing for %s len=%d depth=%s (the answer queries did "
                        "not take the sparse path: eval.prefill_chunk, or a chat-wrapped generation)",
                        s.task, s.length, s.depth)
        rec.update(probed)
    rec["seconds"] = time.time() - t0
    log.debug("eval %s %s len=%d depth=%s: %s", mode, s.task, s.length, s.depth,
              {k: rec[k] for k in ("exact", "logprob") if k in rec})
    return rec


def _mean_of(records: List[Dict[str, Any]], task: str) -> float:
    xs = [r["exact"] for r in records if r["task"] == task]
    return sum(xs) / len(xs)


class EvalInterrupted(Exception):
    """run_suite's `should_stop` answered True between two samples (the trainer got a stop signal)."""


def run_suite(model, tokenizer, eval_cfg: EvalConfig, out_dir: str, modes: Optional[Sequence[str]] = None, *,
              data_cfg=None, step: Optional[int] = None, metrics_path: Optional[str] = None,
              title: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Score `model` on the configured tasks in each attention mode (default: eval_cfg.modes) and write
    eval_results.json, eval_report.md and the PNGs to `out_dir`. Returns flat metrics without a prefix
    (<mode>/<task>/acc, <mode>/ppl/0-4096, seconds; the trainer logs them under "eval/").
    `data_cfg`: the corpus for real-text haystacks and perplexity (default: DataConfig(), the embedded corpus)."""
    modes = list(modes if modes is not None else eval_cfg.modes)
    if eval_cfg.corpus == "stdlib":
        data_cfg = None
    elif data_cfg is None:
        data_cfg = _default_data_cfg()
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    was_training = model.training
    model.eval()
    records: List[Dict[str, Any]] = []
    ppl: Dict[str, Dict] = {}
    skipped: List[str] = []
    try:
        samples, ppl_docs, ppl_heldout = _inputs(tokenizer, eval_cfg, data_cfg)
        log.info("eval: %d samples, %d perplexity doc(s), modes %s", len(samples), len(ppl_docs), modes)
        for mode in modes:
            ctx = mode_context(model, mode)
            if ctx is None:
                log.warning("eval: mode %r needs the InfLLM-V2 attention swap; skipped", mode)
                skipped.append(mode)
                continue
            with ctx, torch.no_grad():
                if should_stop is not None and should_stop():
                    raise EvalInterrupted(f"stopped before mode {mode}")
                if ppl_docs:
                    t0 = time.time()
                    p = perplexity_by_position(model, ppl_docs, eval_cfg.resolved_ppl_length, eval_cfg.ppl_bucket,
                                               eval_cfg.prefill_chunk, eval_cfg.logits_chunk)
                    ppl[mode] = dict(p.as_dict(), heldout_docs=ppl_heldout, seconds=time.time() - t0)
                    log.info("eval %s perplexity at %d tokens: %.2f (%.0f s)", mode, p.length, p.overall,
                             ppl[mode]["seconds"])
                # Shortest first, so a run stopped early still has every task at the short lengths.
                for length in sorted({s.length for s in samples}):
                    batch = [s for s in samples if s.length == length]
                    t_len = time.time()
                    for s in batch:
                        if should_stop is not None and should_stop():
                            raise EvalInterrupted(f"stopped after {len(records)} of {len(samples) * len(modes)} "
                                                  "samples")
                        records.append(_score(model, tokenizer, s, mode, eval_cfg))
                        # A partial report (no plots) after every sample: long CPU runs can be read meanwhile.
                        partial = dict(report.flat_metrics(records, ppl), seconds=time.time() - t_start)
                        _write_report(model, eval_cfg, out_dir, records, ppl, partial, skipped, step, None, title,
                                      plots=False)
                    done = records[-len(batch):]
                    log.info("eval %s %d tokens: %s (%.1f s/sample)", mode, length, ", ".join(
                        f"{t} {100 * _mean_of(done, t):.0f}%" for t in dict.fromkeys(r["task"] for r in done)),
                        (time.time() - t_len) / len(batch))
    finally:
        if was_training:
            model.train()
    metrics = report.flat_metrics(records, ppl)
    metrics["seconds"] = time.time() - t_start
    _write_report(model, eval_cfg, out_dir, records, ppl, metrics, skipped, step, metrics_path, title)
    return metrics


def _write_report(model, eval_cfg, out_dir, records, ppl, metrics, skipped, step, metrics_path, title,
                  plots: bool = True) -> None:
    config = getattr(model, "config", None)
    device = model_device(model)
    if device.type == "cpu":
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    header = {
        "model": title or getattr(config, "name_or_path", None) or type(model).__name__,
        "step": step,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "attention": getattr(config, "_attn_implementation", None),
        "scoring": eval_cfg.scoring,
        "samples per cell": eval_cfg.samples,
        "seconds": round(metrics["seconds"], 1),
        "skipped modes": ", ".join(skipped) or None,
    }
    seconds_by_len: Dict[int, List[float]] = {}
    for r in records:
        seconds_by_len.setdefault(r["length"], []).append(r["seconds"])
    results = {"header": header, "config": asdict(eval_cfg), "metrics": metrics, "records": records,
               "perplexity": ppl,
               "seconds_per_sample": {n: sum(v) / len(v) for n, v in sorted(seconds_by_len.items())}}
    report.write_json(os.path.join(out_dir, report.RESULTS_JSON), results)
    with open(os.path.join(out_dir, report.REPORT_MD), "w") as f:
        f.write(report.markdown(records, ppl, header))
    if plots and eval_cfg.plots:
        report.plot_heatmaps(records, os.path.join(out_dir, report.HEATMAP_PNG))
        trained = getattr(config, "max_position_embeddings", None)
        report.plot_perplexity(ppl, os.path.join(out_dir, report.PPL_PNG), trained)
        metrics_path = metrics_path or eval_cfg.metrics_file
        if metrics_path and os.path.isfile(metrics_path):
            report.plot_loss(metrics_path, os.path.join(out_dir, report.LOSS_PNG))
