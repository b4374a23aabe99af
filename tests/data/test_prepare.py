"""prepare -> load round trips, the token cache, every source format, the CLI, held-out documents."""
import json
import os

import numpy as np

import data.prepare as prepare_mod
from data import build_train_loader, heldout_documents
from data.prepare import MANIFEST, main, prepare_all
from data.shards import TokenStore
from tests.data.conftest import ByteTokenizer, write_jsonl

TEXTS = ["hello world", "the second document, a little longer than the first one",
         "ünïcödé ✓ text", "x" * 300, "short"]


def _decode_docs(store, tok):
    return [tok.decode(store.document(i)[:-1].tolist()) for i in range(store.num_documents)]


def test_round_trip_jsonl(tmp_path, tok, make_cfg):
    write_jsonl(tmp_path / "d.jsonl", TEXTS)
    cfg = make_cfg(sources=[{"path": str(tmp_path / "d.jsonl")}])
    [(_, directory)] = prepare_all(cfg, tok)
    store = TokenStore(directory)
    assert _decode_docs(store, tok) == TEXTS
    assert all(store.document(i)[-1] == tok.eos_token_id for i in range(store.num_documents))
    m = json.load(open(os.path.join(directory, MANIFEST)))
    assert m["tokenizer"]["name"] == "bytes" and m["tokenizer"]["vocab_size"] == len(tok)
    assert m["tokenizer"]["fingerprint"] and m["tokenizer"]["eos_id"] == 2
    assert m["num_documents"] == 5 and m["num_tokens"] == sum(len(t.encode()) + 1 for t in TEXTS)
    assert sum(m["length_histogram"]["counts"]) == 5
    assert store.tokens[0].dtype == np.uint32 and isinstance(store.tokens[0], np.memmap)


def test_cache_is_reused_and_keyed(tmp_path, tok, make_cfg, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    cfg = make_cfg(sources=[{"path": str(path)}])
    [(_, first)] = prepare_all(cfg, tok)

    def boom(texts):
        raise AssertionError("re-tokenized a prepared source")

    monkeypatch.setattr(prepare_mod, "_tokenize_batch", boom)
    [(_, again)] = prepare_all(cfg, tok)
    assert again == first
    build_train_loader(cfg, tok, seq_len=32, micro_batch_size=1)
    monkeypatch.undo()
    # Another tokenizer, or changed data, is another cache entry.
    [(_, other_tok)] = prepare_all(cfg, ByteTokenizer(shift=4))
    write_jsonl(path, TEXTS + ["one more"])
    [(_, other_data)] = prepare_all(cfg, tok)
    assert len({first, other_tok, other_data}) == 3
    # No half-written entry is left (the empty *.lock files of filelock stay by design: flock locks, released
    # by the OS when a holder dies, so a leftover file is never a stale lock).
    assert not [p for p in os.listdir(tmp_path / "cache") if ".tmp-" in p]


def test_parallel_preparation_identical(tmp_path, tok, make_cfg):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcdefgh \n"), size=int(n))) for n in rng.integers(1, 2000, size=300)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    stores = []
    for n in (1, 2):
        cfg = make_cfg(sources=[{"path": str(path)}], num_proc=n, tokenize_batch=16, shard_tokens=50_000,
                       cache_dir=str(tmp_path / f"cache{n}"))
        [(_, directory)] = prepare_all(cfg, tok)
        stores.append(TokenStore(directory))
    a, b = stores
    assert len(a.tokens) > 1  # several shards
    assert np.array_equal(a.doc_len, b.doc_len) and np.array_equal(a.doc_hash, b.doc_hash)
    assert all(np.array_equal(a.document(i), b.document(i)) for i in range(a.num_documents))
    assert _decode_docs(a, tok) == texts


def test_formats_through_datasets(tmp_path, tok, make_cfg):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": TEXTS[:3], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    ds = datasets.Dataset.from_dict({"body": TEXTS[3:]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "one.txt").write_text("first file\n\nsecond paragraph")
    (tmp_path / "txt" / "two.md").write_text("# second file")
    (tmp_path / "lines.json").write_text(json.dumps({"body": "a json line"}) + "\n")
    arrow = next(p for p in os.listdir(tmp_path / "saved") if p.endswith(".arrow"))
    cases = [
        ({"path": str(tmp_path / "a.parquet"), "text_field": "body"}, TEXTS[:3]),
        ({"path": str(tmp_path / "saved"), "text_field": "body"}, TEXTS[3:]),
        ({"path": str(tmp_path / "saved_dict"), "text_field": "body", "split": "validation"}, TEXTS[3:]),
        ({"path": str(tmp_path / "saved" / arrow), "text_field": "body"}, TEXTS[3:]),
        ({"path": str(tmp_path / "txt")}, ["first file\n\nsecond paragraph", "# second file"]),
        ({"path": str(tmp_path / "txt" / "one.txt"), "text_unit": "paragraph"}, ["first file", "second paragraph"]),
        ({"path": str(tmp_path / "lines.json"), "text_field": "body"}, ["a json line"]),
        ({"path": str(tmp_path / "*.parquet"), "text_field": "body"}, TEXTS[:3]),
    ]
    for src, expected in cases:
        [(_, directory)] = prepare_all(make_cfg(sources=[src]), tok)
        assert _decode_docs(TokenStore(directory), tok) == expected, src


def test_cli_out_and_prepared_kind(tmp_path, tok, make_cfg, monkeypatch, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    asked = []

    def load_tokenizer(path):
        asked.append(path)
        return tok

    out = tmp_path / "prepared"
    rc = main(["--source", str(path), "--out", str(out), "--num-proc", "1", "--tokenizer", "my-tok",
               "progress=false"], load_tokenizer=load_tokenizer)
    assert asked == ["my-tok"]
    assert rc == 0 and (out / MANIFEST).is_file()
    assert "5 documents" in capsys.readouterr().out
    cfg = make_cfg(sources=[{"kind": "prepared", "path": str(out)}], holdout_fraction=0.0, bucket_edges=[0, 64],
                   bucket_ratios=[1])
    batch = next(build_train_loader(cfg, tok, seq_len=64, micro_batch_size=2))
    assert batch.input_ids.shape == (2, 64)
    # A bad config is one clear line, exit code 2.
    assert main(["--source", str(tmp_path / "missing.jsonl"), "--num-proc", "1"], load_tokenizer=load_tokenizer) == 2
    assert "does not exist" in capsys.readouterr().err
    # Without a tokenizer loader from the caller, the data layer's CLI asks for a directory, naming the option.
    assert main(["--source", str(path), "--num-proc", "1"]) == 2
    assert "--tokenizer: name a local tokenizer directory" in capsys.readouterr().err


def test_data_layer_does_not_import_the_model():
    """data/ sits below infllm/ (only infllm.errors and the package root): importing the whole data pipeline
    must not pull in the model code."""
    import subprocess
    import sys

    code = ("import sys, data.prepare, data.loader, data.sources, data.shards; "
            "print(sorted(m for m in sys.modules if m.startswith('infllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    loaded = eval(out.stdout.strip())
    assert not [m for m in loaded if m not in ("infllm", "infllm.errors")], loaded


def test_heldout_documents(tmp_path, itok, make_cfg):
    from tests.data.conftest import int_docs

    lengths = list(range(20, 220))
    write_jsonl(tmp_path / "c.jsonl", int_docs(lengths))
    cfg = make_cfg(sources=[{"path": str(tmp_path / "c.jsonl")}], holdout_fraction=0.2, bucket_edges=[0, 256],
                   bucket_ratios=[1])
    held = heldout_documents(cfg, itok, min_tokens=100, n=10)
    assert len(held) == 10 and all(len(d) >= 100 for d in held)
    assert all(d == list(range(d[0], d[0] + len(d))) for d in held)  # whole documents, no separator
    held_ids = {t for d in heldout_documents(cfg, itok, min_tokens=0, n=None) for t in d}
    assert 0.1 < len(held_ids) / sum(lengths) < 0.3
    loader = build_train_loader(cfg, itok, seq_len=256, micro_batch_size=4)
    trained = set()
    for _ in range(40):
        trained.update(next(loader).input_ids.reshape(-1).tolist())
    assert not (trained & held_ids)
