"""Retention versus training tokens for launch/s2l_prose.sh (issue 16): markdown on stdout, retention.json and
retention.png in the root.

    python launch/s2l_retention.py runs/s2l_prose

Reads <root>/<arm>/eval/step_*/eval_results.json for arm in base (the untrained model, step 0), dense and
sparse, and <root>/<arm>/metrics.jsonl for the tokens seen at each step. A score is the mean accuracy over the
tasks (RULER's metric for the ruler_* tasks, teacher-forced exact match for the others) at one length; "beyond
8k" is the mean over the lengths above SmolLM2's native 8k. Retention = the InfLLM-V2 arm in sparse mode over
the dense arm in dense mode, at the same step, over the (task, length) cells beyond 8k that both evals hold.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

NATIVE = 8192
ARMS = ("base", "dense", "sparse")
LABEL = {"base": "no training (RoPE 1e6)", "dense": "dense arm", "sparse": "InfLLM-V2 arm"}


def load_evals(root: str, arm: str) -> Dict[int, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(root, arm, "eval", "step_*", "eval_results.json"))):
        step = int(re.search(r"step_(\d+)", path).group(1))
        with open(path) as f:
            out[step] = json.load(f)
    return out


def tokens_by_step(root: str, arm: str) -> Dict[int, int]:
    out = {0: 0}
    path = os.path.join(root, arm, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "tokens_seen" in m:
                    out[int(m["step"])] = int(m["tokens_seen"])
    return out


def scores(result: dict, mode: str, tasks: Optional[List[str]] = None) -> Dict[int, float]:
    """{length: mean accuracy over tasks} in one mode (tasks: a subset, default every task)."""
    per: Dict[int, List[float]] = {}
    for key, value in result["metrics"].items():
        m = re.fullmatch(rf"{mode}/([^/]+)/len(\d+)/acc", key)
        if m and (tasks is None or m.group(1) in tasks):
            per.setdefault(int(m.group(2)), []).append(float(value))
    return {length: sum(v) / len(v) for length, v in sorted(per.items())}


def beyond_native(by_length: Dict[int, float]) -> Optional[float]:
    vals = [v for length, v in by_length.items() if length > NATIVE]
    return sum(vals) / len(vals) if vals else None


def cells(result: dict, mode: str, tasks: List[str]) -> Dict[Tuple[str, int], float]:
    out = {}
    for key, value in result["metrics"].items():
        m = re.fullmatch(rf"{mode}/([^/]+)/len(\d+)/acc", key)
        if m and m.group(1) in tasks and int(m.group(2)) > NATIVE:
            out[(m.group(1), int(m.group(2)))] = float(value)
    return out


def matched_retention(sparse_arm: Optional[dict], dense_arm: Optional[dict], tasks: List[str]) -> Optional[float]:
    """Sparse arm in sparse mode over dense arm in dense mode, beyond 8k, over the (task, length) cells both
    have (a cut eval leaves some out)."""
    if sparse_arm is None or dense_arm is None:
        return None
    a, b = cells(sparse_arm, "sparse", tasks), cells(dense_arm, "dense", tasks)
    common = sorted(set(a) & set(b))
    den = sum(b[c] for c in common)
    return sum(a[c] for c in common) / den if common and den else None


def task_names(result: dict) -> List[str]:
    names = []
    for key in result["metrics"]:
        m = re.fullmatch(r"[^/]+/([^/]+)/len\d+/acc", key)
        if m and m.group(1) not in names:
            names.append(m.group(1))
    return names


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def build(root: str) -> Tuple[List[str], dict]:
    evals = {arm: load_evals(root, arm) for arm in ARMS}
    tokens = {arm: tokens_by_step(root, arm) for arm in ARMS}
    base = evals["base"].get(0)
    rows = []
    steps = sorted(set(evals["dense"]) | set(evals["sparse"]))
    if base is not None:
        for arm in ("dense", "sparse"):
            evals[arm].setdefault(0, base)
        steps = [0] + [s for s in steps if s != 0]
    lines = []
    any_result = next((r for arm in ARMS for r in evals[arm].values()), None)
    if any_result is None:
        return [f"no eval results under {root}"], {}
    all_tasks = task_names(any_result)
    ruler_tasks = [t for t in all_tasks if t.startswith("ruler_")]
    tf_tasks = [t for t in all_tasks if not t.startswith("ruler_")]
    lengths = sorted(scores(any_result, "dense"))
    lines += ["Mean accuracy (%) at " + " / ".join(f"{length // 1024}k" for length in lengths)
              + ", and beyond 8k; retention = InfLLM-V2 arm (sparse mode) / dense arm (dense mode) over the (task, length)"
              " cells beyond 8k that both hold.", ""]
    lines += ["| step | tokens (M) | dense arm, dense | dense arm, sparse | InfLLM-V2 arm, sparse | InfLLM-V2 arm, "
              "dense | retention beyond 8k: all / RULER / teacher-forced |", "|---:|---:|---|---|---|---|---|"]
    for step in steps:
        cells, row = [], {"step": step}
        tok = tokens["dense"].get(step, tokens["sparse"].get(step))
        row["tokens"] = tok
        for arm, mode in (("dense", "dense"), ("dense", "sparse"), ("sparse", "sparse"), ("sparse", "dense")):
            r = evals[arm].get(step)
            if r is None:
                cells.append("-")
                continue
            by_len = scores(r, mode)
            row[f"{arm}/{mode}"] = {"by_length": by_len, "beyond_8k": beyond_native(by_len),
                                    "ruler_beyond_8k": beyond_native(scores(r, mode, ruler_tasks)),
                                    "tf_beyond_8k": beyond_native(scores(r, mode, tf_tasks))}
            cells.append(" / ".join(_pct(by_len.get(length)) for length in lengths)
                         + f"; **{_pct(row[f'{arm}/{mode}']['beyond_8k'])}**")
        ret = []
        for subset in (all_tasks, ruler_tasks, tf_tasks):
            ret.append(matched_retention(evals["sparse"].get(step), evals["dense"].get(step), subset))
        row["retention"] = dict(zip(("all", "ruler", "teacher_forced"), ret))
        lines.append(f"| {step} | {'-' if tok is None else f'{tok / 1e6:.1f}'} | " + " | ".join(cells) + " | "
                     + " / ".join("-" if x is None else f"{100 * x:.0f}%" for x in ret) + " |")
        rows.append(row)

    # By task at the last step where both arms have results.
    both = [s for s in steps if s in evals["dense"] and s in evals["sparse"]]
    if both:
        last = both[-1]
        lines += ["", f"By task at step {last} (%, " + " / ".join(f"{length // 1024}k" for length in lengths) + "):",
                  "", "| task | dense arm, dense | dense arm, sparse | InfLLM-V2 arm, sparse | InfLLM-V2 arm, dense |",
                  "|---|---|---|---|---|"]
        for task in all_tasks:
            cells = []
            for arm, mode in (("dense", "dense"), ("dense", "sparse"), ("sparse", "sparse"), ("sparse", "dense")):
                by_len = scores(evals[arm][last], mode, [task])
                cells.append(" / ".join(_pct(by_len.get(length)) for length in lengths))
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines += ["", f"Perplexity by position at step {last} (held-out prose mix):", ""]
        ppl_rows = []
        for arm, mode in (("dense", "dense"), ("dense", "sparse"), ("sparse", "sparse"), ("sparse", "dense")):
            m = evals[arm][last]["metrics"]
            buckets = [(k.split("/")[-1], v) for k, v in m.items() if k.startswith(f"{mode}/ppl/")]
            if buckets:
                if not ppl_rows:
                    ppl_rows = ["| arm | mode | " + " | ".join(b for b, _ in buckets) + " |",
                                "|---|---|" + "---:|" * len(buckets)]
                ppl_rows.append(f"| {LABEL[arm]} | {mode} | " + " | ".join(f"{v:.2f}" for _, v in buckets) + " |")
        lines += ppl_rows
    return lines, {"root": root, "lengths": lengths, "tasks": all_tasks, "rows": rows}


def plot(data: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r.get("tokens") is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label, style in (("dense/dense", "dense arm, dense mode", "k-o"),
                              ("sparse/sparse", "InfLLM-V2 arm, sparse mode", "r-o"),
                              ("sparse/dense", "InfLLM-V2 arm, dense mode", "r--s"),
                              ("dense/sparse", "dense arm, sparse mode", "k--s")):
        pts = [(r["tokens"] / 1e6, r[key]["beyond_8k"]) for r in rows if key in r and r[key]["beyond_8k"] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=label)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("mean accuracy beyond 8k (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for key, label, style in (("all", "all tasks", "b-o"), ("ruler", "RULER tasks", "g-^"),
                              ("teacher_forced", "teacher-forced needles", "m-v")):
        pts = [(r["tokens"] / 1e6, r["retention"][key]) for r in rows if r["retention"].get(key) is not None]
        if pts:
            ax2.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=label)
    ax2.axhline(90, color="grey", ls=":", lw=1)
    ax2.set_xlabel("training tokens (M)")
    ax2.set_ylabel("retention beyond 8k (%)")
    ax2.set_title("InfLLM-V2 arm (sparse) / dense arm (dense)", fontsize=9)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    args = p.parse_args(argv)
    lines, data = build(args.root)
    print("\n".join(lines))
    if data:
        with open(os.path.join(args.root, "retention.json"), "w") as f:
            json.dump(data, f, indent=1)
        plot(data, os.path.join(args.root, "retention.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
