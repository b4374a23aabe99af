"""InfLLM (v1) context memory: the kernel (kernels/infllm_v1) against a per-query brute force written here, and
the integration (infllm/attention_v1.py) on tiny random HF models and on the embedded SmolLM2.

Kernel sizes: n_init 5, n_local 40, units of 12 tokens, topk 3 of up to ~18 units, 3 representative keys,
chunks of 17 queries, G = 3 query heads per KV head: every part (sinks, retrieved units, gap, local window) is
active and unaligned with the others.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from infllm.attention_v1 import apply_infllm_v1, infllm_v1_config_of
from infllm.config import AttentionConfig, ConfigError, InfLLMv1Config
from kernels.infllm_v1 import ContextMemory, infllm_v1_attn, rope

CONF_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "attention")
VOCAB = 97
SMALL = dict(block_size=12, n_init=5, n_local=40, topk=3, repr_topk=3, exc_block_size=17)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small tensors: a second intra-op thread only adds synchronisation, which costs 10-100x on a loaded machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------
# A per-query brute force, written independently of the kernel: complex-number RoPE in float64, explicit key
# sets, memory keys rotated to (query position - n_local), plain Python bookkeeping.
# ---------------------------------------------------------------------------------------------------------

def rotate_complex(x: torch.Tensor, position: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """x [n, d] rotated to positions [n]: dims (t, t + d/2) as the complex number x_t + i x_{t+d/2}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(inv_freq, dtype=torch.float64).expand(x.shape[0], -1),
                        position.double()[:, None] * inv_freq.double()[None, :]) * scaling
    return torch.cat([z.real, z.imag], dim=-1)


def brute_force_v1(q, k, v, inv_freq, scaling, calls, *, block_size, n_init, n_local, topk, repr_topk,
                   exc_block_size, sink_position="memory"):
    """Outputs [T, H_q, d] (float64), selections {chunk start: [sorted unit list per KV head]}, token scores."""
    T, Hq, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = d ** -0.5
    score = torch.zeros(Hkv, T, dtype=torch.float64)
    reps = [dict() for _ in range(Hkv)]  # unit -> positions of its representative keys
    out = torch.zeros(T, Hq, d, dtype=torch.float64)
    selections = {}
    chunks, past = [], 0
    for L in calls:
        chunks += [(s, min(s + exc_block_size, past + L)) for s in range(past, past + L, exc_block_size)]
        past += L
    for s, e in chunks:
        lo_s = max(0, s - n_local + 1)
        finished = [u for u in range(T) if n_init + (u + 1) * block_size <= lo_s]
        selections[s] = []
        for h in range(Hkv):
            for u in finished:
                if u not in reps[h]:
                    toks = list(range(n_init + u * block_size, n_init + (u + 1) * block_size))
                    best = sorted(toks, key=lambda j: -float(score[h, j]))[:repr_topk]
                    reps[h][u] = best
            chosen = set()
            if finished and topk:
                qs = torch.cat([rotate_complex(q[s:e, h * G + g], torch.full((e - s,), n_local), inv_freq, scaling)
                                for g in range(G)])
                unit_scores = {}
                for u in finished:
                    keys = rotate_complex(k[reps[h][u], h], torch.zeros(repr_topk), inv_freq, scaling)
                    unit_scores[u] = float((qs @ keys.T).mean())
                chosen = set(sorted(finished, key=lambda u: -unit_scores[u])[:topk])
            selections[s].append(sorted(chosen))
            unit_done = torch.zeros(T, dtype=torch.bool)
            unit_kept = torch.zeros(T, dtype=torch.bool)
            for u in finished:
                unit_done[n_init + u * block_size:n_init + (u + 1) * block_size] = True
                unit_kept[n_init + u * block_size:n_init + (u + 1) * block_size] = u in chosen
            for i in range(s, e):
                lo_i = max(0, i - n_local + 1)
                js = torch.arange(i + 1)
                local = js >= lo_i
                sink = ~local & (js < n_init)
                keep = local | sink | ~unit_done[:i + 1] | unit_kept[:i + 1]
                true_distance = local | (sink & (sink_position == "true"))
                dist = torch.where(true_distance, i - js, torch.full_like(js, n_local))
                js, dist, local = js[keep], dist[keep], local[keep]
                keys = rotate_complex(k[js, h], i - dist, inv_freq, scaling)
                qi = rotate_complex(q[i, h * G:(h + 1) * G], torch.full((G,), i), inv_freq, scaling)
                p = torch.softmax((qi @ keys.T) * scale, dim=-1)
                out[i, h * G:(h + 1) * G] = p @ v[js, h].double()
                score[h, js[local]] += p[:, local].sum(0)
    return out, selections, score


def random_qkv(T=260, Hkv=2, G=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, Hkv * G, d, generator=g)
    k = torch.randn(T, Hkv, d, generator=g)
    v = torch.randn(T, Hkv, d, generator=g)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return q, k, v, inv_freq


def run_kernel(q, k, v, inv_freq, calls, scaling=1.0, **cfg):
    """The kernel over `calls` (numbers of new tokens per call), the memory passed along."""
    memory, outs, sels, past = None, [], {}, 0
    for L in calls:
        out, memory, chunk_sels = infllm_v1_attn(q[past:past + L], k[:past + L], v[:past + L], inv_freq,
                                                 memory=memory, attention_scaling=scaling, return_selection=True,
                                                 **cfg)
        outs.append(out)
        sels.update({c.start: [row.tolist() for row in c.units] for c in chunk_sels})
        past += L
    return torch.cat(outs), sels, memory


@pytest.mark.parametrize("calls,sink_position,scaling,topk", [
    ((260,), "memory", 1.0, 3),
    ((150, 45, 1, 1, 1, 1, 1, 60), "memory", 1.0, 3),
    ((260,), "true", 1.3, 3),
    ((200, 1, 1), "memory", 1.0, 0),
    ((260,), "memory", 1.0, 50),
], ids=["one-call", "prefill-pieces-decode", "true-sinks-scaled-rope", "topk0", "topk-all"])
def test_kernel_matches_brute_force(calls, sink_position, scaling, topk):
    q, k, v, inv_freq = random_qkv(T=sum(calls))
    cfg = dict(SMALL, topk=topk, sink_position=sink_position)
    out, sels, memory = run_kernel(q, k, v, inv_freq, calls, scaling=scaling, **cfg)
    ref, ref_sels, ref_score = brute_force_v1(q, k, v, inv_freq, scaling, calls, **cfg)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    assert sels == ref_sels
    torch.testing.assert_close(memory.token_score.double(), ref_score, atol=2e-5, rtol=2e-5)
    if topk == 3:
        # Retrieval really chooses: late chunks see more units than they retrieve, and the KV heads disagree.
        late = [s for s in sels if len(sels[s][0]) == 3]
        assert len(late) > 5
        assert any(sels[s][0] != sels[s][1] for s in late)
        assert memory.num_units > 3


def test_memory_keys_sit_at_one_fixed_distance():
    """rope(q, n_local) . rope(k, 0) is the logit of any query i with a key at i - n_local; and since memory keys
    carry no position, swapping the contents of two retrieved units leaves the last chunk's output unchanged,
    whereas under true positions (dense attention) it changes."""
    q, k, v, inv_freq = random_qkv(T=200, d=16, seed=1)
    n_local = 32
    for i in (0, 7, 150, 4000):
        a = (rope(q[:1, :1], torch.tensor([n_local]), inv_freq) * rope(k[:1, :1], torch.tensor([0]), inv_freq)).sum()
        b = (rope(q[:1, :1], torch.tensor([i]), inv_freq)
             * rope(k[:1, :1], torch.tensor([i - n_local]), inv_freq)).sum()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)

    cfg = dict(block_size=8, n_init=4, n_local=n_local, topk=100, repr_topk=2, exc_block_size=16)
    k2, v2 = k.clone(), v.clone()
    a, b = slice(4 + 2 * 8, 4 + 3 * 8), slice(4 + 5 * 8, 4 + 6 * 8)
    k2[a], k2[b], v2[a], v2[b] = k[b], k[a], v[b], v[a]
    last = slice(184, 200)  # the last chunk: lo >= 153, units 2 and 5 (tokens 20..28, 44..52) are memory
    out, _ = infllm_v1_attn(q, k, v, inv_freq, **cfg)
    out2, _ = infllm_v1_attn(q, k2, v2, inv_freq, **cfg)
    torch.testing.assert_close(out2[last], out[last], atol=1e-5, rtol=1e-5)
    dense, _ = infllm_v1_attn(q, k, v, inv_freq, **dict(cfg, n_local=1000))
    dense2, _ = infllm_v1_attn(q, k2, v2, inv_freq, **dict(cfg, n_local=1000))
    assert (dense2[last] - dense[last]).abs().max() > 1e-3


def test_rope_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=2, head_dim=32, rope_theta=1e4,
                                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 256})
    rot = LlamaRotaryEmbedding(config)
    x = torch.randn(1, 2, 50, 32)
    pos = torch.arange(100, 150)[None]
    cos, sin = rot(x, pos)
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)
    mine = rope(x, pos[0], rot.inv_freq, rot.attention_scaling)
    assert rot.attention_scaling != 1.0
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-6)


def test_kernel_refuses_misuse():
    q, k, v, inv_freq = random_qkv(T=40)
    with pytest.raises(ValueError, match="fresh sequence"):
        infllm_v1_attn(q[30:], k, v, inv_freq)
    _, memory = infllm_v1_attn(q[:20], k[:20], v[:20], inv_freq, **SMALL)
    with pytest.raises(ValueError, match="has seen 20 tokens"):
        infllm_v1_attn(q[30:], k, v, inv_freq, memory=memory, **SMALL)
    with pytest.raises(ValueError, match="repr_topk"):
        infllm_v1_attn(q, k, v, inv_freq, **dict(SMALL, repr_topk=13))


# ---------------------------------------------------------------------------------------------------------
# The integration on tiny random HF models
# ---------------------------------------------------------------------------------------------------------

ARCHS = {
    "llama-G3-D16": ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16)),
    "qwen2-G3-D32": ("qwen2", dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1)),
    "qwen3-G1-D32": ("qwen3", dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32)),
    "mistral-G2-D16": ("mistral", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       sliding_window=None)),
}


def make_model(arch="llama-G3-D16", **overrides):
    model_type, extra = ARCHS[arch]
    kw = dict(vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024,
              tie_word_embeddings=False, **extra)
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def v1_model(model, **v1):
    return apply_infllm_v1(copy.deepcopy(model), AttentionConfig(name="infllm_v1", v1=InfLLMv1Config(**v1)))


def tokens(n, seed=0):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exc_block_size", [7, 1000], ids=["chunks7", "one-chunk"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_local_window_covering_input_equals_dense(arch, exc_block_size):
    model = make_model(arch)
    ids = tokens(150)
    with torch.no_grad():
        ref = model(ids).logits
        out = v1_model(model, n_local=150, n_init=4, block_size=16, exc_block_size=exc_block_size)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cache_pieces_equal_one_forward():
    """Memory active (n_local 32 << 224 tokens): a forward in pieces through HF's cache (pieces aligned to
    exc_block_size, then one-token steps) gives the same logits as one forward whose chunks are the same."""
    model = v1_model(make_model(), n_local=32, n_init=4, block_size=8, topk=2, repr_topk=2, exc_block_size=16)
    ids = tokens(224)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, parts = DynamicCache(config=model.config), []
        for a, b in ((0, 64), (64, 160), (160, 208)):
            parts.append(model(ids[:, a:b], past_key_values=cache, use_cache=True).logits)
        assert cache.get_seq_length() == 208
    torch.testing.assert_close(torch.cat(parts, dim=1), full[:, :208], atol=1e-5, rtol=1e-5)
    # exc_block_size 1: every query is its own chunk, as in decoding.
    model1 = v1_model(make_model(), n_local=32, n_init=4, block_size=8, topk=2, repr_topk=2, exc_block_size=1)
    with torch.no_grad():
        full1 = model1(ids[:, :120], use_cache=False).logits
        cache = DynamicCache(config=model1.config)
        steps = [model1(ids[:, :100], past_key_values=cache).logits]
        steps += [model1(ids[:, t:t + 1], past_key_values=cache).logits for t in range(100, 120)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full1, atol=1e-5, rtol=1e-5)


def test_greedy_generate_after_long_prompt():
    """model.generate works, and its tokens are the argmax of a teacher-forced forward (exc_block_size 1, so the
    forward's chunks are the decode steps)."""
    model = v1_model(make_model(), n_local=32, n_init=4, block_size=8, topk=2, repr_topk=2, exc_block_size=1)
    prompt = tokens(150, seed=3)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert gen.shape == (1, 156)
        logits = model(gen, use_cache=False).logits
    assert gen[0, 150:].tolist() == logits[0, 149:155].argmax(-1).tolist()


def test_training_is_refused():
    model = v1_model(make_model(), n_local=32)
    model.train()
    with pytest.raises(RuntimeError, match="training-free"):
        model(tokens(20), labels=tokens(20))
    with torch.no_grad():
        model(tokens(20))  # train() mode without gradients is only a forward: allowed


def test_unsupported_inputs_and_models_are_refused():
    model = v1_model(make_model(), n_local=32)
    with torch.no_grad(), pytest.raises(ValueError, match="batch size 1"):
        model(torch.cat([tokens(10), tokens(10, seed=1)]))
    with torch.no_grad(), pytest.raises(ValueError, match="positions"):
        model(tokens(10), position_ids=torch.arange(5, 15)[None])
    with torch.no_grad(), pytest.raises(ValueError, match="DynamicCache"):
        model.generate(tokens(10), max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ConfigError, match="sliding_window"):
        v1_model(make_model("mistral-G2-D16", sliding_window=64), n_local=32)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2,
                                                                 vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        apply_infllm_v1(gpt2, AttentionConfig(name="infllm_v1"))
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="GemmaAttention"):
        apply_infllm_v1(gemma, AttentionConfig(name="infllm_v1"))
    with pytest.raises(ConfigError, match="name=infllm_v1"):
        apply_infllm_v1(make_model(), AttentionConfig(name="dense"))


@pytest.mark.parametrize("field,value", [("repr_topk", 200), ("n_local", 0), ("topk", -1),
                                         ("sink_position", "middle"), ("exc_block_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"attention.v1.{field}"):
        InfLLMv1Config(**{field: value})
    with pytest.raises(ConfigError, match="attention.v1"):
        apply_infllm_v1(make_model(), {"name": "infllm_v1", "v1": {"n_locl": 3}})


@pytest.mark.parametrize("name", ["infllm_v1", "infllm_v1_small"])
def test_config_files(name):
    schema = OmegaConf.structured(AttentionConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(os.path.join(CONF_DIR, f"{name}.yaml"))))
    assert cfg.name == "infllm_v1" and isinstance(cfg.v1, InfLLMv1Config)
    if name == "infllm_v1":  # the published Mistral-7B settings
        assert (cfg.v1.block_size, cfg.v1.n_init, cfg.v1.n_local, cfg.v1.topk, cfg.v1.repr_topk,
                cfg.v1.exc_block_size) == (128, 128, 4096, 16, 4, 512)
    with pytest.raises(Exception, match="n_locl"):
        OmegaConf.merge(schema, OmegaConf.load(os.path.join(CONF_DIR, f"{name}.yaml")),
                        OmegaConf.from_dotlist(["v1.n_locl=3"]))
    model = apply_infllm_v1(make_model(), cfg)
    assert infllm_v1_config_of(model) == cfg.v1


# ---------------------------------------------------------------------------------------------------------
# The embedded SmolLM2 (30 layers, 9 / 3 heads), short input
# ---------------------------------------------------------------------------------------------------------

def test_smollm2_short_input():
    from infllm.config import ModelConfig
    from infllm.model import load_model

    model, tok = load_model(ModelConfig())
    model.eval()
    text = ("The quick brown fox jumps over the lazy dog. " * 3 + "Alice has a cat named Tom. " * 2
            + "Paris is the capital of France. Berlin is the capital of Germany. " * 5)
    ids = tok(text, return_tensors="pt").input_ids
    assert 100 < ids.shape[1] < 200, ids.shape
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    v1 = apply_infllm_v1(model, AttentionConfig(name="infllm_v1", v1=InfLLMv1Config(
        n_local=256, n_init=4, block_size=16, topk=2, exc_block_size=48)))
    with torch.no_grad():
        out = v1(ids, use_cache=False).logits
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
        # Memory active (local window 32 of ~140 tokens): generation runs and stays close to dense.
        v1.model.layers[0].self_attn._infllm_v1.cfg = InfLLMv1Config(n_local=32, n_init=4, block_size=16, topk=2,
                                                                       exc_block_size=16)
        gen = v1.generate(ids, max_new_tokens=4, do_sample=False)
        sparse = v1(ids, use_cache=False).logits
    assert gen.shape == (1, ids.shape[1] + 4)
    agree = (sparse.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.5, agree
    assert math.isfinite(sparse.abs().max().item())
