"""Shared helpers for the framework-level tests: compose the Hydra config the way train.py does."""
from __future__ import annotations

import os
from typing import List

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from infllm.config import Config, to_object

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose_config(overrides: List[str] = (), output_dir: str = "/tmp/infllm-test") -> Config:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = compose(config_name="config", overrides=list(overrides) + [f"output_dir={output_dir}"])
    return to_object(dcfg)


def experiment_names() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "experiment")) if f.endswith(".yaml"))


def flip_byte(path: str, offset: int, mask: int = 0xFF) -> None:
    """Corrupt a file in place without changing its size: XOR the byte at `offset` with `mask`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))
