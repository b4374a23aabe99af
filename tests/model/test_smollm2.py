"""The embedded default is the real pretrained SmolLM2: it predicts real text far better than random tokens,
loads from the safetensors cache, and keeps its parameter count under the attention swap."""
import math
import os
import sysconfig

import pytest
import torch

from infllm.config import AttentionConfig, ModelConfig
from infllm.model import count_parameters, embedded_model_dir, load_model

SMOLLM2_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load_model(ModelConfig())
    return model.eval(), tok


def _ppl(model, ids):
    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


def test_embedded_model_is_real_smollm2(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) \
        == (30, 9, 3)
    assert count_parameters(model) == SMOLLM2_PARAMS
    assert os.path.isfile(os.path.join(embedded_model_dir(), "model.safetensors"))
    # Real held-out text (a standard-library module) vs random tokens of the same length.
    text = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    real = _ppl(model, ids)
    rand = _ppl(model, torch.randint(0, len(tok), ids.shape))
    assert real < 20, real
    assert rand > 100 * real, (real, rand)


def test_swap_keeps_parameters(smollm2):
    model, _ = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped, _ = load_model(ModelConfig(), AttentionConfig(name="infllm_v2", block_size=32, kernel_size=16,
                                                           kernel_stride=8, window_size=128, topk=8, dense_len=512))
    assert count_parameters(swapped) == SMOLLM2_PARAMS
    after = swapped.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert swapped.config.sparse_config["topk"] == 8
