"""The RWKV World tokenizer (vocabulary `rwkv_vocab_v20230424`), used by RWKV-7 "Goose" and earlier World models.

Encoding is greedy longest match over the UTF-8 bytes of the text, with no normalization or pre-tokenization; it
gives exactly the ids of the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`. Decoding concatenates the tokens' bytes.

Ids: 0 is `<|endoftext|>` (end of document, also used for padding); 1..65529 are the vocabulary file's tokens (byte
`b` alone is id `b + 1`); 65530..65535 are reserved: they exist in the embeddings of released models but hold no
text, so they decode to nothing.

Two classes give the same ids and texts: `RWKV7TokenizerFast` (the default of `AutoTokenizer`) runs on the
`tokenizers` library, which `DecodeStream`, `transformers serve` and offset mappings need, and writes a
`tokenizer.json` that the `tokenizers` library alone encodes exactly; `RWKV7Tokenizer` is the pure Python one.

This module only imports from transformers, tokenizers and the standard library: `save_pretrained` copies it next to
the weights, where it is loaded with `trust_remote_code=True`.
"""

import ast
import functools
import math
import os
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

VOCAB_FILES_NAMES = {"vocab_file": "rwkv_vocab_v20230424.txt"}
DEFAULT_VOCAB_FILE = Path(__file__).parent / VOCAB_FILES_NAMES["vocab_file"]

VOCAB_SIZE = 65536  # embedding rows of released RWKV World models
END_OF_TEXT = "<|endoftext|>"

# RWKV-7 G1 chat format, following BlinkDL/RWKV-LM `RWKV-v7/RWKV7-G1x-templates.txt` and the rwkv pip package's
# chat demo (ChatRWKV `API_DEMO_CHAT.py`):
#   "System: xxx\n\nUser: xxx\n\nAssistant: xxx\n\nUser: xxx\n\nAssistant:"
# - every turn is "<Role>: <content>" followed by "\n\n", the turn separator of the training data. The official demo
#   stops generating once the model writes "\n\n" and keeps it in the context, so a finished assistant turn also
#   ends with "\n\n" (which is also what a model fine-tuned on this template must learn to emit);
# - contents are cleaned as the official file asks: "\r\n" -> "\n", runs of newlines -> one "\n", outer whitespace
#   stripped. The official file says this for System and User inputs; it is applied to assistant turns too, because
#   an official context never holds "\n\n" inside an assistant turn (generation stops there);
# - `add_generation_prompt=True` appends "Assistant:" with no trailing space: the model writes the space itself.
# Splitting on "\n", dropping empty lines and joining with "\n" equals replacing every run of newlines by one
# "\n" once the result is stripped (Jinja has no regular expressions).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set role = 'System' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set role = 'User' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role = 'Assistant' -%}"
    "{%- else -%}"
    "{{- raise_exception('RWKV chat roles are system, user and assistant, got ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{%- set content = message['content'].replace('\\r\\n', '\\n').split('\\n') | reject('equalto', '')"
    " | join('\\n') | trim -%}"
    "{{- role ~ ': ' ~ content ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _byte_to_char() -> list[str]:
    """The byte-level alphabet of GPT-2 style tokenizers: a printable, non-whitespace character for each byte value.
    Bytes that are printable in Latin-1 stand for themselves; the others take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    next_free = 256
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(next_free)
            next_free += 1
    return [chars[byte] for byte in range(256)]


def token_strings(vocab_bytes: list[bytes]) -> list[str]:
    """The string of every id (`VOCAB_SIZE` of them): `<|endoftext|>`, the vocabulary tokens in the byte-level
    alphabet, then `<|reserved_<id>|>` up to `VOCAB_SIZE - 1`."""
    byte_to_char = _byte_to_char()
    strings = [END_OF_TEXT] + ["".join(byte_to_char[byte] for byte in token) for token in vocab_bytes[1:]]
    return strings + [f"<|reserved_{i}|>" for i in range(len(vocab_bytes), VOCAB_SIZE)]


def _escape(char: str) -> str:
    """`char` as a literal in a regular expression or a character class (Oniguruma and Python `re`)."""
    return "\\" + char if char.isascii() and not char.isalnum() else char


def longest_match_pattern(tokens: list[str]) -> str:
    """A regular expression whose match at a position is the longest of `tokens` starting there.

    The tokens form a trie; each node becomes `(?:<child 1>|<child 2>|...)`, followed by `?` where a token ends at the
    node. Children start with distinct characters, so at most one can continue the match, and a backtracking engine
    (Oniguruma, Python `re`) tries it before stopping at the node: the match is the deepest token-ending node on the
    path spelled by the text, i.e. the longest token. Backtracking is bounded by the longest token, so a text is
    scanned in linear time. When every single character is a token, consecutive matches tile the text: they are
    exactly the greedy longest-match tokenization.
    """
    trie = {}
    for token in tokens:
        node = trie
        for char in token:
            node = node.setdefault(char, {})
        node[""] = True  # "" marks a token end: it is no character

    def node_pattern(node: dict) -> tuple[str, int]:
        branches, leaves, size = [], [], 1
        for char, child in node.items():
            if char == "":
                continue
            if list(child) == [""]:  # a token that no longer token extends
                leaves.append(_escape(char))
                size += 1
            else:
                child_pattern, child_size = node_pattern(child)
                branches.append((child_size, _escape(char), _escape(char) + child_pattern))
                size += child_size
        # (first characters, pattern); their order does not change the match: larger subtrees first is faster
        alternatives = [(first, pattern) for _, first, pattern in sorted(branches, key=lambda branch: -branch[0])]
        if leaves:
            alternatives.append(("".join(leaves), leaves[0] if len(leaves) == 1 else "[" + "".join(leaves) + "]"))
        if len(alternatives) > 32:
            # the engine tries alternatives one by one: groups of about sqrt(n), each behind a lookahead on its
            # first characters, take some 2 * sqrt(n) tests instead of n / 2 (the root has 256 alternatives)
            width = math.isqrt(len(alternatives) - 1) + 1
            groups = [alternatives[i : i + width] for i in range(0, len(alternatives), width)]
            alternatives = [
                ("", "(?=[" + "".join(first for first, _ in group) + "])(?:" + "|".join(p for _, p in group) + ")")
                for group in groups
            ]
        group = "(?:" + "|".join(pattern for _, pattern in alternatives) + ")"
        return (group + "?" if "" in node else group), size

    return node_pattern(trie)[0]


@functools.lru_cache(maxsize=4)
def _vocabulary_and_pattern(vocab_file: str, modified_ns: int) -> tuple[dict[str, int], str]:
    """The token-string-to-id map and `longest_match_pattern` of a vocabulary file, cached per file version: building
    the pattern takes about a second, and a process may load the tokenizer many times."""
    vocab_bytes = load_rwkv_vocab(vocab_file)
    strings = token_strings(vocab_bytes)
    vocab = {token: token_id for token_id, token in enumerate(strings)}
    return vocab, longest_match_pattern(strings[1 : len(vocab_bytes)])


def build_backend(vocab_file: str | os.PathLike) -> Tokenizer:
    """The `tokenizers` pipeline of the RWKV World tokenizer with the vocabulary file `vocab_file`.

    The text's UTF-8 bytes are mapped to the byte-level alphabet (`pre_tokenizers.ByteLevel` without its GPT-2
    regex), `longest_match_pattern` of the vocabulary cuts them into tokens (every byte is a token, so the cuts are
    exactly the greedy longest match), and `models.WordLevel` looks each one up; a piece outside the vocabulary cannot
    occur and would raise rather than give an unknown id. Decoding maps the characters back to bytes
    (`decoders.ByteLevel`, invalid UTF-8 becoming U+FFFD), the reserved ids giving nothing.
    """
    vocab_file = os.path.abspath(vocab_file)
    modified_ns = os.stat(vocab_file).st_mtime_ns if os.path.isfile(vocab_file) else 0  # else load_rwkv_vocab raises
    vocab, pattern = _vocabulary_and_pattern(vocab_file, modified_ns)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.Sequence([decoders.Replace(Regex(r"\A<\|reserved_\d+\|>\z"), ""), decoders.ByteLevel()])
    return backend


def load_rwkv_vocab(vocab_file: str | os.PathLike) -> list[bytes]:
    """Read an RWKV vocabulary file (lines `<id> <Python str or bytes literal> <byte length>`, ids 1, 2, 3, ... in
    order). Returns the token bytes indexed by id, with `b""` at id 0."""
    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"RWKV vocabulary file not found: {vocab_file}")
    token_bytes = [b""]
    with open(vocab_file, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            first_space, last_space = line.find(" "), line.rfind(" ")
            try:
                token_id = int(line[:first_space])
                token = ast.literal_eval(line[first_space + 1 : last_space])
                length = int(line[last_space + 1 :])
            except (ValueError, SyntaxError) as error:
                raise ValueError(
                    f"{vocab_file}:{line_number}: expected `<id> <literal> <length>`, got {line!r}"
                ) from error
            token = token.encode("utf-8") if isinstance(token, str) else token
            if token_id != line_number or not isinstance(token, bytes) or len(token) != length:
                raise ValueError(
                    f"{vocab_file}:{line_number}: expected id {line_number} and a token of {length} bytes, got id "
                    f"{token_id} and {token!r}"
                )
            token_bytes.append(token)
    if len(token_bytes) > VOCAB_SIZE:
        raise ValueError(f"{vocab_file} has {len(token_bytes) - 1} tokens, expected at most {VOCAB_SIZE - 1}")
    return token_bytes


class RWKV7Tokenizer(PreTrainedTokenizer):
    """RWKV World tokenizer: greedy longest match over UTF-8 bytes with the `rwkv_vocab_v20230424` vocabulary.

    Token strings use the GPT-2 byte-level alphabet (a space is `Ġ`, a newline `Ċ`, and the UTF-8 bytes of "é" read
    `Ã©`); id 0 is `<|endoftext|>` and the reserved ids 65530..65535 are `<|reserved_65530|>` ...

    Args:
        vocab_file: the vocabulary file; defaults to the copy next to this module.
        eos_token, pad_token: both `<|endoftext|>` (id 0), which ends every document in RWKV training data.
        add_bos_token: prepend `<|endoftext|>` (id 0) to every encoded sequence, to start from a document boundary
            as the LAMBADA check of RWKV-LM `rwkv_v7_demo.py` does. Off by default: encoding then returns exactly the
            official ids. (transformers 5.23 `save_pretrained` does not write `add_bos_token` for any tokenizer.)
        chat_template: defaults to the RWKV-7 G1 chat format (see `CHAT_TEMPLATE`).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        eos_token: str = END_OF_TEXT,
        pad_token: str = END_OF_TEXT,
        add_bos_token: bool = False,
        chat_template: str | dict | None = CHAT_TEMPLATE,
        **kwargs,
    ):
        if vocab_file is None:
            vocab_file = DEFAULT_VOCAB_FILE
        self.vocab_file = str(vocab_file)
        self.add_bos_token = add_bos_token

        self._vocab_bytes = load_rwkv_vocab(vocab_file)
        self._build_tables()

        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            chat_template=chat_template,
            **kwargs,
        )

    def _build_tables(self) -> None:
        """Derive the lookup tables from `self._vocab_bytes` (token bytes by id, `b""` at id 0)."""
        vocab_bytes = self._vocab_bytes
        self._id_to_token = token_strings(vocab_bytes)
        self._id_to_bytes = vocab_bytes + [b""] * (VOCAB_SIZE - len(vocab_bytes))
        self._token_to_id = {token: token_id for token_id, token in enumerate(self._id_to_token)}
        # byte trie as nested dicts: `node[byte]` is a child node, `node[256]` the id of the token ending at `node`
        self._trie = {}
        for token_id in range(1, len(vocab_bytes)):
            node = self._trie
            for byte in vocab_bytes[token_id]:
                node = node.setdefault(byte, {})
            node[256] = token_id

    def __getstate__(self) -> dict:
        # pickle (multiprocessing, `datasets` fingerprints) only the vocabulary, not the tables derived from it
        derived = ("_id_to_token", "_id_to_bytes", "_token_to_id", "_trie")
        return {key: value for key, value in self.__dict__.items() if key not in derived}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._build_tables()

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._token_to_id)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes (valid UTF-8 or not) by greedy longest match, as the official `encodeBytes`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"encode_bytes takes bytes, got {type(data).__name__}: pass `text.encode('utf-8')`, or encode text "
                "with `encode` / `__call__`"
            )
        trie, ids, position, end = self._trie, [], 0, len(data)
        while position < end:
            node, cursor = trie, position
            while cursor < end:
                node = node.get(data[cursor])
                if node is None:
                    break
                cursor += 1
                token_id = node.get(256)
                if token_id is not None:
                    match_id, match_end = token_id, cursor
            # every single byte is a token, so a match always exists
            ids.append(match_id)
            position = match_end
        return ids

    def decode_bytes(self, token_ids: list[int]) -> bytes:
        """The bytes of vocabulary ids `token_ids` concatenated, as the official `decodeBytes` (no UTF-8 decoding).
        `<|endoftext|>` and the reserved ids hold no bytes."""
        data = bytearray()
        for token_id in token_ids:
            if not 0 <= token_id < VOCAB_SIZE:
                raise ValueError(f"Token id {token_id} is out of range: vocabulary ids are 0..{VOCAB_SIZE - 1}")
            data += self._id_to_bytes[token_id]
        return bytes(data)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        id_to_token = self._id_to_token
        return [id_to_token[token_id] for token_id in self.encode_bytes(text.encode("utf-8"))]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < VOCAB_SIZE:  # ids past the vocabulary are added tokens, handled by the caller
            raise ValueError(f"Token id {index} is out of range: valid ids are 0..{len(self) - 1}")
        return self._id_to_token[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Concatenate the tokens' bytes and decode them as UTF-8, bytes that do not form valid UTF-8 becoming U+FFFD
        (the official tokenizer returns a single U+FFFD for the whole text in that case). Added tokens, such as
        `<|endoftext|>`, give their own text."""
        pieces, pending = [], bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pieces.append(token)
                pending.clear()
            elif token in self._token_to_id:
                pending += self._id_to_bytes[self._token_to_id[token]]
            else:
                raise ValueError(f"Unknown token {token!r}: not in the RWKV vocabulary nor an added token")
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """`[<|endoftext|>] + ids_0 + ids_1` with `add_bos_token`, else `ids_0 + ids_1`."""
        prefix = [self.eos_token_id] if self.add_bos_token else []
        return prefix + token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        prefix = [1] if self.add_bos_token else []
        return prefix + [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        return _copy_vocabulary(self.vocab_file, save_directory, filename_prefix)


def _copy_vocabulary(vocab_file: str, save_directory: str, filename_prefix: str | None) -> tuple[str]:
    """Copy the vocabulary file into `save_directory` (the format of `load_rwkv_vocab` and the official tokenizer)."""
    if not os.path.isdir(save_directory):
        raise NotADirectoryError(f"save_vocabulary expects a directory, got {save_directory}")
    prefix = f"{filename_prefix}-" if filename_prefix else ""
    target = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
    if os.path.abspath(target) != os.path.abspath(vocab_file):
        shutil.copyfile(vocab_file, target)
    return (target,)


class RWKV7TokenizerFast(PreTrainedTokenizerFast):
    """RWKV World tokenizer on the `tokenizers` library (see `build_backend`): the ids, texts, special tokens, padding
    side and chat template of `RWKV7Tokenizer`, plus `DecodeStream`, offset mappings and batch encoding in Rust.

    `AutoTokenizer` loads this class (transformers 5 ignores `use_fast=False`); the pure Python tokenizer is
    `RWKV7Tokenizer.from_pretrained(folder)`.

    Args:
        vocab_file: the RWKV vocabulary file; defaults to the copy next to this module. It is saved with the
            tokenizer, so a folder also loads with `RWKV7Tokenizer` and the official tokenizer.
        tokenizer_file: a `tokenizer.json` written by this class, loaded instead of building the pipeline from
            `vocab_file` (it also holds the added tokens).
        eos_token, pad_token: both `<|endoftext|>` (id 0).
        add_bos_token: prepend `<|endoftext|>` (id 0) to every encoded sequence, as `RWKV7Tokenizer` does.
        chat_template: defaults to the RWKV-7 G1 chat format (see `CHAT_TEMPLATE`).
    """

    vocab_files_names = {**VOCAB_FILES_NAMES, "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    slow_tokenizer_class = RWKV7Tokenizer

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        eos_token: str = END_OF_TEXT,
        pad_token: str = END_OF_TEXT,
        add_bos_token: bool = False,
        chat_template: str | dict | None = CHAT_TEMPLATE,
        **kwargs,
    ):
        if kwargs.get("add_eos_token"):
            raise ValueError("RWKV7TokenizerFast has no add_eos_token: RWKV World text appends nothing after a text")
        self.vocab_file = str(vocab_file if vocab_file is not None else DEFAULT_VOCAB_FILE)
        if tokenizer_file is not None:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        else:
            self._tokenizer = build_backend(self.vocab_file)
        kwargs["backend"] = "tokenizers"  # a folder written by RWKV7Tokenizer says "custom"
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            chat_template=chat_template,
            **kwargs,
        )

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs) -> dict:
        # the backend is `tokenizer.json` as written (its regular expression is the tokenizer), or built from the
        # vocabulary file: never rebuilt from a vocabulary extracted by transformers
        return kwargs

    def update_post_processor(self) -> None:
        """`add_bos_token` prepends `<|endoftext|>` (id 0), as `RWKV7Tokenizer` does; nothing else is added."""
        prefix = f"{END_OF_TEXT}:0 " if self.add_bos_token else ""
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{prefix}$A:0",
            pair=f"{prefix}$A:0 $B:0",
            special_tokens=[(END_OF_TEXT, 0)] if self.add_bos_token else [],
        )

    def _decode(self, token_ids: int | list[int], **kwargs) -> str:
        ids = token_ids["input_ids"] if isinstance(token_ids, dict) else token_ids
        ids = [ids] if isinstance(ids, int) else ids
        if ids:  # ids are contiguous, so the smallest and the largest tell; `tokenizers` would skip unknown ids
            smallest = min(ids)
            extreme = smallest if smallest < 0 else max(ids)
            if extreme < 0 or extreme >= len(self) or self._tokenizer.id_to_token(extreme) is None:
                raise ValueError(f"Token id {extreme} is out of range: valid ids are 0..{len(self) - 1}")
        return super()._decode(token_ids, **kwargs)

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        """`tokenizer.json` and the RWKV vocabulary file, so that the folder also loads with `RWKV7Tokenizer`."""
        file_names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return file_names + self.save_vocabulary(str(save_directory), filename_prefix)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        return _copy_vocabulary(self.vocab_file, save_directory, filename_prefix)


__all__ = ["RWKV7Tokenizer", "RWKV7TokenizerFast"]
