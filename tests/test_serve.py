"""Issue 20: `transformers serve` (through scripts/serve.py) serves the default model to the official `openai`
client: completions and chat, streamed and not, with `stop` and sampling honoured, greedy answers equal to
in-process generate(); with `--continuous-batching`, 16 concurrent requests each get what they get alone, in less
time than one after another."""

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai  # the `test` extra has it, with transformers serve's fastapi and uvicorn
import pytest
import torch
from helpers import installed_environment
from transformers import AutoTokenizer

from modeling_rwkv7 import RWKV7ForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "models" / "rwkv7-tiny-default"
MODEL = "models/rwkv7-tiny-default"  # as the server names it (the command line's, relative to the repository)
PROMPT = "User: What is the capital of France?\n\nAssistant:"
# 16 prompts with 10 different greedy answers from the default model
OPENINGS = ["Tell me of the", "I love", "Come,", "O", "Farewell", "What", "My lord", "Good", "Thou art", "Why", "Alas",
            "Here", "Now", "Then", "And so", "Sweet"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(target, *options: str) -> tuple[subprocess.Popen, str]:
    """The README's launcher, run from a fresh install of the serve extra (`target`) in this checkout."""
    port = free_port()
    command = [sys.executable, "scripts/serve.py", MODEL, "--host", "127.0.0.1", "--port", str(port), *options]
    env = {**installed_environment(target, "serve"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    return process, f"http://127.0.0.1:{port}/v1"


def wait_until_ready(process: subprocess.Popen, base_url: str, timeout: float = 240.0) -> openai.OpenAI:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}): {process.stderr.read().decode()[-3000:]}")
        try:
            client.models.list()
            return client
        except openai.APIConnectionError:
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer within {timeout} s")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def servers(installed_package):
    """A server that runs generate() and one with continuous batching, started side by side."""
    target, _ = installed_package
    started = {"generate": start_server(target), "continuous batching": start_server(target, "--continuous-batching")}
    try:
        yield {name: wait_until_ready(*server) for name, server in started.items()}
    finally:
        for process, _ in started.values():
            stop_server(process)


@pytest.fixture(scope="module")
def local():
    """The model and tokenizer in this process, and `greedy(ids, max_new_tokens)`: the text generate() gives."""
    model = RWKV7ForCausalLM.from_pretrained(FOLDER).eval()
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)

    def greedy(ids: list[int], max_new_tokens: int, stop: str | None = None) -> str:
        """The greedy text after `ids`; with `stop`, up to the token where the text first holds it."""
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)[0, len(ids) :]
        ends = range(1, len(out) + 1) if stop is not None else [len(out)]
        texts = (tokenizer.decode(out[:end], skip_special_tokens=True) for end in ends)
        return next(text for text in texts if stop is None or stop in text)

    return tokenizer, greedy


def chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize("server", ["generate", "continuous batching"])
def test_completions_and_chat_streamed_or_not_give_the_greedy_text(servers, local, server):
    client = servers[server]
    tokenizer, greedy = local
    expected = greedy(tokenizer(PROMPT).input_ids, 12)
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert answer.choices[0].text == expected
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected

    messages = [{"role": "user", "content": "Speak."}]
    expected = greedy(chat_ids(tokenizer, "Speak."), 12)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == expected


def test_stop_and_sampling_are_honoured(servers, local):
    client = servers["generate"]
    tokenizer, greedy = local
    expected = greedy(tokenizer(PROMPT).input_ids, 12)
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert answer.choices[0].text == greedy(tokenizer(PROMPT).input_ids, 12, stop=stop) != expected
    assert answer.choices[0].finish_reason == "stop"

    def sample(seed: int) -> str:
        answer = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=3.0, top_p=1.0, seed=seed
        )
        return answer.choices[0].text

    assert sample(1) == sample(1) != sample(2)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(servers):
    """16 requests sent together get what each gets alone (one after another, which is generate()'s greedy text:
    see the first test), in less time."""
    client = servers["continuous batching"]
    prompts = [f"ROMEO:\n{opening}" for opening in OPENINGS]

    def complete(prompt: str) -> str:
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        return answer.choices[0].text

    start = time.perf_counter()
    alone = [complete(prompt) for prompt in prompts]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(complete, prompts))
    concurrent = time.perf_counter() - start
    assert len(set(alone)) > 5  # the prompts lead to different answers
    assert together == alone
    assert concurrent < sequential, (concurrent, sequential)
