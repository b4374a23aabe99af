"""The short-to-long experiment's table (launch/s2l_smollm2.sh): quality of every arm at each length, and cost.

    python launch/s2l_table.py runs/s2l            # markdown on stdout, runs/s2l/table.json beside it

Reads <root>/eval/<arm>/eval_results.json (the eval suite's report) and <root>/<arm>/metrics.jsonl (the
trainer's per-step metrics). The long-context score of an arm and mode is the mean exact-match accuracy over
tasks, depths and samples at each length; "retained" compares the InfLLM-V2 arm (sparse mode) with the dense arm
(dense mode) on the mean over the lengths above the native 8k and over all lengths.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from typing import Dict, List, Optional

ARMS = [  # (directory name, label)
    ("base", "no training, RoPE theta 1e5 (native)"),
    ("base_theta", "no training, RoPE theta 1e6"),
    ("base_yarn", "no training, YaRN x4"),
    ("dense", "dense continued training, 32k"),
    ("sparse", "InfLLM-V2 continued training, 32k"),
]
NATIVE = 8192


def _load_eval(path: str) -> Optional[dict]:
    f = os.path.join(path, "eval_results.json")
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        return json.load(fh)


def _acc_by_length(records: List[dict], mode: str) -> Dict[int, float]:
    out: Dict[int, List[float]] = {}
    for r in records:
        if r.get("mode") == mode and "exact" in r:
            out.setdefault(int(r["length"]), []).append(float(r["exact"]))
    return {n: sum(v) / len(v) for n, v in sorted(out.items())}


def _acc_by_task(records: List[dict], mode: str) -> Dict[str, Dict[int, float]]:
    out: Dict[str, Dict[int, List[float]]] = {}
    for r in records:
        if r.get("mode") == mode and "exact" in r:
            out.setdefault(r["task"], {}).setdefault(int(r["length"]), []).append(float(r["exact"]))
    return {t: {n: sum(v) / len(v) for n, v in sorted(d.items())} for t, d in out.items()}


def _cost(metrics_path: str, skip: int = 10) -> Optional[dict]:
    """Medians over the steps after the first `skip` (Triton compilation, SDPA and allocator warm-up: the dense arm
    took 7 s, then ~2 s a step on the H100)."""
    if not os.path.isfile(metrics_path):
        return None
    rows = []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and "step_time_s" in r:
                rows.append(r)
    if not rows:
        return None
    steady = rows[skip:] or rows

    def med(key: str) -> Optional[float]:
        xs = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.median(xs) if xs else None

    return {"steps": len(rows), "tokens_per_s": med("tokens_per_s"), "step_time_s": med("step_time_s"),
            "peak_mem_gb": max((r.get("peak_mem_gb") or 0.0) for r in rows) or None,
            "tflops": med("tflops"), "mfu": med("mfu"), "density": med("sparse/density"),
            "select_share": med("sparse/select_step_share"), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "wall_s": sum(r["step_time_s"] for r in rows)}


def _fmt(x: Optional[float], pct: bool = True, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{nd}f}" if pct else f"{x:,.{nd}f}"


def _arms(root: str) -> List[tuple]:
    """The fixed arms, then every InfLLM-V2 variant (sparse_<name>, launch/s2l_smollm2.sh VARIANTS) found."""
    arms = list(ARMS)
    found = set(os.listdir(os.path.join(root, "eval"))) if os.path.isdir(os.path.join(root, "eval")) else set()
    natural = lambda a: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", a)]
    for arm in sorted(found, key=natural):
        if arm.startswith("sparse_"):
            label = f"InfLLM-V2 continued training, 32k ({arm[len('sparse_'):]})"
            cfg_path = os.path.join(root, arm, "final", "config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    sc = json.load(f).get("sparse_config") or {}
                if sc:
                    k_eff = sc["topk"] + sc["window_size"] // sc["block_size"]
                    label = (f"InfLLM-V2 continued training, 32k, k_eff {k_eff} ({k_eff * sc['block_size']} keys: "
                             f"topk {sc['topk']} + window {sc['window_size']})")
            arms.append((arm, label))
    return arms


def build(root: str) -> dict:
    table: dict = {"arms": {}}
    for arm, label in _arms(root):
        ev = _load_eval(os.path.join(root, "eval", arm))
        entry: dict = {"label": label}
        if ev is not None:
            recs = ev.get("records", [])
            modes = sorted({r["mode"] for r in recs})
            entry["acc"] = {m: _acc_by_length(recs, m) for m in modes}
            entry["task_acc"] = {m: _acc_by_task(recs, m) for m in modes}
            entry["ppl"] = {m: {b["range"]: b["ppl"] for b in p.get("buckets", [])}
                            for m, p in (ev.get("perplexity") or {}).items()}
            entry["eval_seconds"] = ev.get("metrics", {}).get("seconds")
        cost = _cost(os.path.join(root, arm, "metrics.jsonl"))
        if cost:
            entry["cost"] = cost
        table["arms"][arm] = entry

    def mean_acc(arm: str, mode: str, long_only: bool) -> Optional[float]:
        acc = table["arms"].get(arm, {}).get("acc", {}).get(mode)
        if not acc:
            return None
        xs = [v for n, v in acc.items() if n > NATIVE or not long_only]
        return sum(xs) / len(xs) if xs else None

    summary = {}
    for arm in table["arms"]:
        if arm != "sparse" and not arm.startswith("sparse_"):
            continue
        entry = {}
        for long_only in (True, False):
            d = mean_acc("dense", "dense", long_only)
            s_sparse = mean_acc(arm, "sparse", long_only)
            s_dense = mean_acc(arm, "dense", long_only)
            entry["beyond_native" if long_only else "all_lengths"] = {
                "dense_arm_dense": d, "sparse_arm_sparse": s_sparse, "sparse_arm_dense": s_dense,
                "retained": (s_sparse / d) if (d and s_sparse is not None) else None,
                "retained_dense_mode": (s_dense / d) if (d and s_dense is not None) else None}
        cd, cs = table["arms"].get("dense", {}).get("cost"), table["arms"][arm].get("cost")
        if cd and cs and cd.get("step_time_s") and cs.get("step_time_s"):
            entry["train_speedup"] = cd["step_time_s"] / cs["step_time_s"]
        summary[arm] = entry
    table["summary"] = summary
    return table


def markdown(table: dict) -> str:
    arms = table["arms"]
    lengths = sorted({n for e in arms.values() for acc in e.get("acc", {}).values() for n in acc})
    lines = ["### Long-context accuracy (mean exact match over tasks, depths and samples, %)", "",
             "| arm | eval mode | " + " | ".join(f"{n // 1024}k" for n in lengths) + " | mean |",
             "|---|---|" + "---:|" * (len(lengths) + 1)]
    for arm, e in arms.items():
        for mode, acc in e.get("acc", {}).items():
            xs = [acc.get(n) for n in lengths]
            present = [x for x in xs if x is not None]
            lines.append(f"| {e['label']} | {mode} | " + " | ".join(_fmt(x) for x in xs)
                         + f" | {_fmt(sum(present) / len(present) if present else None)} |")
    tasks = sorted({t for e in arms.values() for ta in e.get("task_acc", {}).values() for t in ta})
    lines += ["", "### By task (%, lengths " + " / ".join(f"{n // 1024}k" for n in lengths) + ")", "",
              "| arm | mode | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for arm, e in arms.items():
        for mode, ta in e.get("task_acc", {}).items():
            cells = [" / ".join(_fmt(ta.get(t, {}).get(n)) for n in lengths) for t in tasks]
            lines.append(f"| {e['label']} | {mode} | " + " | ".join(cells) + " |")
    ranges = []
    for e in arms.values():
        for p in e.get("ppl", {}).values():
            ranges += [r for r in p if r not in ranges]
    if ranges:
        lines += ["", "### Perplexity by position (held-out text)", "",
                  "| arm | mode | " + " | ".join(ranges) + " |", "|---|---|" + "---:|" * len(ranges)]
        for arm, e in arms.items():
            for mode, p in e.get("ppl", {}).items():
                lines.append(f"| {e['label']} | {mode} | " + " | ".join(_fmt(p.get(r), False, 2) for r in ranges) + " |")
    costs = [(a, e) for a, e in arms.items() if "cost" in e]
    if costs:
        lines += ["", "### Training cost (medians after 10 steps)", "",
                  "| arm | steps | tokens/s | step s | peak GiB | TFLOP/s | MFU | density | selection share | loss first -> last |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for a, e in costs:
            c = e["cost"]
            lines.append(f"| {e['label']} | {c['steps']} | {_fmt(c['tokens_per_s'], False)} | "
                         f"{_fmt(c['step_time_s'], False, 3)} | {_fmt(c['peak_mem_gb'], False, 1)} | "
                         f"{_fmt(c['tflops'], False, 1)} | {_fmt(c['mfu'], True, 1)}% | {_fmt(c['density'], False, 3)} | "
                         f"{_fmt(c['select_share'])}% | {c['first_loss']:.3f} -> {c['last_loss']:.3f} |")
    lines += [""]
    for arm, s in table["summary"].items():
        lines.append(f"- {arms[arm]['label']}:")
        for key, name in (("beyond_native", "beyond 8k"), ("all_lengths", "all lengths")):
            d = s[key]
            lines.append(f"  - {name}: dense arm (dense mode) {_fmt(d['dense_arm_dense'], True, 1)}%; this arm in sparse mode "
                         f"{_fmt(d['sparse_arm_sparse'], True, 1)}% (retained {_fmt(d['retained'], True, 1)}%), in dense mode "
                         f"{_fmt(d['sparse_arm_dense'], True, 1)}% ({_fmt(d['retained_dense_mode'], True, 1)}%)")
        if "train_speedup" in s:
            lines.append(f"  - training step {s['train_speedup']:.2f}x faster than dense")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="runs/s2l")
    args = p.parse_args(argv)
    if not os.path.isdir(args.root):
        print(f"s2l_table: {args.root!r} is not a directory (run launch/s2l_smollm2.sh first)", file=sys.stderr)
        return 2
    table = build(args.root)
    with open(os.path.join(args.root, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
