"""Issue 12: the generate() contract made exact: any subclass generates, a warm cache that the input cannot extend
is refused, packed documents by cu_seq_lens_q/k equal position_ids packing, unknown arguments are refused by name;
the cache is written in place without touching what it was built from."""

import pytest
import torch
from helpers import random_model

from modeling_rwkv7 import RWKV7Cache, RWKV7ForCausalLM
from modeling_rwkv7.state_tuning import RWKV7StateTuning

VOCAB = 256
TINY = dict(vocab_size=VOCAB, hidden_size=64, head_dim=32, intermediate_size=None)  # 2 heads of 32


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class MyGoose(RWKV7ForCausalLM):
    """A user subclass whose name does not contain "rwkv"."""


def test_a_subclass_with_any_name_generates_like_the_base_class():
    base, goose = random_model(0, **TINY), random_model(0, MyGoose, **TINY)
    goose.load_state_dict(base.state_dict())
    prompt = tokens(2, 7, seed=1)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    for settings in (
        dict(do_sample=False),
        dict(num_beams=3, do_sample=False, num_return_sequences=2),
    ):
        settings.update(attention_mask=mask, max_new_tokens=10, min_new_tokens=10)
        expected = base.generate(prompt, **settings)
        assert torch.equal(goose.generate(prompt, **settings), expected), settings
    torch.manual_seed(5)
    sampled = goose.generate(prompt, attention_mask=mask, do_sample=True, max_new_tokens=10, min_new_tokens=10)
    torch.manual_seed(5)
    assert torch.equal(
        sampled, base.generate(prompt, attention_mask=mask, do_sample=True, max_new_tokens=10, min_new_tokens=10)
    )
    out = goose.generate(prompt, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    assert isinstance(out.cache, RWKV7Cache)


def test_a_warm_cache_with_an_input_that_cannot_extend_it_is_refused():
    model = random_model(0, **TINY)
    prompt = tokens(1, 8, seed=2)
    cache = model.init_cache(1)
    with torch.no_grad():
        model(prompt, cache=cache)
    for short in (prompt[:, :5], prompt):  # shorter than, and as long as, what the cache has seen
        with pytest.raises(ValueError, match=r"cache has already seen 8 tokens.*Pass the full ids"):
            model.generate(short, cache=cache, max_new_tokens=2)
    assert cache.get_seq_length() == 8  # refused before anything was fed

    # the full ids continue the cache: the same as generating from scratch
    full = torch.cat([prompt, tokens(1, 3, seed=3)], dim=1)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(full, cache=cache.copy(), **settings), model.generate(full, **settings))


def test_empty_input_and_unknown_arguments_are_refused_by_name():
    model = random_model(0, **TINY)
    with pytest.raises(ValueError, match=r"The input is empty \(batch, seq_len\) = \(1, 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['flash_attn_kwargs'\]"):
        model(tokens(1, 3, seed=4), flash_attn_kwargs={})
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        model.model(tokens(1, 3, seed=4), foo=1)
    with pytest.raises(ValueError, match="no attention weights"):
        model(tokens(1, 3, seed=4), output_attentions=True)
    with pytest.raises(ValueError, match="foo"):  # generate() names the argument the model does not take
        model.generate(tokens(1, 3, seed=4), foo=1, max_new_tokens=2)


def test_cu_seq_lens_mark_documents_like_position_ids():
    model = random_model(0, **TINY)
    lengths = (5, 9, 1, 7)
    documents = [tokens(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(documents, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seq_lens = torch.tensor([0, 5, 14, 15, 22], dtype=torch.int32)
    labels = packed.clone()
    with torch.no_grad():
        by_positions = model(packed, position_ids=position_ids, labels=labels)
        by_cu = model(
            packed, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=9, max_length_k=9, labels=labels
        )
        by_seq_idx = model(packed, seq_idx=torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))[None])
        alone = torch.cat([model(doc).logits for doc in documents], dim=1)
    torch.testing.assert_close(by_cu.logits, by_positions.logits, rtol=0, atol=0)
    torch.testing.assert_close(by_cu.logits, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(by_seq_idx.logits, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(by_cu.loss, by_positions.loss, rtol=0, atol=0)
    unpacked = model(packed).logits
    assert (unpacked - alone).abs().max() > 1e-2  # without the boundaries the documents do see each other

    with pytest.raises(ValueError, match=r"cu_seq_lens \[0, 5, 20\] must rise from 0 to seq_len=22"):
        model(packed, cu_seq_lens_q=torch.tensor([0, 5, 20]))
    with pytest.raises(ValueError, match="differs from cu_seq_lens_k"):
        model(packed, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=torch.tensor([0, 22], dtype=torch.int32))
    with pytest.raises(ValueError, match="for one packed row"):
        model(torch.cat([packed, packed]), cu_seq_lens_q=cu_seq_lens)
    tuned = RWKV7StateTuning(model)
    with pytest.raises(ValueError, match="one document per row"):
        tuned(input_ids=packed, cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens)


def test_the_state_is_written_in_place_and_copies_are_independent():
    model = random_model(0, **TINY)
    cache = model.init_cache(2)
    addresses = [t.data_ptr() for layer in cache.layers for t in layer.tensors().values()]
    with torch.no_grad():
        model(tokens(2, 40, seed=5), cache=cache)  # chunked prefill
        snapshot = cache.copy()
        before = [t.clone() for layer in snapshot.layers for t in layer.tensors().values()]
        model(tokens(2, 1, seed=6), cache=cache)  # a decoding step
        cache.reorder_cache(torch.tensor([1, 1]))
    assert [t.data_ptr() for layer in cache.layers for t in layer.tensors().values()] == addresses
    assert all(
        torch.equal(a, b) for a, b in zip(before, (t for layer in snapshot.layers for t in layer.tensors().values()))
    )
    assert snapshot.get_seq_length() == 40 and cache.get_seq_length() == 41
    assert torch.equal(cache.layers[0].recurrent_state[0], cache.layers[0].recurrent_state[1])


def test_decoding_from_a_tuned_state_never_overwrites_it():
    model = random_model(0, **TINY)
    tuned = RWKV7StateTuning(model)
    with torch.no_grad():
        tuned.initial_state.normal_(0, 0.5)
    initial = tuned.initial_state.detach().clone()
    tuned.generate(tokens(1, 4, seed=7), max_new_tokens=5)  # batch 1: the expanded state has the parameter's layout
    assert torch.equal(tuned.initial_state, initial)
    # and training through a cache still reaches the state
    tuned(input_ids=tokens(2, 6, seed=8), labels=tokens(2, 6, seed=8)).loss.backward()
    assert tuned.initial_state.grad is not None and tuned.initial_state.grad.abs().max() > 0


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_a_half_precision_wkv_state_halves_its_memory_and_stays_close(state_dtype):
    reference = random_model(0, **TINY)
    model = random_model(0, **TINY)
    model.config.wkv_state_dtype = state_dtype
    dtype = getattr(torch, state_dtype)
    cache, reference_cache = model.init_cache(1), reference.init_cache(1)
    assert cache.layers[0].recurrent_state.dtype == dtype
    assert reference_cache.layers[0].recurrent_state.dtype == torch.float32
    recurrent_bytes = sum(layer.recurrent_state.numel() for layer in cache.layers)
    assert reference_cache.nbytes - cache.nbytes == 2 * recurrent_bytes
    ids = tokens(1, 64, seed=9)
    with torch.no_grad():
        logits = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(64)], dim=1)
        expected = torch.cat([reference(ids[:, t : t + 1], cache=reference_cache).logits for t in range(64)], dim=1)
    assert cache.layers[0].recurrent_state.dtype == dtype  # written back in its own dtype
    drift = ((logits - expected).abs().max() / expected.abs().max()).item()
    assert 0 < drift < 2e-2, drift
