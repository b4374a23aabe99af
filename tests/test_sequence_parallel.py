"""Ulysses sequence parallelism (parallel.sp_size) on CPU ranks (gloo, torchrun), with InfLLM-V2 exact under it.

- The loss and every parameter's gradient of the first step under sp_size 2 (2 ranks) and 4 (4 ranks) equal the
  one-process run on the same rows, dense and InfLLM-V2, ZeRO-2 and ZeRO-3, on packed rows whose documents cross
  the slice boundaries. Tiny models with 8 query heads and 2 or 4 KV heads: at sp_size 4 the 2-KV-head model's
  query groups are split over 2 ranks each (the selection then gathers the group's queries), the other's are not.
- A run stopped after its checkpoint resumes onto the uninterrupted loss curve exactly.
- Without a group's whole queries the selection differs (what the gather is for); with them, a slice of the
  group's heads attends exactly like those heads of the whole group.
- Bad settings fail at start naming the setting.

The file is its own torchrun worker (`python tests/test_sequence_parallel.py grads <out> <case.json>...`).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # when run as the torchrun worker
    sys.path.insert(0, REPO)

from infllm.errors import ConfigError  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

pytest.importorskip("deepspeed")

TIMEOUT = 600
# 512-token rows of packed stdlib documents, sparse from 128 tokens on (k_eff = 4 + 32 / 16 = 6 blocks of 16):
# selection really chooses, and documents cross the 256- and 128-token slice boundaries.
BASE = ["experiment=debug", "trainer.progress_bar=false", "trainer.seq_len=512", "trainer.micro_batch_size=1",
        "trainer.grad_accum_steps=2", "logger=console", "checkpoint.save_hf=false", "checkpoint.every_steps=0",
        "attention.block_size=16", "attention.kernel_size=16", "attention.kernel_stride=8",
        "attention.window_size=32", "attention.topk=4", "attention.dense_len=128",
        "model.arch.num_attention_heads=8", "model.arch.head_dim=8"]
CASES = {
    "kv2_sparse": ["model.arch.num_key_value_heads=2", "attention.name=infllm_v2"],
    "kv2_dense": ["model.arch.num_key_value_heads=2", "attention.name=dense"],
    # Two rows a micro-batch: the exchange keeps the rows apart (cu_seqlens runs over both, row after row).
    "kv4_sparse": ["model.arch.num_key_value_heads=4", "attention.name=infllm_v2", "trainer.micro_batch_size=2"],
}
ENGINES = {"zero2": ["parallel=zero2"], "zero3": ["parallel=zero3"]}
MEMORY = ["trainer.loss=fused", "trainer.tiled_mlp=true", "trainer.activation_offload=true",
          "trainer.gradient_checkpointing=true"]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1")
    return env


def _torchrun(nproc, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-8000:]}"
    return proc.stdout


# -- the worker -------------------------------------------------------------------------------------------

def _first_step(overrides, run_dir):
    """Loss and full gradients of the first training step, as the trainer runs it."""
    from infllm.trainer import Trainer

    trainer = Trainer.build(compose_config(overrides, output_dir=run_dir))
    engine = trainer.engine
    grads = {}
    named = list(engine.module.named_parameters())
    if engine.is_distributed:
        from deepspeed.utils import safe_get_full_grad

        ds_step = engine.ds.step

        def step(*args, **kwargs):
            if engine.ds.is_gradient_accumulation_boundary():
                for name, p in named:  # collective at ZeRO-3
                    g = safe_get_full_grad(p)
                    grads[name] = None if g is None else g.detach().cpu().clone()
            return ds_step(*args, **kwargs)

        engine.ds.step = step
    else:
        own_step = engine.step

        def step():
            grads.update({name: p.grad.detach().clone() for name, p in named if p.grad is not None})
            return own_step()

        engine.step = step
    out = trainer.train_step(trainer._micro_batches(iter(trainer.loader)))
    return {"loss": out["loss"], "grads": grads}


def _worker_grads(out_path, case_files):
    results = {}
    for path in case_files:
        case = json.load(open(path))
        results[case["name"]] = _first_step(case["overrides"], case["run_dir"])
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out_path)


# -- the tests --------------------------------------------------------------------------------------------

def _case_file(tmp_path, name, overrides):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "overrides": overrides, "run_dir": str(tmp_path / name)}))
    return str(path)


def _sp_runs(tmp_path, nproc, sp_size, cases):
    files = [_case_file(tmp_path, name, BASE + overrides + [f"parallel.sp_size={sp_size}"])
             for name, overrides in cases.items()]
    out = str(tmp_path / "grads.pt")
    log = _torchrun(nproc, ["grads", out, *files])
    return torch.load(out, weights_only=True), log


def _assert_same_step(got, ref, name):
    assert got["loss"] == pytest.approx(ref["loss"], rel=2e-6), (name, got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"]), name
    for param, g_ref in ref["grads"].items():
        g = got["grads"][param]
        assert g is not None and torch.isfinite(g).all(), (name, param)
        # fp32, different summation orders (slices, all-to-all, reductions): a few ulps of the largest entry.
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6 * float(g_ref.abs().max()),
                                   msg=lambda m: f"{name} {param}: {m}")


def _one_process(tmp_path, name, overrides):
    return _first_step(BASE + overrides + ["parallel=single"], str(tmp_path / f"ref_{name}"))


@pytest.mark.parametrize("nproc", [2, 4], ids=["sp2", "sp4"])
def test_sp_loss_and_gradients_equal_one_process(tmp_path, nproc):
    cases = {f"{name}_zero2": overrides + ENGINES["zero2"] for name, overrides in CASES.items()}
    cases["kv2_sparse_zero3"] = CASES["kv2_sparse"] + ENGINES["zero3"]
    if nproc == 2:
        # The memory options compose with the slices: the fused loss on pre-shifted labels, TiledMLP over the
        # local slice, offloaded checkpoint inputs; against the one process with none of them.
        cases["kv2_sparse_memory_zero2"] = CASES["kv2_sparse"] + ENGINES["zero2"] + MEMORY
    got, log = _sp_runs(tmp_path, nproc, nproc, cases)
    assert f"sequence parallel over {nproc} ranks (1 replicas)" in log
    if nproc == 4:
        # 2 KV heads on 4 ranks: each KV head on 2 ranks, its group of 4 query heads split 2 + 2.
        assert "query groups split over 2 ranks, gathered for the selection" in log
    for name, overrides in cases.items():
        base = [o for o in overrides if not o.startswith("parallel=") and o not in MEMORY]
        _assert_same_step(got[name], _one_process(tmp_path, name, base + ["trainer.loss=plain"]), name)


def _metrics(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in line]
    return {r["step"]: r["loss"] for r in rows}


def test_sp_resume_is_exact(tmp_path):
    """2 ranks, sp_size 2: 4 steps straight vs 2 steps, stop, resume to 4 (the loader, RNG and optimizer state
    of a sliced run come back as they were)."""
    run_sh = os.path.join(REPO, "launch", "run.sh")
    common = BASE + CASES["kv2_sparse"] + ["parallel=zero2", "parallel.sp_size=2", "checkpoint.every_steps=2"]

    def launch(run_dir, extra):
        cmd = ["bash", run_sh, "NGPU=2", f"PYTHON={sys.executable}", *common, *extra, f"hydra.run.dir={run_dir}",
               f"run_name={os.path.basename(run_dir)}"]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-6000:]

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    launch(straight, ["trainer.max_steps=4"])
    launch(resumed, ["trainer.max_steps=2"])
    launch(resumed, ["trainer.max_steps=4", "checkpoint.resume=auto"])
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4], (a, b)
    assert [b[s] for s in (3, 4)] == [a[s] for s in (3, 4)]


def test_selection_needs_the_whole_group_and_select_q_restores_it():
    from kernels import infllm_v2_attn_varlen, infllm_v2_select

    torch.manual_seed(0)
    n, h_kv, group, d = 300, 1, 4, 16
    q = torch.randn(n, h_kv * group, d, dtype=torch.float64)
    k, v = torch.randn(n, h_kv, d, dtype=torch.float64), torch.randn(n, h_kv, d, dtype=torch.float64)
    cu = torch.tensor([0, 137, 300], dtype=torch.int32)
    kw = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=32, topk=3)
    whole = infllm_v2_select(q, k, cu, 163, **kw)
    half = infllm_v2_select(q[:, :2].contiguous(), k, cu, 163, **kw)
    assert not torch.equal(whole, half), "half a group selected like the whole group: the test shows nothing"
    full_out = infllm_v2_attn_varlen(q, k, v, cu, 163, dense_len=-1, **kw)
    for part in (slice(0, 2), slice(2, 4)):
        out = infllm_v2_attn_varlen(q[:, part].contiguous(), k, v, cu, 163, dense_len=-1, select_q=q, **kw)
        torch.testing.assert_close(out, full_out[:, part], rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides, match", [
    (["parallel=single", "parallel.sp_size=2"], r"parallel.sp_size=2 needs parallel.engine=deepspeed"),
    (["parallel=zero2", "parallel.sp_size=3"], r"parallel.sp_size=3 must divide the world size 1"),
    (["parallel=zero2", "parallel.sp_size=0"], r"parallel.sp_size: must be >= 1"),
])
def test_bad_sp_settings_fail_naming_the_setting(overrides, match):
    from infllm.parallel import setup_parallel

    with pytest.raises(ConfigError, match=match):
        setup_parallel(compose_config(BASE + overrides))


def test_sp_checks_seq_len_and_heads():
    from infllm.parallel.sequence import check_sequence_parallel

    cfg = compose_config(BASE + ["parallel=zero2", "parallel.sp_size=2", "trainer.seq_len=511"])
    with pytest.raises(ConfigError, match=r"trainer.seq_len=511 must be divisible by parallel.sp_size=2"):
        check_sequence_parallel(cfg, world_size=2)
    cfg = compose_config(BASE + ["parallel=zero2", "parallel.sp_size=2", "attention=infllm_v1_small"])
    with pytest.raises(ConfigError, match=r"attention.name=dense or infllm_v2, got infllm_v1"):
        check_sequence_parallel(cfg, world_size=2)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if sys.argv[1] == "grads":
        _worker_grads(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(f"unknown worker command {sys.argv[1]!r}")
