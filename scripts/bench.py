"""CPU benchmark: this project (float32, bfloat16, int8, int4 weights) vs rwkv7-hf 0.9.0 vs BlinkDL's `rwkv` 0.8.32.

Model: the RWKV-7 0.1B shape (12 layers, hidden 768, vocab 65536) with random weights at a trained model's scale,
2 threads. Cases: prefill 1x512 and 4x512 (all logits, and 1x512 keeping only the last logit), decode at batch 1
(ms/token after a 16-token prompt), training forward+backward 2x256 with labels (tokens/s, peak RSS).
Variants of ours (`--dtypes`): fp32; bf16 (bfloat16 weights and activations, float32 recurrent state); int8
(torchao `Int8WeightOnlyConfig` on every projection, the vocabulary head included, bfloat16 activations; loaded
with `from_pretrained(..., quantization_config=TorchAoConfig(...))`; no training); int4 (likewise, torchao
`IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))`: symmetric scales per 32 values). Each
is a plain `from_pretrained` model called as users call it: its decoding steps take the default path (the package's
native CPU decoding ops, `dispatch_rwkv7`). `--eager` adds, for decoding, each dtype with the eager modules forced
(`implementation={"decode": "eager"}`); `--compiled` each dtype through `compile_decode_step` (torch.compile;
compiled during the warm-up). The peers run fp32. `decode_b32` decodes 32 rows at once (aggregate tokens/s against
the matmul floor; ours only), `first_call` is the extra time of a fresh process's first generate() over its second
(16-token prompt, 8 new tokens, decisions stored on this machine by the earlier cases).

Each case runs in its own process (so peak RSS is per case): one warm-up, then `--reps` timed runs. The variants
take turns: `--rounds` rounds, each running every variant once, so that a slow spell hits them alike; the median
over all rounds' runs is quoted. On a 2-core machine another busy process makes 2-thread timings collapse, so every
run records the CPU time other processes used meanwhile (from /proc/stat); a run during which they used more than
`--load-limit` of a core is taken again (up to `--retries` times) and, if still loaded, kept and counted in the
"loaded" column.

Also measured and printed first: the machine (CPU model, ISA flags, threads), its fp32 and bf16 matmul GFLOP/s
and copy bandwidth (the floors the "x floor" column refers to); printed last: the few-row products and WKV paths
our model chose on this machine. `--quality` adds the accuracy of bf16, int8 and int4 on the built-in default
model: logit error against fp32, held-out perplexity (data/shakespeare/validation.jsonl), greedy generation of 32
tokens.

    pip install -e ".[bench]"
    python scripts/bench.py [--rounds 3] [--reps 2] [--dtypes fp32,bf16,int8,int4] [--compiled] [--eager] [--quality]
                            [--peers ours,rwkv7_hf,rwkv_pip] [--cases ...]
    python scripts/bench.py --smoke          # 1 round, 1 run, fewer tokens: checks that everything runs
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "configuration", "rwkv7-0.1b.json")
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")
HELD_OUT = os.path.join(REPO, "data", "shakespeare", "validation.jsonl")
PEERS = ("ours", "rwkv7_hf", "rwkv_pip")
DTYPES = ("fp32", "bf16", "int8", "int4")
COMPILED = "+compiled"  # a dtype suffix: ours decoding through modeling_rwkv7.decode_rwkv7.compile_decode_step
EAGER = "+eager"  # a dtype suffix: ours decoding through its eager modules (implementation={"decode": "eager"})
DECODE_PATHS = (COMPILED, EAGER)
CASES = {
    "prefill_1x512": dict(kind="prefill", batch=1, seq=512, last_only=False),
    "prefill_1x512_last": dict(kind="prefill", batch=1, seq=512, last_only=True),
    "prefill_4x512": dict(kind="prefill", batch=4, seq=512, last_only=False),
    "decode_b1": dict(kind="decode", batch=1, prompt=16, new=64),
    "decode_b32": dict(kind="decode", batch=32, prompt=16, new=16),
    "train_2x256": dict(kind="train", batch=2, seq=256),
    "first_call": dict(kind="first_call", batch=1, prompt=16, new=8),
    # serving: `streams` requests (16-token prompts, 32 new tokens each, greedy) through the continuous batching
    # manager that `transformers serve --continuous-batching` runs, all added at once; aggregate tokens/s
    "serve_1": dict(kind="serve", streams=1, prompt=16, new=32),
    "serve_8": dict(kind="serve", streams=8, prompt=16, new=32),
    "serve_32": dict(kind="serve", streams=32, prompt=16, new=32),
    "serve_64": dict(kind="serve", streams=64, prompt=16, new=32),
    # a long prompt through generate() (chunked prefill, the last logits kept), 4 new tokens: seconds per prompt
    # token, and the peak memory above the loaded model
    "long_512": dict(kind="long_prompt", seq=512, new=4),
    "long_8k": dict(kind="long_prompt", seq=8192, new=4),
    "long_64k": dict(kind="long_prompt", seq=65536, new=4),
}
OURS_ONLY_KINDS = ("serve", "long_prompt")  # the peers have no batching manager; the long prompts: fp32 only
# no training path, no batch (`rwkv`), a batch too slow to time (rwkv7-hf: 0.3 s a token at batch 1), ours only
UNSUPPORTED = {
    ("rwkv_pip", "fp32", "train_2x256"),
    ("ours", "int8", "train_2x256"),
    ("ours", "int4", "train_2x256"),
    ("rwkv_pip", "fp32", "decode_b32"),
    ("rwkv7_hf", "fp32", "decode_b32"),
    ("rwkv_pip", "fp32", "first_call"),
    ("rwkv7_hf", "fp32", "first_call"),
}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
THREADS = 2


# --- the machine and its load ----------------------------------------------------------------------------------


def _measured_module():
    """`modeling_rwkv7.measured_rwkv7` (torch and the standard library only), loaded from its file so that a peer's
    worker process does not import transformers with our package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rwkv7_measured", os.path.join(REPO, "modeling_rwkv7", "measured_rwkv7.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


measured = _measured_module()


def machine() -> dict:
    """`measured_rwkv7.machine()` (what the stored decisions are keyed by) with the CPU's family and model numbers,
    the ISA flags that matter for matmuls only, the core count and torch's CPU capability."""
    import torch

    info = {**measured.machine(), "family": None, "model": None, "cores": os.cpu_count()}
    info["flags"] = [flag for flag in ISA_FLAGS if flag in info["flags"].split()]
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            first_cpu = cpuinfo.read().split("\n\n")[0].splitlines()
        fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first_cpu)}
        info.update(family=fields.get("cpu family"), model=fields.get("model"))
    except OSError:
        pass
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def timed(fn, reps: int, load_limit: float, retries: int, warmup: int = 1) -> tuple[list[float], list[float]]:
    """`reps` wall times of `fn()` after `warmup` calls, each retaken up to `retries` times while other processes
    used more than `load_limit` cores on average during it. Returns (times, other processes' CPU per second)."""
    for _ in range(warmup):
        fn()
    times, loads = [], []
    for _ in range(reps):
        for _attempt in range(retries + 1):
            _, wall, other = measured.timed_call(fn)
            if other <= load_limit * wall:
                break
        times.append(wall)
        loads.append(other / wall)
    return times, loads


# --- weights -------------------------------------------------------------------------------------------------


def prepare_weights(workdir: str) -> dict:
    """Write one set of random 0.1B weights in the three formats (once; reused while the marker exists)."""
    paths = {
        "ours": os.path.join(workdir, "ours"),
        "rwkv_pip": os.path.join(workdir, "official"),
        "rwkv7_hf": os.path.join(workdir, "rwkv7_hf"),
    }
    marker = os.path.join(workdir, "weights-ready")
    if os.path.exists(marker):
        return paths
    os.makedirs(workdir, exist_ok=True)
    import torch

    from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
    from modeling_rwkv7.conversion_mapping_rwkv7 import hf_to_official

    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config.from_json_file(PRESET)).eval()
    with torch.no_grad():  # the official init leaves output projections at zero: give every path signal
        for param in model.parameters():
            if param.dim() == 2 and torch.count_nonzero(param) == 0:
                param.normal_(0, 0.5 / math.sqrt(param.shape[1]))
        model.model.embeddings.weight.normal_()
    model.save_pretrained(paths["ours"])
    torch.save(hf_to_official(model.state_dict()), paths["rwkv_pip"] + ".pth")
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from rwkv7_hf.converter import main; main(sys.argv[1:])",
            "--input",
            paths["rwkv_pip"] + ".pth",
            "--output",
            paths["rwkv7_hf"],
            "--precision",
            "fp32",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    open(marker, "w").close()
    return paths


def load_ours(path: str, dtype: str, **kwargs):
    """Our RWKV7ForCausalLM from `path` in one of DTYPES (int8, int4: torchao weight-only on every projection)."""
    import torch

    import modeling_rwkv7  # noqa: F401  (registers the model)
    from modeling_rwkv7 import RWKV7ForCausalLM

    if dtype in ("int8", "int4"):
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from transformers import TorchAoConfig

        if dtype == "int8":
            weights = Int8WeightOnlyConfig()
        else:
            weights = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
        quantization = TorchAoConfig(weights, modules_to_not_convert=[])  # the head too
        return RWKV7ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=quantization, **kwargs)
    return RWKV7ForCausalLM.from_pretrained(
        path, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], **kwargs
    )


# --- one case in one process ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return _rss_mb("VmHWM:")


def _rss_mb(field: str) -> float:
    """A /proc/self/status memory field (VmHWM: peak RSS, VmRSS: now) in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def base_dtype(variant: str) -> str:
    """fp32 / bf16 / int8 / int4 of a variant of ours ("bf16+eager" -> "bf16")."""
    for suffix in DECODE_PATHS:
        variant = variant.removesuffix(suffix)
    return variant


def run_case(
    peer: str, dtype: str, case: str, path: str, reps: int, new_tokens: int, load_limit: float, retries: int
) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    spec = dict(CASES[case])
    if spec["kind"] == "decode":
        spec["new"] = new_tokens
    generator = torch.Generator().manual_seed(0)

    def tokens(batch, seq):
        return torch.randint(1, 65530, (batch, seq), generator=generator)

    if peer == "rwkv_pip":
        os.environ["RWKV_V7_ON"], os.environ["RWKV_CUDA_ON"], os.environ["RWKV_JIT_ON"] = "1", "0", "1"
        from rwkv.model import RWKV

        model = RWKV(path, strategy="cpu fp32")
        if spec["kind"] == "prefill":
            rows = tokens(spec["batch"], spec["seq"]).tolist()

            def step():  # no batch dimension: one call per row
                for row in rows:
                    model.forward(row, None, full_output=not spec["last_only"])

        else:
            prompt, new = tokens(1, spec["prompt"])[0].tolist(), tokens(1, spec["new"])[0].tolist()

            def step():
                _, state = model.forward(prompt, None)
                for token in new:
                    model.forward([token], state)

    else:
        if peer == "ours":
            eager = {"implementation": {"decode": "eager"}} if dtype.endswith(EAGER) else {}
            model = load_ours(path, base_dtype(dtype), **eager)
        else:
            from rwkv7_hf import RWKV7ForCausalLM

            model = RWKV7ForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.train(spec["kind"] == "train")
        if spec["kind"] == "prefill":
            ids = tokens(spec["batch"], spec["seq"])
            keep = {"logits_to_keep": 1} if spec["last_only"] else {}

            def step():
                with torch.inference_mode():
                    model(ids, use_cache=False, **keep)

        elif spec["kind"] == "first_call":
            return {"peer": peer, "dtype": dtype, "case": case, **_first_call(model, tokens(1, spec["prompt"]), spec)}
        elif spec["kind"] == "serve":
            return {
                "peer": peer,
                "dtype": dtype,
                "case": case,
                **_serve(model, tokens, spec, reps, load_limit, retries),
            }
        elif spec["kind"] == "long_prompt":
            return {
                "peer": peer,
                "dtype": dtype,
                "case": case,
                **_long_prompt(model, tokens, spec, reps, load_limit, retries),
            }
        elif spec["kind"] == "decode":
            prompt, new = tokens(spec["batch"], spec["prompt"]), tokens(spec["batch"], spec["new"])
            decode = model
            if dtype.endswith(COMPILED):  # compiled in the warm-up run, which is not timed
                from modeling_rwkv7.decode_rwkv7 import compile_decode_step

                decode = compile_decode_step(model, batch_size=spec["batch"])

            def step():
                with torch.inference_mode():
                    cache = model(prompt, use_cache=True).cache
                    for t in range(new.shape[1]):
                        cache = decode(new[:, t : t + 1], cache=cache, use_cache=True).cache

        else:
            ids = tokens(spec["batch"], spec["seq"])

            def step():
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids, use_cache=False).loss.backward()

    times, loads = timed(step, reps, load_limit, retries)
    if spec["kind"] == "decode":  # time the decode loop only: subtract the prompt's prefill
        prompt_times, _ = timed(lambda: _prefill_only(peer, model, spec, tokens), reps, load_limit, retries)
        prompt_time = statistics.median(prompt_times)
        times = [(t - prompt_time) / spec["new"] for t in times]
    result = {
        "peer": peer,
        "dtype": dtype,
        "case": case,
        "times": times,
        "other_cores": loads,
        "median": statistics.median(times),
        "peak_rss_mb": peak_rss_mb(),
    }
    if peer == "ours":
        result["paths"] = chosen_paths()
        native = _loaded_native_ops()
        if native is not None:
            result["paths"]["native_vector_bits"] = native.decode_vector_bits()
    return result


def _first_call(model, prompt, spec) -> dict:
    """A fresh process's first generate() and its second: their seconds (this is the first case of the process)."""
    import torch

    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=spec["new"], do_sample=False)
        seconds.append(time.perf_counter() - start)
    return {
        "times": [seconds[0] - seconds[1]],
        "other_cores": [0.0],
        "median": seconds[0] - seconds[1],
        "first_s": seconds[0],
        "second_s": seconds[1],
        "peak_rss_mb": peak_rss_mb(),
    }


def _serve(model, tokens, spec, reps, load_limit, retries) -> dict:
    """`spec["streams"]` requests at once through `model.init_continuous_batching` (a pool of that many rows):
    seconds per generated token, all streams together, scheduling included."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    prompts = tokens(spec["streams"], spec["prompt"]).tolist()
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=spec["new"], do_sample=False, eos_token_id=0),
        continuous_batching_config=ContinuousBatchingConfig(max_requests_per_batch=spec["streams"]),
    )
    manager.warmup()
    manager.start()
    generated = []

    def step():
        pending = set(manager.add_requests(prompts))
        count = 0
        while pending:
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError(f"the manager stopped with {len(pending)} requests pending")
            pending.discard(result.request_id)
            count += len(result.generated_tokens)
        generated.append(count)

    try:
        times, loads = timed(step, reps, load_limit, retries)
    finally:
        manager.stop(block=True)
    per_token = [t / n for t, n in zip(times, generated[-len(times) :])]
    return {"times": per_token, "other_cores": loads, "median": statistics.median(per_token),
            "generated_tokens": generated[-len(times):], "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def _long_prompt(model, tokens, spec, reps, load_limit, retries) -> dict:
    """generate() after a `spec["seq"]`-token prompt: seconds per prompt token (the prefill dominates), and the
    process's peak memory above what it held with the model loaded and warmed up by a 16-token generate() (peak
    RSS reset then)."""
    import torch

    prompt = tokens(1, spec["seq"])

    def generate(ids):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=spec["new"], min_new_tokens=spec["new"], do_sample=False)

    generate(prompt[:, :16])  # warm-up: the libraries' first-call allocations are not the prompt's
    with open("/proc/self/clear_refs", "w") as clear:  # peak RSS from here on
        clear.write("5")
    loaded_mb = _rss_mb("VmRSS:")
    times, loads = timed(lambda: generate(prompt), reps, load_limit, retries, warmup=0)
    per_token = [t / spec["seq"] for t in times]
    return {"times": per_token, "other_cores": loads, "median": statistics.median(per_token),
            "memory_above_model_mb": peak_rss_mb() - loaded_mb, "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def _loaded_native_ops():
    from modeling_rwkv7 import dispatch_rwkv7

    return dispatch_rwkv7._native["module"]


def _prefill_only(peer, model, spec, tokens):
    import torch

    prompt = tokens(spec["batch"], spec["prompt"])
    if peer == "rwkv_pip":
        model.forward(prompt[0].tolist(), None)
    else:
        with torch.inference_mode():
            model(prompt, use_cache=True)


def chosen_paths() -> dict:
    """What our model ran on this machine: the few-row product decisions and the WKV decisions (chunk size, and the
    length from which the chunked form runs instead of the per-token loop)."""
    from modeling_rwkv7 import linear_rwkv7, wkv

    return {
        "wkv": [
            {
                "batch_x_heads": key[0],
                "head_dim": key[1],
                "dtype": str(key[2]).replace("torch.", ""),
                "grad": key[3],
                "chunk_size": choice.chunk_size,
                "chunked_min_seq_len": choice.chunked_min_seq_len,
            }
            for key, choice in wkv.wkv_choices.items()
        ],
        "few_row_products": [
            {
                "out": key[0],
                "in": key[1],
                "dtype": str(key[2]).replace("torch.", ""),
                "rows": key[3],
                "compiled": key[4],
                "product": choice.product,
                "us": {name: s * 1e6 for name, s in choice.seconds.items()},
                "other_cpu_s": choice.other_cpu_seconds,
            }
            for key, choice in linear_rwkv7.few_row_choices.items()
        ],
    }


def run_ceilings(reps: int, load_limit: float, retries: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp32, _ = timed(lambda: a @ b, reps, load_limit, retries)
    a16, b16 = a.bfloat16(), b.bfloat16()
    bf16, _ = timed(lambda: a16 @ b16, reps, load_limit, retries)
    src, dst = torch.randn(2**28), torch.empty(2**28)  # 1 GiB each
    copy, _ = timed(lambda: dst.copy_(src), reps, load_limit, retries)
    return {
        "matmul_gflops": 2 * 2048**3 / statistics.median(fp32) / 1e9,
        "bf16_matmul_gflops": 2 * 2048**3 / statistics.median(bf16) / 1e9,
        "copy_gbs": 2 * src.numel() * 4 / statistics.median(copy) / 1e9,
        "machine": machine(),
    }


# --- accuracy of bf16, int8 and int4 on the default model ---------------------------------------------------------


def run_quality(max_tokens: int) -> dict:
    """Logit error against fp32 (first 512 held-out tokens), held-out perplexity (documents cut into rows of 1024
    tokens, up to `max_tokens`), and greedy generation of 32 tokens after "ROMEO:\\n", per dtype."""
    import torch
    from transformers import AutoTokenizer

    import modeling_rwkv7  # noqa: F401  (registers the tokenizer)

    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    with open(HELD_OUT) as handle:
        documents = [json.loads(line)["text"] for line in handle if line.strip()]
    rows, total = [], 0
    for document in documents:
        ids = tokenizer(document)["input_ids"]
        for start in range(0, len(ids) - 1, 1024):
            row = ids[start : start + 1024]
            if len(row) > 1 and total < max_tokens:
                rows.append(torch.tensor([row]))
                total += len(row) - 1
    prompt = tokenizer("ROMEO:\n", return_tensors="pt")["input_ids"]
    report, reference = {}, None
    for dtype in DTYPES:
        model = load_ours(DEFAULT_MODEL, dtype).eval()
        with torch.inference_mode():
            nll = sum(model(row, labels=row).loss.item() * (row.shape[1] - 1) for row in rows)
            logits = model(rows[0][:, :512]).logits[0].float()
            generated = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[
                0, prompt.shape[1] :
            ]
        entry = {"perplexity": math.exp(nll / total), "tokens": total, "greedy": generated.tolist()}
        if reference is None:
            reference = {"logits": logits, "greedy": generated}
        else:
            difference = logits - reference["logits"]
            entry["logit_max_abs_error"] = difference.abs().max().item()
            entry["logit_rms_relative_error"] = (difference.norm() / reference["logits"].norm()).item()
            same = (generated == reference["greedy"]).tolist()
            entry["greedy_same_tokens"] = same.index(False) if False in same else len(same)
        report[dtype] = entry
    if any(entry.get("greedy_same_tokens", 32) < 32 for entry in report.values()):
        report["fp32"]["greedy_top2_margins"] = _greedy_margins(reference["greedy"], prompt)
    return report


def _greedy_margins(generated, prompt) -> list[float]:
    """fp32's top-1 minus top-2 logit at every greedy step: a divergence where the margin is below the logit error
    is explained by that error."""
    import torch

    model = load_ours(DEFAULT_MODEL, "fp32").eval()
    ids = torch.cat([prompt[0], generated])[None]
    with torch.inference_mode():
        logits = model(ids).logits[0, prompt.shape[1] - 1 : -1].float()
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


# --- the driver ----------------------------------------------------------------------------------------------


def floors(ceilings: dict) -> dict:
    """Seconds (decode: per token) a perfect implementation would need on this machine, per (case, dtype): matmul
    FLOPs at the fp32 (bf16 for bf16, int8 and int4) GEMM rate; decode bytes at the copy bandwidth (int4: half a
    byte per weight and a bfloat16 scale per 32)."""
    import torch

    from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM

    config = RWKV7Config.from_json_file(PRESET)
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = config.vocab_size * config.hidden_size
    other_params = config.param_count() - head - matmul_params  # norms, mixes, biases (the embedding row aside)
    state_bytes = config.num_hidden_layers * config.num_heads * config.head_dim**2 * 4 * 2
    table = {}
    for dtype, matrix_bytes, other_bytes, gflops in (
        ("fp32", 4, 4, ceilings["matmul_gflops"]),
        ("bf16", 2, 2, ceilings["bf16_matmul_gflops"]),
        ("int8", 1, 2, ceilings["bf16_matmul_gflops"]),
        ("int4", 0.5 + 2 / 32, 2, ceilings["bf16_matmul_gflops"]),
    ):
        rate = gflops * 1e9  # FLOP/s; a token costs 2 FLOP per matmul parameter
        decode_bytes = matmul_params * matrix_bytes + other_params * other_bytes + state_bytes
        table[dtype] = {
            "prefill_1x512": 2 * matmul_params * 512 / rate,
            "prefill_1x512_last": 2 * ((matmul_params - head) * 512 + head) / rate,
            "prefill_4x512": 2 * matmul_params * 2048 / rate,
            "decode_b1": decode_bytes / (ceilings["copy_gbs"] * 1e9),
            # 32 rows a step: the matmuls at the GEMM rate (or the bytes, where those take longer)
            "decode_b32": max(2 * matmul_params * 32 / rate, decode_bytes / (ceilings["copy_gbs"] * 1e9)),
            "first_call": math.nan,
            "train_2x256": 3 * 2 * matmul_params * 512 / rate,
        }
        for case, spec in CASES.items():
            if spec["kind"] == "serve":  # per token of all streams: a step of `streams` rows, as decode_b32
                streams = spec["streams"]
                step = max(2 * matmul_params * streams / rate, decode_bytes / (ceilings["copy_gbs"] * 1e9))
                table[dtype][case] = step / streams
            elif spec["kind"] == "long_prompt":  # per prompt token: the prefill's matmuls, the head once
                table[dtype][case] = 2 * ((matmul_params - head) * spec["seq"] + head) / rate / spec["seq"]
    return table


def throughput(case: str, seconds: float) -> str:
    spec = CASES[case]
    if spec["kind"] == "first_call":
        return f"+{seconds * 1000:.0f} ms"
    if spec["kind"] == "decode" and spec["batch"] > 1:
        return f"{spec['batch'] / seconds:.1f} tok/s"
    if spec["kind"] == "decode":
        return f"{seconds * 1000:.1f} ms/tok"
    if spec["kind"] == "serve":
        return f"{1 / seconds:.1f} tok/s"
    if spec["kind"] == "long_prompt":
        return f"{1 / seconds:.0f} tok/s"
    return f"{spec['batch'] * spec['seq'] / seconds:.1f} tok/s"


def label(peer: str, dtype: str) -> str:
    return peer if dtype == "fp32" else f"{peer}[{dtype}]"


def print_paths(results: dict) -> None:
    """The decisions of our fp32/bf16/int8/int4 runs, once per (shape, dtype, rows)."""
    seen, lines, wkv, native = set(), [], set(), set()
    for result in results.values():
        paths = result.get("paths")
        if not paths:
            continue
        if "native_vector_bits" in paths:
            native.add(paths["native_vector_bits"])
        wkv.update(
            f"  {c['batch_x_heads']:2d} batch x heads of {c['head_dim']}, {c['dtype']}, "
            f"{'with' if c['grad'] else 'no'} "
            f"grad: chunks of {c['chunk_size']}, chunked from {c['chunked_min_seq_len']} tokens"
            for c in paths["wkv"]
        )
        for choice in paths["few_row_products"]:
            key = (choice["out"], choice["in"], choice["dtype"], choice["rows"], choice["compiled"])
            if key in seen:
                continue
            seen.add(key)
            timings = ", ".join(f"{name} {us:.0f} us" for name, us in choice["us"].items())
            lines.append(
                f"  {choice['rows']:2d} row(s) x [{choice['out']:5d}, {choice['in']:4d}] {choice['dtype']:8s} "
                f"{'compiled' if choice['compiled'] else 'eager':8s} -> "
                f"{choice['product']:10s} ({timings}; others {choice['other_cpu_s']:.2f} CPU s)"
            )
    if not lines and not wkv:
        return
    print("\nour WKV decisions, measured once per machine:")
    print("\n".join(sorted(wkv)))
    print("few-row products (prompts of <= 16 rows, eager decoding), measured once per machine:")
    print("\n".join(sorted(lines)))
    if native:
        print(f"native decoding ops (the package's CPU build): {', '.join(map(str, sorted(native)))}-bit vector loops")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="variants of ours: fp32, bf16, int8, int4")
    parser.add_argument("--compiled", action="store_true", help="also decode with each dtype through torch.compile")
    parser.add_argument("--eager", action="store_true", help="also decode with each dtype through the eager modules")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per decode run")
    parser.add_argument(
        "--load-limit", type=float, default=0.1, help="other processes' cores above which a run is retaken"
    )
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="also bf16/int8/int4 accuracy on the default model")
    parser.add_argument("--smoke", action="store_true", help="1 round, 1 run, 8 decoded tokens: a quick check")
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rwkv7-bench"))
    parser.add_argument("--out", default=os.path.join(REPO, "bench_results.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(args.worker)
        kind = job.pop("job")
        result = {"ceilings": run_ceilings, "case": run_case, "quality": run_quality}[kind](**job)
        print("RESULT " + json.dumps(result))
        return
    if args.smoke:
        args.rounds, args.reps, args.new_tokens = 1, 1, 8

    peers, cases = args.peers.split(","), args.cases.split(",")
    for name, values, known in (
        ("--peers", peers, PEERS),
        ("--dtypes", args.dtypes.split(","), DTYPES),
        ("--cases", cases, CASES),
    ):
        unknown = [value for value in values if value not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; expected some of {list(known)}")
    ours_dtypes = args.dtypes.split(",")
    ours_dtypes += [
        dtype + suffix
        for suffix, wanted in ((COMPILED, args.compiled), (EAGER, args.eager))
        if wanted
        for dtype in args.dtypes.split(",")
    ]
    # the package's native CPU decoding ops, which the default path loads (built once per machine)
    subprocess.run(
        [sys.executable, "-m", "modeling_rwkv7.kernel_build", "--native"], check=True, stdout=subprocess.DEVNULL
    )
    variants = [(peer, dtype) for peer in peers for dtype in (ours_dtypes if peer == "ours" else ["fp32"])]
    paths = prepare_weights(args.workdir)
    load = {"load_limit": args.load_limit, "retries": args.retries}

    def worker(job: dict) -> dict:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, cwd=REPO
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"benchmark worker {job} failed:\n{done.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT ") :])

    started = time.perf_counter()
    ceilings = worker({"job": "ceilings", "reps": 2 * args.reps + 1, **load})
    info = ceilings["machine"]
    print(
        f"machine: {info['cpu']} (family {info['family']} model {info['model']}), {info['cores']} cores, "
        f"{THREADS} threads; flags {' '.join(info['flags']) or '-'}; "
        f"torch {info['torch']} ({info['torch_cpu_capability']})\n"
        f"         fp32 matmul {ceilings['matmul_gflops']:.1f} GFLOP/s, "
        f"bf16 matmul {ceilings['bf16_matmul_gflops']:.1f} "
        f"GFLOP/s, copy {ceilings['copy_gbs']:.1f} GB/s",
        flush=True,
    )
    floor = floors(ceilings)
    results = {}
    for case in cases:
        for round_index in range(args.rounds):
            for peer, dtype in variants:
                kind = CASES[case]["kind"]
                if (
                    (peer, dtype, case) in UNSUPPORTED
                    or (dtype != base_dtype(dtype) and kind != "decode")
                    or (kind in OURS_ONLY_KINDS and peer != "ours")
                    or (kind == "long_prompt" and dtype != "fp32")
                ):
                    continue
                print(
                    f"round {round_index + 1}/{args.rounds}: {label(peer, dtype):20s} {case} ...",
                    file=sys.stderr,
                    flush=True,
                )
                run = worker(
                    {
                        "job": "case",
                        "peer": peer,
                        "dtype": dtype,
                        "case": case,
                        "path": paths[peer],
                        "reps": args.reps,
                        "new_tokens": args.new_tokens,
                        **load,
                    }
                )
                pooled = results.setdefault(
                    (case, peer, dtype),
                    {"peer": peer, "dtype": dtype, "case": case, "times": [], "other_cores": [], "peak_rss_mb": 0.0},
                )
                pooled["times"] += run["times"]
                pooled["other_cores"] += run["other_cores"]
                pooled["peak_rss_mb"] = max(pooled["peak_rss_mb"], run["peak_rss_mb"])
                if "memory_above_model_mb" in run:
                    pooled["memory_above_model_mb"] = max(
                        pooled.get("memory_above_model_mb", 0.0), run["memory_above_model_mb"]
                    )
                if "paths" in run:
                    pooled["paths"] = run["paths"]

    header = (
        f"{'case':20s} {'variant':20s} {'median':>14s} {'x floor':>8s} {'ours fp32 faster by':>20s} "
        f"{'peak RSS MB':>12s} {'loaded':>7s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    report = {"ceilings": ceilings, "floors_s": floor, "cases": {}}
    for case in cases:
        ours = results.get((case, "ours", "fp32"))
        for peer, dtype in variants:
            if (case, peer, dtype) not in results:
                continue
            r = results[(case, peer, dtype)]
            r["median"] = statistics.median(r["times"])
            r["x_floor"] = r["median"] / floor[base_dtype(dtype)][case]
            r["ours_fp32_speedup"] = r["median"] / ours["median"] if ours else None
            r["loaded_runs"] = sum(other > args.load_limit for other in r["other_cores"])
            print(
                f"{case:20s} {label(peer, dtype):20s} {throughput(case, r['median']):>14s} {r['x_floor']:>8.2f} "
                f"{(r['ours_fp32_speedup'] or float('nan')):>19.2f}x {r['peak_rss_mb']:>12.0f} "
                f"{r['loaded_runs']:>3d}/{len(r['times']):<3d}"
            )
            report["cases"].setdefault(case, {})[label(peer, dtype)] = r
    long_prompts = [(case, results[(case, "ours", "fp32")]) for case in cases if (case, "ours", "fp32") in results
                    and CASES[case]["kind"] == "long_prompt"]  # fmt: skip
    if long_prompts:
        print("\nlong prompts (ours fp32, generate()): peak memory above the loaded model, time per prompt token")
        for case, r in long_prompts:
            print(
                f"  {CASES[case]['seq']:>6d} tokens: {r['memory_above_model_mb']:8.1f} MB, {r['median'] * 1e6:8.1f} us"
            )
    print_paths(results)
    if args.quality:
        quality = worker({"job": "quality", "max_tokens": 4096 if args.smoke else 1 << 30})
        report["quality"] = quality
        print("\naccuracy on models/rwkv7-tiny-default (held-out data/shakespeare/validation.jsonl):")
        for dtype, entry in quality.items():
            extra = ""
            if "logit_max_abs_error" in entry:
                extra = (
                    f", logits vs fp32: max abs {entry['logit_max_abs_error']:.4f}, RMS relative "
                    f"{entry['logit_rms_relative_error']:.4f}; "
                    f"greedy: first {entry['greedy_same_tokens']}/32 tokens as fp32"
                )
            print(f"  {dtype:5s} perplexity {entry['perplexity']:.2f} over {entry['tokens']} tokens{extra}")
        if "greedy_top2_margins" in quality["fp32"]:
            margins = ", ".join(f"{m:.3f}" for m in quality["fp32"]["greedy_top2_margins"])
            print(f"  fp32 greedy top-1 minus top-2 logit per step: {margins}")
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
