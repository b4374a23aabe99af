"""The fused loss (infllm/loss.py) equals transformers' plain loss: value and every gradient, fp32."""
from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from infllm.config import ConfigError
from infllm.loss import (IGNORE_INDEX, FusedLossLMHead, apply_loss, auto_chunk_tokens, causal_lm_loss,
                         linear_cross_entropy_sum)

TOL = dict(rtol=1e-5, atol=1e-6)


def _tiny_llama(tied: bool, vocab: int = 101, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=tied,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).float()


def _labels(batch: int, length: int, vocab: int, n_ignored: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length))
    labels.view(-1)[torch.randperm(batch * length)[:n_ignored]] = IGNORE_INDEX
    return labels


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["chunked", "deepspeed"])
@pytest.mark.parametrize("n,vocab,chunk", [(1, 7, 3), (37, 50, 8), (130, 257, 64), (64, 33, 1000)],
                         ids=lambda v: str(v))
def test_linear_cross_entropy_sum_matches_plain(impl, n, vocab, chunk):
    hidden = torch.randn(n, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, 24, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < 0.3] = IGNORE_INDEX
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum") * 0.7
    ref.backward()
    g_ref = (hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    # backward() rather than autograd.grad: impl=deepspeed writes the weight's gradient during the forward.
    out = linear_cross_entropy_sum(hidden, weight, targets, impl=impl, chunk_tokens=chunk, scale=0.7)
    out.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-8)
    for a, b in zip((hidden.grad, weight.grad), g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_chunked_all_ignored_gives_zero_sum_and_zero_grads():
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    out = linear_cross_entropy_sum(hidden, weight, torch.full((9,), IGNORE_INDEX), chunk_tokens=4)
    out.backward()
    assert out.item() == 0.0
    assert hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


def test_auto_chunk_tokens_holds_about_a_gib_of_logits():
    assert auto_chunk_tokens(49152) == 4096
    assert auto_chunk_tokens(128256) == 2048
    assert auto_chunk_tokens(10) == 32768


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("num_items", [None, 173, "tensor"], ids=["mean", "n173", "ntensor"])
def test_model_fused_loss_equals_plain(tied, num_items):
    plain = _tiny_llama(tied)
    fused = copy.deepcopy(plain)
    assert apply_loss(fused, SimpleNamespace(loss="fused", loss_chunk_tokens=13), device_type="cpu") == "fused"
    assert (fused.lm_head.weight is fused.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 101, (2, 45))
    labels = _labels(2, 45, 101, n_ignored=17)
    pos = torch.cat([torch.arange(20), torch.arange(25)]).expand(2, -1)
    if num_items == "tensor":
        num_items = torch.tensor(151)
    kwargs = dict(input_ids=ids, position_ids=pos, labels=labels)
    if num_items is not None:
        kwargs["num_items_in_batch"] = num_items
    plain.train(), fused.train()
    out_p = plain(**kwargs)
    out_f = fused(**kwargs)
    assert out_f.logits is None and out_p.logits.shape == (2, 45, 101)
    torch.testing.assert_close(out_f.loss, out_p.loss, **TOL)
    out_p.loss.backward()
    out_f.loss.backward()
    _assert_same_grads(_grads(fused), _grads(plain))


def test_shift_labels_accepted_and_equal_to_labels():
    model = _tiny_llama(True)
    apply_loss(model, SimpleNamespace(loss="fused", loss_chunk_tokens=0), device_type="cpu")
    model.train()
    ids = torch.randint(0, 101, (1, 33))
    labels = _labels(1, 33, 101, n_ignored=5)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    a = model(input_ids=ids, labels=labels, num_items_in_batch=40).loss
    b = model(input_ids=ids, shift_labels=shifted, num_items_in_batch=40).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Pre-shifted labels of one shard of a row (sequence parallelism): the shard's own last position keeps its
    # target, which plain cross-entropy over the shard's logits also counts.
    half = shifted[:, 16:]
    c = model(input_ids=ids[:, 16:], shift_labels=half, num_items_in_batch=40).loss
    logits = model.lm_head(model.model(input_ids=ids[:, 16:]).last_hidden_state)
    ref = F.cross_entropy(logits[0], half[0], ignore_index=IGNORE_INDEX, reduction="sum") / 40
    torch.testing.assert_close(c, ref, **TOL)


def test_without_labels_or_in_eval_the_model_is_unchanged():
    plain = _tiny_llama(True)
    fused = copy.deepcopy(plain)
    apply_loss(fused, SimpleNamespace(loss="auto", loss_chunk_tokens=0), device_type="cpu")
    ids = torch.randint(0, 101, (1, 21))
    labels = _labels(1, 21, 101, n_ignored=3)
    plain.eval(), fused.eval()
    with torch.no_grad():
        for kwargs in (dict(input_ids=ids), dict(input_ids=ids, logits_to_keep=4), dict(input_ids=ids, labels=labels)):
            a, b = plain(**kwargs), fused(**kwargs)
            torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
            if "labels" in kwargs:
                torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=0)
    fused.train()
    out = fused(input_ids=ids)
    assert out.logits.shape == (1, 21, 101) and out.loss is None


def test_autocast_matmuls_in_its_dtype_softmax_in_fp32():
    # bf16 autocast on CPU: the fused loss does what the plain one does (bf16 matmul, fp32 softmax), so the two
    # agree to the bf16 rounding of the logits, far closer than bf16 against fp32.
    torch.manual_seed(1)
    hidden = torch.randn(2, 40, 32)
    weight = torch.randn(300, 32) / 4
    labels = _labels(2, 40, 300, n_ignored=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = causal_lm_loss(hidden, weight, labels, num_items_in_batch=70, chunk_tokens=16)
        logits = F.linear(hidden, weight)
    plain = F.cross_entropy(logits.float().view(-1, 300), F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum") / 70
    exact = F.cross_entropy((hidden @ weight.t()).view(-1, 300), F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum") / 70
    assert fused.dtype == torch.float32
    assert abs(fused - plain) <= 0.1 * abs(exact - plain) + 1e-6


def test_unsupported_model_refused_for_fused_and_plain_for_auto():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ConfigError, match="trainer.loss: fused cannot replace.*'gpt2'"):
        apply_loss(model, SimpleNamespace(loss="fused", loss_chunk_tokens=0))
    assert apply_loss(model, SimpleNamespace(loss="auto", loss_chunk_tokens=0)) == "plain"
    assert type(model.lm_head) is torch.nn.Linear


def test_softcapping_refused():
    model = _tiny_llama(True)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        apply_loss(model, SimpleNamespace(loss="fused", loss_chunk_tokens=0))


def test_save_pretrained_keeps_the_architecture_and_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(True)
    apply_loss(model, SimpleNamespace(loss="fused", loss_chunk_tokens=0), device_type="cpu")
    assert isinstance(model.lm_head, FusedLossLMHead)
    model.save_pretrained(tmp_path)
    assert json.load(open(os.path.join(tmp_path, "config.json")))["architectures"] == ["LlamaForCausalLM"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_trainer_fused_trains_like_plain(tmp_path):
    from infllm.trainer import Trainer
    from tests.helpers import compose_config

    losses = {}
    for loss in ("plain", "fused"):
        run = str(tmp_path / loss)
        cfg = compose_config(["experiment=debug", "trainer.max_steps=4", "trainer.seq_len=256",
                              "trainer.grad_accum_steps=2", "checkpoint.every_steps=0", "checkpoint.save_hf=false",
                              "trainer.progress_bar=false", f"trainer.loss={loss}", "trainer.loss_chunk_tokens=96"],
                             output_dir=run)
        trainer = Trainer.build(cfg)
        assert (type(trainer.engine.module.lm_head) is FusedLossLMHead) == (loss == "fused")
        trainer.fit()
        losses[loss] = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))
                        if '"loss"' in line]
    assert len(losses["plain"]) == 4
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-5, atol=1e-5)
