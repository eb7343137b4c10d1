"""Issue 20, items 1 and 4: what generate() takes for itself (the tokenizer, stop strings, a pipeline's stop_sequence)
works on the trained default model, checked against its plain greedy output; assisted and prompt-lookup decoding,
which would crop a recurrent state, are refused by name. The published generation config samples and ends a chat
turn at its "\n\n"."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.configuration_rwkv7 import default_generation_config

FOLDER = Path(__file__).resolve().parents[1] / "models" / "rwkv7-tiny-default"
PROMPT = "User: What is the capital of France?\n\nAssistant:"
GREEDY = dict(do_sample=False, max_new_tokens=16)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return RWKV7ForCausalLM.from_pretrained(FOLDER).eval(), AutoTokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def greedy(model_and_tokenizer) -> tuple[torch.Tensor, list[int]]:
    """The prompt's ids [1, n] and the plain greedy continuation (no generate() argument but GREEDY)."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    return prompt, model.generate(prompt, **GREEDY)[0, prompt.shape[1] :].tolist()


def first_tokens_containing(tokenizer, tokens: list[int], stop: str) -> list[int]:
    """The shortest prefix of `tokens` whose text contains `stop`."""
    for end in range(1, len(tokens) + 1):
        if stop in tokenizer.decode(tokens[:end]):
            return tokens[:end]
    raise AssertionError(f"{stop!r} is not in {tokenizer.decode(tokens)!r}")


def a_stop_string(tokenizer, tokens: list[int]) -> str:
    """Three characters from the middle of the greedy text (so the stop lies inside it, not at its start)."""
    text = tokenizer.decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and text.index(stop) > 0
    return stop


def test_the_tokenizer_argument_leaves_the_tokens_as_they_are(model_and_tokenizer, greedy):
    model, tokenizer = model_and_tokenizer
    prompt, expected = greedy
    assert model.generate(prompt, tokenizer=tokenizer, **GREEDY)[0, prompt.shape[1] :].tolist() == expected


def test_stop_strings_end_the_greedy_output_where_the_text_first_holds_them(model_and_tokenizer, greedy):
    model, tokenizer = model_and_tokenizer
    prompt, greedy = greedy
    stop = a_stop_string(tokenizer, greedy)
    expected = first_tokens_containing(tokenizer, greedy, stop)
    assert len(expected) < len(greedy)
    out = model.generate(prompt, tokenizer=tokenizer, stop_strings=[stop], **GREEDY)
    assert out[0, prompt.shape[1] :].tolist() == expected


def test_a_pipelines_stop_sequence_ends_the_greedy_text(model_and_tokenizer, greedy):
    model, tokenizer = model_and_tokenizer
    _, greedy = greedy
    stop = a_stop_string(tokenizer, greedy)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    (result,) = generator(PROMPT, stop_sequence=stop, **GREEDY)
    assert result["generated_text"] == PROMPT + tokenizer.decode(first_tokens_containing(tokenizer, greedy, stop))


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3"),
        (dict(assistant_model="itself"), "assistant_model"),
        (dict(assistant_early_exit=1), "assistant_early_exit=1"),
    ],
)
def test_assisted_and_prompt_lookup_decoding_are_refused_by_name(model_and_tokenizer, settings, named):
    model, tokenizer = model_and_tokenizer
    if settings.get("assistant_model") == "itself":
        settings = dict(assistant_model=model)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=f"{named}.*assisted decoding.*cannot"):
        model.generate(prompt, **settings, **GREEDY)


def test_the_published_generation_config_is_the_default_one():
    folder_config = json.loads((FOLDER / "generation_config.json").read_text())
    expected = default_generation_config(RWKV7Config.from_pretrained(FOLDER)).to_diff_dict()
    assert {k: v for k, v in folder_config.items() if k != "transformers_version"} == {
        k: v for k, v in expected.items() if k != "transformers_version"
    }


def test_a_chat_turn_ends_at_its_blank_line(model_and_tokenizer):
    """Greedy under the folder's config: the plain greedy tokens (end of sequence only) up to the first "\n\n"."""
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer("User: Speak.\n\nAssistant: I will.", return_tensors="pt").input_ids
    (turn_end,) = tokenizer.encode("\n\n")
    plain = model.generate(prompt, eos_token_id=0, do_sample=False, max_new_tokens=8)[0, prompt.shape[1] :].tolist()
    assert turn_end in plain and len(plain) == 8, "the plain answer goes on after its blank line"
    expected = plain[: plain.index(turn_end) + 1]
    assert model.generate(prompt, do_sample=False, max_new_tokens=8)[0, prompt.shape[1] :].tolist() == expected


def test_the_published_config_samples_with_a_requests_temperature(model_and_tokenizer, greedy):
    """A request's temperature applies without asking for do_sample: two seeds at temperature 3 (top_p 1) differ."""
    model, _ = model_and_tokenizer
    prompt, _ = greedy
    assert model.generation_config.do_sample
    samples = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        samples.append(model.generate(prompt, temperature=3.0, top_p=1.0, max_new_tokens=16, eos_token_id=0))
    assert not torch.equal(*samples)
