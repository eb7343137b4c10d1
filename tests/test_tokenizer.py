"""RWKV7Tokenizer and RWKV7TokenizerFast against the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER` (the `rwkv` pip
package)."""

import json
import os
import pickle
import random
import re
from pathlib import Path

import pytest
import rwkv
import torch
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig, PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from modeling_rwkv7.tokenization_rwkv7 import (
    CHAT_TEMPLATE,
    VOCAB_SIZE,
    RWKV7Tokenizer,
    RWKV7TokenizerFast,
    longest_match_pattern,
)

OFFICIAL_VOCAB = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"
SHIPPED_VOCAB = Path(__file__).resolve().parent.parent / "modeling_rwkv7" / "rwkv_vocab_v20230424.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return RWKV7Tokenizer()


@pytest.fixture(scope="module")
def fast():
    return RWKV7TokenizerFast()


@pytest.fixture(scope="module")
def official():
    return TRIE_TOKENIZER(str(OFFICIAL_VOCAB))


# ---------------------------------------------------------------------------------------------------- random text


def _chars(rng, low, high, count):
    return "".join(chr(rng.randint(low, high)) for _ in range(count))


def _ascii(rng):
    return "".join(rng.choice([chr(c) for c in range(32, 127)] + ["\n", "\t"]) for _ in range(rng.randint(1, 300)))


def _code(rng):
    pieces = [
        "def ",
        "return ",
        "if ",
        "else:",
        "for i in range(",
        "self.",
        "x",
        "_id",
        " = ",
        " == ",
        "(",
        ")",
        "[",
        "]",
        "{",
        "}",
        ":",
        ",",
        ".",
        "0x1F",
        "42",
        "'str'",
        '"s"',
        "#",
        "//",
        "/*",
        "*/",
        "->",
        "=>",
    ]
    lines = []
    for _ in range(rng.randint(1, 12)):
        indent = rng.choice(["", "    ", "        ", "\t", "\t\t"])
        lines.append(indent + "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))))
    return rng.choice(["\n", "\r\n"]).join(lines)


def _whitespace(rng):
    # runs longer than the longest token (128 bytes) as well as short mixed ones
    units = [" ", "\t", "\n", "\r\n", "\u3000", "\xa0"]
    run_lengths = [1, 2, 3, 7, 64, 127, 128, 129, 300]
    return "".join(rng.choice(units) * rng.choice(run_lengths) for _ in range(rng.randint(1, 4)))


def _cjk(rng):
    ranges = [(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x3000, 0x303F), (0xFF00, 0xFFEF)]
    return "".join(_chars(rng, *rng.choice(ranges), rng.randint(1, 8)) for _ in range(rng.randint(1, 10)))


def _emoji(rng):
    singles = [_chars(rng, 0x1F300, 0x1FAFF, 1) for _ in range(8)]
    sequences = ["👨\u200d👩\u200d👧", "👍🏽", "🇯🇵", "❤️", "🏳️\u200d🌈", "1️⃣", "🪿"]
    return "".join(rng.choice(singles + sequences + [" ", "!"]) for _ in range(rng.randint(1, 20)))


def _mixed_scripts(rng):
    words = [
        "hello",
        " world",
        "Привет",
        " мир",
        "γειά",
        "مرحبا",
        "नमस्ते",
        "สวัสดี",
        "שלום",
        "中文",
        "日本語",
        "한국어",
        "café",
        "naïve",
        "e\u0301",
        "Ω≈ç√",
        "😀",
        "\n\n",
        "  ",
        "ß",
        "ﬁ",
        "ｆｕｌｌ",
    ]
    return "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))


def _any_code_point(rng):
    def one():
        while True:
            c = rng.choice(
                [
                    rng.randint(0, 0x7F),
                    rng.randint(0x80, 0x7FF),
                    rng.randint(0x800, 0xFFFF),
                    rng.randint(0x10000, 0x10FFFF),
                ]
            )
            if not 0xD800 <= c <= 0xDFFF:
                return chr(c)

    return "".join(one() for _ in range(rng.randint(1, 60)))


def _vocab_tokens(rng, official):
    # neighbouring tokens make the longest match cross token boundaries in every way
    tokens = [official.idx2token[rng.randint(1, 65529)] for _ in range(rng.randint(1, 30))]
    return b"".join(tokens).decode("utf-8", errors="ignore")


GENERATORS = [_ascii, _code, _whitespace, _cjk, _emoji, _mixed_scripts, _any_code_point]


def random_texts(seed, count, official):
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        if i % (len(GENERATORS) + 1) == len(GENERATORS):
            texts.append(_vocab_tokens(rng, official))
        else:
            texts.append(GENERATORS[i % (len(GENERATORS) + 1)](rng))
    return texts


# ------------------------------------------------------------------------------------------------ official parity


def test_shipped_vocab_is_the_official_one_with_lf_line_endings():
    assert SHIPPED_VOCAB.read_bytes() == OFFICIAL_VOCAB.read_bytes().replace(b"\r\n", b"\n")
    assert b"\r\n" not in SHIPPED_VOCAB.read_bytes()


@pytest.mark.parametrize("seed", [0, 1])
def test_ids_match_official_on_random_text(tokenizer, official, seed):
    texts = random_texts(seed, 160, official)
    assert len(set(texts)) > 150
    for text in texts:
        expected = official.encode(text)
        assert tokenizer.encode(text) == expected, text
        assert tokenizer(text)["input_ids"] == expected, text
        assert tokenizer.decode(expected) == text
        assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text


def test_batch_encoding_matches_official(tokenizer, official):
    texts = random_texts(7, 40, official)
    assert tokenizer(texts)["input_ids"] == [official.encode(text) for text in texts]
    assert tokenizer.batch_decode([official.encode(text) for text in texts]) == texts


def test_long_text_matches_official(tokenizer, official):
    text = "".join(random_texts(3, 400, official))
    assert len(text.encode("utf-8")) > 20_000
    assert tokenizer.encode(text) == official.encode(text)


@pytest.mark.parametrize("byte", range(256))
def test_every_byte_value(tokenizer, official, byte):
    # as a one-character string (U+0080..U+00FF take two UTF-8 bytes) and as one raw byte
    text = chr(byte)
    assert tokenizer.encode(text) == official.encode(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_bytes(bytes([byte])) == official.encodeBytes(bytes([byte])) == [byte + 1]
    assert tokenizer.decode_bytes([byte + 1]) == bytes([byte])


def test_random_bytes_match_official(tokenizer, official):
    rng = random.Random(11)
    for _ in range(100):
        data = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 200)))
        ids = tokenizer.encode_bytes(data)
        assert ids == official.encodeBytes(data)
        assert tokenizer.decode_bytes(ids) == data
        assert tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


INVALID_UTF8 = [
    b"\x80",  # lone continuation byte
    b"\xbf\xbf\xbf",
    b"\xc3",  # truncated two-byte sequence
    b"\xc3(",
    b"\xe4\xb8",  # truncated CJK character
    b"\xf0\x9f\x98",  # truncated emoji
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # encoded surrogate U+D800
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xfe\xff",
    b"ok \xff\xfe then \xe4\xb8\xad\xe6\x96\x87 and \xf0\x9f",
]


@pytest.mark.parametrize("data", INVALID_UTF8)
def test_invalid_utf8_bytes_match_official(tokenizer, official, data):
    ids = tokenizer.encode_bytes(data)
    assert ids == official.encodeBytes(data)
    assert tokenizer.decode_bytes(ids) == official.decodeBytes(ids) == data
    # errors="replace" where the official decoder collapses the whole text to one U+FFFD
    assert official.decode(ids) == "\ufffd"
    assert tokenizer.decode(ids) == data.decode("utf-8", errors="replace")


def test_decoding_a_split_multibyte_character(tokenizer, official):
    text = "a😀中"
    ids = official.encode(text)
    assert tokenizer.encode(text) == ids
    data = text.encode("utf-8")
    for cut in range(len(ids) + 1):
        head = tokenizer.decode_bytes(ids[:cut])
        assert data.startswith(head)
        assert tokenizer.decode(ids[:cut]) == head.decode("utf-8", errors="replace")
        if official.decode(ids[:cut]) != "\ufffd":
            assert tokenizer.decode(ids[:cut]) == official.decode(ids[:cut])
    assert tokenizer.decode(ids) == text


def test_lone_surrogate_is_rejected_like_official(tokenizer, official):
    with pytest.raises(UnicodeEncodeError):
        official.encode("a\ud800b")
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        tokenizer.encode("a\ud800b")


# ------------------------------------------------------------------------------------------- tokens and vocabulary


def test_vocabulary_and_token_strings_are_consistent(tokenizer, official):
    vocab = tokenizer.get_vocab()
    assert tokenizer.vocab_size == len(vocab) == len(tokenizer) == VOCAB_SIZE == 65536
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    tokens = tokenizer.convert_ids_to_tokens(list(range(VOCAB_SIZE)))
    assert all(vocab[token] == token_id for token_id, token in enumerate(tokens))
    assert tokenizer.convert_tokens_to_ids(tokens) == list(range(VOCAB_SIZE))
    # byte-level alphabet: printable, no whitespace, one character per byte
    assert tokens[0] == "<|endoftext|>"
    assert tokens[1 + ord(" ")] == "Ġ" and tokens[1 + ord("\n")] == "Ċ" and tokens[1 + ord("A")] == "A"
    assert len(set(tokens[1:257])) == 256 and all(len(token) == 1 for token in tokens[1:257])
    for token_id in range(1, 65530):
        assert len(tokens[token_id]) == len(official.idx2token[token_id])
        assert not any(char.isspace() for char in tokens[token_id])
        assert tokenizer.decode_bytes([token_id]) == official.idx2token[token_id]
    assert tokens[65530:] == [f"<|reserved_{i}|>" for i in range(65530, 65536)]


def test_special_tokens(tokenizer, official):
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.bos_token is None and tokenizer.add_bos_token is False
    assert tokenizer.encode("hello") == official.encode("hello")  # nothing prepended or appended
    # the special token's text becomes id 0, unless special tokens are split
    text = "one<|endoftext|>two"
    assert tokenizer.encode(text) == official.encode("one") + [0] + official.encode("two")
    assert tokenizer.encode(text, split_special_tokens=True) == official.encode(text)
    ids = official.encode("a") + [0] + official.encode("b")
    assert tokenizer.decode(ids) == "a<|endoftext|>b"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    # the reserved ids hold no text
    assert tokenizer.decode(official.encode("x") + [65530, 65535] + official.encode("y")) == "xy"


def test_add_bos_token_prepends_end_of_text(official):
    tokenizer = RWKV7Tokenizer(add_bos_token=True)
    encoded = tokenizer("hello world", return_special_tokens_mask=True)
    assert encoded["input_ids"] == [0] + official.encode("hello world")
    assert encoded["special_tokens_mask"] == [1] + [0] * len(official.encode("hello world"))
    assert tokenizer.encode("hello world", add_special_tokens=False) == official.encode("hello world")


def test_added_tokens_come_after_the_vocabulary(official):
    tokenizer = RWKV7Tokenizer()
    assert tokenizer.add_tokens(["<tool>"], special_tokens=True) == 1
    assert tokenizer.convert_tokens_to_ids("<tool>") == VOCAB_SIZE and len(tokenizer) == VOCAB_SIZE + 1
    assert tokenizer.encode("a<tool>b") == official.encode("a") + [VOCAB_SIZE] + official.encode("b")
    assert tokenizer.decode([VOCAB_SIZE] + official.encode("中")) == "<tool>中"


def test_pickle_round_trip(tokenizer, official):
    # what multiprocessing workers and `datasets` fingerprints see: the vocabulary, not the derived lookup tables
    data = pickle.dumps(tokenizer)
    assert len(data) < 1_000_000
    restored = pickle.loads(data)
    text = "pickled 中文 😀 text\n\n"
    assert restored.encode(text) == official.encode(text)
    assert restored.decode(official.encode(text)) == text
    assert restored.get_vocab() == tokenizer.get_vocab()


# -------------------------------------------------------------------------------------------------------- batching


def test_batch_is_left_padded_with_attention_mask(tokenizer, official):
    texts = ["hi", "a longer sentence, with 中文 and 😀", "mid length"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = [len(official.encode(text)) for text in texts]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    assert batch["input_ids"].dtype == torch.long
    for row, (text, length) in enumerate(zip(texts, lengths)):
        pad = width - length
        assert batch["input_ids"][row].tolist() == [0] * pad + official.encode(text)
        assert batch["attention_mask"][row].tolist() == [0] * pad + [1] * length
    assert "token_type_ids" not in batch
    right = tokenizer(texts, padding=True, padding_side="right")
    assert right["input_ids"][0] == official.encode(texts[0]) + [0] * (width - lengths[0])


# --------------------------------------------------------------------------------------------------- chat template


def test_chat_template_two_turns_with_system(tokenizer, official):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is RWKV?"},
        {"role": "assistant", "content": "An RNN with transformer-level performance."},
        {"role": "user", "content": "Is it fast?"},
    ]
    expected = (
        "System: You are a helpful assistant.\n\n"
        "User: What is RWKV?\n\n"
        "Assistant: An RNN with transformer-level performance.\n\n"
        "User: Is it fast?\n\n"
        "Assistant:"
    )
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == official.encode(
        expected
    )
    finished = messages + [{"role": "assistant", "content": "Yes."}]
    assert tokenizer.apply_chat_template(finished, tokenize=False) == expected + " Yes.\n\n"


def test_chat_template_cleans_contents_like_the_official_recipe(tokenizer):
    # RWKV-LM RWKV-v7/RWKV7-G1x-templates.txt: "\r\n" -> "\n", runs of "\n" -> one "\n", then strip
    def clean(text):
        return re.sub(r"\n{2,}", "\n", text.replace("\r\n", "\n")).strip()

    rng = random.Random(5)
    units = ["a", "b c", " ", "\t", "\n", "\r\n", "中", "😀", "  x  "]
    for _ in range(50):
        contents = ["".join(rng.choice(units) for _ in range(rng.randint(1, 15))) for _ in range(3)]
        roles = ["system", "user", "assistant"]
        messages = [{"role": role, "content": content} for role, content in zip(roles, contents)]
        expected = "".join(f"{role.capitalize()}: {clean(content)}\n\n" for role, content in zip(roles, contents))
        assert tokenizer.apply_chat_template(messages, tokenize=False) == expected, contents


def test_chat_template_rejects_unknown_roles(tokenizer):
    with pytest.raises(Exception, match="system, user and assistant, got tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


# ----------------------------------------------------------------------------------------------- saving, Auto class


def test_save_and_load_round_trip(tmp_path, official):
    tokenizer = RWKV7Tokenizer()
    assert Path(tokenizer.vocab_file) == SHIPPED_VOCAB
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == SHIPPED_VOCAB.read_bytes()
    loaded = RWKV7Tokenizer.from_pretrained(tmp_path)
    assert Path(loaded.vocab_file) == tmp_path / "rwkv_vocab_v20230424.txt"
    text = "Round trip: 中文, emoji 😀, code `x = 1`\n\n"
    assert loaded.encode(text) == official.encode(text)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.padding_side, loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token) == ("left", 0, 0, None)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    # saving a loaded tokenizer into its own folder keeps the vocabulary intact
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == SHIPPED_VOCAB.read_bytes()


def test_auto_tokenizer_with_remote_code(tmp_path, monkeypatch, official):
    monkeypatch.setattr(RWKV7Tokenizer, "_auto_class", None)
    RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")
    RWKV7Tokenizer().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_rwkv7.RWKV7Tokenizer", None]}
    assert config["tokenizer_class"] == "RWKV7Tokenizer"
    shipped_module = Path(__file__).resolve().parent.parent / "modeling_rwkv7" / "tokenization_rwkv7.py"
    assert (tmp_path / "tokenization_rwkv7.py").read_text() == shipped_module.read_text()
    assert (tmp_path / "rwkv_vocab_v20230424.txt").is_file()

    text = "Remote code: 中文 😀"
    # where modeling_rwkv7 is imported its registered class wins; elsewhere the copied module is used (below)
    loaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is RWKV7TokenizerFast
    assert loaded.encode(text) == official.encode(text)

    remote_class = get_class_from_dynamic_module("tokenization_rwkv7.RWKV7Tokenizer", tmp_path)
    assert remote_class.__name__ == "RWKV7Tokenizer" and remote_class.__module__ != RWKV7Tokenizer.__module__
    remote = remote_class.from_pretrained(tmp_path)
    assert Path(remote.vocab_file) == tmp_path / "rwkv_vocab_v20230424.txt"
    assert remote.encode(text) == official.encode(text)
    assert remote.padding_side == "left" and remote.chat_template == CHAT_TEMPLATE


class _TokenizerTestConfig(PreTrainedConfig):
    model_type = "rwkv7-tokenizer-test"


def test_auto_tokenizer_registered_for_a_config(tmp_path, official):
    AutoConfig.register(_TokenizerTestConfig.model_type, _TokenizerTestConfig, exist_ok=True)
    AutoTokenizer.register(
        _TokenizerTestConfig,
        slow_tokenizer_class=RWKV7Tokenizer,
        fast_tokenizer_class=RWKV7TokenizerFast,
        exist_ok=True,
    )
    _TokenizerTestConfig().save_pretrained(tmp_path)
    RWKV7Tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)  # transformers 5 loads the fast class (it ignores use_fast)
    assert type(loaded) is RWKV7TokenizerFast
    assert loaded.encode("registered 中文") == official.encode("registered 中文")


# ---------------------------------------------------------------------------------------------------------- errors


def test_missing_vocab_file_names_the_path(tmp_path):
    missing = tmp_path / "no_such_vocab.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        RWKV7Tokenizer(vocab_file=missing)


def test_malformed_vocab_file_names_the_line(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 '\\x00' 1\n2 'ab' 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2") + ".*3 bytes"):
        RWKV7Tokenizer(vocab_file=bad)


@pytest.mark.parametrize("bad_id", [65536, 70000, -1])
def test_out_of_range_id_names_the_id_and_the_range(tokenizer, bad_id):
    with pytest.raises(ValueError, match=f"Token id {bad_id} is out of range: valid ids are 0..65535"):
        tokenizer.decode([5, bad_id])
    with pytest.raises(ValueError, match=f"Token id {bad_id} is out of range: vocabulary ids are 0..65535"):
        tokenizer.decode_bytes([5, bad_id])


def test_unknown_token_string_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="Unknown token 'not a token'"):
        tokenizer.convert_tokens_to_string(["Hello", "not a token"])
    assert tokenizer.convert_tokens_to_ids("not a token") is None


# ------------------------------------------------------------------------------------------- fast tokenizer (Rust)


def _token_prefixes(rng, official):
    # proper prefixes of long tokens: the longest match must back off from a token it almost matched
    long_tokens = [token for token in official.idx2token.values() if len(token) >= 6]
    pieces = []
    for _ in range(rng.randint(1, 20)):
        token = rng.choice(long_tokens)
        pieces.append(token[: rng.randint(1, len(token) - 1)] if rng.random() < 0.7 else token)
    return b"".join(pieces).decode("utf-8", errors="ignore")


def _long_runs(rng):
    # runs far longer than the longest token (128 bytes), of units that long tokens repeat
    units = [" ", "\n", "=", "-", "#", "*", "/", "ab", " =", "\t", "0", "中", "😀", "ー", "..", "\r\n"]
    return "".join(rng.choice(units) * rng.randint(1, 700) + rng.choice(["", "x", " y", "\n"]) for _ in range(4))


def adversarial_texts(seed, count, official):
    rng = random.Random(seed)
    generators = [_token_prefixes, _vocab_tokens, _long_runs, _any_code_point, _whitespace]
    texts = []
    for i in range(count):
        generator = generators[i % len(generators)]
        texts.append(generator(rng, official) if generator in (_token_prefixes, _vocab_tokens) else generator(rng))
    return texts


def _greedy_longest_match(text, vocabulary):
    pieces, position, longest = [], 0, max(map(len, vocabulary))
    while position < len(text):
        end = next(
            end for end in range(min(len(text), position + longest), position, -1) if text[position:end] in vocabulary
        )
        pieces.append(text[position:end])
        position = end
    return pieces


def test_longest_match_pattern_is_greedy_longest_match():
    # a toy vocabulary where backing off matters ("abcd" is no token, so "abcx" is "abc" + "x"), with regex
    # metacharacters, and more than 32 first characters (grouped behind lookaheads)
    assert re.findall(longest_match_pattern(["a", "b", "c", "d", "x", "ab", "abc", "abcde"]), "abcdabcxabcdeab") == [
        "abc",
        "d",
        "abc",
        "x",
        "abcde",
        "ab",
    ]
    rng = random.Random(9)
    alphabet = [chr(c) for c in range(33, 127)] + ["é", "Ġ", "中"]
    vocabulary = set(alphabet)
    for _ in range(400):
        vocabulary.add(
            "".join(
                rng.choice(alphabet[:12] + ["(", "[", "\\", "^", "-", "]", "?", "*", "é"])
                for _ in range(rng.randint(2, 7))
            )
        )
    token_list = sorted(vocabulary)
    pattern = re.compile(longest_match_pattern(token_list))
    for _ in range(200):
        text = "".join(rng.choice(token_list)[: rng.randint(1, 7)] for _ in range(rng.randint(1, 40)))
        assert pattern.findall(text) == _greedy_longest_match(text, vocabulary)


def test_fast_ids_match_official_on_random_and_adversarial_text(fast, official):
    texts = random_texts(0, 160, official) + adversarial_texts(1, 250, official) + [chr(c) for c in range(256)]
    expected = [official.encode(text) for text in texts]
    assert fast(texts)["input_ids"] == expected
    assert [fast.encode(text) for text in texts[::7]] == expected[::7]
    assert fast.batch_decode(expected) == texts


def test_tokenizer_json_alone_is_exact(fast, official):
    # what another runtime reads: the serialized `tokenizers` pipeline, without transformers or this package
    backend = Tokenizer.from_str(fast.backend_tokenizer.to_str())
    texts = adversarial_texts(2, 100, official) + random_texts(3, 40, official)
    texts.append("".join(texts))  # all of them as one text
    assert [encoding.ids for encoding in backend.encode_batch(texts)] == [official.encode(text) for text in texts]
    # a long run is tokenized in linear time (a quadratic scan would take minutes here)
    text = " " * 300_000 + "=" * 300_000 + "ab" * 200_000
    assert backend.encode(text).ids == official.encode(text)


def test_fast_offsets_cover_the_tokens(fast, tokenizer, official):
    # a token that holds part of a character spans that whole character
    text = "héllo 中文😀 world\n\n  x"
    encoded = fast(text, return_offsets_mapping=True)
    assert encoded["input_ids"] == official.encode(text)
    offsets = encoded["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for token_id, (start, end), (next_start, _) in zip(encoded["input_ids"], offsets, offsets[1:] + [(len(text), 0)]):
        assert tokenizer.decode_bytes([token_id]) in text[start:end].encode("utf-8")
        assert start <= next_start <= end


def test_fast_decode_matches_slow_on_any_ids(fast, tokenizer):
    # random ids (reserved and <|endoftext|> included) split UTF-8 characters between tokens in every way
    rng = random.Random(4)
    for _ in range(300):
        ids = [rng.choice([rng.randint(0, VOCAB_SIZE - 1), rng.randint(0, 300), 0, 65533]) for _ in range(20)]
        for skip in (False, True):
            assert fast.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)
    for data in INVALID_UTF8:
        ids = tokenizer.encode_bytes(data)
        assert fast.decode(ids) == data.decode("utf-8", errors="replace")


def test_decode_stream_equals_full_decode(fast, official):
    # what `transformers serve` does: DecodeStream(...).step(tokenizer._tokenizer, token_id) per generated token
    rng = random.Random(6)
    sequences = [official.encode(text) for text in adversarial_texts(7, 60, official) + random_texts(8, 40, official)]
    sequences += [[rng.randint(0, VOCAB_SIZE - 1) for _ in range(30)] for _ in range(40)]  # invalid UTF-8 too
    sequences += [official.encode("a") + [0] + official.encode("中😀") + [65531] + official.encode("b")]
    checked = 0
    for ids in sequences:
        for skip in (False, True):
            stream = DecodeStream(skip_special_tokens=skip)
            chunks = [stream.step(fast._tokenizer, token_id) for token_id in ids]
            streamed = "".join(chunk for chunk in chunks if chunk is not None)
            full = fast.decode(ids, skip_special_tokens=skip)
            # a stream holds back a text that ends in U+FFFD: more bytes could complete the character
            if full.endswith("\ufffd"):
                assert full.startswith(streamed)
            else:
                assert streamed == full
                checked += 1
    assert checked > 250


def test_fast_equals_slow_special_tokens_and_padding(fast, tokenizer, official):
    text = "one<|endoftext|>two"
    assert fast.encode(text) == tokenizer.encode(text) == official.encode("one") + [0] + official.encode("two")
    assert fast.encode(text, split_special_tokens=True) == official.encode(text)
    assert (fast.eos_token_id, fast.pad_token_id, fast.bos_token, fast.padding_side) == (0, 0, None, "left")
    assert fast.vocab_size == len(fast) == VOCAB_SIZE and fast.get_vocab() == tokenizer.get_vocab()
    ids = list(range(VOCAB_SIZE))
    assert fast.convert_ids_to_tokens(ids) == tokenizer.convert_ids_to_tokens(ids)
    texts = ["hi", "a longer sentence, with 中文 and 😀"]
    assert fast(texts, padding=True)["input_ids"] == tokenizer(texts, padding=True)["input_ids"]
    assert fast("a", "b")["input_ids"] == tokenizer("a", "b")["input_ids"]
    with_bos = [RWKV7TokenizerFast(add_bos_token=True), RWKV7Tokenizer(add_bos_token=True)]
    for bos, pair in [(False, [fast, tokenizer]), (True, with_bos)]:
        encoded = [t("hello", return_special_tokens_mask=True) for t in pair]
        assert encoded[0]["input_ids"] == encoded[1]["input_ids"] == [0] * bos + official.encode("hello")
        assert encoded[0]["special_tokens_mask"] == encoded[1]["special_tokens_mask"]
    with pytest.raises(ValueError, match="Token id 65536 is out of range: valid ids are 0..65535"):
        fast.decode([5, 65536])
    with pytest.raises(ValueError, match="no add_eos_token"):
        RWKV7TokenizerFast(add_eos_token=True)


def test_fast_added_tokens_and_chat_template(official):
    fast, slow = RWKV7TokenizerFast(), RWKV7Tokenizer()
    for t in (fast, slow):
        assert t.add_tokens(["<tool>"], special_tokens=True) == 1
    expected = official.encode("a") + [VOCAB_SIZE] + official.encode("b")
    assert fast.encode("a<tool>b") == slow.encode("a<tool>b") == expected
    assert fast.decode([VOCAB_SIZE] + official.encode("中")) == "<tool>中"
    messages = [
        {"role": "system", "content": "Be brief.\n\n\nVery."},
        {"role": "user", "content": "Hi 中文 😀\r\n"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Again?"},
    ]
    text = slow.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = fast.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == slow.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == official.encode(text)


def test_fast_save_and_load_round_trip(tmp_path, fast, official):
    fast.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "rwkv_vocab_v20230424.txt"} <= set(os.listdir(tmp_path))
    assert (tmp_path / "rwkv_vocab_v20230424.txt").read_bytes() == SHIPPED_VOCAB.read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # the slow class name: transformers resolves it to the fast class registered with it
    assert config["tokenizer_class"] == "RWKV7Tokenizer"
    text = "Round trip: 中文, emoji 😀, code `x = 1`\n\n<|endoftext|>"
    expected = official.encode(text[: -len("<|endoftext|>")]) + [0]
    for loaded in (RWKV7TokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert type(loaded) is RWKV7TokenizerFast
        assert loaded.encode(text) == expected and loaded.decode(expected) == text
        assert loaded.chat_template == CHAT_TEMPLATE and (loaded.padding_side, loaded.pad_token_id) == ("left", 0)
    assert RWKV7Tokenizer.from_pretrained(tmp_path).encode(text) == expected
    # transformers alone (no RWKV class at all) reads tokenizer.json into its generic fast tokenizer
    generic = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert generic.encode(text) == expected and generic.decode(expected) == text


def test_default_model_folder_loads_the_fast_tokenizer(official):
    folder = Path(__file__).resolve().parent.parent / "models" / "rwkv7-tiny-default"
    loaded = AutoTokenizer.from_pretrained(folder)
    assert type(loaded) is RWKV7TokenizerFast
    assert loaded.encode("ROMEO:\n中文") == official.encode("ROMEO:\n中文")


def test_fast_auto_tokenizer_with_remote_code(tmp_path, monkeypatch, official):
    monkeypatch.setattr(RWKV7TokenizerFast, "_auto_class", None)
    RWKV7TokenizerFast.register_for_auto_class("AutoTokenizer")
    RWKV7TokenizerFast().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {
        "AutoTokenizer": ["tokenization_rwkv7.RWKV7Tokenizer", "tokenization_rwkv7.RWKV7TokenizerFast"]
    }
    remote_class = get_class_from_dynamic_module("tokenization_rwkv7.RWKV7TokenizerFast", tmp_path)
    assert remote_class.__module__ != RWKV7TokenizerFast.__module__
    remote = remote_class.from_pretrained(tmp_path)
    text = "Remote code: 中文 😀"
    assert remote.encode(text) == official.encode(text) and remote.decode(official.encode(text)) == text


def test_encode_bytes_refuses_text(tokenizer):
    with pytest.raises(TypeError, match="encode_bytes takes bytes, got str: pass `text.encode"):
        tokenizer.encode_bytes("abc")
