"""Issue 3: the recurrent state as `cache`: generate() in every mode, O(1) memory, saved and resumed."""

import os
import subprocess
import sys

import oracle
import pytest
import torch

from modeling_rwkv7 import RWKV7Cache, RWKV7Config, RWKV7Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_tokens(length: int, seed: int, vocab_size: int = 1000) -> torch.Tensor:
    return torch.randint(1, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def state_tensors(cache: RWKV7Cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in layer.tensors().values()]


@pytest.fixture(scope="module")
def model(converted_model):
    return converted_model


def test_split_prefill_equals_one_prefill(model):
    tokens = random_tokens(200, seed=1)
    with torch.no_grad():
        whole = model(tokens, use_cache=True)
        cache = model.init_cache(1)
        pieces = [model(tokens[:, a:b], cache=cache).logits for a, b in ((0, 1), (1, 17), (17, 200))]
    assert cache.get_seq_length() == whole.cache.get_seq_length() == 200
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole.logits, rtol=0, atol=1e-5)
    for split, full in zip(state_tensors(cache), state_tensors(whole.cache)):
        torch.testing.assert_close(split, full, rtol=0, atol=1e-5)


def test_token_by_token_decoding_equals_prefill_and_official_rnn_path(model, official_checkpoint):
    tokens = random_tokens(200, seed=2)
    with torch.no_grad():
        prefill = model(tokens).logits[0]
        cache = model.init_cache(1)
        steps = torch.cat([model(tokens[:, t : t + 1], cache=cache).logits[0] for t in range(200)])
    assert (steps - prefill).abs().max().item() <= 1e-4

    official, state, official_steps = official_checkpoint[2], None, []
    for token in tokens[0].tolist():
        logits, state = oracle.oracle_logits(official, [token], state)  # one token: the official RNN path
        official_steps.append(logits)
    assert (steps - torch.cat(official_steps)).abs().max().item() <= 1e-4


def greedy_by_recomputation(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    sequence = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def test_greedy_generate_with_cache_equals_recomputation(model):
    prompt = random_tokens(12, seed=3)
    generated = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(generated, greedy_by_recomputation(model, prompt, 20))
    no_cache = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False)
    assert torch.equal(generated, no_cache)


def test_sampling_with_a_fixed_seed_is_reproducible(model):
    prompt = random_tokens(8, seed=4)
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        runs.append(
            model.generate(
                prompt, max_new_tokens=15, min_new_tokens=15, do_sample=True, top_k=50, num_return_sequences=2
            )
        )
    assert runs[0].shape == (2, 23) and torch.equal(runs[0], runs[1])
    torch.manual_seed(99)
    other = model.generate(
        prompt, max_new_tokens=15, min_new_tokens=15, do_sample=True, top_k=50, num_return_sequences=2
    )
    assert not torch.equal(runs[0], other)


def test_beam_search_with_cache_equals_without(model):
    prompt = random_tokens(10, seed=5)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=3)
    with_cache = model.generate(prompt, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (3, 18)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    prompts = [random_tokens(n, seed=10 + n)[0] for n in (5, 13, 9)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    generated = model.generate(batch, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert torch.equal(generated[row, width:], alone[0, len(prompt) :]), row


def test_padding_never_changes_the_state(model):
    """Padded positions (anywhere, with a non-zero starting state) leave state and token shift untouched."""
    prefix, suffix = random_tokens(6, seed=20), random_tokens(7, seed=21)
    with torch.no_grad():
        reference = model.init_cache(1)
        model(prefix, cache=reference)
        expected = model(suffix, cache=reference).logits

        cache = model.init_cache(1)
        model(prefix, cache=cache)
        padded = torch.cat(
            [torch.zeros(1, 3, dtype=torch.long), suffix[:, :4], torch.zeros(1, 2, dtype=torch.long), suffix[:, 4:]], 1
        )
        mask = torch.ones_like(padded)
        mask[0, :3] = 0
        mask[0, 7:9] = 0
        logits = model(padded, attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(logits[:, mask[0].bool()], expected, rtol=0, atol=1e-5)
    for a, b in zip(state_tensors(cache), state_tensors(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_generate_continues_from_a_previous_cache(model):
    prompt = random_tokens(10, seed=6)
    first = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    cache = first.cache
    assert isinstance(cache, RWKV7Cache) and cache.get_seq_length() == 14  # the last token is not fed yet

    follow_up = torch.cat([first.sequences, random_tokens(4, seed=7)], dim=1)
    continued = model.generate(follow_up, cache=cache, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    from_scratch = model.generate(follow_up, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(continued, from_scratch)


@pytest.mark.slow
def test_cache_memory_is_constant_in_generated_length(model):
    prompt = random_tokens(4, seed=8)
    sizes = {}
    for new_tokens in (10, 1000):
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True
        )
        assert out.sequences.shape[1] == 4 + new_tokens
        cache = out.cache
        sizes[new_tokens] = (cache.nbytes, [tuple(t.shape) for t in state_tensors(cache)])
    assert sizes[10] == sizes[1000]
    layers, heads, head_dim, hidden = 3, 4, 64, 256
    assert sizes[10][0] == layers * (heads * head_dim * head_dim * 4 + 2 * hidden * 4)


def test_reorder_select_copy_and_move(model):
    tokens = torch.cat([random_tokens(9, seed=s) for s in (30, 31, 32)])
    with torch.no_grad():
        cache = model(tokens, use_cache=True).cache
    snapshot = cache.copy()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for reordered, original in zip(state_tensors(cache), state_tensors(snapshot)):
        assert torch.equal(reordered, original[[2, 0, 0]])
    cache.batch_select_indices(torch.tensor([0]))
    assert cache.batch_size == 1 and torch.equal(
        cache.layers[1].recurrent_state, snapshot.layers[1].recurrent_state[2:3]
    )
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 2
    moved = snapshot.copy().to("cpu", torch.bfloat16)
    assert (
        moved.layers[0].attn_shift_state.dtype == torch.bfloat16
        and moved.layers[0].recurrent_state.dtype == torch.float32
    )
    with pytest.raises(RuntimeError, match="cannot be cropped"):
        cache.crop(-1)


def test_init_cache_shapes(model):
    cache = model.init_cache(batch_size=5)
    assert len(cache.layers) == 3 and cache.get_seq_length() == 0
    layer = cache.layers[0]
    assert layer.recurrent_state.shape == (5, 4, 64, 64) and layer.recurrent_state.dtype == torch.float32
    assert layer.attn_shift_state.shape == layer.ffn_shift_state.shape == (5, 256)
    assert all(torch.count_nonzero(t) == 0 for t in state_tensors(cache))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        model.init_cache(0)


CONTINUE_IN_FRESH_PROCESS = """
import sys, torch
import modeling_rwkv7
from modeling_rwkv7 import RWKV7Cache, RWKV7ForCausalLM
model = RWKV7ForCausalLM.from_pretrained(sys.argv[1]).eval()
cache = RWKV7Cache.load(sys.argv[2], config=model.config)
prompt = torch.load(sys.argv[3])
out = model.generate(prompt, cache=cache, max_new_tokens=10, min_new_tokens=10, do_sample=False)
torch.save(out, sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_saved_state_continues_identically_in_a_fresh_process(model, tmp_path):
    system_prompt, question = random_tokens(40, seed=9), random_tokens(6, seed=10)
    with torch.no_grad():
        cache = model.init_cache(1)
        model(system_prompt, cache=cache)
    cache.save(tmp_path / "system_prompt.safetensors")
    model.save_pretrained(tmp_path / "model")

    full_prompt = torch.cat([system_prompt, question], dim=1)
    torch.save(full_prompt, tmp_path / "prompt.pt")
    expected = model.generate(full_prompt, cache=cache.copy(), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(expected, model.generate(full_prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False))

    subprocess.run(
        [
            sys.executable,
            "-c",
            CONTINUE_IN_FRESH_PROCESS,
            str(tmp_path / "model"),
            str(tmp_path / "system_prompt.safetensors"),
            str(tmp_path / "prompt.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
        cwd=REPO,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_mismatched_or_corrupt_state_is_refused(model, tmp_path):
    other = RWKV7Config(vocab_size=1000, hidden_size=128, num_hidden_layers=3, head_dim=64)
    RWKV7Cache(other).save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=r'"num_heads": 2.*the model expects.*"num_heads": 4'):
        RWKV7Cache.load(tmp_path / "other.safetensors", config=model.config)

    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "not_a_state.safetensors")
    with pytest.raises(ValueError, match="is not an RWKV7Cache file"):
        RWKV7Cache.load(tmp_path / "not_a_state.safetensors")

    cache = model.init_cache(1)
    tensors = {f"layers.{i}.{n}": t for i, layer in enumerate(cache.layers) for n, t in layer.tensors().items()}
    tensors["layers.2.recurrent_state"] = torch.zeros(1, 4, 64, 32)
    metadata = {
        "format": "rwkv7-state",
        "num_hidden_layers": "3",
        "num_heads": "4",
        "head_dim": "64",
        "hidden_size": "256",
        "seen_tokens": "0",
    }
    save_file(tensors, tmp_path / "corrupt.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"layers\.2\.recurrent_state is \(1, 4, 64, 32\), expected \(1, 4, 64, 64\)"):
        RWKV7Cache.load(tmp_path / "corrupt.safetensors")


def test_failed_save_leaves_no_file(model, tmp_path, monkeypatch):
    import modeling_rwkv7.cache_rwkv7 as cache_module

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        model.init_cache(1).save(tmp_path / "state.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_streaming_encoder_equals_full_pass():
    """The seed's use case: features arrive one frame at a time; the cached stream gives the full pass's output."""
    torch.manual_seed(0)
    config = RWKV7Config(
        vocab_size=None, input_size=287, hidden_size=128, num_hidden_layers=3, head_dim=64, window_size=60
    )
    encoder = RWKV7Model(config).eval()
    oracle.fill_zero_matrices(encoder)
    features = torch.randn(2, 60, 287)
    with torch.no_grad():
        full = encoder(inputs_embeds=features).pooler_output
        cache = encoder.init_cache(batch_size=2)
        streamed = [encoder(inputs_embeds=features[:, t : t + 1], cache=cache).pooler_output for t in range(60)]
        half = encoder(inputs_embeds=features[:, :30]).pooler_output
    torch.testing.assert_close(streamed[-1], full, rtol=0, atol=1e-5)
    torch.testing.assert_close(streamed[29], half, rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 60
