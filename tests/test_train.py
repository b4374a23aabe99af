"""End-to-end training on CPU with the tiny debug model: the loss goes down, the exported model loads in plain
transformers with the same logits, an interrupted run resumes exactly, bad input fails before training."""
import json
import os
import signal

import pytest
import torch

from infllm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from infllm.config import ConfigError
from infllm.trainer import Trainer
from tests.helpers import compose_config

DEBUG = ["experiment=debug", "trainer.progress_bar=false"]


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in l]


def test_debug_run_loss_goes_down_and_export_loads(tmp_path):
    run = str(tmp_path / "run")
    cfg = compose_config(DEBUG + ["trainer.max_steps=12", "checkpoint.every_steps=0"], output_dir=run)
    trainer = Trainer.build(cfg)
    trainer.fit()
    losses = _losses(run)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    from transformers import AutoModelForCausalLM

    final = os.path.join(run, "final")
    loaded = AutoModelForCausalLM.from_pretrained(final)  # plain transformers, no infllm
    cfg_json = json.load(open(os.path.join(final, "config.json")))
    assert cfg_json["sparse_config"]["block_size"] == cfg.attention.block_size
    model = trainer.engine.module.eval()
    ids = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_resume_continues_exactly(tmp_path):
    full_dir, part_dir = str(tmp_path / "full"), str(tmp_path / "part")
    common = DEBUG + ["trainer.max_steps=6", "checkpoint.every_steps=3", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common, output_dir=full_dir)).fit()
    # Interrupted run: stop after step 3 (a checkpoint is written there), then resume=auto.
    Trainer.build(compose_config(common + ["trainer.max_steps=3"], output_dir=part_dir)).fit()
    # (debug uses a constant lr, so the shorter run's schedule matches the full run's first steps)
    resumed = Trainer.build(compose_config(common + ["checkpoint.resume=auto"], output_dir=part_dir))
    assert resumed.step == 0
    resumed.fit()
    full, part = _losses(full_dir), _losses(part_dir)
    assert len(part) == 6
    torch.testing.assert_close(torch.tensor(part[3:]), torch.tensor(full[3:]), rtol=1e-5, atol=1e-5)


def test_sigterm_saves_checkpoint_and_resume_auto(tmp_path):
    run = str(tmp_path / "run")
    cfg = compose_config(DEBUG + ["trainer.max_steps=50", "checkpoint.every_steps=0", "checkpoint.save_hf=false"],
                         output_dir=run)
    trainer = Trainer.build(cfg)
    orig = trainer.train_step

    def step_then_signal(batches):
        out = orig(batches)
        if trainer.step == 1:  # the step counter is incremented after train_step returns: signal at step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = step_then_signal
    trainer.fit()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and ckpt.endswith("step_00000002")
    assert not os.path.exists(os.path.join(run, "final"))


def test_partial_checkpoint_ignored_and_corrupt_refused(tmp_path):
    run = str(tmp_path / "run")
    common = DEBUG + ["trainer.max_steps=2", "checkpoint.every_steps=2", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common, output_dir=run)).fit()
    good = latest_checkpoint(run)
    # A partial checkpoint (no manifest, as left by a crash mid-save) is ignored by resume=auto.
    os.makedirs(os.path.join(run, "checkpoints", "step_00000009.tmp"))
    os.makedirs(os.path.join(run, "checkpoints", "step_00000010"))
    assert latest_checkpoint(run) == good
    # A truncated file is refused with a message naming it.
    with open(os.path.join(good, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    trainer = Trainer.build(compose_config(common + ["checkpoint.resume=auto", "trainer.max_steps=4"],
                                           output_dir=run))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        trainer.fit()


def test_checkpoint_from_another_model_refused(tmp_path):
    run = str(tmp_path / "run")
    common = DEBUG + ["trainer.max_steps=2", "checkpoint.every_steps=2", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common, output_dir=run)).fit()
    other = Trainer.build(compose_config(common + ["checkpoint.resume=auto", "model.arch.hidden_size=32",
                                                   "model.arch.head_dim=8"], output_dir=run))
    with pytest.raises(CheckpointError, match="written for model"):
        other.fit()


def test_keep_last(tmp_path):
    run = str(tmp_path / "run")
    Trainer.build(compose_config(DEBUG + ["trainer.max_steps=4", "checkpoint.every_steps=1",
                                          "checkpoint.keep_last=2", "checkpoint.save_hf=false"],
                                 output_dir=run)).fit()
    assert [os.path.basename(p) for p in list_checkpoints(run)] == ["step_00000003", "step_00000004"]


def test_missing_model_path_fails_before_training(tmp_path):
    cfg = compose_config(DEBUG + ["model.random_init=false", f"model.path={tmp_path}/nope"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="model.path"):
        Trainer.build(cfg)


def test_model_path_without_config_json(tmp_path):
    cfg = compose_config(DEBUG + ["model.random_init=false", f"model.path={tmp_path}"], output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="config.json"):
        Trainer.build(cfg)


def test_beyond_native_length_warns(tmp_path, caplog):
    cfg = compose_config(DEBUG + ["model.arch.max_position_embeddings=256", "trainer.max_steps=1",
                                  "checkpoint.save_hf=false"], output_dir=str(tmp_path))
    with caplog.at_level("WARNING"):
        Trainer.build(cfg)
    assert "beyond the model's native length" in caplog.text


def test_rope_scaling_written_into_saved_config(tmp_path):
    run = str(tmp_path / "run")
    cfg = compose_config(DEBUG + ["trainer.max_steps=1", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4.0",
                                  "model.rope_theta=50000"], output_dir=run)
    Trainer.build(cfg).fit()
    saved = json.load(open(os.path.join(run, "final", "config.json")))
    rope = saved.get("rope_parameters") or saved.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0 and rope["rope_theta"] == 50000


def test_time_selection_logs_select_share(tmp_path):
    """trainer.time_selection (on by default): selection is timed at the first layer and its share of the step
    is logged."""
    run = str(tmp_path / "run")
    cfg = compose_config(DEBUG + ["trainer.max_steps=2", "trainer.seq_len=1024",
                                  "checkpoint.every_steps=0", "checkpoint.save_hf=false"], output_dir=run)
    Trainer.build(cfg).fit()
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in l]
    assert len(rows) == 2
    for r in rows:
        assert r["sparse/sparse_tokens"] > 0
        assert r["sparse/select_ms"] > 0 and r["sparse/attention_ms"] > 0
        assert 0 < r["sparse/select_step_share"] < 1
    # Off: nothing is timed.
    run2 = str(tmp_path / "run2")
    Trainer.build(compose_config(DEBUG + ["trainer.max_steps=1", "trainer.seq_len=1024", "checkpoint.every_steps=0",
                                          "trainer.time_selection=false",
                                          "checkpoint.save_hf=false"], output_dir=run2)).fit()
    row = [json.loads(l) for l in open(os.path.join(run2, "metrics.jsonl")) if '"loss"' in l][0]
    assert "sparse/select_step_share" not in row and "sparse/select_ms" not in row
