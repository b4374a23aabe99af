"""Every preset and group option composes against the typed schema and takes effect; typos and bad values fail
at compose time, naming the key."""
import dataclasses
import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from infllm.config import Config, ConfigError
from tests.helpers import CONF_DIR, compose_config, experiment_names

GROUPS = sorted(d for d in os.listdir(CONF_DIR) if os.path.isdir(os.path.join(CONF_DIR, d)) and d != "experiment")


def _group_options():
    return [(g, f[:-5]) for g in GROUPS for f in sorted(os.listdir(os.path.join(CONF_DIR, g))) if f.endswith(".yaml")]


def _leaves(node, prefix=""):
    """(dotted key, value) of every plain value a YAML file sets (not its defaults list, not interpolations).
    `???` is left out: merged onto a schema default it changes nothing (OmegaConf keeps the default)."""
    for key, value in node.items():
        if key == "defaults":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, name + ".")
        elif not (isinstance(value, str) and ("${" in value or value == "???")):
            yield name, value


def _preset(group, option):
    """(group options chosen, own values) of a config file: its defaults list (another option of the same
    group, e.g. `- long_32k`, or `override /group: option`, the last choice of a group winning), then its own
    values (Hydra puts _self_ last unless the file says otherwise)."""
    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(CONF_DIR, group, f"{option}.yaml")), resolve=False)
    chosen, own = {}, {}
    for entry in raw.get("defaults", []):
        if isinstance(entry, str):
            parent_chosen, parent_own = _preset(group, entry)
            chosen.update(parent_chosen)
            own.update(parent_own)
        else:
            [(key, other)] = entry.items()
            chosen[key.replace("override ", "").strip("/")] = other
    own.update(_leaves(raw, "" if group == "experiment" else group + "."))
    return chosen, own


def _file_values(group, option):
    """What composing `group=option` sets, key by key."""
    chosen, own = _preset(group, option)
    values = {}
    for g, o in chosen.items():
        values.update(_file_values(g, o))
    values.update(own)
    return values


def _get(cfg, dotted):
    obj = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _plain(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _assert_applied(cfg, values, where):
    assert values, f"{where} sets nothing"
    for key, want in values.items():
        got = _plain(_get(cfg, key))
        if isinstance(want, list) and want and isinstance(want[0], dict):  # e.g. data.sources: the keys given
            got = [{k: g[k] for k in w} for g, w in zip(got, want)] if len(got) == len(want) else got
        assert got == want, f"{where}: {key} is {got!r}, the file sets {want!r}"


def test_base_config_composes_into_the_schema():
    cfg = compose_config()
    assert isinstance(cfg, Config) and dataclasses.is_dataclass(cfg.trainer)
    assert cfg.model.path is None  # the embedded SmolLM2
    assert cfg.attention.name == "infllm_v2" and cfg.parallel.engine == "single"
    assert cfg.output_dir == "/tmp/infllm-test"


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_preset_takes_effect(name):
    cfg = compose_config([f"experiment={name}"])
    _assert_applied(cfg, _file_values("experiment", name), f"experiment={name}")
    assert cfg.attention.window_size % cfg.attention.block_size == 0


@pytest.mark.parametrize("group,option", _group_options(), ids=lambda x: x)
def test_every_group_option_takes_effect(group, option):
    if (group, option) == ("model", "hf"):
        # model=hf is a template: without model.path it must fail (not fall back to the embedded model).
        with pytest.raises(ConfigError, match=r"^model\.path: model=hf needs model\.path="):
            compose_config(["~experiment", "model=hf"])
        return
    # Without the default experiment, which would override some group values (e.g. trainer.seq_len).
    cfg = compose_config(["~experiment", f"{group}={option}"])
    _assert_applied(cfg, _file_values(group, option), f"{group}={option}")


def test_unknown_key_fails_naming_it():
    for override, key in (("trainer.seq_lne=10", "seq_lne"), ("optim.lerning_rate=1e-3", "lerning_rate")):
        with pytest.raises(ConfigCompositionException, match=key) as info:
            compose_config([override])
        assert isinstance(info.value.__cause__, ConfigAttributeError)


def test_typo_in_a_config_file_fails_naming_it():
    # What a group/preset YAML goes through: a merge into the typed schema.
    with pytest.raises(ConfigKeyError, match="seq_lne") as info:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create({"trainer": {"seq_lne": 5}}))
    assert info.value.full_key == "trainer.seq_lne"


@pytest.mark.parametrize("override,field", [
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
    ("trainer.seq_len=-5", "trainer.seq_len"),
    ("model.rope_scaling.type=bogus", "model.rope_scaling.type"),
    ("model.rope_scaling.type=yarn", "model.rope_scaling.factor"),
    ("attention.window_size=100", "attention.window_size"),
    ("attention.topk=0", "attention.topk"),
    ("schedule.name=exponential", "schedule.name"),
    ("optim.lr=-1", "optim.lr"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        compose_config([override])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="trainer.max_steps=many") as info:
        compose_config(["trainer.max_steps=many"])
    assert isinstance(info.value.__cause__, ValidationError) and "max_steps" in str(info.value.__cause__)


def test_plus_form_cannot_add_unknown_keys():
    """`+trainer.max_step=3` (the form Hydra suggests after a typo) would add a key nothing reads."""
    with pytest.raises(ConfigError, match=r"trainer\.max_step: not a key .*did you mean trainer\.max_steps\?"):
        compose_config(["+trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"^lerning_rate: not a key of the config schema \(Config\)"):
        compose_config(["+lerning_rate=1e-3"])
    # Free-form dicts of the schema still take new keys.
    assert compose_config(["+model.arch.rms_norm_eps=1e-5"]).model.arch["rms_norm_eps"] == 1e-5
