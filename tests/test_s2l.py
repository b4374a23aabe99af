"""The short-to-long experiment tooling (launch/s2l_smollm2.sh + launch/s2l_table.py): the table's numbers from
known eval reports and metrics, and the whole launcher end to end on CPU with a tiny model (every arm trained,
evaluated in both modes, a budget variant, the table)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))

import s2l_table  # noqa: E402


def _eval(root, arm, accs, modes=("dense", "sparse")):
    """An eval report whose exact-match records give `accs[mode][length]` (4 records per cell)."""
    recs = []
    for mode in modes:
        for length, acc in accs[mode].items():
            hits = round(4 * acc)
            for i in range(4):
                recs.append({"mode": mode, "task": "passkey" if i % 2 else "niah_single", "length": length,
                             "depth": 0.5, "exact": 1.0 if i < hits else 0.0})
    d = os.path.join(root, "eval", arm)
    os.makedirs(d)
    ppl = {m: {"overall": 3.0, "buckets": [{"range": "0-4096", "ppl": 3.5}]} for m in modes}
    json.dump({"records": recs, "perplexity": ppl, "metrics": {"seconds": 1.0}}, open(os.path.join(d, "eval_results.json"), "w"))


def _metrics(root, arm, step_time, n=14, density=None):
    os.makedirs(os.path.join(root, arm), exist_ok=True)
    with open(os.path.join(root, arm, "metrics.jsonl"), "w") as f:
        for s in range(1, n + 1):
            r = {"step": s, "loss": 2.0 - 0.01 * s, "step_time_s": step_time * (5 if s <= 2 else 1),
                 "tokens_per_s": 1000 / step_time, "peak_mem_gb": 10.0}
            if density is not None:
                r["sparse/density"] = density
            f.write(json.dumps(r) + "\n")


def test_table_numbers(tmp_path):
    root = str(tmp_path)
    _eval(root, "base", {"dense": {8192: 0.5, 16384: 0.0}, "sparse": {8192: 0.25, 16384: 0.0}})
    _eval(root, "dense", {"dense": {8192: 1.0, 16384: 0.5}, "sparse": {8192: 0.5, 16384: 0.25}})
    _eval(root, "sparse", {"dense": {8192: 1.0, 16384: 0.75}, "sparse": {8192: 0.75, 16384: 0.25}})
    _eval(root, "sparse_k128", {"dense": {8192: 1.0, 16384: 0.5}, "sparse": {8192: 1.0, 16384: 0.5}})
    _eval(root, "sparse_k64", {"dense": {8192: 1.0, 16384: 0.5}, "sparse": {8192: 1.0, 16384: 0.25}})
    os.makedirs(os.path.join(root, "sparse_k64", "final"))
    json.dump({"sparse_config": {"topk": 56, "window_size": 512, "block_size": 64}},
              open(os.path.join(root, "sparse_k64", "final", "config.json"), "w"))
    _metrics(root, "dense", 2.0)
    _metrics(root, "sparse", 1.0, density=0.25)
    table = s2l_table.build(root)
    arms = list(table["arms"])
    # Fixed arms first, then the variants in natural order (k64 before k128).
    assert arms.index("sparse_k64") < arms.index("sparse_k128")
    assert "k_eff 64 (4096 keys" in table["arms"]["sparse_k64"]["label"]
    s = table["summary"]["sparse"]
    assert s["beyond_native"]["dense_arm_dense"] == 0.5          # only 16k is beyond 8k
    assert s["beyond_native"]["sparse_arm_sparse"] == 0.25
    assert s["beyond_native"]["retained"] == 0.5
    assert s["all_lengths"]["retained"] == pytest.approx(0.5 / 0.75)
    assert s["all_lengths"]["retained_dense_mode"] == pytest.approx(0.875 / 0.75)
    # Medians after the warm-up steps: the 5x slower first steps do not count.
    assert s["train_speedup"] == pytest.approx(2.0)
    cost = table["arms"]["sparse"]["cost"]
    assert cost["steps"] == 14 and cost["density"] == 0.25 and cost["step_time_s"] == 1.0
    md = s2l_table.markdown(table)
    assert "| InfLLM-V2 continued training, 32k | sparse | 75 | 25 | 50 |" in md
    assert "retained 50.0%" in md and "2.00x faster" in md


def test_table_refuses_missing_root(tmp_path, capsys):
    assert s2l_table.main([str(tmp_path / "nope")]) == 2
    assert "launch/s2l_smollm2.sh" in capsys.readouterr().err


def test_launcher_end_to_end_tiny(tmp_path):
    """Every arm, both eval modes, one budget variant and the table, with a tiny random model at 1k tokens."""
    root = str(tmp_path / "s2l")
    env = dict(os.environ, ROOT=root, PYTHON=sys.executable, VARIANTS="k8:attention.topk=8",
               TRAIN_ARGS="model=tiny_llama data=tiny trainer.seq_len=1024 trainer.max_steps=2 trainer.grad_accum_steps=1 "
                          "checkpoint.every_steps=1 attention.block_size=32 attention.kernel_size=16 "
                          "attention.kernel_stride=8 attention.window_size=64 attention.dense_len=256",
               EVAL_ARGS="model=tiny_llama data=tiny eval.lengths=[768] eval.tasks=[passkey] eval.depths=[0.5] "
                         "eval.samples=1 eval.ppl_length=768 eval.ppl_bucket=256 eval.plots=false "
                         "attention.block_size=32 attention.kernel_size=16 attention.kernel_stride=8 "
                         "attention.window_size=64 attention.dense_len=256")
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "s2l_smollm2.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for arm in ("base", "base_theta", "base_yarn", "dense", "sparse", "sparse_k8"):
        res = json.load(open(os.path.join(root, "eval", arm, "eval_results.json")))
        assert {r["mode"] for r in res["records"]} == {"dense", "sparse"}, arm
    for arm in ("dense", "sparse", "sparse_k8"):
        assert os.path.isfile(os.path.join(root, arm, "final", "config.json"))
    saved = json.load(open(os.path.join(root, "sparse_k8", "final", "config.json")))["sparse_config"]
    assert saved["topk"] == 8
    table = json.load(open(os.path.join(root, "table.json")))
    assert table["arms"]["sparse"]["cost"]["density"] < 1.0      # the sparse arm really trained sparse
    assert "retained" in open(os.path.join(root, "table.md")).read()
    # A re-run skips everything that is done.
    again = subprocess.run(["bash", os.path.join(REPO, "launch", "s2l_smollm2.sh")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "trained already" in again.stdout and "done already" in again.stdout


def _step_eval(root, arm, step, metrics):
    d = os.path.join(root, arm, "eval", f"step_{step:08d}")
    os.makedirs(d)
    json.dump({"metrics": metrics, "records": []}, open(os.path.join(d, "eval_results.json"), "w"))


def test_retention_matches_cells_and_writes_plot(tmp_path):
    """launch/s2l_retention.py: per step and arm the mean over tasks at each length; retention over the
    (task, length) cells beyond 8k that both arms hold (the sparse arm's cut 32k cell is left out)."""
    import s2l_retention

    root = str(tmp_path)
    full = {f"{m}/{t}/len{n}/acc": v for m in ("dense", "sparse") for t, v in (("niah_single", 1.0),
            ("ruler_niah_single_2", 0.5)) for n in (8192, 16384, 32768)}
    _step_eval(root, "base", 0, {k: v / 4 for k, v in full.items()})
    _step_eval(root, "dense", 50, dict(full, **{"dense/ruler_niah_single_2/len32768/acc": 0.0}))
    cut = {k: v for k, v in full.items() if "len32768" not in k}
    cut["sparse/niah_single/len16384/acc"] = 0.5
    _step_eval(root, "sparse", 50, cut)
    with open(os.path.join(root, "dense", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 50, "loss": 1.0, "tokens_seen": 6_553_600}) + "\n")
    assert s2l_retention.main([root]) == 0
    data = json.load(open(os.path.join(root, "retention.json")))
    rows = {r["step"]: r for r in data["rows"]}
    assert rows[50]["tokens"] == 6_553_600
    assert rows[50]["dense/dense"]["by_length"] == {"8192": 0.75, "16384": 0.75, "32768": 0.5}
    # 16k only (the sparse arm has no 32k): (0.5 + 0.5) / (1.0 + 0.5)
    assert rows[50]["retention"]["all"] == pytest.approx(1.0 / 1.5)
    assert rows[50]["retention"]["ruler"] == pytest.approx(1.0)
    assert rows[50]["retention"]["teacher_forced"] == pytest.approx(0.5)
    assert rows[0]["retention"]["all"] == pytest.approx(1.0)  # the base model is both arms' step 0
    assert os.path.getsize(os.path.join(root, "retention.png")) > 1000


def test_knobs_end_to_end_tiny(tmp_path):
    """launch/s2l_knobs.py on a tiny trained checkpoint: two knobs evaluated in sparse mode with the probe, the
    table from their reports, the overrides reaching the model; a second call runs nothing again."""
    import s2l_knobs

    root = tmp_path / "s2l"
    geometry = ["attention.block_size=32", "attention.kernel_size=16", "attention.kernel_stride=8",
                "attention.window_size=64", "attention.dense_len=256", "attention.topk=4"]
    train = subprocess.run([sys.executable, "train.py", "experiment=s2l_prose_sparse", "model=tiny_llama",
                            "data=tiny", "trainer.seq_len=1024", "trainer.max_steps=1", "trainer.grad_accum_steps=1",
                            "trainer.progress_bar=false", "eval.every_steps=0", "checkpoint.every_steps=1",
                            f"hydra.run.dir={root}/sparse", *geometry], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    env = dict(os.environ, EVAL_ARGS=" ".join(["model=tiny_llama", "data=tiny", "eval.lengths=[768]",
                                               "eval.tasks=[niah_single]", "eval.depths=[0.5]", "eval.samples=1",
                                               "eval.plots=false", *geometry]))
    cmd = [sys.executable, os.path.join(REPO, "launch", "s2l_knobs.py"), str(root), "--knobs", "base,topk12"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    knob_dir = root / "knobs" / "sparse_step1"
    summary = json.load(open(knob_dir / "knobs.json"))["knobs"]
    assert set(summary) == {"base", "topk12"}
    for knob in summary.values():
        assert 0 <= knob["acc_768"] <= 1 and 0 <= knob["needle_block_recall"] <= 1
    # The override reached the model: the probe saw 8 more free selection slots (topk 12 instead of 4).
    slots = {k: json.load(open(knob_dir / k / "eval_results.json"))["records"][0]["selection_probe"]["free_slots"]
             for k in summary}
    assert slots["topk12"] == slots["base"] + 8
    assert "| topk12 | attention.topk=12 |" in open(knob_dir / "knobs.md").read()
    # A second call runs nothing (an eval.py that would fail is never started) and rebuilds the table.
    assert s2l_knobs.main([str(root), "--knobs", "base,topk12", "--python", "/bin/false"]) == 0
    with pytest.raises(SystemExit):
        s2l_knobs.main([str(root), "--knobs", "nope"])


def test_knobs_go_on_past_a_failing_knob(tmp_path, capsys):
    import s2l_knobs

    ckpt = tmp_path / "s2l" / "sparse" / "checkpoints" / "step_00000007"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    rc = s2l_knobs.main([str(tmp_path / "s2l"), "--knobs", "base,topk12", "--python", "/bin/false"])
    assert rc == 1 and "failed: base, topk12" in capsys.readouterr().out
    for knob in ("base", "topk12"):
        d = tmp_path / "s2l" / "knobs" / "sparse_step7" / knob
        assert (d / "eval.log").is_file() and not (d / ".done").exists()
