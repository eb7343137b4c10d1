"""Issue 11: the compiled decoding step computes what the eager model computes, token after token."""

import pytest
import torch
from helpers import assert_close, assert_states_close, random_model

from modeling_rwkv7 import linear_rwkv7
from modeling_rwkv7.decode_rwkv7 import compile_decode_step
from modeling_rwkv7.linear_rwkv7 import RWKV7Linear


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_step_matches_the_eager_step_over_64_tokens(forced_product):
    """Batch 2, a 5-token eager prompt, then 64 tokens through both: logits and every state tensor agree. Every
    few-row product is decided beforehand (how `compile_decode_step` measures them, compiled candidates included:
    `test_projection.py`), so that only the step itself is compiled here."""
    model = random_model(seed=21)
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, RWKV7Linear)}
    forced_product("row_blocks", sorted(shapes))
    tokens = torch.randint(0, 1000, (2, 69), generator=torch.Generator().manual_seed(22))
    step = compile_decode_step(model, batch_size=2)
    assert {choice.product for choice in linear_rwkv7.few_row_choices.values()} == {"row_blocks"}  # none measured
    with torch.no_grad():
        eager_cache = model(tokens[:, :5], use_cache=True).cache
        compiled_cache = eager_cache.copy()
        for t in range(5, 69):
            eager = model(tokens[:, t : t + 1], cache=eager_cache).logits
            compiled = step(tokens[:, t : t + 1], cache=compiled_cache).logits
            assert compiled.shape == eager.shape == (2, 1, 1000)
            assert_close(compiled, eager, 1e-4, f"token {t}")
    assert_states_close(compiled_cache, eager_cache, 1e-4, scale_floor=1.0)
    assert int(compiled_cache.seen_tokens) == int(eager_cache.seen_tokens) == 69
