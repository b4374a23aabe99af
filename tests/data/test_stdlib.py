"""The embedded default corpus (the standard library's sources), the conf/data files, and one run on the real
SmolLM2 tokenizer."""
import dataclasses
import glob
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from data import DataError, build_train_loader, heldout_documents
from data.config import DataConfig, as_data_config
from data.prepare import prepare_all
from data.shards import TokenStore
from data.sources import stdlib_dir, stdlib_documents_index

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "data")


def test_stdlib_index_packages_without_tests():
    index = stdlib_documents_index()
    names = [name for name, _ in index]
    assert names == sorted(names) and {"asyncio", "email", "json", "collections"} <= set(names)
    assert "test" not in names and "site-packages" not in names and "encodings" not in names
    files = [f for _, fs in index for f in fs]
    assert not [f for f in files if f"{os.sep}test{os.sep}" in f or f"{os.sep}tests{os.sep}" in f]
    asyncio = dict(index)["asyncio"]
    assert len(asyncio) > 20 and all(f.startswith(os.path.join(stdlib_dir(), "asyncio")) for f in asyncio)
    with pytest.raises(DataError, match="not packages or modules"):
        stdlib_documents_index(["no_such_package"])


def test_stdlib_corpus_has_long_real_documents(tmp_path, tok, make_cfg):
    cfg = make_cfg(sources=[{"kind": "stdlib", "include": ["asyncio", "json", "email", "textwrap"]}])
    [(_, directory)] = prepare_all(cfg, tok)
    store = TokenStore(directory)
    assert store.num_documents == 4
    texts = [tok.decode(store.document(i)[:-1].tolist()) for i in range(4)]
    assert texts[0].startswith("# file: asyncio/__init__.py") and "class BaseEventLoop" in texts[0]
    # One byte per token here: a package is hundreds of thousands of tokens long.
    assert store.doc_len.max() > 300_000
    assert "def dedent" in texts[3]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONF, "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_conf_data_files_fit_the_schema(path):
    cfg = as_data_config(OmegaConf.load(path))
    assert isinstance(cfg, DataConfig) and cfg.effective_sources


def test_conf_unknown_key_fails():
    with pytest.raises(Exception, match="bucket_edgez"):
        as_data_config(OmegaConf.create({"bucket_edgez": [0, 1]}))
    with pytest.raises(Exception, match="txt_field"):
        as_data_config(OmegaConf.create({"sources": [{"path": "x", "txt_field": "t"}]}))


@pytest.fixture(scope="module")
def real_tokenizer():
    from infllm.config import ModelConfig
    from infllm.model import load_tokenizer

    return load_tokenizer(ModelConfig())


def test_real_tokenizer_stdlib(tmp_path, real_tokenizer):
    tok = real_tokenizer
    cfg = DataConfig(sources=[{"kind": "stdlib", "include": ["json", "textwrap", "email", "asyncio"]}],
                     cache_dir=str(tmp_path), progress=False, holdout_fraction=0.0,
                     bucket_edges=[0, 1024, 4096], bucket_ratios=[1, 1])
    loader = build_train_loader(cfg, tok, seq_len=4096, micro_batch_size=2)
    batch = next(loader)
    assert batch.input_ids.shape == (2, 4096) and int(batch.input_ids.max()) < len(tok)
    cu = batch.cu_seqlens.tolist()
    text = tok.decode(batch.input_ids.reshape(-1)[cu[0]:cu[1]].tolist())
    assert "def " in text or "import " in text or '"""' in text
    # Documents end with <|endoftext|>, the separator SmolLM2 was pretrained with.
    assert tok.eos_token == "<|endoftext|>"
    store = TokenStore(os.path.join(tmp_path, sorted(p for p in os.listdir(tmp_path) if p.startswith("stdlib-"))[0]))
    assert (store.doc_len > 32_768).any()  # asyncio: ~115k tokens
    assert np.all([store.document(i)[-1] == tok.eos_token_id for i in range(store.num_documents)])
    loader2 = build_train_loader(cfg, tok, seq_len=4096, micro_batch_size=2)
    assert (next(loader2).input_ids == batch.input_ids).all()
    held = heldout_documents(dataclasses.replace(cfg, holdout_fraction=0.5), tok, min_tokens=100, n=2)
    assert held and all(len(d) >= 100 for d in held)
