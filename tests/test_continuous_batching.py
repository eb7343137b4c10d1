"""Issue 20, item 3: continuous batching of recurrent states. The cache's slot operations (take, free, reset, write a
row; grow or shrink the batch) keep every sequence's state what it would be alone, copying at most one row; the
manager gives each request the tokens and final state it gets alone from generate(), with prompts prefilled in
chunks and rows joining and leaving mid-run."""

import pytest
import torch
from helpers import VOCAB, assert_close, random_model
from transformers import ContinuousBatchingConfig

from modeling_rwkv7 import RWKV7Cache
from modeling_rwkv7.continuous_batching_rwkv7 import RWKV7ContinuousBatchingManager


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def states_close(actual: RWKV7Cache, actual_row: int, expected: RWKV7Cache, expected_row: int = 0, tol=1e-5):
    """Row `actual_row` of `actual`'s states against row `expected_row` of `expected`'s (`assert_close`)."""
    for layer_idx, (actual_layer, expected_layer) in enumerate(zip(actual.layers, expected.layers)):
        for name, tensor in expected_layer.tensors().items():
            found, wanted = getattr(actual_layer, name)[actual_row], tensor[expected_row]
            assert_close(found, wanted, tol, f"layer {layer_idx} {name}", scale_floor=1.0)


@pytest.fixture(scope="module")
def model():
    model = random_model(seed=31)
    model.generation_config.update(do_sample=False, eos_token_id=None, max_new_tokens=8)
    return model


# --- slot operations ----------------------------------------------------------------------------------------------


def test_rows_join_and_leave_a_pool_and_each_keeps_its_own_sequence(model):
    """Five sequences through a pool of 3 rows, joining and leaving between steps: every step's logits and the
    final states equal each sequence run alone in a cache of its own."""
    sequences = {name: prompt(12, seed) for seed, name in enumerate("abcde")}
    alone = {}
    with torch.no_grad():
        for name, tokens in sequences.items():
            alone[name] = model(torch.tensor([tokens])).logits[0]  # every position's logits, in one pass

        pool = model.init_cache(3)
        pool.resize(0)
        storage = pool.layers[0].recurrent_state.untyped_storage().data_ptr()
        rows, position = [], {}  # the name of the sequence of each row; how far each has gone
        schedule = {0: "abc", 4: "d", 7: "e"}  # step -> sequences joining (c leaves at step 3, a at 6)
        leaves = {3: "c", 6: "a", 9: "b"}
        for step in range(20):
            if step in leaves and leaves[step] in rows:
                row = rows.index(leaves[step])
                moved = pool.free_row(row)
                assert moved == (len(rows) - 1 if row != len(rows) - 1 else None)
                rows[row] = rows[-1]
                rows.pop()
            for name in schedule.get(step, ""):
                assert pool.take_row() == len(rows)
                rows.append(name)
                position[name] = 0
            rows_left = [name for name in rows if position[name] < 12]
            if rows_left != rows or not rows:
                break
            ids = torch.tensor([[sequences[name][position[name]]] for name in rows])
            logits = model(ids, cache=pool).logits[:, -1]
            assert pool.layers[0].recurrent_state.untyped_storage().data_ptr() == storage  # the pool, not a copy
            for row, name in enumerate(rows):
                expected = alone[name][position[name]]
                assert (logits[row] - expected).abs().max() <= 1e-4 * expected.abs().max(), (step, name)
                position[name] += 1
        assert set(rows) == {"d", "e"} and pool.capacity == 3
        for row, name in enumerate(rows):
            done = position[name]
            cache = model.init_cache(1)
            model(torch.tensor([sequences[name][:done]]), cache=cache)
            states_close(pool, row, cache, tol=1e-4)


def test_reset_write_and_resize_touch_only_their_rows(model):
    pool = model.init_cache(4)
    with torch.no_grad():
        model(torch.tensor([prompt(5, seed) for seed in range(4)]), cache=pool)
    before = pool.copy()
    one = model.init_cache(1)
    with torch.no_grad():
        model(torch.tensor([prompt(7, 9)]), cache=one)
    pool.reset_row(1)
    pool.write_row(2, one)
    for layer, old in zip(pool.layers, before.layers):
        for name, tensor in layer.tensors().items():
            assert torch.equal(tensor[0], getattr(old, name)[0]) and torch.equal(tensor[3], getattr(old, name)[3])
            assert not tensor[1].any()
    states_close(pool, 2, one, tol=0)
    pool.resize(2)
    assert pool.batch_size == 2 and pool.capacity == 4
    pool.resize(4)  # the rows come back as they were left
    states_close(pool, 3, before, 3, tol=0)
    with pytest.raises(ValueError, match="capacity=4"):
        pool.resize(5)
    with pytest.raises(IndexError, match="batch_size=4"):
        pool.free_row(4)
    with pytest.raises(RuntimeError, match="All 4 rows"):
        pool.take_row()
    copy = pool.copy()  # its own rows, as many as the batch
    assert copy.capacity == 4
    assert copy.layers[0].recurrent_state.data_ptr() != pool.layers[0].recurrent_state.data_ptr()


# --- the manager --------------------------------------------------------------------------------------------------


def generate_alone(model, tokens: list[int], max_new_tokens: int):
    out = model.generate(
        torch.tensor([tokens]), max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
    )
    return out.sequences[0, len(tokens) :].tolist(), out.cache


def collect(manager, request_ids, timeout=60.0) -> dict:
    results = {}
    while len(results) < len(request_ids):
        result = manager.get_result(timeout=timeout)
        assert result is not None, f"no output for {set(request_ids) - set(results)}"
        if result.is_finished():
            results[result.request_id] = result
    return results


def test_the_manager_gives_each_request_what_it_gets_alone(model):
    """Eight requests, prompts of 1 to 40 tokens prefilled 16 tokens per step, a pool of 3 rows: the requests wait,
    join as rows free up, and leave after 2 to 14 tokens; one joins while the first is decoding. Each gets the
    greedy tokens and the final state that generate() gives it alone."""
    requests = [(prompt(length, seed), new) for seed, (length, new) in enumerate(
        [(9, 14), (40, 3), (1, 6), (17, 2), (33, 9), (5, 12), (16, 4), (23, 7)]
    )]  # fmt: skip
    expected = [generate_alone(model, tokens, new) for tokens, new in requests]
    manager = RWKV7ContinuousBatchingManager(model, model.generation_config, max_batch_size=3, max_prefill_tokens=16)
    manager.start()
    try:
        first = manager.add_request(requests[0][0], max_new_tokens=requests[0][1], streaming=True)
        streamed = [manager.get_result(timeout=60) for _ in range(2)]  # the first request decodes
        assert [len(output.generated_tokens) for output in streamed] == [1, 2]
        others = [manager.add_request(tokens, max_new_tokens=new) for tokens, new in requests[1:]]
        results = collect(manager, [first, *others])
    finally:
        manager.stop()
    for request_id, (tokens, final_state) in zip([first, *others], expected):
        assert results[request_id].generated_tokens == tokens, request_id
        assert results[request_id].error is None
        states_close(results[request_id].cache, 0, final_state, tol=1e-4)


def test_short_prompts_join_at_once_and_long_ones_are_prefilled_in_chunks(model, monkeypatch):
    """Four short prompts (6, 6, 9 and 14 tokens) and a long one (40) added at once to a pool of 4 rows, chunks of
    16: the short ones take the four rows at once and are read by the batched steps ([4, 1] from the first step);
    the long one waits for a free row, then has its first 39 tokens prefilled alone in chunks of 16, 16 and 7, and
    its last read by a step. Each request gets what generate() gives it alone."""
    requests = [prompt(length, 60 + index) for index, length in enumerate([6, 6, 9, 14, 40])]
    expected = [generate_alone(model, tokens, 4) for tokens in requests]
    manager = RWKV7ContinuousBatchingManager(model, model.generation_config, max_batch_size=4, max_prefill_tokens=16)
    manager.warmup()
    steps, chunks, forward = [], [], model.forward

    def recording_forward(input_ids=None, cache=None, **kwargs):
        (steps if cache is manager.cache else chunks).append(tuple(input_ids.shape))
        return forward(input_ids=input_ids, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    ids = manager.add_requests(requests, max_new_tokens=4)  # queued before the worker starts: taken in together
    manager.start()
    try:
        results = collect(manager, ids)
    finally:
        manager.stop()
    assert steps[0] == (4, 1) and set(steps) <= {(n, 1) for n in range(1, 5)}, steps
    assert chunks == [(1, 16), (1, 16), (1, 7)], chunks
    for request_id, (tokens, final_state) in zip(ids, expected):
        assert results[request_id].generated_tokens == tokens, request_id
        states_close(results[request_id].cache, 0, final_state, tol=1e-4)


def test_end_of_sequence_cancellation_and_sampling_settings(model):
    tokens = prompt(6, seed=40)
    greedy, _ = generate_alone(model, tokens, 10)
    manager = RWKV7ContinuousBatchingManager(model, model.generation_config, max_batch_size=4)
    manager.start()
    try:
        ids = {
            "eos": manager.add_request(tokens, max_new_tokens=10, eos_token_id=greedy[4]),
            "top_k=1": manager.add_request(tokens, max_new_tokens=10, temperature=5.0, top_k=1),
            "tiny top_p": manager.add_request(tokens, max_new_tokens=10, temperature=5.0, top_p=1e-6),
            "hot": manager.add_request(tokens, max_new_tokens=10, temperature=50.0, top_k=0, top_p=1.0),
        }
        results = collect(manager, list(ids.values()))
        cancelled = manager.add_request(tokens, max_new_tokens=10_000, streaming=True)
        manager.get_result(timeout=60)
        manager.cancel_request(cancelled)
        after = manager.add_request(tokens, max_new_tokens=3)  # the cancelled row was freed for it
        assert collect(manager, [after])[after].generated_tokens == greedy[:3]
    finally:
        manager.stop()
    assert results[ids["eos"]].generated_tokens == greedy[: greedy.index(greedy[4]) + 1]
    assert results[ids["top_k=1"]].generated_tokens == greedy
    assert results[ids["tiny top_p"]].generated_tokens == greedy
    assert results[ids["hot"]].generated_tokens != greedy  # 10 tokens drawn nearly uniformly from 1000


def test_what_the_manager_cannot_apply_is_refused_by_name(model):
    manager = RWKV7ContinuousBatchingManager(model, model.generation_config)
    with pytest.raises(ValueError, match="min_p"):
        manager.add_request([1, 2], min_p=0.1)
    with pytest.raises(ValueError, match="page_size"):
        model.init_continuous_batching(continuous_batching_config=ContinuousBatchingConfig(page_size=64))
    config = model.generation_config.__class__(**model.generation_config.to_dict())
    config.repetition_penalty = 1.3
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.init_continuous_batching(generation_config=config)


def test_generate_batch_runs_through_the_manager(model):
    """transformers' `generate_batch` (ContinuousMixin) on our `init_continuous_batching`."""
    requests = [prompt(4, 50), prompt(11, 51)]
    outputs = model.generate_batch(requests, max_new_tokens=5)
    assert [output.generated_tokens for output in outputs.values()] == [
        generate_alone(model, tokens, 5)[0] for tokens in requests
    ]
