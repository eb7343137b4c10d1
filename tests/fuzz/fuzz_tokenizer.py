"""Fuzz the RWKV World tokenizer: encode of arbitrary bytes (as UTF-8 text, invalid bytes replaced or kept as lone
surrogates, and raw through `encode_bytes`) and decode of arbitrary id lists, with `RWKV7Tokenizer` (pure Python)
and `RWKV7TokenizerFast` (tokenizers).

Invariants: for valid text both give the same ids and `decode(encode(text)) == text`; `decode_bytes(encode_bytes(b))
== b`; a decode either gives the same text in both or fails with a clear error in both.

    python tests/fuzz/fuzz_tokenizer.py -max_total_time=60
"""

import sys

import atheris
from _common import CLEAR_ERRORS, InvariantError, fuzz, run_file

with atheris.instrument_imports(include=["modeling_rwkv7"]):
    from modeling_rwkv7.tokenization_rwkv7 import VOCAB_SIZE, RWKV7Tokenizer, RWKV7TokenizerFast

SLOW = RWKV7Tokenizer()
FAST = RWKV7TokenizerFast()


def _outcome(fn, *args, **kwargs):
    """(True, result) or (False, the clear error); anything else propagates."""
    try:
        return True, fn(*args, **kwargs)
    except CLEAR_ERRORS as error:
        return False, error


def check_encode(raw: bytes, errors: str) -> None:
    text = raw.decode("utf-8", errors=errors)
    slow_ok, slow_ids = _outcome(SLOW.encode, text)
    fast_ok, fast_ids = _outcome(FAST.encode, text)
    if slow_ok != fast_ok:
        raise InvariantError(f"encode({text!r}): slow {'ok' if slow_ok else slow_ids!r}, fast {fast_ids!r}")
    if not slow_ok:
        if errors == "replace":  # valid text must encode
            raise InvariantError(f"encode of valid text {text!r} failed: {slow_ids!r}")
        return
    if slow_ids != fast_ids:
        raise InvariantError(f"encode({text!r}): slow {slow_ids} != fast {fast_ids}")
    for tokenizer in (SLOW, FAST):
        decoded = tokenizer.decode(slow_ids)
        if decoded != text:
            raise InvariantError(f"{type(tokenizer).__name__}.decode(encode({text!r})) = {decoded!r}")


def check_encode_bytes(raw: bytes) -> None:
    ids = SLOW.encode_bytes(raw)
    if SLOW.decode_bytes(ids) != raw:
        raise InvariantError(f"decode_bytes(encode_bytes({raw!r})) differs")
    if any(not 1 <= token_id < VOCAB_SIZE for token_id in ids):
        raise InvariantError(f"encode_bytes({raw!r}) gave an id outside 1..{VOCAB_SIZE - 1}: {ids}")


def check_decode(provider: atheris.FuzzedDataProvider) -> None:
    wide = provider.ConsumeBool()
    count = provider.ConsumeIntInRange(0, 64)
    if wide:  # any integer, huge and negative ones included
        ids = [provider.ConsumeInt(provider.ConsumeIntInRange(1, 12)) for _ in range(count)]
    else:
        ids = provider.ConsumeIntListInRange(count, 0, VOCAB_SIZE + 8)
    skip = provider.ConsumeBool()
    slow_ok, slow_text = _outcome(SLOW.decode, ids, skip_special_tokens=skip)
    fast_ok, fast_text = _outcome(FAST.decode, ids, skip_special_tokens=skip)
    if slow_ok != fast_ok or (slow_ok and slow_text != fast_text):
        raise InvariantError(f"decode({ids}): slow {slow_text!r}, fast {fast_text!r}")
    bytes_ok, _ = _outcome(SLOW.decode_bytes, ids)
    if bytes_ok != all(0 <= token_id < VOCAB_SIZE for token_id in ids):
        raise InvariantError(f"decode_bytes({ids}) {'accepted' if bytes_ok else 'refused'} it")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 0:
        check_encode(rest, "replace")
    elif mode == 1:
        check_encode(rest, "surrogateescape")
    elif mode == 2:
        check_encode_bytes(rest)
    else:
        check_decode(atheris.FuzzedDataProvider(rest))


SEEDS = {
    "text": b"\x00Hello, world! <|endoftext|>\n\nUser: caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80",
    "invalid": b"\x01abc\xff\xfe\xc3(\xed\xa0\x80 \r\n\t",
    "bytes": b"\x02\x00\x01\x7f\x80\xff  \n\n\xe2\x82",
    "ids": b"\x03" + bytes(range(64)),
}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replay":
        run_file(test_one_input, sys.argv[2])
    else:
        fuzz("tokenizer", test_one_input, SEEDS)
