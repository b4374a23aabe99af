"""Every preset composes against the typed schema; typos and bad values fail at compose time, naming the key."""
import pytest

from infllm.config import ConfigError
from tests.helpers import compose_config, experiment_names


def test_base_config_composes():
    cfg = compose_config()
    assert cfg.model.path is None  # the embedded SmolLM2
    assert cfg.attention.name == "infllm_v2"
    assert cfg.trainer.seq_len > 0


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_preset_composes(name):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.trainer.max_steps > 0
    assert cfg.attention.window_size % cfg.attention.block_size == 0


@pytest.mark.parametrize("group,option", [
    ("attention", "dense"), ("attention", "infllm_v2"), ("schedule", "wsd"), ("schedule", "linear"),
    ("logger", "wandb"), ("model", "tiny_llama"),
])
def test_group_options_compose(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg is not None


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="seq_lne"):
        compose_config(["trainer.seq_lne=10"])
    with pytest.raises(Exception, match="lerning_rate"):
        compose_config(["optim.lerning_rate=1e-3"])


def test_typo_in_a_config_file_fails_naming_it():
    # What a group/preset YAML goes through: a merge into the typed schema.
    from omegaconf import OmegaConf

    from infllm.config import Config

    with pytest.raises(Exception, match="seq_lne"):
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create({"trainer": {"seq_lne": 5}}))


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
    with pytest.raises(Exception, match="max_steps"):
        compose_config(["trainer.max_steps=many"])
