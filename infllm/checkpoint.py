"""Resumable checkpoints, written atomically, read without unpickling arbitrary objects.

Layout of a run directory:
    <run>/checkpoints/step_00000010/   model.safetensors, optimizer.pt, trainer_state.json, manifest.json
    <run>/final/                       Hugging Face export (save_pretrained + tokenizer)
A checkpoint is written into `step_N.tmp-<pid>` and renamed when complete; `manifest.json` (names and sizes of
every file) is written last inside it, so `resume=auto` can tell a complete checkpoint from a partial one, and a
checkpoint whose files do not match its manifest is refused as corrupt.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


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


def save_checkpoint(run_dir: str, step: int, files: Dict[str, Any], keep_last: int, is_main: bool = True,
                    barrier: Optional[Callable[[], None]] = None) -> str:
    """Write a checkpoint atomically. `files` maps a file name to a callable(path) that writes it.

    Every rank writes its own files into one temporary directory; after a barrier the main rank writes the
    manifest (names and sizes of all files) and renames the directory into place, then prunes old ones."""
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
    if is_main:
        # Every file, sub-directories included (DeepSpeed writes its own into zero/), by relative path.
        sizes = {os.path.relpath(os.path.join(d, n), tmp): os.path.getsize(os.path.join(d, n))
                 for d, _, names in os.walk(tmp) for n in names}
        sizes = dict(sorted(sizes.items()))
        write_json(os.path.join(tmp, MANIFEST), {"format": FORMAT_VERSION, "step": step, "files": sizes})
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


def verify_checkpoint(path: str) -> Dict[str, Any]:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError naming the problem."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST}; it is partial (interrupted while saving) or "
                              "not a checkpoint directory")
    try:
        manifest = json.load(open(manifest_path))
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({e}); the checkpoint is corrupt") from None
    for name, size in files.items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path}: file {name} listed in the manifest is missing; corrupt")
        if os.path.getsize(fpath) != size:
            raise CheckpointError(f"checkpoint {path}: file {name} has {os.path.getsize(fpath)} bytes, the "
                                  f"manifest says {size}; the checkpoint is corrupt (truncated or overwritten)")
    return manifest


def resolve_resume(resume: str, run_dir: str) -> Optional[str]:
    """checkpoint.resume: none | auto | a path. Returns the checkpoint directory to load, or None."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            log.info("resume=auto: no complete checkpoint in %s, starting from scratch", checkpoint_root(run_dir))
        return path
    if not os.path.isdir(resume):
        raise CheckpointError(f"checkpoint.resume: {resume!r} is not a directory; expected none, auto or the path "
                              "of a checkpoint (…/checkpoints/step_N)")
    return resume


def torch_save(obj: Any):
    return lambda path: torch.save(obj, path)


def torch_load(path: str) -> Any:
    # weights_only: tensors, numbers, strings and containers only, never arbitrary pickled objects.
    return torch.load(path, map_location="cpu", weights_only=True)


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
