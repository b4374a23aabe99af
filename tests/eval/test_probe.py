"""eval.selection_probe: the recorded selections are the reference selection of the layer's q / k, a forced
needle block is always found, the option off changes nothing and dense mode records nothing."""
import pytest
import torch

import kernels
from infllm.config import AttentionConfig
from infllm.eval.config import EvalConfig
from infllm.eval.probe import PROBE_RECORD_KEYS, SelectionRecorder, needle_target, recording, sample_recorder
from infllm.eval.scoring import score_teacher_forced
from infllm.eval.suite import run_suite
from infllm.eval.tasks import generate_samples

pytest.importorskip("infllm.attention")
from infllm.attention import _runtimes, apply_attention, attention_mode  # noqa: E402
from kernels.infllm_v2._validate import check_sparse_config  # noqa: E402
from kernels.infllm_v2.naive import block_scores_doc, infllm_v2_select_naive  # noqa: E402

B = 16
# k_eff = 4 + 32 / 16 = 6 blocks = 96 keys: a 512-token sample (32 blocks) is really sparse.
SPARSE = dict(name="infllm_v2", block_size=B, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32,
              topk=4, dense_len=-1, impl="naive")


def _model(tokenizer, **attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=1024)).eval()
    return apply_attention(model, AttentionConfig(**dict(SPARSE, **attn)))


@pytest.fixture(scope="module")
def sparse_model(tokenizer):
    return _model(tokenizer)


def _sample(tokenizer, pool, depth, length=512, task="passkey"):
    return generate_samples(task, tokenizer, [length], [depth], 1, seed=0, pool=pool, haystack="filler")[0]


def test_recorded_selection_is_the_reference(tokenizer, pool, sparse_model, monkeypatch):
    s = _sample(tokenizer, pool, 0.3)
    target = needle_target(s)
    assert target.value_len == 5 and s.prompt_ids[target.value_start:target.value_start + 5] == s.answer_ids[:5]
    # The attention's own inputs, captured independently of the probe.
    captured, attn = [], kernels.infllm_v2_attn_varlen

    def spy(q, k, v, cu, max_seqlen, **kw):
        captured.append((q.detach().clone(), k.detach().clone(), cu.clone(), max_seqlen, kw))
        return attn(q, k, v, cu, max_seqlen, **kw)

    monkeypatch.setattr(kernels, "infllm_v2_attn_varlen", spy)
    rec = SelectionRecorder(target)
    with torch.no_grad(), attention_mode(sparse_model, "sparse"), recording(sparse_model, rec):
        score_teacher_forced(sparse_model, s)
    assert len(captured) == 2 and sorted(rec.selected) == [0, 1]
    q0 = target.queries[0]
    c = q0 // B
    needle = target.blocks(B)
    assert c + 1 > 6 and all(1 <= b < c - 2 for b in needle)  # sparse, needle not forced
    cfg = check_sparse_config(B, 8, 4, 1, 32, 4)
    direct_hits = []
    for layer, (q, k, cu, max_seqlen, kw) in enumerate(captured):
        scale = kw["softmax_scale"]
        ref = infllm_v2_select_naive(q, k, cu, max_seqlen, block_size=B, kernel_size=8, kernel_stride=4,
                                     init_blocks=1, window_size=32, topk=4, lse_approx=True, softmax_scale=scale)
        assert torch.equal(rec.selected[layer], ref[:, target.queries])
        scores = block_scores_doc(q, k, cfg, scale if scale is not None else 16 ** -0.5, True)
        torch.testing.assert_close(rec.scores[layer], scores[:, target.queries].float(), rtol=1e-5, atol=1e-6)
        direct_hits += [all(b in ref[h, q0].tolist() for b in needle) for h in range(2)]
    m = rec.metrics()
    assert m["needle_block_recall"] == pytest.approx(sum(direct_hits) / 4)
    assert m["needle_block_rank"] >= 1 and m["needle_block_rank_best"] >= 1  # a candidate, not forced
    assert m["selection_probe"]["free_slots"] == 6 - 1 - 3 and m["selection_probe"]["needle_blocks"] == needle
    # Rank and selection agree: a needle block ranked within the free slots is selected (no ties here).
    for layer in (0, 1):
        for h in range(2):
            hit = all(b in rec.selected[layer][h, 0].tolist() for b in needle)
            assert hit == (m["selection_probe"]["ranks"][layer][h] <= 2)


@pytest.mark.parametrize("where", ["init", "local"])
def test_forced_needle_block_is_always_found(tokenizer, pool, where):
    s = _sample(tokenizer, pool, 0.0 if where == "init" else 1.0)
    target = needle_target(s)
    needle, c = target.blocks(B), target.queries[0] // B
    if where == "init":  # the needle's blocks are init blocks
        attn = dict(init_blocks=max(needle) + 1, topk=max(needle) + 2)
    else:  # the needle's blocks are inside the local window
        attn = dict(window_size=(c - min(needle)) * B, topk=2)
    k_eff = attn.get("topk", 4) + attn.get("window_size", 32) // B
    assert c + 1 > k_eff  # still sparse at the answer
    model = _model(tokenizer, **attn)
    rec = sample_recorder(s, "sparse", True)
    with torch.no_grad(), attention_mode(model, "sparse"), recording(model, rec):
        score_teacher_forced(model, s)
    m = rec.metrics()
    assert m["needle_block_recall"] == 1.0 and m["needle_block_recall_answer"] == 1.0
    assert m["needle_block_rank"] == 0.0 and m["selection_probe"]["layer_recall"] == [1.0, 1.0]


def test_dense_mode_records_nothing(tokenizer, pool, sparse_model):
    s = _sample(tokenizer, pool, 0.5)
    assert sample_recorder(s, "dense", True) is None and sample_recorder(s, "model", True) is None
    assert sample_recorder(s, "sparse", False) is None
    rec = SelectionRecorder(needle_target(s))  # even if installed, the dense path never calls it
    with torch.no_grad(), attention_mode(sparse_model, "dense"), recording(sparse_model, rec):
        score_teacher_forced(sparse_model, s)
    assert rec.selected == {} and rec.metrics() == {}
    assert all(rt.probe is None for rt in _runtimes(sparse_model))


def _suite_cfg(**kw):
    return EvalConfig(**dict(tasks=["passkey", "niah_single"], lengths=[256], depths=[0.5], samples=1,
                             perplexity=False, corpus="stdlib", plots=False, **kw))


def test_option_off_changes_nothing_and_dense_records_nothing(tokenizer, sparse_model, tmp_path):
    probes = []
    hook = sparse_model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args: probes.append(any(rt.probe is not None for rt in _runtimes(sparse_model))))
    try:
        off = run_suite(sparse_model, tokenizer, _suite_cfg(), str(tmp_path / "off"), modes=["dense", "sparse"])
        assert probes and not any(probes)  # no probe was ever installed
        probes.clear()
        on = run_suite(sparse_model, tokenizer, _suite_cfg(selection_probe=True), str(tmp_path / "on"),
                       modes=["dense", "sparse"])
        assert any(probes) and not all(probes)  # installed for the sparse forwards only
    finally:
        hook.remove()
    assert not any("needle_block" in k for k in off)
    new = {k for k in on if k not in off}
    assert new == {f"sparse/{t}/{p}{m}" for t in ("passkey", "niah_single") for p in ("", "len256/")
                   for m in ("needle_block_recall", "needle_block_rank")}
    for k in off:  # the probe changes no score
        if k != "seconds":
            assert on[k] == pytest.approx(off[k], rel=1e-6), k
    import json

    for name, expect in (("off", False), ("on", True)):
        res = json.loads((tmp_path / name / "eval_results.json").read_text())
        for r in res["records"]:
            has = [key in r for key in PROBE_RECORD_KEYS]
            assert all(has) if (expect and r["mode"] == "sparse") else not any(has), (name, r["mode"])
        md = (tmp_path / name / "eval_report.md").read_text()
        assert ("## Needle block selection" in md) == expect
    md = (tmp_path / "on" / "eval_report.md").read_text()
    assert "| passkey | sparse | all |" in md and "| passkey | dense | all |" not in md
    assert "| L0 | L1 |" in md


def test_config_field():
    from tests.helpers import compose_config

    assert compose_config([]).eval.selection_probe is False
    assert compose_config(["eval.selection_probe=true"]).eval.selection_probe is True
