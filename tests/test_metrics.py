"""The console's per-step line and eval table, and metrics.jsonl cut back to the resumed step."""
import json
import re
from types import SimpleNamespace

from infllm.metrics import MetricsLogger, format_eval_table, format_step_line


def test_step_line_has_step_loss_lr_throughput_density_memory():
    m = {"step": 7, "loss": 2.345678, "lr": 3e-4, "tokens_per_s": 12345.6, "sparse/density": 0.3125,
         "peak_mem_gb": 41.27}
    assert format_step_line(m, max_steps=50) == \
        "step 7/50 | loss 2.3457 | lr 3.00e-04 | 12,346 tok/s | density 0.31 | mem 41.3 GiB"
    dense_cpu = format_step_line({"step": 3, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 99.0})
    assert dense_cpu.startswith("step 3 | loss 1.0000 | lr 1.00e-03 | 99 tok/s | rss ") and "density" not in dense_cpu


def test_eval_table_one_row_per_mode_one_column_per_task():
    flat = {"dense/passkey/acc": 1.0, "dense/kv/acc": 0.5, "dense/acc": 0.75, "dense/ppl": 12.34,
            "dense/passkey/len512/acc": 1.0, "dense/passkey/logprob": -0.2,
            "sparse/passkey/acc": 0.25, "sparse/kv/acc": 0.0, "sparse/acc": 0.125, "sparse/ppl": 1234.5,
            "sparse/passkey/needle_block_recall": 0.4}
    lines = format_eval_table(flat, step=20).splitlines()
    assert len(lines) == 4 and lines[0] == "eval at step 20:"
    assert lines[1].split() == ["mode", "passkey", "kv", "mean", "acc", "ppl"]
    assert lines[2].split() == ["dense", "1.000", "0.500", "0.750", "12.340"]
    assert lines[3].split() == ["sparse", "0.250", "0.000", "0.125", "1234.5"]
    # Columns line up: every cell of a column ends where its header ends.
    ends = [m.end() for m in re.finditer(r"\S+", lines[1])]
    ends = [ends[0], ends[1], ends[2], ends[4], ends[5]]  # "mean acc" is one column
    for row in lines[2:]:
        assert [m.end() for m in re.finditer(r"\S+", row)][1:] == ends[1:]
    assert "no accuracy" in format_eval_table({"dense/passkey/logprob": -1.0}, step=3)


def test_truncate_after_keeps_rows_up_to_the_resumed_step(tmp_path):
    logger = MetricsLogger(str(tmp_path), SimpleNamespace(name="console"), {})
    for step in range(1, 8):
        logger.log({"step": step, "loss": 10.0 - step})
        if step == 4:
            logger.log({"step": 4, "eval/dense/acc": 0.5})
    with open(logger.path, "a") as f:
        f.write('{"step": 8, "loss"')  # torn by a kill mid-write
    assert logger.truncate_after(4) == 4
    rows = [json.loads(line) for line in open(logger.path)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert logger.truncate_after(4) == 0
    logger.log({"step": 5, "loss": 5.0})
    assert [json.loads(line)["step"] for line in open(logger.path)] == [1, 2, 3, 4, 4, 5]
