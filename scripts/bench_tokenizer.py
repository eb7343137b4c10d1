"""Encode and decode throughput (MB/s of UTF-8 text) of the RWKV World tokenizers, and whether their ids are exact.

Tokenizers: ours (`RWKV7Tokenizer`, pure Python; `RWKV7TokenizerFast`, the `tokenizers` library), the official one
(`rwkv.rwkv_tokenizer.TRIE_TOKENIZER`) and the Rust ones on PyPI (`pyrwkv-tokenizer`, `rwkv-tokenizer`) when
installed. The corpus: the Shakespeare validation set, this package's Python sources and generated multilingual text
(CJK, Cyrillic, emoji), about 0.5 MB. "one text" encodes the whole corpus as one string, "documents" its ~1,000
documents as one batch (the Rust tokenizers' batch calls use several threads), "decode" turns the corpus ids back into
text. "exact" compares ids and decoded text with the official tokenizer's. Each cell is MB/s by wall-clock time / by
process CPU time (all threads; steadier on a shared machine), medians of `--reps` runs after a warm-up. The CPU
model, core count and load average are printed, since results depend on them.

    python scripts/bench_tokenizer.py [--reps 3]
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
from pathlib import Path

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from modeling_rwkv7.measured_rwkv7 import machine, median_seconds
from modeling_rwkv7.tokenization_rwkv7 import RWKV7Tokenizer, RWKV7TokenizerFast

REPO = Path(__file__).resolve().parent.parent


def corpus_documents() -> list[str]:
    """Shakespeare scenes, Python sources and generated multilingual paragraphs, in a fixed order."""
    documents = [json.loads(line)["text"] for line in (REPO / "data/shakespeare/validation.jsonl").open()]
    # the official tokenizer has no special tokens: the sources' "<|endoftext|>" would encode differently
    documents += [
        path.read_text().replace("<|endoftext|>", "<|end of text|>")
        for path in sorted((REPO / "modeling_rwkv7").glob("*.py"))
    ]
    rng = random.Random(0)
    words = ["Привет", "мир", "中文", "日本語の文章", "한국어", "café", "naïve", "😀", "👍🏽", "γειά", "مرحبا", "नमस्ते"]
    for _ in range(300):
        documents.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) + "\n\n")
    return documents


def candidates() -> tuple[dict[str, tuple], TRIE_TOKENIZER]:
    """name -> (encode one text, encode a list of texts, decode ids), and the official tokenizer."""
    slow, fast = RWKV7Tokenizer(), RWKV7TokenizerFast()
    official = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    found = {
        "ours, RWKV7Tokenizer (Python)": (
            slow.encode,
            lambda texts: slow(texts)["input_ids"],
            slow.decode,
        ),
        "ours, RWKV7TokenizerFast (tokenizers)": (
            fast.encode,
            lambda texts: fast(texts)["input_ids"],
            fast.decode,
        ),
        "rwkv TRIE_TOKENIZER (official, Python)": (
            official.encode,
            lambda texts: [official.encode(text) for text in texts],
            official.decode,
        ),
    }
    for package in ("pyrwkv_tokenizer", "rwkv_tokenizer"):
        if importlib.util.find_spec(package) is None:
            print(f"{package} is not installed: `pip install {package.replace('_', '-')}` to include it")
            continue
        module = importlib.import_module(package)
        rust = module.RWKVTokenizer()
        version = importlib.metadata.version(package.replace("_", "-"))
        # rwkv-tokenizer 0.5.2 (the last with wheels) has no encode_batch
        encode_batch = getattr(rust, "encode_batch", None) or (lambda texts, rust=rust: list(map(rust.encode, texts)))
        found[f"{package} {version} (Rust)"] = (rust.encode, encode_batch, rust.decode)
    return found, official


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    documents = corpus_documents()
    text = "".join(documents)
    size_mb = len(text.encode("utf-8")) / 1e6
    found, official = candidates()
    expected_ids = official.encode(text)
    expected_batch = [official.encode(document) for document in documents]

    print(
        f"CPU: {machine()['cpu']}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"corpus {size_mb:.2f} MB, "
        f"{len(documents)} documents, {len(expected_ids)} tokens; MB/s by wall / by CPU time, median of {args.reps}"
    )
    print(f"| {'tokenizer':<40} | encode, one text | encode, documents | decode        | exact |")
    print(f"|{'-' * 42}|------------------|-------------------|---------------|-------|")
    for name, (encode, encode_batch, decode) in found.items():
        ids, batch = encode(text), encode_batch(documents)
        exact = ids == expected_ids and batch == expected_batch and decode(expected_ids) == text
        rates = []
        for run in (lambda: encode(text), lambda: encode_batch(documents), lambda: decode(expected_ids)):
            wall, cpu = median_seconds(run, args.reps)
            rates.append(f"{size_mb / wall:5.1f} / {size_mb / cpu:5.1f}")
        print(f"| {name:<40} | {rates[0]:>16} | {rates[1]:>17} | {rates[2]:>13} | {'yes' if exact else 'NO':<5} |")


if __name__ == "__main__":
    main()
