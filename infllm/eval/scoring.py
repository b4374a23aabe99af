"""Scoring a sample: teacher-forced (one forward, logits only at the answer positions) or greedy generation.

Legend: P = prompt tokens, A = answer tokens, V = vocabulary.

Teacher-forced: the model reads prompt + answer[:-1] once; `logits_to_keep=A` makes lm_head run on the last A
positions only, so a 16k-token context never materialises a [16k, V] logits tensor. A value is correct when the
greedy argmax reproduces all of its tokens. For tasks whose values may come in any order, a slot also counts
when the argmax leaves the teacher's value for another value not yet given (the rest of that value is then
unverifiable; the first diverging token decides).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from infllm.eval.haystack import bos_prefix, encode
from infllm.eval.tasks import Sample


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def last_logits(model, ids: Sequence[int], keep: int, prefill_chunk: int = 0) -> torch.Tensor:
    """fp32 logits [keep, V] of the last `keep` positions of `ids`. With `prefill_chunk`, the context goes
    through the model in pieces with a KV cache (lower peak memory; same result for dense attention)."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    n = x.shape[1]
    if prefill_chunk and n - keep > prefill_chunk:
        cache = new_cache(model)
        split = n - keep
        for s in range(0, split, prefill_chunk):
            model(input_ids=x[:, s:min(s + prefill_chunk, split)], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
        out = model(input_ids=x[:, split:], past_key_values=cache, use_cache=True, logits_to_keep=keep)
    else:
        out = model(input_ids=x, use_cache=False, logits_to_keep=keep)
    return out.logits[0, -keep:].float()


def _slot_scores(sample: Sample, pred: List[int]) -> List[bool]:
    """Per value slot of the answer: did the greedy argmax give a (still unlisted) right value?"""
    ans = sample.answer_ids
    tokens = [ans[a:b] for a, b in sample.value_spans]
    if not sample.unordered:
        return [pred[a:b] == ans[a:b] for a, b in sample.value_spans]
    remaining = list(range(len(tokens)))
    hits = []
    for slot, (a, b) in enumerate(sample.value_spans):
        teacher = tokens[slot]
        chosen = None
        for j in range(b - a):
            p = pred[a + j]
            # Values still open that agree with the teacher so far and continue with the predicted token.
            open_ = [k for k in remaining
                     if tokens[k][:j] == teacher[:j] and len(tokens[k]) > j and tokens[k][j] == p]
            if not open_:
                break
            if p != teacher[j]:
                chosen = open_[0]
                break
            if j == b - a - 1 and slot in remaining:
                chosen = slot
        hits.append(chosen is not None)
        if chosen is not None:
            remaining.remove(chosen)
    return hits


def score_teacher_forced(model, sample: Sample, prefill_chunk: int = 0) -> Dict[str, float]:
    A = len(sample.answer_ids)
    logits = last_logits(model, sample.prompt_ids + sample.answer_ids[:-1], A, prefill_chunk)  # [A, V]
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(sample.answer_ids, device=logp.device)
    tok_logp = logp.gather(1, target[:, None])[:, 0]
    pred = logits.argmax(-1).tolist()
    hits = _slot_scores(sample, pred)
    token_acc = sum(int(p == t) for p, t in zip(pred, sample.answer_ids)) / A
    return {"exact": float(all(hits)), "value_acc": sum(hits) / len(hits), "logprob": tok_logp.mean().item(),
            "token_acc": token_acc}


def chat_wrap(tokenizer, sample: Sample) -> List[int]:
    """Header + haystack + question as the user's turn; the answer prefix starts the assistant's turn."""
    marker = "\x00QUESTION\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    bos = len(bos_prefix(tokenizer))
    prefix = sample.prompt_ids[sample.context_len:]
    return (encode(tokenizer, before) + sample.prompt_ids[bos:sample.context_len] + encode(tokenizer, after)
            + prefix)


@torch.no_grad()
def score_generate(model, tokenizer, sample: Sample, chat_template: bool = False, extra_new_tokens: int = 16
                   ) -> Tuple[Dict[str, float], str]:
    """Greedy continuation of the prompt; a value counts when its text appears in the continuation
    (RULER's string match)."""
    ids = chat_wrap(tokenizer, sample) if chat_template else sample.prompt_ids
    x = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                         max_new_tokens=len(sample.answer_ids) + extra_new_tokens, pad_token_id=pad)
    text = tokenizer.decode(out[0, x.shape[1]:].tolist(), skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
    hits = [v in text for v in sample.values]
    return {"exact": float(all(hits)), "value_acc": sum(hits) / len(hits)}, text
