"""Resumable checkpoints, written atomically, read without unpickling arbitrary objects.

Layout of a run directory:
    <run>/checkpoints/step_00000010/   model.safetensors, optimizer.pt, trainer_state.json, manifest.json
    <run>/final/                       Hugging Face export (save_pretrained + tokenizer)
A checkpoint is written into `step_N.tmp` and renamed when complete; `manifest.json` (name, size and SHA-256 of
every file) is written last inside it, so `resume=auto` can tell a complete checkpoint from a partial one, and a
checkpoint whose files do not match their manifest entry (truncated, overwritten, bit-flipped) is refused,
naming the file. `resume=auto` then falls back to the newest intact checkpoint, with a warning. Checksums are
streamed (4 MiB chunks, files hashed in parallel threads: hashlib releases the GIL), about 1-2 s per GB.
Manifests of format 1 (sizes only) still load, with a warning that only sizes could be checked.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import torch

from infllm.errors import CheckpointError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
# 2: per file {"size", "sha256"}; 1: per file its size only.
FORMAT_VERSION = 2
_HASH_CHUNK = 4 << 20


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write (tmp file + fsync + rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in chunks (memory stays flat whatever the size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _digests(directory: str, names: List[str]) -> Dict[str, str]:
    """SHA-256 of each file, in parallel threads (the hashing runs outside the GIL)."""
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: file_sha256(os.path.join(directory, n)), names)))


def read_json(path: str, what: str) -> Any:
    """A JSON file of a checkpoint; a missing or garbled one is a CheckpointError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is unreadable or garbled ({e}); the checkpoint is corrupt") from None


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def list_checkpoints(run_dir: str) -> List[str]:
    """Complete checkpoints (with a manifest), oldest first. Partial `.tmp-*` directories are ignored."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, MANIFEST)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _files_under(directory: str) -> List[str]:
    """Every file, sub-directories included (DeepSpeed writes its own into zero/), by relative path, sorted;
    the ranks' partial checksum files left out."""
    return sorted(rel for rel in (os.path.relpath(os.path.join(d, n), directory)
                                  for d, _, ns in os.walk(directory) for n in ns)
                  if not os.path.basename(rel).startswith(_PART_PREFIX))


_PART_PREFIX = ".sha256_rank"


def save_checkpoint(run_dir: str, step: int, files: Dict[str, Any], keep_last: int, is_main: bool = True,
                    barrier: Optional[Callable[[], None]] = None, rank: int = 0, world_size: int = 1) -> str:
    """Write a checkpoint atomically. `files` maps a file name to a callable(path) that writes it.

    Every rank writes its own files into one temporary directory; after a barrier each rank checksums a share of
    all the files (every file once over the ranks), then the main rank writes the manifest (name, size and
    SHA-256 of every file), renames the directory into place and prunes old ones."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = f"{final}.tmp"
    sync = barrier or (lambda: None)
    if is_main:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    sync()
    for name, writer in files.items():
        writer(os.path.join(tmp, name))
    sync()
    if world_size > 1:
        write_json(os.path.join(tmp, f"{_PART_PREFIX}{rank}.json"),
                   _digests(tmp, _files_under(tmp)[rank::world_size]))
        sync()
    if is_main:
        names = _files_under(tmp)
        digests: Dict[str, str] = {}
        for part in (n for n in os.listdir(tmp) if n.startswith(_PART_PREFIX)):
            with open(os.path.join(tmp, part)) as f:
                digests.update(json.load(f))
            os.remove(os.path.join(tmp, part))
        # A file a rank did not list (a slow shared file system) is checksummed here.
        digests.update(_digests(tmp, [n for n in names if n not in digests]))
        files_meta = {n: {"size": os.path.getsize(os.path.join(tmp, n)), "sha256": digests[n]} for n in names}
        write_json(os.path.join(tmp, MANIFEST), {"format": FORMAT_VERSION, "step": step, "files": files_meta})
        _fsync_dir(tmp)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    sync()
    return final


def verify_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> Dict[str, Any]:
    """Check a checkpoint against its manifest (every file present, its size and its checksum); return the
    manifest or raise CheckpointError naming the file. With world_size > 1 this rank checksums only its share
    of the files (file i when i % world_size == rank): every file is read once over all ranks, which then have
    to agree (see `resolve_resume`'s `agree`)."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is missing; the checkpoint is partial "
                              "(interrupted while saving) or not a checkpoint directory")
    manifest = read_json(manifest_path, f"checkpoint {path}")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {path}: {manifest_path} lists no files; the checkpoint is corrupt")
    old_format = manifest.get("format", 1) < 2
    if old_format:
        log.warning("checkpoint %s: its manifest (format %s) has no checksums; only file sizes are checked",
                    path, manifest.get("format", 1))
    expected: Dict[str, str] = {}
    for i, (name, meta) in enumerate(sorted(files.items())):
        size = meta if old_format else meta["size"]
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: file {name} listed in the manifest is missing; corrupt")
        if os.path.getsize(fpath) != size:
            raise CheckpointError(f"checkpoint {path}: file {name} has {os.path.getsize(fpath)} bytes, the "
                                  f"manifest says {size}; the checkpoint is corrupt (truncated or overwritten)")
        if not old_format and i % world_size == rank:
            expected[name] = meta["sha256"]
    for name, digest in _digests(path, list(expected)).items():
        if digest != expected[name]:
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its checksum in the manifest "
                                  "(overwritten or damaged after it was saved); the checkpoint is corrupt")
    return manifest


def resolve_resume(resume: Optional[str], run_dir: str, rank: int = 0, world_size: int = 1,
                   agree: Optional[Callable[[bool], bool]] = None, asked: bool = True) -> Optional[str]:
    """checkpoint.resume: none | auto | a path. Returns the verified checkpoint directory to load, or None.

    auto: the newest checkpoint that verifies; a damaged one is passed over with a warning naming it and the
    reason, and when every checkpoint is damaged that is an error (never a silent start from scratch). Finding
    no checkpoint at all is a loud warning naming the directory searched (the run starts from step 0), or an
    info line when the user did not ask (`asked=False`: a preset's resume=auto, whose first start is normal).
    A path: that checkpoint, verified; damaged is an error. `agree(ok) -> all ranks ok`: the ranks' verdicts
    combined (each checks its share of the files), so that every rank resumes from the same checkpoint."""
    if resume in ("none", "", None):
        return None
    combine = agree or (lambda ok: ok)

    def check(path: str) -> Optional[CheckpointError]:
        error = None
        try:
            verify_checkpoint(path, rank, world_size)
        except CheckpointError as e:
            error = e
        if not combine(error is None):
            return error or CheckpointError(f"checkpoint {path}: another rank found a damaged file")
        return None

    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            log.log(logging.WARNING if asked else logging.INFO,
                    "checkpoint.resume=auto: no complete checkpoint in %s; starting from scratch (step 0). "
                    "To resume an earlier run, give its run_name=... (runs are named by start time) or "
                    "checkpoint.resume=<path of a checkpoint>", checkpoint_root(run_dir))
            return None
        failures = []
        for path in reversed(found):
            error = check(path)
            if error is None:
                if failures:
                    log.warning("checkpoint.resume=auto: %s is damaged (%s); resuming from the newest intact "
                                "checkpoint %s instead", failures[0][0], failures[0][1], path)
                return path
            failures.append((path, error))
        raise CheckpointError("checkpoint.resume=auto: every checkpoint in " + checkpoint_root(run_dir) +
                              " is damaged: " + "; ".join(str(e) for _, e in failures))
    if not os.path.isdir(resume):
        raise CheckpointError(f"checkpoint.resume: {resume!r} is not a directory; expected none, auto or the path "
                              "of a checkpoint (…/checkpoints/step_N)")
    error = check(resume)
    if error is not None:
        raise error
    return resume


def torch_save(obj: Any):
    return lambda path: torch.save(obj, path)


def torch_load(path: str) -> Any:
    # weights_only: tensors, numbers, strings and containers only, never arbitrary pickled objects.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 -- garbled bytes raise whatever the unpickler trips on (IndexError too)
        raise CheckpointError(f"{path} is unreadable or garbled ({type(e).__name__}: {str(e)[:200]}); the "
                              "checkpoint is corrupt") from None


def rng_state() -> Dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((state["python_version"], tuple(int(x) for x in py[:-1]), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

def save_hf(model: torch.nn.Module, tokenizer, out_dir: str,
            state_dict: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Export in Hugging Face format, atomically: plain transformers loads it (sparse_config documents the
    attention it was trained with). `state_dict`: the weights when the module does not hold them (ZeRO-3)."""
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
