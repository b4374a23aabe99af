"""End-to-end training on CPU with the tiny debug model: the loss goes down, the exported model loads in plain
transformers with the same logits, an interrupted run resumes exactly, bad input fails before training."""
import json
import os
import re
import signal

import pytest
import torch

from infllm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from infllm.config import ConfigError
from infllm.trainer import Trainer
from tests.helpers import compose_config, flip_byte

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


def test_stop_during_eval_keeps_the_step_and_reruns_the_eval_at_resume(tmp_path, monkeypatch):
    """SIGTERM while the in-training eval runs: the eval stops at the next sample, the step's checkpoint was
    written before it, the run exits as stopped; the resumed run first reruns that eval, then goes on."""
    import infllm.eval.suite as suite

    run = str(tmp_path / "run")
    common = DEBUG + ["trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.save_hf=false",
                      "eval.every_steps=2", "eval.tasks=[passkey]", "eval.lengths=[512]", "eval.depths=[0.5]",
                      "eval.samples=3", "eval.perplexity=false", "eval.modes=[dense]"]
    trainer = Trainer.build(compose_config(common, output_dir=run))
    orig = suite._score
    calls = []

    def score_then_signal(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **kw)

    monkeypatch.setattr(suite, "_score", score_then_signal)
    trainer.fit()
    assert trainer.stopped and len(calls) == 1  # the second sample was never scored
    assert latest_checkpoint(run).endswith("step_00000002")
    step2 = os.path.join(run, "eval", "step_00000002")
    assert not os.path.exists(os.path.join(step2, ".done"))

    monkeypatch.setattr(suite, "_score", orig)
    resumed = Trainer.build(compose_config(common + ["checkpoint.resume=auto"], output_dir=run))
    resumed.fit()
    assert resumed.step == 4 and not resumed.stopped
    for step in (2, 4):
        assert os.path.isfile(os.path.join(run, "eval", f"step_{step:08d}", ".done"))
    evals = [json.loads(l)["step"] for l in open(os.path.join(run, "metrics.jsonl")) if '"eval/' in l]
    assert evals == [2, 4]
    assert len(_losses(run)) == 4


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


# -- stopping, resuming, integrity (issue 17) ----------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short steps: a few seconds each on a 2-core CPU.
SMALL = ["trainer.seq_len=256", "trainer.grad_accum_steps=1", "trainer.micro_batch_size=1"]


def _steps(run_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]


def test_ctrl_c_saves_exits_resumable_and_prints_the_resume_command(tmp_path):
    """SIGINT at step k of `python train.py experiment=debug`: the step finishes, a checkpoint is saved, the
    process exits 75 with the exact command that resumes it; that command finishes the run (exit 0) and
    metrics.jsonl holds every step once."""
    import shlex
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = DEBUG + SMALL + ["trainer.max_steps=5", "checkpoint.every_steps=0", "checkpoint.save_hf=false",
                            f"hydra.run.dir={run}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MAKELEVEL", None)
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    deadline = time.time() + 300
    for line in proc.stdout:
        out.append(line)
        if "step 2/5 |" in line:
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "".join(out)
    out += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 75, "".join(out)
    text = "".join(out)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    stop = re.search(r"stopped by SIGINT after step (\d) of 5; checkpoint saved: (\S+)", text)
    assert stop, text
    k = int(stop.group(1))
    assert k in (2, 3) and stop.group(2) == latest_checkpoint(str(run)) and stop.group(2).endswith(f"step_{k:08d}")
    assert _steps(str(run)) == list(range(1, k + 1))
    command = re.search(r"resume with:  (.+)", text).group(1)
    name = re.search(r"run_name=(\S+)", command).group(1)
    assert command.endswith(f"run_name={name} checkpoint.resume=auto") and "trainer.max_steps=5" in command
    argv = shlex.split(command)
    assert argv[1] == "train.py"
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {stop.group(2)} at step {k}" in resumed.stdout
    assert _steps(str(run)) == [1, 2, 3, 4, 5]


def test_second_ctrl_c_aborts_at_once(tmp_path):
    run = str(tmp_path / "run")
    trainer = Trainer.build(compose_config(DEBUG + SMALL + ["trainer.max_steps=20", "checkpoint.every_steps=0",
                                                            "checkpoint.save_hf=false"], output_dir=run))
    orig = trainer.train_step

    def step_then_two_ctrl_c(batches):
        out = orig(batches)
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    trainer.train_step = step_then_two_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert latest_checkpoint(run) is None and not trainer.stopped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_metrics_have_no_duplicates_after_a_kill_between_checkpoints(tmp_path):
    import shutil

    run = str(tmp_path / "run")
    common = DEBUG + SMALL + ["checkpoint.every_steps=2", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common + ["trainer.max_steps=3"], output_dir=run)).fit()
    # A kill after step 3 was logged but before its checkpoint: the newest one left is step 2.
    shutil.rmtree(os.path.join(run, "checkpoints", "step_00000003"))
    assert _steps(run) == [1, 2, 3]
    resumed = Trainer.build(compose_config(common + ["trainer.max_steps=4", "checkpoint.resume=auto"], output_dir=run))
    resumed.fit()
    assert _steps(run) == [1, 2, 3, 4]


def test_damaged_checkpoint_refused_and_auto_falls_back(tmp_path, caplog):
    run = str(tmp_path / "run")
    common = DEBUG + SMALL + ["checkpoint.every_steps=1", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common + ["trainer.max_steps=2"], output_dir=run)).fit()
    step1, step2 = list_checkpoints(run)
    weights = os.path.join(step2, "model.safetensors")
    flip_byte(weights, os.path.getsize(weights) - 7, mask=0x01)  # a same-size change a size check cannot see
    with pytest.raises(CheckpointError, match=r"step_00000002: file model\.safetensors does not match its checksum"):
        Trainer.build(compose_config(common + ["trainer.max_steps=3", f"checkpoint.resume={step2}"],
                                     output_dir=run)).fit()
    trainer = Trainer.build(compose_config(common + ["trainer.max_steps=3", "checkpoint.resume=auto"], output_dir=run))
    loaded = []
    orig = trainer.load_checkpoint
    trainer.load_checkpoint = lambda path, **kw: (loaded.append(path), orig(path, **kw))
    with caplog.at_level("WARNING"):
        trainer.fit()
    assert loaded == [step1] and "step_00000002 is damaged" in caplog.text
    assert _steps(run) == [1, 2, 3]


def test_nan_weights_refused_even_with_a_matching_manifest(tmp_path):
    """Weights that are NaN but match the manifest (an old sizes-only manifest, or saved so): refused on load."""
    from safetensors.torch import load_file, save_file

    from infllm.checkpoint import MANIFEST, write_json

    run = str(tmp_path / "run")
    common = DEBUG + SMALL + ["checkpoint.every_steps=1", "checkpoint.save_hf=false"]
    Trainer.build(compose_config(common + ["trainer.max_steps=1"], output_dir=run)).fit()
    [path] = list_checkpoints(run)
    weights = os.path.join(path, "model.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[3]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.load(open(os.path.join(path, MANIFEST)))
    write_json(os.path.join(path, MANIFEST), {"format": 1, "step": 1, "files": {
        n: os.path.getsize(os.path.join(path, n)) for n in manifest["files"]}})
    trainer = Trainer.build(compose_config(common + ["trainer.max_steps=2", "checkpoint.resume=auto"], output_dir=run))
    with pytest.raises(CheckpointError, match=r"model weights hold NaN/inf \(" + name.replace(".", r"\.")):
        trainer.fit()


def test_progress_bar_off_logs_one_line_per_log_every(tmp_path, caplog):
    run = str(tmp_path / "run")
    cfg = compose_config(DEBUG + SMALL + ["trainer.max_steps=4", "trainer.log_every=2", "checkpoint.every_steps=0",
                                          "checkpoint.save_hf=false"], output_dir=run)
    with caplog.at_level("INFO", logger="infllm.trainer"):
        Trainer.build(cfg).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" | loss " in line and " | lr " in line and " tok/s" in line and " | density " in line
               and ("| mem " in line or "| rss " in line) for line in lines)


@pytest.mark.parametrize("overrides,expect", [
    (["trainer.seq_len=256"], r"trainer\.seq_len=256 is below attention\.dense_len=512"),
    (["trainer.seq_len=384", "attention.dense_len=-1"], r"trainer\.seq_len=384 fits in the k_eff=12 blocks"),
])
def test_settings_that_leave_nothing_sparse_warn(tmp_path, caplog, overrides, expect):
    with caplog.at_level("WARNING"):
        Trainer.build(compose_config(DEBUG + overrides, output_dir=str(tmp_path)))
    assert re.search(expect, caplog.text), caplog.text


def test_a_first_step_without_sparse_documents_warns(caplog):
    from infllm.config import AttentionConfig
    from infllm.trainer import _warn_if_never_sparse

    attn = AttentionConfig(name="infllm_v2", dense_len=4096)
    with caplog.at_level("WARNING"):
        _warn_if_never_sparse(attn, 8192, {"sparse/sparse_tokens": 1.0, "sparse/dense_tokens": 10.0})
        # seq_len below dense_len: the header's warning said it already.
        _warn_if_never_sparse(attn, 2048, {"sparse/sparse_tokens": 0.0, "sparse/dense_tokens": 10.0})
        assert caplog.text == ""
        _warn_if_never_sparse(attn, 8192, {"sparse/sparse_tokens": 0.0, "sparse/dense_tokens": 10.0})
    assert "no document of the first step reached attention.dense_len=4096" in caplog.text


def test_resume_command_forms(monkeypatch):
    from infllm.trainer import resume_command

    cfg = compose_config(DEBUG)
    argv = ["train.py", "experiment=debug", "run_name=old", "checkpoint.resume=none", "eval.modes=[dense,sparse]"]
    for var in ("TORCHELASTIC_RUN_ID", "MAKELEVEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VIRTUAL_ENV", "/x/.venv")
    tail = f"run_name={cfg.run_name} checkpoint.resume=auto"
    assert resume_command(cfg, argv) == f"python train.py experiment=debug 'eval.modes=[dense,sparse]' {tail}"
    monkeypatch.setenv("MAKELEVEL", "1")
    quoted = "'\"'\"'eval.modes=[dense,sparse]'\"'\"'"  # shlex.quote inside shlex.quote
    assert resume_command(cfg, argv) == f"make train ARGS='experiment=debug {quoted} {tail}'"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command(cfg, argv).startswith("launch/run.sh NGPU=2 experiment=debug ")
