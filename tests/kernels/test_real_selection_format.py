"""The compact form of recorded selections (bench/real_selection.py): bits per (head, token, block) round-trip
to the kernels' block_idx layout, and the overlap statistics count what they say."""
import torch

from bench.real_selection import from_bits, overlap_stats, to_bits
from tests.kernels.test_attention_triton import random_selection


def test_bits_round_trip_uneven_rows():
    gen = torch.Generator().manual_seed(3)
    idx = random_selection(2, [300], 16, 7, gen).cpu()          # [2, 300, 7], -1 padded, ascending
    n_blocks = 24                                               # a multiple of 8, above ceil(300 / 16) = 19
    bits = to_bits(idx, n_blocks)
    assert bits.shape == (2, 300, 3) and bits.dtype.name == "uint8"
    assert torch.equal(from_bits(bits, 7), idx)


def test_overlap_of_shifting_windows():
    """Token t selects blocks t..t+3 (of its own made-up range): neighbours share 3 of 4, 4 tokens span 7."""
    t = torch.arange(4096 + 64)
    idx = (t[:, None] + torch.arange(4)[None, :]).to(torch.int32)[None]   # [1, T, 4]
    stats = overlap_stats(idx)
    assert abs(stats["neighbour_overlap"] - 0.75) < 1e-6
    assert stats["mean_selected"] == 4
    assert abs(stats["union4"] - 7) < 1e-6 and abs(stats["union16"] - 19) < 1e-6
