"""The RWKV World tokenizer (vocabulary `rwkv_vocab_v20230424`), used by RWKV-7 "Goose" and earlier World models.

Encoding is greedy longest match over the UTF-8 bytes of the text, with no normalization or pre-tokenization; it
gives exactly the ids of the official `rwkv.rwkv_tokenizer.TRIE_TOKENIZER`. Decoding concatenates the tokens' bytes.

Ids: 0 is `<|endoftext|>` (end of document, also used for padding); 1..65529 are the vocabulary file's tokens (byte
`b` alone is id `b + 1`); 65530..65535 are reserved: they exist in the embeddings of released models but hold no
text, so they decode to nothing.

This module only imports from transformers and the standard library: `save_pretrained` copies it next to the
weights, where it is loaded with `trust_remote_code=True`.
"""

import ast
import os
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizer


VOCAB_FILES_NAMES = {"vocab_file": "rwkv_vocab_v20230424.txt"}

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
            vocab_file = Path(__file__).parent / VOCAB_FILES_NAMES["vocab_file"]
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
        byte_to_char = _byte_to_char()
        self._id_to_token = [END_OF_TEXT] + ["".join(byte_to_char[b] for b in token) for token in vocab_bytes[1:]]
        self._id_to_token += [f"<|reserved_{i}|>" for i in range(len(vocab_bytes), VOCAB_SIZE)]
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
        """Copy the vocabulary file into `save_directory` (the format `load_rwkv_vocab` and the official tokenizer
        read)."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_vocabulary expects a directory, got {save_directory}")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        target = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


__all__ = ["RWKV7Tokenizer"]
