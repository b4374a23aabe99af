"""Every bad input gets a clear error naming the file / field / setting, or a counted skip."""
import json
import logging
import os

import pytest

from data import DataError, build_train_loader
from data.config import DataConfig
from data.prepare import MANIFEST, prepare_all
from infllm.config import ConfigError
from tests.data.conftest import ByteTokenizer, write_jsonl


def _manifest(directory):
    return json.load(open(os.path.join(directory, MANIFEST)))


def _write_bytes(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = json.dumps({"text": "a good document"}).encode()


def test_empty_file_skipped_and_counted(tmp_path, tok, make_cfg, caplog):
    write_jsonl(tmp_path / "d" / "a.jsonl", ["one", "two"])
    (tmp_path / "d" / "b.jsonl").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(tmp_path / "d")}]), tok)
    assert _manifest(directory)["bad_documents"] == {"empty file": 1}
    assert "skipped 1 bad documents" in caplog.text and "b.jsonl" in caplog.text
    with pytest.raises(DataError, match=r"b\.jsonl: empty file"):
        prepare_all(make_cfg(sources=[{"path": str(tmp_path / "d")}], on_bad_document="error",
                             cache_dir=str(tmp_path / "c2")), tok)


def test_cache_key_honours_on_bad_document_and_reuse_repeats_the_skips(tmp_path, tok, make_cfg, caplog):
    """A cache prepared in skip mode is not reused under on_bad_document=error (which must stop at the bad
    document), and every reuse of a cache that skipped documents says so again."""
    _write_bytes(tmp_path / "d.jsonl", [GOOD, b"\xff\xfe not utf-8", GOOD, b"{broken json", GOOD])
    src = [{"path": str(tmp_path / "d.jsonl")}]
    [(_, skipped)] = prepare_all(make_cfg(sources=src), tok)
    assert _manifest(skipped)["bad_documents"] == {"non-UTF-8 bytes": 1, "invalid JSON": 1}
    with pytest.raises(DataError, match=r"d\.jsonl:2: non-UTF-8 bytes"):
        prepare_all(make_cfg(sources=src, on_bad_document="error"), tok)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [(_, again)] = prepare_all(make_cfg(sources=src), tok)
    assert again == skipped
    assert "reusing the prepared cache" in caplog.text and "skipped 2 bad documents" in caplog.text
    assert "d.jsonl:4: invalid JSON" in caplog.text
    # Once per process: the eval's later reads of the same cache stay quiet.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_all(make_cfg(sources=src), tok)
    assert "reusing" not in caplog.text
    # A clean corpus: error mode prepares its own entry and its reuse is quiet.
    write_jsonl(tmp_path / "clean.jsonl", ["one", "two", "three"])
    clean = make_cfg(sources=[{"path": str(tmp_path / "clean.jsonl")}], on_bad_document="error")
    [(_, first)] = prepare_all(clean, tok)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        [(_, second)] = prepare_all(clean, tok)
    assert first == second and first != skipped and "reusing" not in caplog.text


def test_only_empty_file_is_an_empty_corpus(tmp_path, tok, make_cfg):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty corpus.*empty file"):
        prepare_all(make_cfg(sources=[{"path": str(tmp_path / "e.jsonl")}]), tok)
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")]


def test_missing_text_field(tmp_path, tok, make_cfg):
    write_jsonl(tmp_path / "d.jsonl", ["x", "y"], field="content")
    with pytest.raises(DataError, match=r"no row has the text field 'text'; keys seen: \['content'\]"):
        prepare_all(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}]), tok)
    # Some rows without it: skipped and counted.
    _write_bytes(tmp_path / "m.jsonl", [GOOD, json.dumps({"other": 1}).encode(), GOOD])
    [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(tmp_path / "m.jsonl")}]), tok)
    assert _manifest(directory)["bad_documents"] == {"missing text field 'text'": 1}
    # A columnar file names its columns.
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"no text field 'text'; the columns are \['body'\]"):
        prepare_all(make_cfg(sources=[{"path": str(tmp_path / "p.parquet")}]), tok)


def test_non_utf8_bytes(tmp_path, tok, make_cfg):
    path = _write_bytes(tmp_path / "d.jsonl", [GOOD, b'{"text": "bad \xff\xfe bytes"}', GOOD, b"{not json", GOOD])
    [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(path)}]), tok)
    m = _manifest(directory)
    assert m["num_documents"] == 3
    assert m["bad_documents"] == {"non-UTF-8 bytes": 1, "invalid JSON": 1}
    with pytest.raises(DataError, match=r"d\.jsonl:2: non-UTF-8 bytes"):
        prepare_all(make_cfg(sources=[{"path": str(path)}], on_bad_document="error",
                             cache_dir=str(tmp_path / "c2")), tok)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "ok.txt").write_text("fine text")
    (tmp_path / "t" / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9")
    [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(tmp_path / "t")}]), tok)
    assert _manifest(directory)["bad_documents"] == {"non-UTF-8 bytes": 1}


def test_zero_token_document(tmp_path, tok, make_cfg):
    write_jsonl(tmp_path / "d.jsonl", ["text", "", "more"])
    [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}]), tok)
    assert _manifest(directory)["bad_documents"] == {"zero tokens": 1}
    with pytest.raises(DataError, match=r"d\.jsonl:2: zero tokens"):
        prepare_all(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}], on_bad_document="error",
                             cache_dir=str(tmp_path / "c2")), tok)


def test_bad_documents_do_not_stop_a_long_preparation(tmp_path, tok, make_cfg):
    lines = []
    for i in range(2000):
        lines.append(GOOD if i % 7 else b'{"text": "\xc3\x28"}')
    path = _write_bytes(tmp_path / "d.jsonl", lines)
    [(_, directory)] = prepare_all(make_cfg(sources=[{"path": str(path)}], tokenize_batch=8), tok)
    m = _manifest(directory)
    assert m["num_documents"] == 2000 - 286 and m["bad_documents"] == {"non-UTF-8 bytes": 286}


def test_manifest_tokenizer_mismatch(tmp_path, tok, make_cfg):
    import data.prepare as prepare_mod

    write_jsonl(tmp_path / "d.jsonl", ["some text"] * 4)
    out = tmp_path / "prepared"
    prepare_mod.prepare_source(prepare_mod.resolve_source(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}])
                                                          .sources[0]), tok, make_cfg(), out_dir=str(out))
    cfg = make_cfg(sources=[{"kind": "prepared", "path": str(out)}])
    with pytest.raises(DataError, match=r"tokenized with 'bytes', not with the run's tokenizer 'other'"):
        build_train_loader(cfg, ByteTokenizer(name="other", shift=4), seq_len=16, micro_batch_size=1)
    with pytest.raises(DataError, match="not a prepared data directory"):
        build_train_loader(make_cfg(sources=[{"kind": "prepared", "path": str(tmp_path)}]), tok, 16, 1)


def test_missing_and_unreadable_paths(tmp_path, tok, make_cfg, monkeypatch):
    with pytest.raises(DataError, match=r"data\.sources\[0\]\.path: '.*nope' does not exist"):
        build_train_loader(make_cfg(sources=[{"path": str(tmp_path / "nope")}]), tok, 16, 1)
    (tmp_path / "locked").mkdir()
    write_jsonl(tmp_path / "locked" / "a.jsonl", ["x"])
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if "locked" in str(p) else real_access(p, mode))
    with pytest.raises(DataError, match=r"cannot read directory .*locked.*permission denied"):
        build_train_loader(make_cfg(sources=[{"path": str(tmp_path / "locked")}]), tok, 16, 1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="no data files under"):
        build_train_loader(make_cfg(sources=[{"path": str(tmp_path / "other")}]), tok, 16, 1)


def test_empty_corpus_after_filters(tmp_path, tok, make_cfg):
    write_jsonl(tmp_path / "d.jsonl", ["tiny", "small"])
    with pytest.raises(DataError, match="empty corpus.*min_chars=100"):
        build_train_loader(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl"), "min_chars": 100}]), tok, 16, 1)
    with pytest.raises(DataError, match="empty corpus: no training documents"):
        build_train_loader(make_cfg(sources=[{"path": str(tmp_path / "d.jsonl"), "min_tokens": 100}]), tok, 16, 1)


def test_hub_offline_fails_at_once(tmp_path, tok, make_cfg):
    import time

    t0 = time.time()
    with pytest.raises(DataError, match=r"hub dataset 'some/dataset'.*offline \(HF_HUB_OFFLINE is set\)"):
        build_train_loader(make_cfg(sources=[{"kind": "hub", "path": "some/dataset"}]), tok, 16, 1)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("kw,field", [
    (dict(sources=[{"kind": "nope", "path": "x"}]), "data.sources[0].kind"),
    (dict(sources=[{"kind": "jsonl"}]), "data.sources[0].path"),
    (dict(sources=[{"path": "x", "weight": 0}]), "data.sources[0].weight"),
    (dict(holdout_fraction=1.0), "data.holdout_fraction"),
    (dict(long_docs="keep"), "data.long_docs"),
    (dict(on_bad_document="ignore"), "data.on_bad_document"),
    (dict(pack_buffer=0), "data.pack_buffer"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**kw)


def test_loader_arguments(tmp_path, tok, make_cfg):
    write_jsonl(tmp_path / "d.jsonl", ["x" * 40])
    cfg = make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}], holdout_fraction=0.0)
    with pytest.raises(DataError, match="micro_batch_size: expected a positive integer"):
        build_train_loader(cfg, tok, 16, 0)
    with pytest.raises(DataError, match="rank"):
        build_train_loader(cfg, tok, 16, 1, rank=2, world_size=2)
