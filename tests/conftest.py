import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import oracle  # noqa: E402  (sets RWKV_V7_ON before anything imports `rwkv`)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """A random official-format RWKV-7 checkpoint (3 layers, hidden 256, 4 heads, vocab 1000) on disk, its state
    dict, and the `rwkv` package's model loaded from it."""
    state_dict = oracle.random_official_state_dict(vocab_size=1000, hidden_size=256, num_layers=3, seed=1234)
    path = oracle.write_official_checkpoint(state_dict, tmp_path_factory.mktemp("official"))
    return state_dict, path, oracle.load_oracle(path)


@pytest.fixture(scope="session")
def converted_model(official_checkpoint):
    """Our RWKV7ForCausalLM holding the weights of `official_checkpoint` (eval mode, fp32)."""
    from modeling_rwkv7 import RWKV7ForCausalLM
    from modeling_rwkv7.convert_rwkv7 import official_to_hf

    config, state_dict = official_to_hf(official_checkpoint[0])
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
