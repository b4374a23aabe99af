"""Packing pieces of documents into full rows, and rows into a PackedBatch.

A *piece* is a whole document, or a seq_len-long part of a longer one, described by plain ints
`(stream, index, offset, length)`: `offset` > 0 only for the tail left over when a piece was split to fill a
row. `RowPacker` keeps up to `buffer_size` pieces in arrival order and fills each row first-fit: the oldest
piece that fits the space left goes in next. When none fits, it splits the shortest buffered piece (the head
fills the row exactly, the tail stays buffered and starts a later row), or with fill="pad" closes the row with a
padding document. A new row can always take the oldest piece (pieces are at most seq_len), so no piece waits
more than one row and the realised mix follows the order pieces arrive in.

`assemble_batch` turns rows of segments into the tensors: every segment is its own document, so positions
restart and the first token's label is IGNORE_INDEX (HF causal LMs shift labels left by one, so this is the
label that would otherwise ask the last token of the previous document to predict the next document).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.batch import IGNORE_INDEX, PackedBatch

Piece = Tuple[int, int, int, int]  # (stream, index, offset, length); stream -1 = padding
PAD_STREAM = -1


class RowPacker:
    def __init__(self, seq_len: int, buffer_size: int, fill: str, next_piece: Callable[[], Piece]):
        self.seq_len = seq_len
        self.buffer_size = buffer_size
        self.fill = fill
        self.next_piece = next_piece
        self.buffer: List[Piece] = []
        # Pieces cut to fill a row (fill="split").
        self.splits = 0

    def next_row(self) -> List[Piece]:
        remaining = self.seq_len
        row: List[Piece] = []
        buf = self.buffer
        while remaining:
            while len(buf) < self.buffer_size:
                buf.append(self.next_piece())
            for i, piece in enumerate(buf):
                if piece[3] <= remaining:
                    row.append(buf.pop(i))
                    remaining -= piece[3]
                    break
            else:
                if self.fill == "pad":
                    row.append((PAD_STREAM, 0, 0, remaining))
                    break
                j = min(range(len(buf)), key=lambda i: buf[i][3])
                stream, index, offset, length = buf[j]
                row.append((stream, index, offset, remaining))
                buf[j] = (stream, index, offset + remaining, length - remaining)
                self.splits += 1
                remaining = 0
        return row


def assemble_batch(rows: Sequence[Sequence[Tuple[Optional[np.ndarray], int, int]]], seq_len: int,
                   pad_id: int) -> PackedBatch:
    """rows: per row, segments (tokens, start, length) covering exactly seq_len tokens; tokens=None is padding.
    Returns CPU tensors: input_ids / labels / position_ids [B, L] int64, cu_seqlens int32 over B * L."""
    n_rows = len(rows)
    ids = np.empty((n_rows, seq_len), np.int64)
    flat = ids.reshape(-1)
    lengths: List[int] = []
    pads: List[Tuple[int, int]] = []
    pos = 0
    for r, row in enumerate(rows):
        for tokens, start, n in row:
            if tokens is None:
                flat[pos:pos + n] = pad_id
                pads.append((pos, n))
            else:
                flat[pos:pos + n] = tokens[start:start + n]
            lengths.append(n)
            pos += n
        if pos != (r + 1) * seq_len:
            raise AssertionError(f"row {r} holds {pos - r * seq_len} tokens, expected {seq_len}")
    lens = np.asarray(lengths, np.int64)
    cu = np.zeros(lens.size + 1, np.int64)
    np.cumsum(lens, out=cu[1:])
    positions = np.arange(flat.size, dtype=np.int64) - np.repeat(cu[:-1], lens)
    labels = ids.copy()
    labels_flat = labels.reshape(-1)
    labels_flat[cu[:-1]] = IGNORE_INDEX
    for p, n in pads:
        labels_flat[p:p + n] = IGNORE_INDEX
    return PackedBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(positions.reshape(n_rows, seq_len)),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_seqlen=int(lens.max()),
    )


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, micro_batch_size: int = 1,
                   buffer_size: int = 64, fill: str = "pad", pad_id: int = 0) -> List[PackedBatch]:
    """Pack a finite list of token lists, in order, once (documents longer than seq_len are split at seq_len):
    a convenience for evaluation and tests. The last batch is completed with padding rows."""
    pieces = [(0, d, off, min(seq_len, len(doc) - off)) for d, doc in enumerate(docs)
              for off in range(0, len(doc), seq_len)]
    arrays = [np.asarray(doc, np.int64) for doc in docs]
    it = iter(pieces)
    total = sum(p[3] for p in pieces)

    def next_piece() -> Piece:
        return next(it, (PAD_STREAM, 0, 0, seq_len))

    packer = RowPacker(seq_len, buffer_size, fill, next_piece)
    rows, emitted = [], 0
    while emitted < total:
        row = packer.next_row()
        emitted += sum(p[3] for p in row if p[0] != PAD_STREAM)
        rows.append([(None, 0, n) if s == PAD_STREAM else (arrays[d], off, n) for s, d, off, n in row])
    while len(rows) % micro_batch_size:
        rows.append([(None, 0, seq_len)])
    return [assemble_batch(rows[i:i + micro_batch_size], seq_len, pad_id)
            for i in range(0, len(rows), micro_batch_size)]
