"""Long-context evaluation: passkey and RULER-style needle tasks, perplexity by position, reports and plots.

    from infllm.eval import run_suite
    metrics = run_suite(model, tokenizer, cfg.eval, out_dir)   # flat dict: eval/<mode>/<task>/acc, ...
"""
from infllm.eval.config import EvalConfig

__all__ = ["EvalConfig", "run_suite"]


def __getattr__(name):
    # infllm.config imports the schema above; the suite (torch, transformers) loads only when used.
    if name == "run_suite":
        from infllm.eval.suite import run_suite

        return run_suite
    raise AttributeError(name)
