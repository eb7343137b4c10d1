"""Issue 7: state tuning, training only the initial WKV state of each layer (`RWKV7StateTuning`)."""

import os

import pytest
import torch
from helpers import assert_close, random_model, relative_error

from modeling_rwkv7 import RWKV7Cache, RWKV7ForSequenceClassification, RWKV7Model
from modeling_rwkv7.state_tuning import RWKV7StateTuning

VOCAB = 97
TINY = dict(vocab_size=VOCAB, hidden_size=64, head_dim=32, intermediate_size=None)  # 2 heads of 32


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two (no OpenMP hand-offs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def random_state(tuned: RWKV7StateTuning, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tuned.initial_state.copy_(torch.randn(tuned.initial_state.shape, generator=generator))
    return tuned.initial_state.detach().clone()


def test_wrapping_freezes_the_model_and_adds_one_state_per_layer():
    model = random_model(0, **TINY)
    tuned = RWKV7StateTuning(model)
    trainable = {name: p.shape for name, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"initial_state": torch.Size([2, 2, 32, 32])}
    assert tuned.initial_state.dtype == torch.float32
    assert not tuned.initial_state.any()


def test_zero_state_gives_the_plain_model_and_a_state_changes_it():
    model = random_model(1, **TINY)
    tuned = RWKV7StateTuning(model)
    x = tokens(2, 9, seed=1)
    with torch.no_grad():
        plain = model(x).logits
        assert torch.equal(tuned(input_ids=x).logits, plain)
        random_state(tuned, seed=2)
        assert (tuned(input_ids=x).logits - plain).abs().max() > 1e-2


def test_every_row_starts_from_the_state_given_to_the_model_as_a_cache():
    model = random_model(2, **TINY)
    tuned = RWKV7StateTuning(model)
    state = random_state(tuned, seed=3)
    x = tokens(3, 11, seed=4)
    with torch.no_grad():
        batched = tuned(input_ids=x).logits
        for row in range(3):
            cache = model.init_cache(1)
            for layer, layer_state in zip(cache.layers, state):
                layer.recurrent_state = layer_state[None].clone()
            expected = model(x[row : row + 1], cache=cache).logits
            torch.testing.assert_close(batched[row : row + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("wkv_backend, seq_len", [("recurrent", 6), ("chunked", 40)])
def test_gradients_reach_the_state_only_and_match_finite_differences(wkv_backend, seq_len):
    model = random_model(3, wkv_backend=wkv_backend, **TINY).double()
    tuned = RWKV7StateTuning(model)
    with torch.no_grad():
        tuned.initial_state.normal_(0.0, 0.5)
    x = tokens(2, seq_len, seed=5)
    loss = tuned(input_ids=x, labels=x).loss
    loss.backward()
    assert all(p.grad is None for name, p in tuned.named_parameters() if name != "initial_state")
    grad = tuned.initial_state.grad
    assert grad.shape == tuned.initial_state.shape and grad.abs().max() > 0

    # the WKV state is float32 by design: compare the directional derivative along a random direction
    direction = torch.randn(grad.shape, generator=torch.Generator().manual_seed(6))
    step = 1e-2
    with torch.no_grad():
        base = tuned.initial_state.clone()
        tuned.initial_state.copy_(base + step * direction)
        plus = tuned(input_ids=x, labels=x).loss.item()
        tuned.initial_state.copy_(base - step * direction)
        minus = tuned(input_ids=x, labels=x).loss.item()
    numeric = (plus - minus) / (2 * step)
    analytic = (grad * direction).sum().item()
    assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_sequence_classification_and_feature_encoder_can_be_state_tuned():
    classifier = random_model(4, RWKV7ForSequenceClassification, num_labels=3, **TINY)
    tuned = RWKV7StateTuning(classifier)
    random_state(tuned, seed=7)
    out = tuned(input_ids=tokens(4, 5, seed=8), labels=torch.tensor([0, 1, 2, 1]))
    assert out.logits.shape == (4, 3)
    out.loss.backward()
    assert tuned.initial_state.grad.abs().max() > 0

    encoder = random_model(5, RWKV7Model, **{**TINY, "vocab_size": None, "input_size": 7})
    tuned = RWKV7StateTuning(encoder)
    random_state(tuned, seed=9)
    features = torch.randn(2, 8, 7, generator=torch.Generator().manual_seed(10))
    pooled = tuned(inputs_embeds=features).pooler_output
    assert pooled.shape == (2, 64)
    pooled.square().sum().backward()
    assert tuned.initial_state.grad.abs().max() > 0


def test_activation_checkpointing_through_the_wrapper_keeps_the_gradient():
    x = tokens(2, 8, seed=19)
    gradients, calls = [], []
    for checkpointing in (False, True):
        tuned = RWKV7StateTuning(random_model(10, **TINY)).train()
        random_state(tuned, seed=20)
        if checkpointing:
            tuned.activation_checkpointing_enable()  # what Trainer(activation_checkpointing=True) calls
        calls.clear()
        tuned.model.model.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
        tuned(input_ids=x, labels=x).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)
        gradients.append(tuned.initial_state.grad)
    assert (gradients[0] - gradients[1]).abs().max() <= 1e-5


def test_save_and_load_reproduce_the_state_in_a_small_file(tmp_path):
    model = random_model(6, **TINY)
    tuned = RWKV7StateTuning(model)
    state = random_state(tuned, seed=11)
    path = tmp_path / "state.safetensors"
    tuned.save_state(path)
    # 2 layers x (2 heads x 32 x 32 float32 + 2 shift vectors of 64 float32) plus a small header
    assert 2 * (2 * 32 * 32 * 4 + 2 * 64 * 4) < os.path.getsize(path) < 2 * (2 * 32 * 32 * 4 + 2 * 64 * 4) + 2048

    reloaded = RWKV7StateTuning(random_model(6, **TINY)).load_state(path)
    assert torch.equal(reloaded.initial_state, state)
    x = tokens(2, 7, seed=12)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, tuned(input_ids=x).logits)


def test_a_saved_state_drives_generation_with_or_without_the_wrapper(tmp_path):
    model = random_model(7, **TINY)
    tuned = RWKV7StateTuning(model)
    random_state(tuned, seed=13)
    path = tmp_path / "state.safetensors"
    tuned.save_state(path)
    prompt = tokens(1, 2, seed=14)

    # greedy decoding by hand from the tuned state
    with torch.no_grad():
        cache = tuned.initial_cache(1)
        logits = model(prompt, cache=cache).logits[:, -1]
        expected = prompt
        for _ in range(8):
            next_token = logits.argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_token], dim=1)
            logits = model(next_token, cache=cache).logits[:, -1]

    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(tuned.generate(prompt, **settings), expected)
    assert torch.equal(model.generate(prompt, cache=RWKV7Cache.load(path, config=model.config), **settings), expected)
    # from the zero state the same prompt continues differently
    assert not torch.equal(model.generate(prompt, **settings), expected)

    # a batch: each row as if alone, with left padding leaving the tuned state untouched
    short = tokens(1, 1, seed=15)
    batch = torch.cat([prompt, torch.cat([torch.zeros(1, 1, dtype=torch.long), short], dim=1)])
    mask = torch.tensor([[1, 1], [0, 1]])
    generated = tuned.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(generated[0], expected[0])
    assert torch.equal(generated[1, 1:], tuned.generate(short, **settings)[0])


def test_a_left_padded_rows_first_token_continues_the_tuned_state():
    """generate()'s position_ids are 0 at the first token after left padding: that token continues from the tuned
    state (it is no packed document start), through the wrapper's forward and through the model with its cache."""
    model = random_model(11, **TINY)
    tuned = RWKV7StateTuning(model)
    random_state(tuned, seed=12)
    ids, mask = tokens(2, 5, seed=13), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    position_ids = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # as generate() makes them
    with torch.no_grad():
        alone = tuned(ids[1:, 2:]).logits[0]
        padded = tuned(ids, attention_mask=mask, position_ids=position_ids).logits[1, 2:]
        through_cache = model(ids, attention_mask=mask, position_ids=position_ids, cache=tuned.initial_cache(2))
        from_zeros = model(ids[1:, 2:]).logits[0]
    assert_close(padded, alone, 1e-5, "wrapper")
    assert_close(through_cache.logits[1, 2:], alone, 1e-5, "cache")
    assert relative_error(from_zeros, alone) > 1e-2  # the tuned state matters


def test_training_moves_only_the_state():
    model = random_model(8, **TINY)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tuned = RWKV7StateTuning(model).train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=0.2)
    x = tokens(4, 10, seed=16)
    losses = []
    for _ in range(20):
        loss = tuned(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert tuned.initial_state.abs().max() > 0


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="Linear"):
        RWKV7StateTuning(torch.nn.Linear(2, 2))

    tuned = RWKV7StateTuning(random_model(9, **TINY))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="one document per row"):
        tuned(input_ids=tokens(1, 6, seed=17), position_ids=packed)

    other = RWKV7StateTuning(random_model(9, num_hidden_layers=3, **TINY))
    other.save_state(tmp_path / "three_layers.safetensors")
    with pytest.raises(ValueError, match='"num_hidden_layers": 3'):
        tuned.load_state(tmp_path / "three_layers.safetensors")

    model = random_model(9, **TINY)
    prompt_state = model.init_cache(1)
    with torch.no_grad():
        model(tokens(1, 4, seed=18), cache=prompt_state)
    prompt_state.save(tmp_path / "prompt.safetensors")
    with pytest.raises(ValueError, match="non-zero token-shift states"):
        tuned.load_state(tmp_path / "prompt.safetensors")

    model.init_cache(2).save(tmp_path / "batch2.safetensors")
    with pytest.raises(ValueError, match="batch size 2"):
        tuned.load_state(tmp_path / "batch2.safetensors")
