"""The data pipeline: sources -> token shards (prepared once) -> length-bucket mix -> packed rows.

    from data import build_train_loader, heldout_documents
    loader = build_train_loader(cfg.data, tokenizer, seq_len=L, micro_batch_size=B, rank=r, world_size=W, seed=s)
    batch = next(loader)            # PackedBatch on CPU; infinite
    loader.state_dict() / loader.load_state_dict(sd)   # exact resume (plain ints and lists)
    loader.mix_stats()              # realised bucket / source mix, for metrics

Names are imported on first use, so `python -m data.prepare` runs its module once (as __main__).
"""
import importlib

_EXPORTS = {
    "IGNORE_INDEX": "data.batch", "PackedBatch": "data.batch",
    "DataConfig": "data.config", "DataError": "data.config", "SourceConfig": "data.config",
    "PackedLoader": "data.loader", "build_train_loader": "data.loader", "heldout_documents": "data.loader",
    "pack_documents": "data.packing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__():
    return __all__
