"""Continuous batching of RWKV-7 recurrent states: requests join and leave a running batch between decoding steps.

Transformers' own manager (`ContinuousBatchingManager`) keeps a paged KV cache for attention layers; an RWKV-7
request needs a fixed-size state instead, whatever its length. This manager keeps a pool of `max_batch_size` state
rows (an `RWKV7Cache` and its slot operations: `take_row`, `write_row`, `free_row`) and runs a worker thread whose
every iteration

1. takes in new requests and cancellations;
2. lets waiting requests join while the pool has free rows: a prompt of up to `STEPPED_PROMPT_TOKENS` tokens takes a
   zeroed row at once; a longer one first has all but its last token prefilled in a cache of its own, one chunk of
   `max_prefill_tokens` tokens per iteration (one such prompt at a time), and its state is written into a free row;
3. runs one batched decoding step, `model(tokens [batch, 1], cache=pool)`: each row reads its next prompt token
   while it has one, else its last sampled token; the rows past their prompt sample their next token with their
   request's settings (greedy, or temperature / top-k / top-p);
4. lets finished rows leave (the last row moves into the freed one).

A row's arithmetic depends on its request alone, never on the others in the batch or on when they came: the
native CPU decoding step gives each row of a batch the same bits it gives it alone, and a long prompt's chunks are
cut the same way whatever else is waiting. So a request gets the same tokens alone and among others.

Its interface is the one `transformers serve --continuous-batching` and `model.generate_batch` use: `add_request`,
`add_requests`, `cancel_request`, `get_result`, `request_id_iter`, `register_result_handler`, `warmup`, `start`,
`stop`, `is_running`, `destroy`, `logit_processor.supported_keys`, `background_thread_status.fatal_error`. Outputs are
transformers' `GenerationOutput`s; a finished one also carries the request's final state (`cache`, one row).
"""

import dataclasses
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from types import SimpleNamespace
from typing import Any, Optional

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestState, RequestStatus
from transformers.utils import logging

from .cache_rwkv7 import RWKV7Cache

logger = logging.get_logger(__name__)

# the per-request sampling settings, with their types (what transformers serve reads as `supported_keys`)
SAMPLING_KEYS = {"temperature": float, "top_k": int, "top_p": float}
# the ContinuousBatchingConfig fields this manager reads; the others are about paged attention caches, and a value
# other than their default is refused
READ_CB_FIELDS = {"max_requests_per_batch", "max_batch_tokens", "max_queue_size", "per_request_processors", "seed"}
# Prompts up to this long are read by the batched decoding steps, a token per step (the batch shares the weight
# reads); a longer one is prefilled in chunks first (a chunk costs about what one step costs, for many tokens).
STEPPED_PROMPT_TOKENS = 16
# the generation-config fields this manager honours (the sampling ones and when to stop); any other set to a value
# other than its default is refused, rather than silently not applied
READ_GENERATION_FIELDS = {
    "do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id",
    "use_cache", "output_attentions", "output_hidden_states", "transformers_version",
}  # fmt: skip


@dataclasses.dataclass
class RWKV7GenerationOutput(GenerationOutput):
    """transformers' `GenerationOutput`, with `cache`: once the request has finished, its recurrent state after the
    prompt and every generated token but the last (as `generate(..., return_dict_in_generate=True).cache`)."""

    cache: Optional[RWKV7Cache] = None


class _WorkerStatus:
    """What transformers serve reads of the worker: `fatal_error`, the exception that stopped it (or None)."""

    def __init__(self):
        self.fatal_error: Optional[BaseException] = None


class RWKV7ContinuousBatchingManager:
    """Runs requests over a pool of recurrent-state rows (see the module docstring). Made by
    `RWKV7ForCausalLM.init_continuous_batching`.

    Args:
        model (`RWKV7ForCausalLM`): the model; its forward pass runs on the worker thread only.
        generation_config (`GenerationConfig`): the defaults of the requests: `max_new_tokens`, `eos_token_id`, and
            sampling (`do_sample`, `temperature`, `top_k`, `top_p`); greedy when `do_sample` is False.
        max_batch_size (`int`): rows of the pool: the most requests decoding at once (more wait).
        max_prefill_tokens (`int`): the chunk of a long prompt prefilled per iteration, between two decoding steps.
        max_queue_size (`int`): the most requests waiting to be taken in (0: no limit).
    """

    def __init__(
        self,
        model,
        generation_config: GenerationConfig,
        max_batch_size: int = 32,
        max_prefill_tokens: int = 512,
        max_queue_size: int = 0,
    ):
        for name, value in (("max_batch_size", max_batch_size), ("max_prefill_tokens", max_prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        unsupported = sorted(
            name for name in generation_config.to_diff_dict() if name not in READ_GENERATION_FIELDS and name[0] != "_"
        )
        if unsupported:
            raise ValueError(
                f"RWKV-7 continuous batching does not apply the generation settings {unsupported} (it applies "
                f"{sorted(READ_GENERATION_FIELDS - {'transformers_version'})}): generate without them, or use "
                "model.generate()."
            )
        self.model = model.eval()
        self.generation_config = generation_config
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.logit_processor = SimpleNamespace(supported_keys=dict(SAMPLING_KEYS))
        self.background_thread_status = _WorkerStatus()
        self.output_router = OutputRouter()
        self.input_queue: queue.Queue[RequestState] = queue.Queue(maxsize=max_queue_size)
        self.cancel_queue: queue.Queue[str] = queue.Queue()
        self.waiting_requests: deque[RequestState] = deque()  # taken in, no row yet (the first may be prefilling)
        self.active_requests: dict[str, RequestState] = {}  # taken in and not finished, waiting or in a row
        self.rows: list[RequestState] = []  # the request of each active row of the pool
        self.cache: Optional[RWKV7Cache] = None  # the pool, made by warmup / start
        self._prefill_cache: Optional[RWKV7Cache] = None  # the long prompt being prefilled
        self._request_counter = 0
        self._lock = threading.Lock()
        self._wake_up = threading.Event()
        self._stop_requested: Optional[str] = None  # None, "flush" or "hard"
        self._thread: Optional[threading.Thread] = None
        self.warmed_up = False

    @classmethod
    def from_configs(
        cls, model, generation_config: GenerationConfig, continuous_batching_config=None, workload_hints=None
    ) -> "RWKV7ContinuousBatchingManager":
        """A manager sized by transformers' `ContinuousBatchingConfig`: `max_requests_per_batch` rows (default 32),
        `max_batch_tokens` prompt tokens per iteration (default 512), `max_queue_size`; `seed` seeds torch. The
        other fields configure paged attention caches: a value other than their default is refused by name.
        `workload_hints` size nothing here (a state has the same size at any length)."""
        config = continuous_batching_config or ContinuousBatchingConfig()
        defaults = ContinuousBatchingConfig()
        refused = sorted(
            field.name
            for field in dataclasses.fields(config)
            if field.name not in READ_CB_FIELDS and getattr(config, field.name) != getattr(defaults, field.name)
        )
        if refused:
            raise ValueError(
                f"ContinuousBatchingConfig fields {refused} configure paged attention caches, which RWKV-7 has none "
                f"of; it reads {sorted(READ_CB_FIELDS)}."
            )
        if config.seed is not None:
            torch.manual_seed(config.seed)
        return cls(
            model,
            generation_config,
            max_batch_size=config.max_requests_per_batch or 32,
            max_prefill_tokens=config.max_batch_tokens or 512,
            max_queue_size=config.max_queue_size,
        )

    # --- control -------------------------------------------------------------------------------------------------

    def warmup(self) -> None:
        """Make the pool (and run the model once, so that the first request does not pay for first-call setup)."""
        if self.cache is None:
            with torch.inference_mode():
                self.cache = self.model.init_cache(self.max_batch_size)
                self.cache.resize(0)
                self._prefill_cache = self.model.init_cache(1)
                self.model(torch.zeros(1, 1, dtype=torch.long, device=self.model.device), cache=self._prefill_cache)
        self.warmed_up = True

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread."""
        if self.is_running():
            logger.warning("The continuous batching worker is already running.")
            return
        self.warmup()
        self.background_thread_status.fatal_error = None
        self._stop_requested = None
        self._thread = threading.Thread(target=self._run, name="rwkv7-continuous-batching", daemon=True)
        self._thread.start()

    def stop(
        self, block: bool = True, timeout: Optional[float] = None, keep_for_next_session: bool = False,
        hard_stop: bool = False,
    ) -> None:  # fmt: skip
        """Stop the worker: once every request taken in has finished, or right away with `hard_stop` (the requests
        left fail). `block` waits for it, up to `timeout` seconds. `keep_for_next_session` is refused: this manager
        is cheap to make again."""
        if keep_for_next_session:
            raise ValueError("keep_for_next_session=True: an RWKV-7 manager is not cached; make a new one instead.")
        self._stop_requested = "hard" if hard_stop else "flush"
        self._wake_up.set()
        if block and self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def join(self, stop_trigger_time: float = 0.0, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def destroy(self) -> None:
        if self.is_running():
            self.stop(block=True)

    # --- requests ------------------------------------------------------------------------------------------------

    def add_request(
        self,
        input_ids: list[int],
        request_id: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        streaming: bool = False,
        record_timestamps: bool = False,
        eos_token_id: Optional[int | list[int]] = None,
        **sampling: Any,
    ) -> str:
        """Queue a request; returns its id.

        Args:
            input_ids (`list[int]`): the prompt (at least one token).
            request_id (`str`, *optional*): its id (`req_<n>` when None).
            max_new_tokens (`int`, *optional*): defaults to the generation config's.
            streaming (`bool`): an output after every token, not only at the end.
            record_timestamps (`bool`): record the time of each token.
            eos_token_id (`int` or `list[int]`, *optional*): defaults to the generation config's.
            sampling: `temperature`, `top_k`, `top_p` of this request; unset ones come from the generation config.
                `top_k=1` or `temperature=0` is greedy, and so is a request with none of them under a generation
                config with `do_sample=False`.
        """
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"Unknown request setting(s) {unknown}; a request takes {sorted(SAMPLING_KEYS)}.")
        input_ids = [int(token) for token in (input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids)]
        if not input_ids:
            raise ValueError("The prompt is empty: a request needs at least one token.")
        vocab_size = self.model.config.vocab_size
        if min(input_ids) < 0 or max(input_ids) >= vocab_size:
            raise ValueError(f"A prompt token id is out of the vocabulary range [0, {vocab_size}).")
        if self._stop_requested is not None or self.background_thread_status.fatal_error is not None:
            raise RuntimeError("The continuous batching manager is stopping or stopped: it takes no new requests.")
        if request_id is None:
            with self._lock:
                request_id, self._request_counter = f"req_{self._request_counter}", self._request_counter + 1
        config = self.generation_config
        state = RequestState(
            request_id=request_id,
            initial_tokens=input_ids,
            streaming=streaming,
            record_timestamps=record_timestamps,
            max_new_tokens=config.max_new_tokens if max_new_tokens is None else max_new_tokens,
            eos_token_id=config.eos_token_id if eos_token_id is None else eos_token_id,
            logit_processor_kwargs=self._sampling_settings(sampling),
        )
        self.input_queue.put(state, timeout=10)
        self._wake_up.set()
        return request_id

    def add_requests(
        self, inputs: list[list[int]], max_new_tokens: Optional[int] = None, streaming: bool = False,
        record_timestamps: bool = False, **sampling: Any,
    ) -> list[str]:  # fmt: skip
        """`add_request` for each prompt of `inputs`; returns their ids."""
        return [
            self.add_request(prompt, None, max_new_tokens, streaming, record_timestamps, **sampling)
            for prompt in inputs
        ]

    def cancel_request(self, request_id: str) -> None:
        """Drop a request (waiting or decoding); no further output comes for it."""
        self.cancel_queue.put(request_id)
        self._wake_up.set()

    def get_result(self, request_id: Optional[str] = None, timeout: Optional[float] = None):
        """The next output (of `request_id` only, when given), or None after `timeout` seconds or when the worker
        has stopped with nothing left to give."""
        output_queue = self.output_router.output_queue
        if output_queue.empty() and not self.is_running():
            return None
        try:
            result = output_queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            output_queue.put(result)
            return None
        return result

    def __iter__(self):
        while self.is_running() or not self.output_router.output_queue.empty():
            result = self.get_result(timeout=0.1)
            if result is not None:
                yield result

    def request_id_iter(self, request_id: str) -> Generator[GenerationOutput]:
        """The outputs of one request, until its last."""
        while self.is_running() or not self.output_router.output_queue.empty():
            result = self.get_result(request_id=request_id, timeout=0.1)
            if result is not None:
                yield result
                if result.is_finished():
                    return

    def register_result_handler(self, request_id: str, callback: Callable) -> None:
        """Deliver the outputs of `request_id` to `callback` on the running asyncio loop of the caller."""
        import asyncio

        loop = asyncio.get_running_loop()
        with self.output_router._lock:
            self.output_router.result_handlers[request_id] = (callback, loop)

    @property
    def batch_processor(self) -> Optional[SimpleNamespace]:
        """What transformers serve's statistics line reads: the requests decoding and waiting, and the pool's use."""
        if self.cache is None:
            return None
        free = 1 - len(self.rows) / self.max_batch_size
        scheduler = SimpleNamespace(active_requests=self.rows, waiting_requests=self.waiting_requests)
        return SimpleNamespace(scheduler=scheduler, cache=SimpleNamespace(compute_free_capacity=lambda: free))

    # --- the worker ----------------------------------------------------------------------------------------------

    def _sampling_settings(self, requested: dict) -> dict:
        """The request's (temperature, top_k, top_p), unset ones from the generation config; {} for greedy."""
        config = self.generation_config
        if not requested and not config.do_sample:
            return {}
        settings = {name: getattr(config, name) for name in SAMPLING_KEYS}
        settings.update({name: value for name, value in requested.items() if value is not None})
        for name, kind in SAMPLING_KEYS.items():
            settings[name] = kind(settings[name]) if settings[name] is not None else None
        if settings["temperature"] is not None and settings["temperature"] < 0:
            raise ValueError(f"temperature must be >= 0, got {settings['temperature']}.")
        if settings["top_p"] is not None and not 0 < settings["top_p"] <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {settings['top_p']}.")
        if settings["top_k"] == 1 or settings["temperature"] == 0:
            return {}
        return settings

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    self._take_in()
                    if self._stop_requested == "hard" or (self._stop_requested and not self.active_requests):
                        break
                    if not self.waiting_requests and not self.rows:
                        self._wake_up.wait(0.1)
                        self._wake_up.clear()
                        continue
                    self._join()
                    if self.rows:
                        self._step()
        except Exception as error:  # the worker dies: every request it holds fails, and serve reports it
            logger.exception("The RWKV-7 continuous batching worker failed")
            self.background_thread_status.fatal_error = error
            self._fail_all(error)
        else:
            self._fail_all(RuntimeError("The continuous batching manager was stopped before the request finished."))

    def _take_in(self) -> None:
        while True:
            try:
                state = self.input_queue.get_nowait()
            except queue.Empty:
                break
            self.active_requests[state.request_id] = state
            self.waiting_requests.append(state)
        while True:
            try:
                request_id = self.cancel_queue.get_nowait()
            except queue.Empty:
                break
            state = self.active_requests.pop(request_id, None)
            if state is None:
                continue
            row = next((row for row, in_row in enumerate(self.rows) if in_row is state), None)
            if row is not None:
                self._leave(row)
            else:  # waiting (the one being prefilled leaves its prefill cache to the next)
                self.waiting_requests = deque(waiting for waiting in self.waiting_requests if waiting is not state)

    def _join(self) -> None:
        """Waiting requests take the pool's free rows, in order; a long prompt first prefills all but its last
        token, a chunk per iteration."""
        while self.waiting_requests and len(self.rows) < self.max_batch_size:
            state = self.waiting_requests[0]
            prompt = state.remaining_prefill_tokens
            if len(state.initial_tokens) > STEPPED_PROMPT_TOKENS:
                if state.status == RequestStatus.PENDING:
                    state.status = RequestStatus.PREFILLING
                    self._prefill_cache.reset()
                if len(prompt) > 1:
                    chunk = prompt[: min(self.max_prefill_tokens, len(prompt) - 1)]
                    del prompt[: len(chunk)]
                    ids = torch.tensor([chunk], device=self.model.device)
                    self.model(ids, cache=self._prefill_cache, logits_to_keep=1)
                    if len(prompt) > 1:
                        return  # its next chunk at the next iteration
                self.cache.write_row(self.cache.take_row(), self._prefill_cache)
            else:
                state.status = RequestStatus.PREFILLING
                self.cache.take_row()
            self.rows.append(self.waiting_requests.popleft())

    def _step(self) -> None:
        """One decoding step of every row (its next prompt token, else its last sampled token); the rows past their
        prompt sample their next token, then the finished rows leave."""
        ids = []
        for state in self.rows:
            prompt = state.remaining_prefill_tokens
            ids.append(prompt.pop(0) if prompt else state.generated_tokens[-1])
        logits = self.model(torch.tensor(ids, device=self.model.device)[:, None], cache=self.cache).logits[:, -1]
        sampling = [row for row, state in enumerate(self.rows) if not state.remaining_prefill_tokens]
        finished = []
        for row, token in zip(sampling, self._sample(logits[sampling], [self.rows[row] for row in sampling])):
            state = self.rows[row]
            state.status = RequestStatus.DECODING
            if self._record(state, token):
                finished.append(row)
        for row in reversed(finished):  # from the last: a leaving row takes the batch's last row, never a finished one
            self._leave(row)

    def _record(self, state: RequestState, token: int) -> bool:
        """Append `token` to the request; deliver an output if it streams or has finished. Returns whether it has."""
        finished = state.update_and_check_completion(token, None)
        if state.streaming and not finished:
            self.output_router.deliver(state.to_generation_output())
        return finished

    def _leave(self, row: int) -> None:
        """The request of `row` leaves the batch: a finished one delivers its last output, with its final state."""
        state = self.rows[row]
        if state.status == RequestStatus.FINISHED:
            final_state = self.model.init_cache(1)
            final_state.write_row(0, self.cache, row)
            self.active_requests.pop(state.request_id, None)
            output = RWKV7GenerationOutput(**vars(state.to_generation_output()), cache=final_state)
            self.output_router.deliver(output)
        moved = self.cache.free_row(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
        self.rows.pop()

    def _sample(self, logits: torch.Tensor, states: list[RequestState]) -> list[int]:
        """The next token of each row of `logits` [rows, vocab]: the arg-max for greedy requests; for the others, a
        draw after temperature, top-k and top-p (in that order, as generate() applies them)."""
        tokens = logits.argmax(dim=-1)
        sampled = [index for index, state in enumerate(states) if state.logit_processor_kwargs]
        if sampled:
            settings = [states[index].logit_processor_kwargs for index in sampled]
            rows = torch.tensor(sampled, device=logits.device)
            temperature = torch.tensor([s["temperature"] or 1.0 for s in settings], device=logits.device)
            scores = logits[rows].float() / temperature[:, None]
            scores, order = scores.sort(dim=-1, descending=True)
            vocab_size = scores.shape[-1]
            top_k = torch.tensor([s["top_k"] or vocab_size for s in settings], device=logits.device)
            scores = scores.masked_fill(torch.arange(vocab_size, device=logits.device) >= top_k[:, None], -torch.inf)
            top_p = torch.tensor([s["top_p"] or 1.0 for s in settings], device=logits.device)
            probs = scores.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # the first token is always kept
            scores = scores.masked_fill(mass_before >= top_p[:, None], -torch.inf)
            draws = torch.multinomial(scores.softmax(dim=-1), 1)
            tokens[rows] = order.gather(1, draws)[:, 0]
        return tokens.tolist()

    def _fail_all(self, error: BaseException) -> None:
        for state in list(self.active_requests.values()):
            state.status = RequestStatus.FAILED
            state.error = str(error)
            self.output_router.deliver(state.to_generation_output())
        self.active_requests.clear()
        self.waiting_requests.clear()
        self.rows.clear()
        if self.cache is not None:
            self.cache.resize(0)


__all__ = ["RWKV7ContinuousBatchingManager", "RWKV7GenerationOutput"]
