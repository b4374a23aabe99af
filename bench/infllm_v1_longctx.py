"""Passkey / needle accuracy of the embedded SmolLM2 (or any model) at long lengths, plain attention beside
InfLLM (v1) context memory, no training. Uses the eval suite's samples and scorers (infllm.eval: build_samples,
score_teacher_forced, score_generate; the same seeded samples as run_suite) and writes one JSON per attention,
<out>/<attention>.json, rewritten after every sample.

    python bench/infllm_v1_longctx.py --attention dense infllm_v1_small --lengths 16384 32768 \
        --tasks passkey niah_single --depths 0.1 0.5 0.9 --samples 1 --out runs/v1_longctx

--attention names: dense (the model's own SDPA attention, untouched) or a file of conf/attention/ with
name: infllm_v1. Results: launch/LOG.md, "InfLLM (v1) baseline on SmolLM2".
"""
from __future__ import annotations

import os
import sys

# Run as a script, Python puts bench/ first on the path, where bench/select.py would shadow the standard
# library's select module; the repository root goes there instead.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH]
sys.path.insert(0, os.path.dirname(_BENCH))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from infllm.attention_v1 import apply_infllm_v1  # noqa: E402
from infllm.config import AttentionConfig, ModelConfig  # noqa: E402
from infllm.eval.config import EvalConfig  # noqa: E402
from infllm.eval.scoring import score_generate, score_teacher_forced  # noqa: E402
from infllm.eval.suite import build_samples  # noqa: E402
from infllm.model import load_model  # noqa: E402

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "attention")


def attention_config(name: str) -> AttentionConfig:
    schema = OmegaConf.structured(AttentionConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(os.path.join(CONF_DIR, f"{name}.yaml"))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", nargs="+", default=["dense", "infllm_v1_small"])
    p.add_argument("--lengths", nargs="+", type=int, default=[16384, 32768])
    p.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    p.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--scoring", default="both", choices=["teacher_forced", "generate", "both"],
                   help="teacher_forced: one forward, argmax at the answer; generate: greedy decoding (InfLLM "
                        "retrieves per decoded token there); both")
    p.add_argument("--set", nargs="*", default=[], help="overrides of the v1 settings, e.g. n_local=4096")
    p.add_argument("--model-path", default=None, help="a Hugging Face model directory (default: embedded SmolLM2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="runs/v1_longctx")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    eval_cfg = EvalConfig(tasks=args.tasks, lengths=args.lengths, depths=args.depths, samples=args.samples,
                          modes=["model"], perplexity=False, plots=False, scoring=args.scoring)
    rows = []
    for name in args.attention:
        model, tok = load_model(ModelConfig(path=args.model_path))
        if name != "dense":
            cfg = attention_config(name)
            for item in args.set:
                key, value = item.split("=", 1)
                setattr(cfg.v1, key, type(getattr(cfg.v1, key))(value))
            cfg.v1.__post_init__()
            apply_infllm_v1(model, cfg)
            label = name + "".join(f",{s}" for s in args.set)
        else:
            label = "dense"
        model.to(args.device).eval()
        os.makedirs(args.out, exist_ok=True)
        t0 = time.time()
        records = []
        # The suite's own samples and scorers, one sample at a time, a result line as soon as it is scored
        # (a 32k sample takes many minutes on CPU).
        for s in build_samples(tok, eval_cfg):
            t_s = time.time()
            rec = dict(attention=label, task=s.task, length=s.length, depth=s.depth, answer=s.values)
            with torch.no_grad():
                if args.scoring in ("teacher_forced", "both"):
                    rec["teacher_forced"] = score_teacher_forced(model, s)["exact"]
                if args.scoring in ("generate", "both"):
                    scores, text = score_generate(model, tok, s)
                    rec.update(generate=scores["exact"], gen_text=text)
            rec["seconds"] = time.time() - t_s
            records.append(rec)
            rows.append(rec)
            print(f"{label:28s} {s.task:12s} len={s.length:6d} depth={s.depth} "
                  f"teacher_forced={rec.get('teacher_forced')} generate={rec.get('generate')} "
                  f"{rec.get('gen_text', '')!r} {rec['seconds']:.0f}s", flush=True)
            with open(os.path.join(args.out, f"{label}.json"), "w") as f:
                json.dump(records, f, indent=1)
        print(f"{label}: {time.time() - t0:.0f}s", flush=True)
        del model
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}")
    print("| attention | task | length | depth | teacher-forced exact | generate exact | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [r["attention"], r["task"], r["length"], r["depth"], r.get("teacher_forced"), r.get("generate")]
        print("| " + " | ".join("-" if x is None else str(x) for x in cells) + f" | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
