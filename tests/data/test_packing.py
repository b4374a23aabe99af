"""Packing invariants: every token once, documents kept apart, positions restart, labels masked at boundaries,
cu_seqlens consistent with the positions."""
import numpy as np
import pytest
import torch

from data import IGNORE_INDEX, build_train_loader, pack_documents
from data.packing import PAD_STREAM, RowPacker
from tests.data.conftest import int_docs, write_jsonl


def segments(batch, seq_len):
    """Check the batch's invariants and return its documents as lists of (token, label) rows."""
    ids, labels, pos, cu = batch.input_ids, batch.labels, batch.position_ids, batch.cu_seqlens
    n_rows = ids.shape[0]
    assert ids.shape == labels.shape == pos.shape == (n_rows, seq_len)
    assert ids.dtype == labels.dtype == pos.dtype == torch.int64 and cu.dtype == torch.int32
    cu = cu.long().tolist()
    assert cu[0] == 0 and cu[-1] == n_rows * seq_len
    assert all(a < b for a, b in zip(cu, cu[1:]))
    # No document crosses a row boundary.
    assert set(range(0, n_rows * seq_len + 1, seq_len)) <= set(cu)
    lens = np.diff(cu)
    assert isinstance(batch.max_seqlen, int) and batch.max_seqlen == lens.max()
    flat_ids, flat_lab, flat_pos = ids.reshape(-1), labels.reshape(-1), pos.reshape(-1)
    # Positions restart at every document: zero exactly at the document starts, +1 within a document.
    assert torch.equal(torch.nonzero(flat_pos == 0).reshape(-1), torch.tensor(cu[:-1]))
    out = []
    for a, b in zip(cu, cu[1:]):
        assert torch.equal(flat_pos[a:b], torch.arange(b - a))
        assert flat_lab[a] == IGNORE_INDEX
        seg_ids, seg_lab = flat_ids[a:b], flat_lab[a:b]
        if not (seg_lab == IGNORE_INDEX).all():
            assert torch.equal(seg_lab[1:], seg_ids[1:])
        out.append((seg_ids.tolist(), bool((seg_lab == IGNORE_INDEX).all() and b - a > 1)))
    # HF shifts labels left: the target of token t is labels[t + 1]; it must never be in the next document.
    starts = torch.zeros(flat_ids.numel(), dtype=torch.bool)
    starts[cu[:-1]] = True
    assert (flat_lab[starts] == IGNORE_INDEX).all()
    return out


@pytest.mark.parametrize("seq_len,buffer,fill", [(64, 8, "pad"), (100, 64, "pad"), (37, 1, "split"),
                                                 (128, 16, "split")])
def test_pack_documents_every_token_once(seq_len, buffer, fill):
    rng = np.random.default_rng(seq_len)
    lengths = rng.integers(1, 3 * seq_len, size=60)
    docs, nxt = [], 1
    for n in lengths:
        docs.append(list(range(nxt, nxt + n)))
        nxt += n
    batches = pack_documents(docs, seq_len, micro_batch_size=3, buffer_size=buffer, fill=fill, pad_id=0)
    seen = []
    for b in batches:
        for toks, _ in segments(b, seq_len):
            toks = [t for t in toks if t != 0]
            # A segment is one contiguous slice of one document.
            assert toks == list(range(toks[0], toks[0] + len(toks))) if toks else True
            seen.extend(toks)
    assert sorted(seen) == list(range(1, nxt))
    # Documents longer than seq_len were split at seq_len at most (pieces never exceed a row).
    assert max(b.max_seqlen for b in batches) <= seq_len


def test_row_packer_rows_exactly_full():
    rng = np.random.default_rng(0)
    lengths = iter(rng.integers(1, 200, size=10_000).tolist())
    taken = []

    def next_piece():
        n = next(lengths)
        taken.append(n)
        return (0, len(taken) - 1, 0, n)

    packer = RowPacker(200, 16, "split", next_piece)
    emitted = {}
    for _ in range(300):
        row = packer.next_row()
        assert sum(p[3] for p in row) == 200 and all(p[0] != PAD_STREAM for p in row)
        for _, idx, off, n in row:
            assert emitted.get(idx, 0) == off  # tails continue exactly where their head stopped
            emitted[idx] = off + n
    in_buffer = {idx: off for _, idx, off, _ in packer.buffer}
    for idx, n in enumerate(taken):
        assert emitted.get(idx, 0) == in_buffer.get(idx, n)


def _loader(tmp_path, itok, make_cfg, lengths, seq_len=64, batch=2, **kw):
    write_jsonl(tmp_path / "corpus" / "a.jsonl", int_docs(lengths))
    kw.setdefault("holdout_fraction", 0.0)
    cfg = make_cfg(sources=[{"path": str(tmp_path / "corpus")}], **kw)
    return build_train_loader(cfg, itok, seq_len=seq_len, micro_batch_size=batch)


def test_loader_first_epoch_every_token_once(tmp_path, itok, make_cfg):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 150, size=80)
    total_ids = int(lengths.sum())
    # One bucket, strict arrival order: the first epoch's tokens are exactly the corpus, each once.
    loader = _loader(tmp_path, itok, make_cfg, lengths, seq_len=64, pack_buffer=1, bucket_edges=[0, 64],
                     bucket_ratios=[1.0])
    epoch_tokens = total_ids + len(lengths)  # + one separator per document
    stream = []
    while len(stream) < epoch_tokens:
        for toks, _ in segments(next(loader), 64):
            stream.extend(toks)
    first = [t for t in stream[:epoch_tokens] if t != 0]
    assert sorted(first) == list(range(1, total_ids + 1))


def test_loader_invariants_with_buckets(tmp_path, itok, make_cfg):
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 400, size=120)
    loader = _loader(tmp_path, itok, make_cfg, lengths, seq_len=128, bucket_edges=[0, 16, 64, 128],
                     bucket_ratios=[1, 1, 1])
    for _ in range(30):
        for toks, _ in segments(next(loader), 128):
            body = [t for t in toks if t != 0]
            assert body == list(range(body[0], body[0] + len(body))) if body else True
            # The separator only ever ends a document, never sits inside one.
            assert 0 not in toks[:-1]


def test_long_docs_drop_and_split(tmp_path, itok, make_cfg):
    lengths = [10, 20, 300, 15, 500]
    split = _loader(tmp_path / "s", itok, make_cfg, lengths, seq_len=64, bucket_edges=[0, 64], bucket_ratios=[1])
    seen = set()
    for _ in range(20):
        for toks, _ in segments(next(split), 64):
            seen.update(toks)
    assert max(seen) == sum(lengths)  # the long documents are there, in pieces
    drop = _loader(tmp_path / "d", itok, make_cfg, lengths, seq_len=64, long_docs="drop", bucket_edges=[0, 64],
                   bucket_ratios=[1])
    seen = set()
    for _ in range(20):
        for toks, _ in segments(next(drop), 64):
            seen.update(toks)
    kept = set(range(1, 31)) | set(range(331, 346))
    assert seen - {0} == kept


def test_row_fill_pad(tmp_path, itok, make_cfg):
    loader = _loader(tmp_path, itok, make_cfg, [50] * 20, seq_len=64, row_fill="pad", bucket_edges=[0, 64],
                     bucket_ratios=[1])
    batch = next(loader)
    segs = segments(batch, 64)
    pads = [toks for toks, all_ignored in segs if all_ignored]
    assert pads and all(set(p) == {0} for p in pads)
    assert loader.mix_stats()["mix/padding"] > 0
