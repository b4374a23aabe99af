"""Distributed training on CPU: DeepSpeed ZeRO over 2 gloo processes started by torchrun (launch/run.sh).

- ZeRO-2 and ZeRO-3 on 2 ranks give the losses and learning rates of one process (SingleEngine) fed the same
  global batch; the ZeRO-3 export, consolidated from the shards, holds that process's weights and loads in plain
  transformers with its sparse_config;
- a 2-rank run stopped by SIGTERM resumes (resume=auto, past partial checkpoint directories) onto the
  uninterrupted loss curve, exactly;
- a corrupt checkpoint is refused on every rank with the file named (no rank left waiting); a truncated one and
  one written by another number of ranks are refused before loading;
- in-loop eval under ZeRO-3 (every rank gathers the weights, rank 0 evaluates) logs the eval numbers of the one
  process at the same step, and training goes on exactly as without it;
- ZeRO-3 builds the model already partitioned (parallel.zero_init, zero.Init): each rank holds only its partition
  after the load, of the weights one process loads (a random model or a checkpoint), and a run trains exactly as
  with zero_init off;
- a NaN loss on one rank is skipped and counted on both;
- a wrong world size fails before training; a 2-point sweep runs each point on 2 ranks and writes its summary.

A torchrun costs ~15-30 s on 2 cores (imports, DeepSpeed set-up), so the uninterrupted runs and the one-process
reference are made once per session and shared, also by pytest-xdist workers (a file lock decides who runs them).
The file doubles as the torchrun worker of the NaN and zero.Init tests (`python tests/test_distributed.py nan|zero_init
...`).
"""
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # when run as the torchrun worker
    sys.path.insert(0, REPO)

from infllm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints  # noqa: E402
from infllm.config import ConfigError  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

pytest.importorskip("deepspeed")

RUN_SH = os.path.join(REPO, "launch", "run.sh")
STEPS = 6
# The debug model on 128-token rows (shorter than the sparse attention's dense_len: dense documents, fast), a
# warmup + cosine schedule so that the lr of every step is checked too. 1 row x 2 micro-batches per rank.
BASE = ["experiment=debug", "trainer.progress_bar=false", "trainer.seq_len=128", "trainer.micro_batch_size=1",
        "trainer.grad_accum_steps=2", "schedule.name=cosine", "schedule.warmup_steps=2",
        f"trainer.max_steps={STEPS}", "logger=console"]
LAUNCH_TIMEOUT = 420
# In-loop eval in the reference and in the ZeRO-3 eval run: both attention modes, teacher-forced and generated.
EVAL_EVERY = 3
EVAL = ["eval=quick", f"eval.every_steps={EVAL_EVERY}", "eval.scoring=both", "eval.modes=[dense,sparse]"]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return env


def _run_sh(run_dir, overrides, nproc=2):
    return ["bash", RUN_SH, f"NGPU={nproc}", f"PYTHON={sys.executable}", "SHUTDOWN_TIMEOUT=120", *BASE,
            *overrides, f"hydra.run.dir={run_dir}", f"run_name={os.path.basename(run_dir)}"]


def launch(run_dir, overrides, nproc=2, check=True):
    """One torchrun of train.py through launch/run.sh; returns (returncode, combined output)."""
    proc = subprocess.run(_run_sh(run_dir, overrides, nproc), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=LAUNCH_TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.returncode, proc.stdout


def metrics(run_dir, key="loss"):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), [r["step"] for r in rows]
    return [r[key] for r in rows]


def eval_rows(run_dir):
    """{step: the eval metrics logged at that step} (the rows of metrics.jsonl with eval/ keys)."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
            if any(k.startswith("eval/") for k in r)}


def _shared_dir(tmp_path_factory, name):
    """A directory of this pytest session that every xdist worker sees (each has its own basetemp below it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return str(root / name)


@contextlib.contextmanager
def _once(path):
    """Yields True to the first caller, which makes `path`; the others wait, then get False and reuse it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = not os.path.exists(path + ".done")
        if todo:
            shutil.rmtree(path, ignore_errors=True)
        yield todo
        if todo:
            open(path + ".done", "w").close()


class _Interleaved:
    """The micro-batches the ranks of a 2-rank run see in one step, in one stream: rank 0's window, then rank
    1's. One process with twice the accumulation steps then trains on exactly the same global batch."""

    def __init__(self, loaders, per_rank):
        self.loaders, self.per_rank = loaders, per_rank

    def __iter__(self):
        its = [iter(loader) for loader in self.loaders]
        while True:
            for it in its:
                for _ in range(self.per_rank):
                    yield next(it)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process (SingleEngine), the 2-rank global batch, evaluated every EVAL_EVERY steps: losses, lrs, grad
    norms, eval metrics and final weights."""
    run = _shared_dir(tmp_path_factory, "reference")
    with _once(run) as todo:
        if todo:
            _train_reference(run)
    return {"loss": metrics(run), "lr": metrics(run, "lr"), "grad_norm": metrics(run, "grad_norm"),
            "eval": eval_rows(run), "weights": torch.load(os.path.join(run, "weights.pt"), weights_only=True)}


def _train_reference(run):
    from data import build_train_loader
    from infllm.trainer import Trainer

    cfg = compose_config(BASE + EVAL + ["parallel=single", "trainer.grad_accum_steps=4", "checkpoint.every_steps=0",
                                        "checkpoint.save_hf=false"], output_dir=run)
    trainer = Trainer.build(cfg)
    loaders = [build_train_loader(cfg.data, trainer.tokenizer, seq_len=cfg.trainer.seq_len,
                                  micro_batch_size=cfg.trainer.micro_batch_size, rank=r, world_size=2,
                                  seed=cfg.trainer.seed) for r in (0, 1)]
    trainer.loader = _Interleaved(loaders, per_rank=cfg.trainer.grad_accum_steps // 2)
    # One thread, like each torchrun process: a second one only spins on a busy 2-core machine (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    torch.save(trainer.engine.module.state_dict(), os.path.join(run, "weights.pt"))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """2 ranks, ZeRO-2, uninterrupted, a checkpoint every 2 steps."""
    run = _shared_dir(tmp_path_factory, "zero2")
    with _once(run) as todo:
        if todo:
            _, out = launch(run, ["parallel=zero2", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
                                  "checkpoint.save_hf=false"])
            assert "DeepSpeed ZeRO-2 on 2 cpu ranks" in out
    return run


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """2 ranks, ZeRO-3, uninterrupted, exported in Hugging Face format at the end."""
    run = _shared_dir(tmp_path_factory, "zero3")
    with _once(run) as todo:
        if todo:
            _, out = launch(run, ["parallel=zero3", "checkpoint.every_steps=0", "checkpoint.save_hf=true"])
            assert "DeepSpeed ZeRO-3 on 2 cpu ranks, model built partitioned (zero.Init)" in out
    return run


def _assert_matches_reference(run, reference):
    torch.testing.assert_close(torch.tensor(metrics(run)), torch.tensor(reference["loss"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(metrics(run, "lr")), torch.tensor(reference["lr"]), rtol=1e-6,
                               atol=0)
    # DeepSpeed's norm (before clipping, over all ranks' shards) is the one process's clip_grad_norm_.
    torch.testing.assert_close(torch.tensor(metrics(run, "grad_norm")), torch.tensor(reference["grad_norm"]),
                               rtol=1e-3, atol=0)


def test_zero2_two_ranks_match_one_process(zero2_run, reference):
    _assert_matches_reference(zero2_run, reference)
    ckpt = latest_checkpoint(zero2_run)
    names = json.load(open(os.path.join(ckpt, "manifest.json")))["files"]
    assert {"zero/mp_rank_00_model_states.pt", "zero/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt", "trainer_state_rank1.json", "rng_rank1.pt"} <= set(names)


def test_zero3_two_ranks_match_one_process_and_export_consolidates(zero3_run, reference):
    from transformers import AutoModelForCausalLM

    _assert_matches_reference(zero3_run, reference)
    final = os.path.join(zero3_run, "final")
    assert json.load(open(os.path.join(final, "config.json")))["sparse_config"]["block_size"] == 32
    exported = AutoModelForCausalLM.from_pretrained(final).state_dict()  # plain transformers
    assert set(exported) == set(reference["weights"])
    for name, ref in reference["weights"].items():
        torch.testing.assert_close(exported[name], ref, rtol=1e-3, atol=1e-4, msg=name)


def test_zero3_in_loop_eval_matches_one_process_and_leaves_training_unchanged(tmp_path, zero3_run, reference):
    run = str(tmp_path / "zero3_eval")
    launch(run, ["parallel=zero3", "checkpoint.every_steps=0", "checkpoint.save_hf=false", *EVAL])
    evals = eval_rows(run)
    assert sorted(evals) == sorted(reference["eval"]) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for step, ref in reference["eval"].items():
        got = evals[step]
        assert set(got) == set(ref), set(got) ^ set(ref)
        assert any(k.startswith("eval/sparse/") for k in ref) and any(k.endswith("/gen_acc") for k in ref)
        for key in sorted(ref):
            if key.endswith("seconds"):
                continue
            # Gathered ZeRO-3 weights are the one process's (to float rounding of the reduction order).
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), (step, key, got[key], ref[key])
        assert os.path.isfile(os.path.join(run, "eval", f"step_{step:08d}", "eval_results.json"))
    # The eval changed nothing: the steps after it are the run without eval's, exactly.
    assert metrics(run) == metrics(zero3_run)
    assert metrics(run, "grad_norm") == metrics(zero3_run, "grad_norm")


def test_zero3_zero_init_off_trains_like_on_and_like_one_process(tmp_path, zero3_run, reference):
    run = str(tmp_path / "zero3_full_load")
    _, out = launch(run, ["parallel=zero3", "parallel.zero_init=false", "checkpoint.every_steps=0",
                          "checkpoint.save_hf=false"])
    assert "DeepSpeed ZeRO-3 on 2 cpu ranks, fp32" in out  # built in full, partitioned by deepspeed.initialize
    assert metrics(run) == metrics(zero3_run)  # zero_init on (zero3_run): the same run, exactly
    assert metrics(run, "grad_norm") == metrics(zero3_run, "grad_norm")
    _assert_matches_reference(run, reference)


def test_zero_init_each_rank_holds_only_its_partition_of_the_one_process_weights(tmp_path):
    from infllm.engine import build_optimizer
    from infllm.model import count_parameters, load_model
    from infllm.checkpoint import save_hf

    run, model_dir = str(tmp_path / "zero_init"), str(tmp_path / "model")
    expected = {}
    for kind in ("random", "checkpoint"):
        cfg = compose_config(_zero_init_overrides(kind, model_dir, "parallel=single"))
        torch.manual_seed(cfg.trainer.seed)
        model, tokenizer = load_model(cfg.model, cfg.attention)
        names = {id(p): n for n, p in model.named_parameters()}
        expected[kind] = {"rng": torch.rand(3).tolist(), "count": count_parameters(model),
                          "groups": [sorted(names[id(p)] for p in g["params"])
                                     for g in build_optimizer(model, cfg).param_groups],
                          "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}
        if kind == "random":  # the checkpoint: this same seeded model, saved
            save_hf(model, tokenizer, model_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.abspath(__file__), "zero_init", run, model_dir]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for kind, exp in expected.items():
        for rank in (0, 1):
            report = json.load(open(os.path.join(run, f"{kind}_rank{rank}.json")))
            assert report["attention"] == "infllm_v2", report["attention"]
            assert report["count"] == exp["count"]  # counted by full sizes (ds_numel)
            assert set(report["params"]) == set(exp["weights"])
            for name, info in report["params"].items():
                numel = exp["weights"][name].numel()
                # Nothing but the rank's half (padded to an even size) of every parameter is held.
                assert info == {"partitioned": True, "numel": 0, "ds_numel": numel, "local": -(-numel // 2)}, \
                    (kind, rank, name, info)
            # zero.Init leaves the RNG as the one process's load does; weight decay groups by the full shapes.
            assert report["rng"] == exp["rng"], (kind, rank)
            assert report["groups"] == exp["groups"], (kind, rank)
        gathered = torch.load(os.path.join(run, f"{kind}_weights.pt"), weights_only=True)
        assert set(gathered) == set(exp["weights"])
        for name, ref in exp["weights"].items():
            assert torch.equal(gathered[name], ref), (kind, name)


def _zero_init_overrides(kind, model_dir, parallel):
    model = [] if kind == "random" else [f"model.path={model_dir}", "model.random_init=false"]
    return BASE + [parallel, *model]


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_sigterm_then_resume_continues_the_curve_exactly(tmp_path, request, stage):
    uninterrupted = request.getfixturevalue(f"zero{stage}_run")
    run = str(tmp_path / "stopped")
    overrides = [f"parallel=zero{stage}", "checkpoint.every_steps=0", "checkpoint.save_hf=false"]
    proc = subprocess.Popen(_run_sh(run, overrides), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log_path = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + LAUNCH_TIMEOUT
    while not (os.path.isfile(log_path) and len(open(log_path).readlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()[-6000:]
        assert time.time() < deadline, "the run logged no step in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to run.sh, which passes it to both ranks (not to torchrun)
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    # Stopped, resumable: the status of a single process, no traceback from torchrun, the resume command.
    assert proc.returncode == 75, out[-6000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-6000:]
    assert f"run_name={os.path.basename(run)} checkpoint.resume=auto" in out, out[-6000:]
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, out[-6000:]
    stopped_at = int(ckpt.rsplit("_", 1)[1])
    assert 2 <= stopped_at < STEPS, out[-6000:]
    assert len(metrics(run)) == stopped_at
    assert not os.path.exists(os.path.join(run, "final"))

    # A crash mid-save leaves directories without a manifest: resume=auto passes over them.
    root = os.path.join(run, "checkpoints")
    os.makedirs(os.path.join(root, "step_00000099.tmp", "zero"))
    os.makedirs(os.path.join(root, "step_00000098", "zero"))
    open(os.path.join(root, "step_00000098", "zero", "mp_rank_00_model_states.pt"), "wb").write(b"partial")
    _, out = launch(run, overrides + ["checkpoint.resume=auto"])
    assert f"resumed from {ckpt} at step {stopped_at}" in out
    resumed = metrics(run)
    assert len(resumed) == STEPS
    # Same ranks, same data position, same RNG: the resumed run's losses are the uninterrupted run's.
    assert resumed == metrics(uninterrupted), (resumed, metrics(uninterrupted))


def test_corrupt_checkpoint_refused_on_every_rank(tmp_path, zero2_run):
    run = str(tmp_path / "corrupt")
    src = latest_checkpoint(zero2_run)
    dst = os.path.join(run, "checkpoints", os.path.basename(src))
    shutil.copytree(src, dst)
    # Same size, garbled pickle: the checksum in the manifest tells, whichever rank checksums the file, and
    # every rank refuses it (resume=auto has no older checkpoint to fall back to).
    bad = os.path.join(dst, "zero", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    data = bytearray(open(bad, "rb").read())
    data[40:400] = bytes(b ^ 0xFF for b in data[40:400])
    open(bad, "wb").write(bytes(data))
    rc, out = launch(run, ["parallel=zero2", "checkpoint.resume=auto"], check=False)
    assert rc != 0
    assert ("file zero/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum" in out
            or "another rank found a damaged file" in out), out[-6000:]
    assert "every checkpoint in" in out, out[-6000:]


def test_truncated_or_other_world_size_checkpoint_refused(tmp_path, zero2_run):
    from infllm.trainer import Trainer

    common = BASE + ["parallel=single", "checkpoint.resume=auto"]
    # Written by 2 ranks, resumed by 1: refused before any state is loaded.
    run = str(tmp_path / "other_world")
    src = latest_checkpoint(zero2_run)
    shutil.copytree(src, os.path.join(run, "checkpoints", os.path.basename(src)))
    with pytest.raises(CheckpointError, match="written by 2 ranks"):
        Trainer.build(compose_config(common, output_dir=run)).fit()
    # A truncated DeepSpeed file (inside zero/) is caught by the manifest, naming the file.
    bad = os.path.join(run, "checkpoints", os.path.basename(src), "zero", "mp_rank_00_model_states.pt")
    with open(bad, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="zero/mp_rank_00_model_states.pt"):
        Trainer.build(compose_config(common, output_dir=run)).fit()
    assert [os.path.basename(p) for p in list_checkpoints(run)] == [os.path.basename(src)]  # nothing deleted


def test_nan_on_one_rank_is_skipped_and_counted_on_both(tmp_path):
    run = str(tmp_path / "nan")
    overrides = BASE + ["parallel=zero3", "trainer.max_steps=3", "checkpoint.every_steps=0",
                        "checkpoint.save_hf=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.abspath(__file__), "nan", run, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for rank in (0, 1):
        report = json.load(open(os.path.join(run, f"nan_rank{rank}.json")))
        assert report == {"step": 3, "nonfinite_steps": 1, "deepspeed_skipped_steps": 1}, (rank, report)
    losses = metrics(run)
    assert len(losses) == 3 and all(loss == loss for loss in losses)


def test_wrong_world_size_and_single_engine_under_torchrun_fail_early(monkeypatch):
    from infllm.parallel import build_engine

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="parallel.world_size: the config expects 4 processes but this run has 2"):
        build_engine(model, compose_config(["parallel=zero2", "parallel.world_size=4"]))
    with pytest.raises(ConfigError, match="parallel.engine: single runs one process"):
        build_engine(model, compose_config(["parallel=single"]))
    with pytest.raises(ConfigError, match="parallel.offload_params"):
        compose_config(["parallel=zero2", "parallel.offload_params=true"])


def test_launcher_argv_and_generated_deepspeed_config(monkeypatch):
    from infllm.parallel import deepspeed_config, launcher_argv

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_argv(["train.py", "--local_rank=1", "experiment=debug"]) == ["train.py", "experiment=debug"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.setenv("RANK", "1")
    assert launcher_argv(["train.py", "--local_rank", "1", "a=b"])[1:] == [
        "a=b", "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    with pytest.raises(SystemExit, match="launch/sweep.py"):
        launcher_argv(["train.py", "-m", "optim.lr=1,2"])

    cfg = compose_config(["parallel=zero3_offload", "trainer.grad_accum_steps=8", "trainer.micro_batch_size=1",
                          "trainer.grad_clip=0.5", "+parallel.extra.zero_optimization.reduce_bucket_size=1000"])
    ds = deepspeed_config(cfg, torch.device("cuda", 0))
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert not deepspeed_config(cfg, torch.device("cpu"))["bf16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds  # client AdamW + our schedule, no JIT fused_adam


def test_sweep_runs_each_point_on_two_ranks(tmp_path):
    sweep_dir = str(tmp_path / "sweep")
    cmd = [sys.executable, os.path.join(REPO, "launch", "sweep.py"), "NGPU=2", f"PYTHON={sys.executable}",
           f"SWEEP_DIR={sweep_dir}", *BASE, "parallel=zero2", "trainer.max_steps=2", "checkpoint.every_steps=0",
           "checkpoint.save_hf=false", "optim.lr=1e-3,3e-3"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=2 * LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert proc.stdout.count("DeepSpeed ZeRO-2 on 2 cpu ranks") == 2
    summary = json.load(open(os.path.join(sweep_dir, "summary.json")))
    assert [(p["point"], p["status"], p["steps"]) for p in summary["points"]] == [
        ({"optim.lr": "1e-3"}, "ok", 2), ({"optim.lr": "3e-3"}, "ok", 2)]
    table = open(os.path.join(sweep_dir, "summary.md")).read()
    assert "| optim.lr |" in table and "| 1e-3 |" in table and "| 3e-3 |" in table
    for i in (0, 1):
        assert len(metrics(os.path.join(sweep_dir, str(i)))) == 2


def _nan_worker(run_dir, overrides):
    """torchrun worker: rank 1's loss is NaN in the second step; every rank reports what it counted."""
    from infllm.trainer import Trainer

    cfg = compose_config(overrides, output_dir=run_dir)
    trainer = Trainer.build(cfg)
    engine = trainer.engine
    forward = engine.forward
    poisoned = []

    def forward_with_nan(**kwargs):
        out = forward(**kwargs)
        if engine.rank == 1 and trainer.step == 1 and not poisoned:
            poisoned.append(True)
            out.loss = out.loss * float("nan")
        return out

    engine.forward = forward_with_nan
    trainer.fit()
    with open(os.path.join(run_dir, f"nan_rank{engine.rank}.json"), "w") as f:
        json.dump({"step": trainer.step, "nonfinite_steps": trainer.nonfinite_steps,
                   "deepspeed_skipped_steps": engine.ds.skipped_steps}, f)


def _zero_init_worker(run_dir, model_dir):
    """torchrun worker: load the random model and its saved copy under zero.Init (parallel=zero3); each rank
    reports what every parameter holds right after the load, the parameter count, the optimizer's weight-decay
    groups and the RNG; rank 0 writes the gathered weights."""
    import deepspeed
    import torch.distributed as dist

    from infllm.engine import build_optimizer
    from infllm.model import count_parameters, load_model
    from infllm.parallel import is_partitioned, setup_parallel

    os.makedirs(run_dir, exist_ok=True)
    setup = None
    for kind in ("random", "checkpoint"):
        cfg = compose_config(_zero_init_overrides(kind, model_dir, "parallel=zero3"), output_dir=run_dir)
        setup = setup or setup_parallel(cfg)
        assert setup.zero_init is not None
        torch.manual_seed(cfg.trainer.seed)
        model, _ = load_model(cfg.model, cfg.attention, zero_init=setup.zero_init)
        rng = torch.rand(3).tolist()
        params = {name: {"partitioned": is_partitioned(p), "numel": p.numel(), "ds_numel": p.ds_numel,
                         "local": p.ds_tensor.numel()} for name, p in model.named_parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        # Weight decay is grouped by the full shape (ds_shape), not the empty placeholder a partition leaves.
        groups = [sorted(names[id(p)] for p in g["params"]) for g in build_optimizer(model, cfg).param_groups]
        assert all(p.numel() == 0 for p in model.parameters())
        weights = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                weights[name] = p.detach().clone()
        rank = dist.get_rank()
        if rank == 0:
            torch.save(weights, os.path.join(run_dir, f"{kind}_weights.pt"))
        with open(os.path.join(run_dir, f"{kind}_rank{rank}.json"), "w") as f:
            json.dump({"params": params, "count": count_parameters(model), "groups": groups, "rng": rng,
                       "attention": model.config._attn_implementation}, f)


if __name__ == "__main__":
    if sys.argv[1] == "zero_init":
        _zero_init_worker(sys.argv[2], sys.argv[3])
    else:
        assert sys.argv[1] == "nan", sys.argv
        _nan_worker(sys.argv[2], sys.argv[3:])
