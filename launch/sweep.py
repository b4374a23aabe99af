#!/usr/bin/env python3
"""A sweep where every point is its own distributed run: one `launch/run.sh` (so one torchrun) per point, one
after the other, then a summary table of the sweep.

    python launch/sweep.py NGPU=2 parallel=zero2 experiment=debug optim.lr=1e-3,3e-3 trainer.seq_len=256,512

Hydra's own multirun (`train.py -m`) runs its jobs inside one process: under torchrun the second job
re-initialises the process group and hangs, hence this launcher.

Words: UPPERCASE KEY=VALUE are launcher settings (NGPU, SHUTDOWN_TIMEOUT, PYTHON: passed to launch/run.sh;
SWEEP_DIR: where the points' run directories go, default runs/sweeps/<timestamp>; FAIL_FAST=1: stop at the
first failed point; DRY_RUN=1: print the commands only). Every other word is a Hydra override; a value with
top-level commas (`optim.lr=1e-3,3e-3`) is a sweep axis, and the points are the product of the axes, in order.
Commas inside brackets, braces, parentheses or quotes belong to the value (`model.arch.foo=[1,2]`).

Each point runs in <SWEEP_DIR>/<i> with run_name=<sweep>_<i>; the sweep writes <SWEEP_DIR>/summary.md and
summary.json (per point: its overrides, status, steps, final loss, median tokens/s, wall time) and exits
non-zero if a point failed.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(REPO, "launch", "run.sh")
PASSED_TO_RUN_SH = ("NGPU", "SHUTDOWN_TIMEOUT", "PYTHON")
OWN_SETTINGS = ("SWEEP_DIR", "FAIL_FAST", "DRY_RUN")


def split_top_level(value: str) -> List[str]:
    """Split on commas that are not inside brackets, braces, parentheses or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def parse_args(argv: List[str]) -> Tuple[Dict[str, str], List[str], List[Tuple[str, List[str]]]]:
    """(launcher settings, fixed overrides, sweep axes as (key, values))."""
    settings: Dict[str, str] = {}
    fixed: List[str] = []
    axes: List[Tuple[str, List[str]]] = []
    for word in argv:
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", word)
        if m:
            if m.group(1) not in PASSED_TO_RUN_SH + OWN_SETTINGS:
                raise SystemExit(f"sweep.py: unknown launcher setting {m.group(1)} (known: "
                                 f"{' '.join(PASSED_TO_RUN_SH + OWN_SETTINGS)}); Hydra overrides are lower-case")
            settings[m.group(1)] = m.group(2)
            continue
        if word in ("-m", "--multirun"):
            continue
        if "=" not in word:
            raise SystemExit(f"sweep.py: expected KEY=VALUE overrides, got {word!r}")
        key, value = word.split("=", 1)
        values = split_top_level(value)
        if len(values) > 1:
            axes.append((key, values))
        else:
            fixed.append(word)
    for key in ("run_name", "hydra.run.dir"):
        if any(w.split("=", 1)[0].lstrip("+") == key for w in fixed):
            raise SystemExit(f"sweep.py: {key} is set per point by the sweep (use SWEEP_DIR=...)")
    return settings, fixed, axes


def read_metrics(run_dir: str) -> Dict[str, Optional[float]]:
    """Steps, final loss and median tokens/s from the point's metrics.jsonl (the trainer's log on rank 0)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if "loss" in row:
                    rows.append(row)
    # The first step carries start-up costs; the median of the rest is the steady rate.
    rates = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")] or \
        [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {"steps": rows[-1]["step"] if rows else None, "final_loss": rows[-1]["loss"] if rows else None,
            "tokens_per_s": statistics.median(rates) if rates else None}


def format_table(axes: List[Tuple[str, List[str]]], results: List[Dict]) -> str:
    head = ["#"] + [k for k, _ in axes] + ["status", "steps", "final loss", "tokens/s", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        cells = [str(r["index"])] + [r["point"][k] for k, _ in axes] + [
            r["status"], "-" if r["steps"] is None else str(r["steps"]),
            "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
            "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    settings, fixed, axes = parse_args(argv)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    sweep_dir = os.path.abspath(settings.get("SWEEP_DIR") or os.path.join("runs", "sweeps", stamp))
    sweep_name = os.path.basename(os.path.normpath(sweep_dir))
    points = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
    run_sh_settings = [f"{k}={settings[k]}" for k in PASSED_TO_RUN_SH if k in settings]
    print(f"sweep: {len(points)} point(s) in {sweep_dir}", flush=True)
    if settings.get("DRY_RUN") != "1":
        os.makedirs(sweep_dir, exist_ok=True)
    results = []
    for i, point in enumerate(points):
        run_dir = os.path.join(sweep_dir, str(i))
        cmd = ["bash", RUN_SH, *run_sh_settings, *fixed, *[f"{k}={v}" for k, v in point.items()],
               f"run_name={sweep_name}_{i}", f"hydra.run.dir={run_dir}"]
        print(f"\n[{i + 1}/{len(points)}] {' '.join(f'{k}={v}' for k, v in point.items())}\n+ {' '.join(cmd)}",
              flush=True)
        if settings.get("DRY_RUN") == "1":
            continue
        t0 = time.time()
        rc = subprocess.call(cmd)
        result = {"index": i, "point": point, "run_dir": run_dir, "returncode": rc,
                  "status": "ok" if rc == 0 else f"failed ({rc})", "wall_s": time.time() - t0,
                  **read_metrics(run_dir)}
        results.append(result)
        if rc != 0 and settings.get("FAIL_FAST") == "1":
            print(f"sweep: point {i} failed (exit {rc}); FAIL_FAST=1, stopping", flush=True)
            break
    if settings.get("DRY_RUN") == "1":
        return 0
    table = format_table(axes, results)
    header = f"# Sweep {sweep_name}\n\nFixed: `{' '.join(fixed) or '-'}`\n\n"
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
        json.dump({"fixed": fixed, "axes": dict(axes), "points": results}, f, indent=2)
    print(f"\nsweep summary ({sweep_dir}/summary.md):\n{table}", flush=True)
    failed = [r for r in results if r["returncode"] != 0]
    return 1 if failed or len(results) < len(points) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
