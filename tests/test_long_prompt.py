"""Issue 20, item 5: a long input of which only the last logits are kept (a prompt in generate()) is read chunk by
chunk, its state carried between chunks: the logits, the state and the generated tokens are those of reading it at
once, and no forward pass of the stack sees more than a chunk."""

import torch
from helpers import random_model

from modeling_rwkv7 import modeling_rwkv7


def test_a_long_prompt_is_read_in_chunks_with_the_logits_and_state_of_one_pass(monkeypatch):
    model = random_model(seed=61)
    prompt = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(62))
    mask = torch.ones_like(prompt)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        at_once = model(prompt, attention_mask=mask, use_cache=True)  # all logits kept: one pass
    monkeypatch.setattr(modeling_rwkv7, "PREFILL_CHUNK_SIZE", 16)
    lengths = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)  # fmt: skip
    try:
        with torch.no_grad():
            chunked = model(prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
    finally:
        hook.remove()
    assert lengths == [16, 16, 16, 2]
    expected = at_once.logits[:, -1:]
    assert chunked.logits.shape == (2, 1, 1000)
    assert (chunked.logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    for layer, reference in zip(chunked.cache.layers, at_once.cache.layers):
        for name, tensor in reference.tensors().items():
            assert (getattr(layer, name) - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name


def test_generate_gives_the_same_tokens_with_chunked_prompts(monkeypatch):
    """Our forward's chunks (generate() keeps only the last logits of the prompt) and transformers'
    `prefill_chunk_size` give the tokens of a prompt read at once."""
    model = random_model(seed=63)
    prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(64))
    settings = dict(do_sample=False, max_new_tokens=8, eos_token_id=None)
    expected = model.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, prefill_chunk_size=12, **settings), expected)
    monkeypatch.setattr(modeling_rwkv7, "PREFILL_CHUNK_SIZE", 16)
    assert torch.equal(model.generate(prompt, **settings), expected)


def test_documents_that_start_at_a_chunk_boundary_or_inside_a_chunk_start_afresh(monkeypatch):
    """position_ids (as generate() passes them) with documents starting at position 16 (a chunk's first) and 23:
    the chunked pass gives the last logits and the state of one pass."""
    model = random_model(seed=65)
    prompt = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(66))
    position_ids = torch.cat([torch.arange(16), torch.arange(7), torch.arange(17)])[None].expand(2, -1)
    with torch.no_grad():
        at_once = model(prompt, position_ids=position_ids, use_cache=True)
        monkeypatch.setattr(modeling_rwkv7, "PREFILL_CHUNK_SIZE", 16)
        chunked = model(prompt, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        no_reset = model(prompt, use_cache=True, logits_to_keep=1)
    expected = at_once.logits[:, -1:]
    assert (chunked.logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (no_reset.logits - expected).abs().max() > 1e-3 * expected.abs().max()  # the documents do matter
    for layer, reference in zip(chunked.cache.layers, at_once.cache.layers):
        for name, tensor in reference.tensors().items():
            assert (getattr(layer, name) - tensor).abs().max() <= 1e-5 * tensor.abs().max(), name
