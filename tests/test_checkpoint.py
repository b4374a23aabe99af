"""Checkpoint integrity: a checksum per file written at save and verified at load; a damaged checkpoint is
refused naming the file, resume=auto falls back to the newest intact one, old manifests still load."""
import json
import logging
import os

import pytest
import torch

from infllm import checkpoint as ckpt
from infllm.errors import CheckpointError
from tests.helpers import flip_byte


def _save(run, step, payloads, keep_last=5):
    def writer(data):
        def write(path):
            with open(path, "wb") as f:
                f.write(data)
        return write

    return ckpt.save_checkpoint(str(run), step, {name: writer(data) for name, data in payloads.items()}, keep_last)


def _payloads(seed, sizes=(1000, 70_001, 5)):
    g = torch.Generator().manual_seed(seed)
    return {f"f{i}.bin": bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
            for i, n in enumerate(sizes)}


def test_manifest_holds_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    data = _payloads(0)
    path = _save(tmp_path, 7, data)
    manifest = json.load(open(os.path.join(path, ckpt.MANIFEST)))
    assert manifest["format"] == 2 and manifest["step"] == 7
    assert manifest["files"] == {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in data.items()}
    assert ckpt.verify_checkpoint(path) == manifest
    # A file larger than one read chunk hashes the same streamed.
    big = tmp_path / "big.bin"
    payload = os.urandom(3 * (4 << 20) + 17)
    big.write_bytes(payload)
    assert ckpt.file_sha256(str(big)) == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("damage", ["flip", "same_size_overwrite", "nan_weights", "truncate"])
def test_damaged_file_refused_naming_it(tmp_path, damage):
    weights = {"w": torch.randn(33, 17)}
    path = ckpt.save_checkpoint(str(tmp_path), 3, {"model.pt": ckpt.torch_save(weights),
                                                    "trainer_state_rank0.json": lambda p: ckpt.write_json(p, {})}, 2)
    target = os.path.join(path, "model.pt")
    size = os.path.getsize(target)
    if damage == "flip":
        flip_byte(target, size // 2)
    elif damage == "same_size_overwrite":
        with open(target, "wb") as f:
            f.write(os.urandom(size))
    elif damage == "nan_weights":
        torch.save({"w": torch.full((33, 17), float("nan"))}, target)
        assert os.path.getsize(target) == size  # a size check alone would pass it
    else:
        os.truncate(target, size - 1)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.pt"):
        ckpt.resolve_resume(path, str(tmp_path))


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    paths = [_save(tmp_path, step, _payloads(step)) for step in (2, 4, 6)]
    assert ckpt.resolve_resume("auto", str(tmp_path)) == paths[-1]
    flip_byte(os.path.join(paths[2], "f1.bin"), 123)
    flip_byte(os.path.join(paths[1], "f0.bin"), 0)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", str(tmp_path)) == paths[0]
    assert "step_00000006 is damaged" in caplog.text and "f1.bin" in caplog.text
    assert f"newest intact checkpoint {paths[0]}" in caplog.text
    # Every one damaged: an error listing them, never a silent start from scratch.
    flip_byte(os.path.join(paths[0], "f2.bin"), 4)
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged.*f1\.bin.*f0\.bin.*f2\.bin"):
        ckpt.resolve_resume("auto", str(tmp_path))


def test_resume_auto_with_nothing_to_resume_warns_naming_the_directory(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", str(tmp_path / "run")) is None
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert os.path.join(str(tmp_path / "run"), "checkpoints") in record.getMessage()
    assert "run_name=" in record.getMessage()
    assert ckpt.resolve_resume("none", str(tmp_path)) is None


def test_format_1_manifest_still_loads_with_a_warning(tmp_path, caplog):
    data = _payloads(1)
    path = _save(tmp_path, 5, data)
    # What an older version wrote: sizes only.
    ckpt.write_json(os.path.join(path, ckpt.MANIFEST), {"format": 1, "step": 5,
                                                         "files": {n: len(d) for n, d in data.items()}})
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", str(tmp_path)) == path
    assert "no checksums; only file sizes are checked" in caplog.text
    os.truncate(os.path.join(path, "f0.bin"), 10)
    with pytest.raises(CheckpointError, match=r"f0\.bin has 10 bytes, the manifest says 1000"):
        ckpt.verify_checkpoint(path)


def test_missing_or_garbled_manifest_and_state_files_are_named(tmp_path):
    path = _save(tmp_path, 1, _payloads(2))
    manifest = os.path.join(path, ckpt.MANIFEST)
    with open(manifest, "w") as f:
        f.write('{"format": 2, "files": {')
    with pytest.raises(CheckpointError, match=f"{manifest} is unreadable or garbled"):
        ckpt.verify_checkpoint(path)
    os.remove(manifest)
    with pytest.raises(CheckpointError, match=f"{manifest} is missing"):
        ckpt.resolve_resume(path, str(tmp_path))
    state = tmp_path / "trainer_state_rank0.json"
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state_rank0.json is unreadable or garbled"):
        ckpt.read_json(str(state), "checkpoint x")
    rng = tmp_path / "rng_rank0.pt"
    rng.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match=r"rng_rank0\.pt is unreadable or garbled"):
        ckpt.torch_load(str(rng))


def test_ranks_share_the_checksums_and_agree(tmp_path):
    """Under world_size ranks each file is checksummed by one rank; a damaged file found by any rank makes every
    rank pass over that checkpoint (the `agree` callback combines their verdicts)."""
    data = _payloads(3, sizes=(11, 22, 33, 44, 55))
    old = _save(tmp_path, 1, _payloads(4, sizes=(9, 8)))
    path = _save(tmp_path, 2, data)
    flip_byte(os.path.join(path, "f3.bin"), 1)
    found = []
    for rank in range(2):
        try:
            ckpt.verify_checkpoint(path, rank=rank, world_size=2)
            found.append(None)
        except CheckpointError as e:
            found.append(str(e))
    # Sorted names f0..f4: rank 1 checks f1 and f3.
    assert found[0] is None and "f3.bin" in found[1]
    # A simulated all-reduce: the other rank's verdicts, newest checkpoint first.
    other = {0: iter([False, True]), 1: iter([True, True])}
    chosen = [ckpt.resolve_resume("auto", str(tmp_path), rank=r, world_size=2,
                                  agree=lambda ok, r=r: ok and next(other[r])) for r in range(2)]
    assert chosen == [old, old]


def test_nothing_to_resume_is_quieter_when_a_preset_asked(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="infllm.checkpoint"):
        assert ckpt.resolve_resume("auto", str(tmp_path), asked=False) is None
    [record] = caplog.records
    assert record.levelno == logging.INFO and "no complete checkpoint" in record.getMessage()


def test_ranks_share_the_checksumming_at_save(tmp_path):
    """world_size ranks (threads here, one barrier): each checksums a share, the manifest has every file once."""
    import hashlib
    import threading

    world = 3
    data = {r: _payloads(10 + r, sizes=(100 + r, 7 + r)) for r in range(world)}
    barrier = threading.Barrier(world)
    hashed = []
    real = ckpt._digests

    def counting(directory, names):
        hashed.extend(names)
        return real(directory, names)

    def rank_files(r):
        return {f"r{r}_{n}": (lambda path, d=d: open(path, "wb").write(d)) for n, d in data[r].items()}

    ckpt._digests = counting
    try:
        threads = [threading.Thread(target=ckpt.save_checkpoint, args=(str(tmp_path), 4, rank_files(r), 2),
                                    kwargs=dict(is_main=r == 0, barrier=barrier.wait, rank=r, world_size=world))
                   for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ckpt._digests = real
    manifest = ckpt.verify_checkpoint(os.path.join(str(tmp_path), "checkpoints", "step_00000004"))
    expected = {f"r{r}_{n}": hashlib.sha256(d).hexdigest() for r in range(world) for n, d in data[r].items()}
    assert {n: m["sha256"] for n, m in manifest["files"].items()} == expected
    assert sorted(hashed) == sorted(expected)  # every file checksummed once, no partial file left behind
