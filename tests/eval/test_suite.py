"""run_suite end to end: the report files, the flat metrics, the attention modes, and eval.py on a checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from infllm.config import AttentionConfig
from infllm.eval import report
from infllm.eval.config import EvalConfig
from infllm.eval.suite import run_suite
from tests.eval.oracles import CopyOracle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small_cfg(**kw):
    base = dict(tasks=["passkey", "niah_single"], lengths=[256, 512], depths=[0.25, 0.75], samples=1,
                ppl_length=512, corpus="stdlib")
    base.update(kw)
    return EvalConfig(**base)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 5000


def test_report_files_and_metrics(tokenizer, tiny_llama, tmp_path):
    metrics_jsonl = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "loss": 5.0 / (1 + i)} for i in range(60)] + [{"step": 50, "eval/dense/acc": 0.5}]
    metrics_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_llama.train()
    out = tmp_path / "eval"
    metrics = run_suite(tiny_llama, tokenizer, _small_cfg(), str(out), modes=["dense", "sparse"], step=7,
                        metrics_path=str(metrics_jsonl))
    assert tiny_llama.training  # the caller's mode is restored
    tiny_llama.eval()
    # A plain HF model has no sparse attention to switch to: "sparse" is skipped and says so.
    assert metrics["dense/passkey/acc"] == 0.0 and "sparse/passkey/acc" not in metrics
    assert {"dense/niah_single/len512/acc", "dense/acc", "dense/ppl", "dense/ppl/0-256", "dense/ppl/256-512",
            "seconds"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    results = json.loads((out / report.RESULTS_JSON).read_text())
    assert len(results["records"]) == 2 * 2 * 2 and results["header"]["step"] == 7
    assert results["perplexity"]["dense"]["buckets"][0]["tokens"] == 255
    md = (out / report.REPORT_MD).read_text()
    assert "| passkey | dense | 0 | 0 | 0 |" in md and "| 0-256 |" in md and "skipped modes: sparse" in md
    for name in (report.HEATMAP_PNG, report.PPL_PNG, report.LOSS_PNG):
        assert _is_png(out / name), name


def test_copy_oracle_suite_is_perfect(tokenizer, tmp_path):
    cfg = _small_cfg(tasks=["passkey", "niah_single", "niah_multikey"], perplexity=False, scoring="both")
    metrics = run_suite(CopyOracle(len(tokenizer)), tokenizer, cfg, str(tmp_path))
    for task in cfg.tasks:
        assert metrics[f"dense/{task}/acc"] == 1.0 and metrics[f"dense/{task}/gen_acc"] == 1.0


def test_dense_and_sparse_side_by_side(tokenizer, tmp_path):
    """With the InfLLM swap both modes run on the same weights; at a length below the sparse window they
    see the same keys, so their perplexities agree."""
    pytest.importorskip("infllm.attention")
    from transformers import LlamaConfig, LlamaForCausalLM

    from infllm.attention import apply_attention

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16)).eval()
    apply_attention(model, AttentionConfig(name="infllm_v2", block_size=16, kernel_size=8, kernel_stride=4,
                                           window_size=64, topk=4, dense_len=512, impl="naive"))
    cfg = _small_cfg(tasks=["passkey"], lengths=[256], depths=[0.5], ppl_length=256, ppl_bucket=128)
    metrics = run_suite(model, tokenizer, cfg, str(tmp_path), modes=["dense", "sparse"])
    assert "sparse/passkey/acc" in metrics and "dense/passkey/acc" in metrics
    assert metrics["sparse/ppl/0-128"] == pytest.approx(metrics["dense/ppl/0-128"], rel=1e-3)
    assert metrics["sparse/ppl/128-256"] != pytest.approx(metrics["dense/ppl/128-256"], rel=1e-6)


def test_eval_py_on_a_checkpoint(tokenizer, tiny_llama, tmp_path):
    ckpt = tmp_path / "run" / "final"
    tiny_llama.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    out = tmp_path / "report"
    cmd = [sys.executable, "eval.py", "eval=quick", f"eval.checkpoint={tmp_path / 'run'}", f"eval.out_dir={out}",
           "eval.lengths=[256]", "eval.tasks=[passkey]", "eval.ppl_length=256", "eval.corpus=stdlib",
           "attention=dense", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| passkey | dense |" in proc.stdout
    assert _is_png(out / report.LOSS_PNG)
    assert json.loads((out / report.RESULTS_JSON).read_text())["records"][0]["task"] == "passkey"


def test_eval_loads_trainer_checkpoints_of_tied_models_and_refuses_others(tmp_path):
    """eval.checkpoint=<trainer checkpoint>: the weights as the trainer wrote them (safetensors' save_model stores
    the tied embedding / lm_head once) load into the configured model; a file missing a tensor is a clear error."""
    import importlib.util

    from safetensors.torch import save_file, save_model

    from infllm.config import ConfigError
    from tests.helpers import compose_config

    spec = importlib.util.spec_from_file_location("eval_entry", os.path.join(ROOT, "eval.py"))
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    cfg = compose_config(["model=tiny_llama", "attention=dense", f"eval.checkpoint={tmp_path / 'ok'}"])
    torch.manual_seed(1)
    trained, _ = entry.build_model(compose_config(["model=tiny_llama", "attention=dense"]))
    os.makedirs(tmp_path / "ok")
    save_model(trained, str(tmp_path / "ok" / "model.safetensors"))
    loaded, _ = entry.build_model(cfg)
    for (name, a), b in zip(trained.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    os.makedirs(tmp_path / "bad")
    state = {k: v.contiguous() for k, v in trained.state_dict().items() if "layers.1.mlp" not in k and "lm_head" not in k}
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ConfigError, match="does not match cfg.model .*layers.1.mlp"):
        entry.build_model(compose_config(["model=tiny_llama", "attention=dense", f"eval.checkpoint={tmp_path / 'bad'}"]))
