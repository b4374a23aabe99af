"""Every conf/eval/*.yaml composes into the typed schema; bad values fail naming the field."""
import os

import pytest

from infllm.errors import ConfigError
from infllm.eval.config import EvalConfig
from tests.helpers import CONF_DIR, compose_config

EVAL_PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "eval")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", EVAL_PRESETS)
def test_eval_preset_composes(name):
    cfg = compose_config([f"eval={name}"])
    assert isinstance(cfg.eval, EvalConfig) and cfg.eval.tasks and cfg.eval.lengths


def test_override_from_command_line():
    # New keys of the task_params dict need "+" on the command line (Hydra struct mode).
    cfg = compose_config(["eval=quick", "eval.modes=[dense,sparse]", "+eval.task_params.niah_multikey.num_keys=8"])
    assert cfg.eval.modes == ["dense", "sparse"] and cfg.eval.task_params["niah_multikey"]["num_keys"] == 8


@pytest.mark.parametrize("kwargs,field", [
    ({"tasks": ["passkey", "needle"]}, "eval.tasks"),
    ({"lengths": [16]}, "eval.lengths"),
    ({"depths": [1.5]}, "eval.depths"),
    ({"modes": ["fast"]}, "eval.modes"),
    ({"scoring": "sampled"}, "eval.scoring"),
    ({"haystack": "noise"}, "eval.haystack"),
    ({"task_params": {"needle": {}}}, "eval.task_params"),
    ({"samples": 0}, "eval.samples"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        EvalConfig(**kwargs)


def test_bad_value_fails_at_compose_time():
    with pytest.raises(ConfigError, match=r"eval\.samples"):
        compose_config(["eval.samples=0"])
