"""Memory options (infllm/memory.py): with each on, the loss and every gradient equal the option off."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from infllm.loss import IGNORE_INDEX
from infllm.memory import HostOffload, apply_activation_offload, apply_memory_options, apply_tiled_mlp


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=10, tie_word_embeddings=True,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).float()


def _batch(length: int = 53):
    ids = torch.randint(0, 97, (1, length))
    labels = ids.clone()
    labels[0, torch.randperm(length)[:9]] = IGNORE_INDEX
    pos = torch.cat([torch.arange(31), torch.arange(length - 31)])[None]
    return dict(input_ids=ids, position_ids=pos, labels=labels, num_items_in_batch=47)


def _loss_and_grads(model, batch, autocast: bool = False):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_equal_runs(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _options(**kw):
    base = dict(loss="plain", loss_chunk_tokens=0, tiled_mlp=False, activation_offload=False,
                gradient_checkpointing=True)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("option", ["tiled_mlp", "activation_offload", "all"])
def test_option_on_equals_off(option, checkpointing):
    ref = _tiny_llama()
    if checkpointing:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = copy.deepcopy(ref)
    batch = _batch()
    on = dict(tiled_mlp=option in ("tiled_mlp", "all"), activation_offload=option in ("activation_offload", "all"))
    if option == "all":
        on["loss"] = "fused"
    applied = apply_memory_options(model, _options(gradient_checkpointing=checkpointing, **on), device_type="cpu")
    if on["tiled_mlp"]:
        # 53 tokens in tiles of 8: 7 tiles, the last one short.
        assert applied["tiled_mlp"] == 3
        apply_tiled_mlp(model, tile_tokens=8)
    stats = None
    if on["activation_offload"]:
        stats = apply_activation_offload(model, min_bytes=0)
    _assert_equal_runs(_loss_and_grads(model, batch), _loss_and_grads(ref, batch))
    if stats is not None:
        # With checkpointing, at least each layer's input [1, 53, 40] fp32 went to host and back.
        assert stats["tensors"] >= 3 and stats["bytes"] >= 3 * 53 * 40 * 4


def test_offload_moves_checkpointed_layer_inputs():
    model = _tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stats = {"tensors": 0, "bytes": 0}
    batch = _batch()
    # min_bytes of one [1, 53, 40] fp32 hidden state: with checkpointing, what goes to host is each layer's input
    # plus what the final norm saves, nothing from inside the layers.
    with HostOffload(min_bytes=53 * 40 * 4, stats=stats):
        out = model.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    norm_stats = {"tensors": 0, "bytes": 0}
    with HostOffload(min_bytes=53 * 40 * 4, stats=norm_stats):
        model.get_decoder().norm(torch.randn(1, 53, 40, requires_grad=True))
    assert norm_stats["tensors"] >= 1
    assert stats["tensors"] == 3 + norm_stats["tensors"]
    out.last_hidden_state.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_offload_host_copies_go_with_the_graph_not_the_cycle_collector(monkeypatch):
    # Pinned host copies must be freed when the backward frees the graph. Held until a gc.collect() (a reference
    # cycle), they piled up one step's offload per step: 8 layers x 4 GiB at 256k tokens, a host OOM at step 7.
    import gc
    import weakref

    import infllm.memory as memory

    copies = []
    pack = memory.HostOffload._pack

    def tracked(self, t):
        out = pack(self, t)
        if isinstance(out, tuple):
            copies.append(weakref.ref(out[1]))
        return out

    monkeypatch.setattr(memory.HostOffload, "_pack", tracked)
    model = _tiny_llama()
    memory.enable_gradient_checkpointing(model, SimpleNamespace(checkpoint_keep="selection"))
    apply_activation_offload(model, min_bytes=0)
    model.train()
    gc.disable()
    try:
        for _ in range(2):
            copies.clear()
            model(**_batch()).loss.backward()
            assert len(copies) >= 3 and all(ref() is None for ref in copies)
    finally:
        gc.enable()


def test_tiled_mlp_keeps_autocast_in_the_recompute():
    # The tile recompute runs inside the backward, where no autocast is active; it must still run in bf16 like
    # the forward did, or the gradients would be those of an fp32 MLP.
    ref = _tiny_llama()
    model = copy.deepcopy(ref)
    apply_tiled_mlp(model, tile_tokens=8)
    seen = []
    model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    batch = _batch()
    a = _loss_and_grads(model, batch, autocast=True)
    b = _loss_and_grads(ref, batch, autocast=True)
    # 53 tokens in tiles of 8: 7 tile forwards without grad, then 7 recomputed in the backward.
    assert seen == [(False, torch.bfloat16)] * 7 + [(True, torch.bfloat16)] * 7
    torch.testing.assert_close(a[0], b[0], rtol=1e-2, atol=1e-2)


def test_eval_and_no_grad_untouched():
    ref = _tiny_llama()
    model = copy.deepcopy(ref)
    apply_memory_options(model, _options(tiled_mlp=True, activation_offload=True, loss="fused"), device_type="cpu")
    apply_tiled_mlp(model, tile_tokens=8)
    ids = torch.randint(0, 97, (1, 40))
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert model.get_decoder()._infllm_offload_stats["tensors"] == 0


def test_zero3_two_ranks_with_every_option_match_one_plain_process(tmp_path):
    """DeepSpeed ZeRO-3 (partitioned, tied lm_head/embedding) on 2 gloo ranks with the fused loss, TiledMLP (2
    tiles a row) and activation offload: the same losses and gradient norms as one process with none of them."""
    pytest.importorskip("deepspeed")
    from data import build_train_loader
    from infllm.trainer import Trainer
    from tests.helpers import compose_config
    from tests.test_distributed import BASE, _Interleaved, launch, metrics

    run = str(tmp_path / "zero3_options")
    _, out = launch(run, ["parallel=zero3", "checkpoint.every_steps=0", "checkpoint.save_hf=false",
                          "trainer.loss=fused", "trainer.tiled_mlp=true", "trainer.activation_offload=true",
                          "trainer.gradient_checkpointing=true"])
    assert "trainer.loss: fused (chunked" in out and "'tiled_mlp': 2" in out
    ref = str(tmp_path / "single_plain")
    cfg = compose_config(BASE + ["parallel=single", "trainer.grad_accum_steps=4", "checkpoint.every_steps=0",
                                 "checkpoint.save_hf=false", "trainer.loss=plain",
                                 "trainer.gradient_checkpointing=true"], output_dir=ref)
    trainer = Trainer.build(cfg)
    trainer.loader = _Interleaved([build_train_loader(cfg.data, trainer.tokenizer, seq_len=cfg.trainer.seq_len,
                                                      micro_batch_size=1, rank=r, world_size=2,
                                                      seed=cfg.trainer.seed) for r in (0, 1)], per_rank=2)
    trainer.fit()
    torch.testing.assert_close(torch.tensor(metrics(run)), torch.tensor(metrics(ref)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(metrics(run, "grad_norm")), torch.tensor(metrics(ref, "grad_norm")),
                               rtol=1e-3, atol=0)


# -- trainer.checkpoint_keep ------------------------------------------------------------------------------------
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that really run: outside the checkpoint's own mode, an op whose output selective
    checkpointing kept is not run again in the recompute, so it is not seen twice."""

    def __init__(self, names):
        super().__init__()
        self.counts = dict.fromkeys(names, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.counts:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _checkpointed_step(model, keep, batch, counted):
    from infllm.memory import enable_gradient_checkpointing

    enable_gradient_checkpointing(model, SimpleNamespace(checkpoint_keep=keep))
    with _OpCounter(counted) as counter:
        run = _loss_and_grads(model, batch)
    return run, counter.counts


SELECT, SPARSE_FWD, CPU_SDPA = ("infllm::infllm_v2_select", "infllm::block_sparse_attn_fwd",
                                "aten::_scaled_dot_product_flash_attention_for_cpu")


def test_checkpoint_keep_skips_the_kept_ops_in_the_recompute_with_equal_gradients():
    # InfLLM-V2 through the Triton ops (the interpreter on the CPU), one layer, a 180-token document: sparse
    # (k_eff = 96 keys). With keep=none the layer runs selection and forward twice (forward, recompute); with
    # selection kept the selection once; with attention kept both once. Same ids and outputs, so the same loss
    # and gradients, bit for bit.
    from tests.conftest import DEVICE
    from tests.model.test_attention_swap import make_model, sparse_cfg, tokens

    from infllm.attention import apply_attention

    base = apply_attention(make_model(num_hidden_layers=1), sparse_cfg(impl="triton")).to(DEVICE)
    ids = tokens(1, 180).to(DEVICE)
    runs = {keep: _checkpointed_step(copy.deepcopy(base), keep, dict(input_ids=ids, labels=ids),
                                     (SELECT, SPARSE_FWD))
            for keep in ("none", "selection", "attention")}
    assert runs["none"][1] == {SELECT: 2, SPARSE_FWD: 2}
    assert runs["selection"][1] == {SELECT: 1, SPARSE_FWD: 2}
    assert runs["attention"][1] == {SELECT: 1, SPARSE_FWD: 1}
    for keep in ("selection", "attention"):
        _assert_equal_runs(runs[keep][0], runs["none"][0], rtol=0, atol=0)


def test_checkpoint_keep_attention_keeps_sdpa_in_the_dense_path():
    # The dense path on the CPU (attention=dense): SDPA one document at a time, the CPU flash kernel; a packed row
    # of two documents, 2 layers: 2 documents x 2 layers SDPA calls in the forward, as many again in the
    # recompute unless kept.
    from tests.model.test_attention_swap import make_model, packed_kwargs, tokens

    from infllm.attention import apply_attention
    from infllm.config import AttentionConfig

    base = apply_attention(make_model(), AttentionConfig(name="dense"))
    kw = packed_kwargs([tokens(1, 70), tokens(1, 45)])
    kw["labels"] = kw["input_ids"]
    runs = {keep: _checkpointed_step(copy.deepcopy(base), keep, kw, (CPU_SDPA,)) for keep in ("none", "attention")}
    assert runs["none"][1] == {CPU_SDPA: 8} and runs["attention"][1] == {CPU_SDPA: 4}
    _assert_equal_runs(runs["attention"][0], runs["none"][0], rtol=0, atol=0)


def test_checkpoint_keep_auto_keeps_the_selection_unless_memory_is_short():
    from infllm.memory import recomputed_selections, resolve_checkpoint_keep

    def cfg(**kw):
        return SimpleNamespace(**{"checkpoint_keep": "auto", "activation_offload": False,
                                  "gradient_checkpointing": True, **kw})

    assert resolve_checkpoint_keep(cfg()) == "selection" and recomputed_selections(cfg()) == 1
    assert resolve_checkpoint_keep(cfg(activation_offload=True)) == "none"
    assert recomputed_selections(cfg(activation_offload=True)) == 2
    assert resolve_checkpoint_keep(cfg(activation_offload=True, checkpoint_keep="attention")) == "attention"
    assert recomputed_selections(cfg(gradient_checkpointing=False, checkpoint_keep="none")) == 1
    # Only where the Triton selection (the kept op) runs: infllm_v2 with impl triton, or auto on CUDA.
    sparse, dense = SimpleNamespace(name="infllm_v2", impl="auto"), SimpleNamespace(name="dense", impl="auto")
    assert resolve_checkpoint_keep(cfg(), sparse, "cuda") == "selection"
    assert resolve_checkpoint_keep(cfg(), sparse, "cpu") == "none"
    assert resolve_checkpoint_keep(cfg(), SimpleNamespace(name="infllm_v2", impl="triton"), "cpu") == "selection"
    assert resolve_checkpoint_keep(cfg(), dense, "cuda") == "none"
    assert recomputed_selections(cfg(), sparse, "cpu") == 2


def test_checkpoint_keep_rejects_unknown_values():
    from infllm.config import ConfigError, TrainerConfig
    from infllm.memory import checkpoint_context_fn

    with pytest.raises(ConfigError, match="trainer.checkpoint_keep"):
        TrainerConfig(checkpoint_keep="everything")
    with pytest.raises(ValueError, match="trainer.checkpoint_keep"):
        checkpoint_context_fn("everything")
    assert checkpoint_context_fn("none") is None
