"""infllm: short-to-long continued training with InfLLM-V2 trainable sparse attention."""
import os


def cache_root() -> str:
    """Where converted models and token caches live: $INFLLM_CACHE, else ~/.cache/infllm."""
    return os.path.expanduser(os.environ.get("INFLLM_CACHE", "~/.cache/infllm"))
