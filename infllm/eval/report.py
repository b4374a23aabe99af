"""Reports of an eval run: aggregation, the JSON file, the markdown table and the PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from infllm.modes import ATTENTION_MODES

RESULTS_JSON = "eval_results.json"
REPORT_MD = "eval_report.md"
HEATMAP_PNG = "needle_heatmap.png"
PPL_PNG = "ppl_by_position.png"
LOSS_PNG = "loss_curve.png"
# Fields of the selection probe's records (infllm/eval/probe.py; kept here so the report needs no torch).
PROBE_METRICS = ("needle_block_recall", "needle_block_rank")


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def aggregate(records: Sequence[Dict[str, Any]], metric: str) -> Dict[Tuple, float]:
    """Means of `metric` keyed by (mode, task, length, depth), (mode, task, length) and (mode, task)."""
    groups: Dict[Tuple, List[float]] = defaultdict(list)
    for r in records:
        if metric not in r:
            continue
        groups[(r["mode"], r["task"], r["length"], r["depth"])].append(r[metric])
        groups[(r["mode"], r["task"], r["length"])].append(r[metric])
        groups[(r["mode"], r["task"])].append(r[metric])
    return {k: _mean(v) for k, v in groups.items()}


def flat_metrics(records: Sequence[Dict[str, Any]], ppl: Dict[str, Dict]) -> Dict[str, float]:
    """The dict a trainer logs (under its own "eval/" prefix): <mode>/<task>/acc, <mode>/<task>/len<L>/acc,
    <mode>/acc (mean over tasks), <mode>/ppl, <mode>/ppl/<start>-<end>, ..."""
    out: Dict[str, float] = {}
    metrics = ["exact", "value_acc", "logprob"] + (["gen_exact"] if any("gen_exact" in r for r in records) else [])
    # eval.selection_probe (sparse records only): <mode>/<task>/[len<L>/]needle_block_recall, ..._rank
    metrics += [m for m in PROBE_METRICS if any(m in r for r in records)]
    names = {"exact": "acc", "value_acc": "value_acc", "logprob": "logprob", "gen_exact": "gen_acc"}
    names.update({m: m for m in PROBE_METRICS})
    for metric in metrics:
        for key, v in aggregate(records, metric).items():
            if len(key) == 2:
                out[f"{key[0]}/{key[1]}/{names[metric]}"] = v
            elif len(key) == 3:
                out[f"{key[0]}/{key[1]}/len{key[2]}/{names[metric]}"] = v
    for mode in sorted({r["mode"] for r in records}):
        accs = [v for k, v in out.items() if k.startswith(f"{mode}/") and k.count("/") == 2 and k.endswith("/acc")]
        out[f"{mode}/acc"] = _mean(accs)
    for mode, p in ppl.items():
        out[f"{mode}/ppl"] = p["overall"]
        for b in p["buckets"]:
            out[f"{mode}/ppl/{b['range']}"] = b["ppl"]
    return out


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}"


def markdown(records: Sequence[Dict[str, Any]], ppl: Dict[str, Dict], header: Dict[str, Any]) -> str:
    modes = sorted({r["mode"] for r in records} | set(ppl), key=ATTENTION_MODES.index)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = ["# Long-context eval", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if v is not None]
    if records:
        acc = aggregate(records, "exact")
        val = aggregate(records, "value_acc")
        lp = aggregate(records, "logprob")
        task_lengths = sorted({r["length"] for r in records})
        cols = " | ".join(str(n) for n in task_lengths)
        lines += ["", "## Accuracy by context length (exact match of the greedy answer, %)", "",
                  f"| task | mode | {cols} | mean |", "|" + "---|" * (len(task_lengths) + 3)]
        for t in tasks:
            for m in modes:
                if (m, t) not in acc:
                    continue
                cells = " | ".join(_pct(acc.get((m, t, n))) for n in task_lengths)
                lines.append(f"| {t} | {m} | {cells} | {_pct(acc[(m, t)])} |")
        lines += ["", "## Accuracy by needle depth (%, rows: depth; columns: context length)", "",
                  f"| task | mode | depth | {cols} |", "|" + "---|" * (len(task_lengths) + 3)]
        lines += _depth_rows(records, tasks, modes, acc, task_lengths, lambda key: _pct(acc.get(key)))
        lines += ["", "## Values recalled (%) and mean answer log-prob (nats/token)", "",
                  f"| task | mode | {cols} |", "|" + "---|" * (len(task_lengths) + 2)]
        for t in tasks:
            for m in modes:
                if (m, t) not in val:
                    continue
                # RULER's tasks are scored on generations only: no answer log-prob.
                cells = " | ".join(f"{_pct(val[(m, t, n)])} / {lp[(m, t, n)]:.2f}" if (m, t, n) in lp
                                   else f"{_pct(val[(m, t, n)])} / -" if (m, t, n) in val else "-"
                                   for n in task_lengths)
                lines.append(f"| {t} | {m} | {cells} |")
        if any("gen_exact" in r for r in records):
            gen = aggregate(records, "gen_exact")
            lines += ["", "## Greedy generation (answer strings found in the output, all of them, %)", "",
                      f"| task | mode | {cols} |", "|" + "---|" * (len(task_lengths) + 2)]
            for t in tasks:
                for m in modes:
                    if (m, t) in gen:
                        lines.append(f"| {t} | {m} | " + " | ".join(_pct(gen.get((m, t, n))) for n in task_lengths)
                                     + " |")
    if any("needle_block_recall" in r for r in records):
        lines += _probe_markdown(records, modes, tasks)
    if ppl:
        any_p = next(iter(ppl.values()))
        heldout = any_p.get("heldout_docs", any_p["docs"])
        lines += ["", f"## Perplexity by position ({any_p['docs']} document(s) of {any_p['length']} tokens, "
                  f"{heldout} of them held out)",
                  "", "| positions | " + " | ".join(ppl) + " |", "|" + "---|" * (len(ppl) + 1)]
        for i, b in enumerate(any_p["buckets"]):
            lines.append(f"| {b['range']} | " + " | ".join(f"{p['buckets'][i]['ppl']:.2f}" for p in ppl.values())
                         + " |")
        lines.append("| all | " + " | ".join(f"{p['overall']:.2f}" for p in ppl.values()) + " |")
    return "\n".join(lines) + "\n"


def _depth_rows(records: Sequence[Dict[str, Any]], tasks: Sequence[str], modes: Sequence[str], present,
                lengths: Sequence[int], cell: Callable[[Tuple], str], all_row: bool = False) -> List[str]:
    """Table rows `| task | mode | depth | cell per length |` for each (mode, task) in `present`, one per needle
    depth found in the task's records, then (all_row) one over every depth; cell gets (mode, task, length[, depth])."""
    rows = []
    for t in tasks:
        depths = sorted({r["depth"] for r in records if r["task"] == t}, key=lambda d: -1 if d is None else d)
        for m in modes:
            if (m, t) not in present:
                continue
            for d in depths:
                rows.append(f"| {t} | {m} | {'-' if d is None else f'{d:g}'} | "
                            + " | ".join(cell((m, t, n, d)) for n in lengths) + " |")
            if all_row:
                rows.append(f"| {t} | {m} | all | " + " | ".join(cell((m, t, n)) for n in lengths) + " |")
    return rows


def _probe_markdown(records: Sequence[Dict[str, Any]], modes: Sequence[str], tasks: Sequence[str]) -> List[str]:
    """The selection probe's tables (eval.selection_probe; records of sparse mode)."""
    probed = [r for r in records if "needle_block_recall" in r]
    lengths = sorted({r["length"] for r in probed})
    cols = " | ".join(str(n) for n in lengths)
    recall = aggregate(probed, "needle_block_recall")
    rank = aggregate(probed, "needle_block_rank")
    free = sorted({r["selection_probe"]["free_slots"] for r in probed})
    lines = ["", "## Needle block selection (eval.selection_probe)", "",
             "Does the block selection of the query that predicts the answer's first value token contain the key "
             "block(s) of the target needle's value? Cells: recall (% of (layer, KV head) pairs selecting every "
             "needle block) / rank (median over those pairs of the needle block's rank among the non-forced "
             "candidate blocks by score; 0 = forced, i.e. init block or local window; selected when rank <= free "
             f"slots = {', '.join(str(f) for f in free)}).", "",
             f"| task | mode | depth | {cols} |", "|" + "---|" * (len(lengths) + 3)]

    def cell(key: Tuple) -> str:
        return f"{_pct(recall[key])} / {rank[key]:.1f}" if key in recall else "-"

    lines += _depth_rows(probed, tasks, modes, recall, lengths, cell, all_row=True)
    # Selection vs outcome: a miss with the needle selected points at the attention, a miss without it at
    # the selection.
    lines += ["", "Needle block recall (%) of the samples answered right / wrong (number of samples):", "",
              f"| task | mode | {cols} |", "|" + "---|" * (len(lengths) + 2)]
    for t in tasks:
        for m in modes:
            rows = [r for r in probed if r["task"] == t and r["mode"] == m]
            if not rows:
                continue
            cells = []
            for n in lengths:
                parts = []
                for right in (True, False):
                    xs = [r["needle_block_recall"] for r in rows
                          if r["length"] == n and "exact" in r and (r["exact"] == 1.0) == right]
                    parts.append(f"{_pct(_mean(xs))} ({len(xs)})" if xs else "- (0)")
                cells.append(" / ".join(parts))
            lines.append(f"| {t} | {m} | " + " | ".join(cells) + " |")
    # Which layers miss: recall per layer, over the samples of each length.
    n_layers = max(len(r["selection_probe"]["layer_recall"]) for r in probed)
    layer_ids = next(r["selection_probe"]["layers"] for r in probed
                     if len(r["selection_probe"]["layers"]) == n_layers)
    lines += ["", "Needle block recall by decoder layer (%, mean over the samples of a length):", "",
              "| task | mode | length | " + " | ".join(f"L{i}" for i in layer_ids) + " |",
              "|" + "---|" * (n_layers + 3)]
    for t in tasks:
        for m in modes:
            for n in lengths:
                rows = [r["selection_probe"]["layer_recall"] for r in probed
                        if r["task"] == t and r["mode"] == m and r["length"] == n]
                if not rows:
                    continue
                means = [_mean(x[i] for x in rows if i < len(x)) for i in range(n_layers)]
                lines.append(f"| {t} | {m} | {n} | " + " | ".join(_pct(v) for v in means) + " |")
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmaps(records: Sequence[Dict[str, Any]], path: str) -> Optional[str]:
    """One panel per (task, mode): exact-match accuracy over context length (x) and needle depth (y)."""
    if not records:
        return None
    plt = _plt()
    acc = aggregate(records, "exact")
    tasks = list(dict.fromkeys(r["task"] for r in records))
    modes = [m for m in ATTENTION_MODES if any(r["mode"] == m for r in records)]
    lengths = sorted({r["length"] for r in records})
    panels = [(t, m) for t in tasks for m in modes]
    ncols = min(len(panels), max(len(modes), 4 // len(modes) * len(modes)))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, layout="constrained",
                             figsize=(ncols * (0.7 * len(lengths) + 1.6) + 1.0, nrows * 2.6))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (t, m) in zip(axes.flat, panels):
        depths = sorted({r["depth"] for r in records if r["task"] == t}, key=lambda d: -1 if d is None else d)
        grid = [[acc.get((m, t, n, d), float("nan")) for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for y, row in enumerate(grid):
            for x, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), ["all" if d is None else f"{d:g}" for d in depths])
        ax.set_title(f"{t} ({m})", fontsize=9)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="exact match")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_perplexity(ppl: Dict[str, Dict], path: str, trained_len: Optional[int] = None) -> Optional[str]:
    if not ppl:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode, p in ppl.items():
        xs = [b["start"] + p["bucket"] / 2 for b in p["buckets"]]
        ax.plot(xs, [b["ppl"] for b in p["buckets"]], marker="o", label=mode)
    ax.set_xlim(0, p_len := max(p["length"] for p in ppl.values()))
    if trained_len and trained_len <= p_len:
        ax.axvline(trained_len, color="grey", linestyle="--", linewidth=1)
        ax.text(trained_len, ax.get_ylim()[1], " max_position_embeddings", va="top", fontsize=7, color="grey")
    values = [b["ppl"] for p in ppl.values() for b in p["buckets"]]
    # Past the trained length perplexity can grow by orders of magnitude: a log axis keeps both ends readable.
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("perplexity")
    p0 = next(iter(ppl.values()))
    ax.set_title(f"Perplexity by position ({p0['docs']} doc(s), bucket {p0['bucket']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def read_metrics(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash mid-write
                    continue
    return rows


def plot_loss(metrics_path: str, path: str) -> Optional[str]:
    """Training loss per step from a trainer's metrics.jsonl (rows with step and loss), and the in-loop eval
    accuracy (rows with eval/<mode>/acc) on a second axis when the trainer logged some."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "step" in r and "loss" in r]
    if not train:
        return None
    plt = _plt()
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, loss, linewidth=1, alpha=0.5 if len(train) > 50 else 1.0, label="loss")
    if len(train) > 50:
        k = max(2, len(train) // 50)
        smooth = [_mean(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, linewidth=1.5, label=f"loss, mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    acc_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.count("/") == 2
                       and k.endswith("/acc")})
    if acc_keys:
        ax2 = ax.twinx()
        for key, color in zip(acc_keys, ("tab:green", "tab:red", "tab:purple")):
            pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, linewidth=1,
                     label=key.replace("eval/", "").replace("/acc", " eval acc"))
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_ylabel("eval accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if len(handles) > 1:
        ax.legend(handles, labels, fontsize=8)
    ax.set_title("Training loss" + (" and in-loop eval" if acc_keys else ""), fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
