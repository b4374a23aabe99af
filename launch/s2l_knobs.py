"""What moves sparse-mode quality on a trained checkpoint (issue 16, item 4): the InfLLM-V2 arm of
launch/s2l_prose.sh evaluated in sparse mode with one selection setting changed at a time, with the selection probe
(is the needle's block selected at the answer query, at what rank). Markdown on stdout; knobs.json and knobs.md in
<root>/knobs/.

    python launch/s2l_knobs.py runs/s2l_prose                       # the arm's newest checkpoint, every knob
    python launch/s2l_knobs.py runs/s2l_prose --knobs base,topk48   # some of them
    python launch/s2l_knobs.py runs/s2l_prose --arm dense           # the dense arm's weights in sparse mode
    python launch/s2l_knobs.py runs/s2l_prose --table               # the table of what is there, nothing run

Each knob is one `eval.py` run on the trainer checkpoint <root>/<arm>/checkpoints/step_N (its weights loaded into
the preset's model, so the attention overrides apply; the final/ export would bring its own sparse_config).
A knob that finished (a .done marker beside its eval_results.json) is not run again, so a cut run resumes. The eval is a cheaper cut of the
preset's: the teacher-forced needles (one forward a sample, with the probe) and RULER's single needle, at 16k and
32k, sparse mode only. Extra Hydra overrides for every run: EVAL_ARGS (space separated; the knob's own come last).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One change each from the trained setting (attention=infllm_v2_smollm2: block 64, kernel 32 / stride 16, 1 init
# block, window 512, topk 24 -> k_eff 32 blocks = 2048 keys, lse_approx on).
KNOBS: Dict[str, List[str]] = {
    "base": [],
    "topk12": ["attention.topk=12"],
    "topk48": ["attention.topk=48"],
    "topk96": ["attention.topk=96"],
    "no_lse_approx": ["attention.lse_approx=false"],
    "kernel16_s8": ["attention.kernel_size=16", "attention.kernel_stride=8"],
    "kernel64_s32": ["attention.kernel_size=64", "attention.kernel_stride=32"],
    "init4": ["attention.init_blocks=4"],
    "window1024": ["attention.window_size=1024"],
    "window0": ["attention.window_size=0"],
}
EVAL = ["eval.modes=[sparse]", "eval.tasks=[niah_single,niah_multikey,ruler_niah_single_2]",
        "eval.lengths=[16384,32768]", "eval.samples=2", "eval.perplexity=false", "eval.selection_probe=true"]
PRESET = {"sparse": ["experiment=s2l_prose_sparse"],
          "dense": ["experiment=s2l_prose_dense", "attention=infllm_v2_smollm2"]}


def newest_checkpoint(root: str, arm: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(root, arm, "checkpoints", "step_*[0-9]")))
    found = [p for p in found if os.path.isfile(os.path.join(p, "model.safetensors"))]
    return found[-1] if found else None


def eval_command(python: str, arm: str, ckpt: str, knob: str, out: str, extra: List[str]) -> List[str]:
    if knob not in KNOBS:
        raise SystemExit(f"--knobs: unknown knob {knob!r}; known: {', '.join(KNOBS)}")
    return [python, "eval.py", *PRESET[arm], f"eval.checkpoint={ckpt}", f"eval.out_dir={out}",
            f"hydra.run.dir={out}/hydra", *EVAL, *extra, *KNOBS[knob]]


def _len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def summarize(result: dict) -> Dict[str, Optional[float]]:
    """Mean accuracy per length over the tasks, and the probe's needle-block recall / rank (teacher-forced tasks)."""
    m = result["metrics"]
    out: Dict[str, Optional[float]] = {}
    by_len: Dict[int, List[float]] = {}
    for key, value in m.items():
        hit = re.fullmatch(r"sparse/([^/]+)/len(\d+)/acc", key)
        if hit:
            by_len.setdefault(int(hit.group(2)), []).append(float(value))
    for length, vals in sorted(by_len.items()):
        out[f"acc_{_len(length)}"] = sum(vals) / len(vals)
    for metric in ("needle_block_recall", "needle_block_rank"):
        vals = [float(v) for k, v in m.items() if re.fullmatch(rf"sparse/[^/]+/{metric}", k)]
        out[metric] = sum(vals) / len(vals) if vals else None
    return out


def _fmt(x: Optional[float], pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}" if pct else f"{x:.1f}"


def table(knob_dir: str, knobs: List[str]) -> List[str]:
    rows, lines = {}, []
    for knob in knobs:
        path = os.path.join(knob_dir, knob, "eval_results.json")
        if os.path.isfile(os.path.join(knob_dir, knob, ".done")) and os.path.isfile(path):
            with open(path) as f:
                rows[knob] = summarize(json.load(f))
    if not rows:
        return [f"no knob results under {knob_dir}"]
    lengths = sorted({k for r in rows.values() for k in r if k.startswith("acc_")},
                     key=lambda k: int(k[4:-1]) * 1024 if k.endswith("k") else int(k[4:]))
    lines += ["Sparse mode, one knob changed from the trained setting. Accuracy (%) over the tasks per length; "
              "needle-block recall (%) = the needle's blocks selected at the first answer query, over layers and "
              "KV heads; rank = the needle block's mean rank among the non-forced blocks (1 = first).", ""]
    lines += ["| knob | overrides | " + " | ".join(k[4:] for k in lengths) + " | needle recall | needle rank |",
              "|---|---|" + "---:|" * (len(lengths) + 2)]
    for knob, r in rows.items():
        lines.append(f"| {knob} | {' '.join(KNOBS[knob]) or 'as trained'} | "
                     + " | ".join(_fmt(r.get(k)) for k in lengths)
                     + f" | {_fmt(r['needle_block_recall'])} | {_fmt(r['needle_block_rank'], pct=False)} |")
    with open(os.path.join(knob_dir, "knobs.json"), "w") as f:
        json.dump({"knobs": {k: {"overrides": KNOBS[k], **v} for k, v in rows.items()}, "eval": EVAL}, f, indent=1)
    with open(os.path.join(knob_dir, "knobs.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="launch/s2l_prose.sh's ROOT (runs/s2l_prose)")
    p.add_argument("--arm", choices=sorted(PRESET), default="sparse")
    p.add_argument("--knobs", default=",".join(KNOBS), help="comma separated, from: " + ", ".join(KNOBS))
    p.add_argument("--checkpoint", default=None, help="a trainer checkpoint dir (default: the arm's newest)")
    p.add_argument("--table", action="store_true", help="only the table of the results present")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv)
    knobs = [k for k in args.knobs.split(",") if k]
    for knob in knobs:
        if knob not in KNOBS:
            p.error(f"--knobs: unknown knob {knob!r}; known: {', '.join(KNOBS)}")
    ckpt = args.checkpoint or newest_checkpoint(args.root, args.arm)
    if ckpt is None and not args.table:
        p.error(f"no trainer checkpoint with model.safetensors under {os.path.join(args.root, args.arm, 'checkpoints')}"
                " (train the arm first: launch/s2l_prose.sh)")
    step = re.search(r"step_(\d+)", ckpt or "")
    knob_dir = os.path.join(args.root, "knobs", f"{args.arm}_step{int(step.group(1)) if step else 0}")
    if args.table:
        found = sorted(glob.glob(os.path.join(args.root, "knobs", f"{args.arm}_step*")))
        knob_dir = knob_dir if ckpt else (found[-1] if found else knob_dir)
    else:
        extra = shlex.split(os.environ.get("EVAL_ARGS", ""))
        failed: List[str] = []
        os.makedirs(knob_dir, exist_ok=True)
        for knob in knobs:
            out = os.path.abspath(os.path.join(knob_dir, knob))
            # eval.py rewrites eval_results.json after every sample: only the marker says a run finished.
            if os.path.isfile(os.path.join(out, ".done")):
                print(f"[s2l_knobs] {knob}: done already", flush=True)
                continue
            os.makedirs(out, exist_ok=True)
            cmd = eval_command(args.python, args.arm, os.path.abspath(ckpt), knob, out, extra)
            t0 = time.time()
            print(f"[s2l_knobs] {knob}: {shlex.join(cmd[1:])}", flush=True)
            with open(os.path.join(out, "eval.log"), "w") as log:
                rc = subprocess.call(cmd, cwd=ROOT_DIR, stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                # One knob that cannot run (a setting the kernels refuse) does not cost the others their turn.
                print(f"[s2l_knobs] {knob}: eval.py failed (rc {rc}); see {out}/eval.log", flush=True)
                failed.append(knob)
                continue
            open(os.path.join(out, ".done"), "w").close()
            print(f"[s2l_knobs] {knob}: {time.time() - t0:.0f} s", flush=True)
    lines = table(knob_dir, knobs)
    print("\n".join(lines))
    if not args.table and failed:
        print(f"[s2l_knobs] failed: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
