"""The data pipeline: sources -> token shards (prepared once) -> length-bucket mix -> packed rows.

    from data import build_train_loader, heldout_documents
    loader = build_train_loader(cfg.data, tokenizer, seq_len=L, micro_batch_size=B, rank=r, world_size=W, seed=s)
    batch = next(loader)            # PackedBatch on CPU; infinite
    loader.state_dict() / loader.load_state_dict(sd)   # exact resume (plain ints and lists)
    loader.mix_stats()              # realised bucket / source mix, for metrics
"""
from data.batch import IGNORE_INDEX, PackedBatch
from data.config import DataConfig, DataError, SourceConfig
from data.loader import PackedLoader, build_train_loader, heldout_documents
from data.packing import pack_documents

__all__ = ["IGNORE_INDEX", "PackedBatch", "DataConfig", "DataError", "SourceConfig", "PackedLoader",
           "build_train_loader", "heldout_documents", "pack_documents"]
