"""CPU benchmark: this project vs rwkv7-hf 0.9.0 vs BlinkDL's `rwkv` 0.8.32 package, side by side in one run.

Model: the RWKV-7 0.1B shape (12 layers, hidden 768, vocab 65536) with random weights at a trained model's scale,
fp32, 2 threads. Cases: prefill 1x512 and 4x512 (all logits, and 1x512 keeping only the last logit), decode at
batch 1 (ms/token after a 16-token prompt), training forward+backward 2x256 with labels (tokens/s, peak RSS).
Each case runs in its own process (so peak RSS is per case): one warm-up, then `--reps` timed runs. The peers take
turns: `--rounds` rounds, each running every peer once, so that a slow spell on a shared machine hits them alike;
the median over all rounds' runs is quoted.
Also measured: the machine's fp32 matmul GFLOP/s and copy bandwidth, giving the floors the ratios refer to.

    pip install -e ".[bench]"
    python scripts/bench.py [--rounds 3] [--reps 2] [--peers ours,rwkv7_hf,rwkv_pip] [--out bench_results.json]
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
PEERS = ("ours", "rwkv7_hf", "rwkv_pip")
CASES = {
    "prefill_1x512": dict(kind="prefill", batch=1, seq=512, last_only=False),
    "prefill_1x512_last": dict(kind="prefill", batch=1, seq=512, last_only=True),
    "prefill_4x512": dict(kind="prefill", batch=4, seq=512, last_only=False),
    "decode_b1": dict(kind="decode", prompt=16, new=64),
    "train_2x256": dict(kind="train", batch=2, seq=256),
}
UNSUPPORTED = {("rwkv_pip", "train_2x256")}  # the official package has no training path


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
    from modeling_rwkv7.convert_rwkv7 import hf_to_official

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
        [sys.executable, "-c", "import sys; from rwkv7_hf.converter import main; main(sys.argv[1:])",
         "--input", paths["rwkv_pip"] + ".pth", "--output", paths["rwkv7_hf"], "--precision", "fp32"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    open(marker, "w").close()
    return paths


# --- one case in one process ---------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_case(peer: str, case: str, path: str, reps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    spec = CASES[case]
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
            import modeling_rwkv7  # noqa: F401  (registers the model)
            from modeling_rwkv7 import RWKV7ForCausalLM as model_class
        else:
            from rwkv7_hf import RWKV7ForCausalLM as model_class
        model = model_class.from_pretrained(path, dtype=torch.float32)
        model.train(spec["kind"] == "train")
        if spec["kind"] == "prefill":
            ids = tokens(spec["batch"], spec["seq"])
            keep = {"logits_to_keep": 1} if spec["last_only"] else {}

            def step():
                with torch.inference_mode():
                    model(ids, use_cache=False, **keep)

        elif spec["kind"] == "decode":
            prompt, new = tokens(1, spec["prompt"]), tokens(1, spec["new"])

            def step():
                with torch.inference_mode():
                    cache = model(prompt, use_cache=True).past_key_values
                    for t in range(new.shape[1]):
                        cache = model(new[:, t : t + 1], past_key_values=cache, use_cache=True).past_key_values

        else:
            ids = tokens(spec["batch"], spec["seq"])

            def step():
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids, use_cache=False).loss.backward()

    times = timed(step, reps)
    if spec["kind"] == "decode":  # time the decode loop only: subtract the prompt's prefill
        prompt_time = statistics.median(timed(lambda: _prefill_only(peer, model, spec, tokens), reps))
        times = [(t - prompt_time) / spec["new"] for t in times]
    return {"peer": peer, "case": case, "times": times, "median": statistics.median(times), "peak_rss_mb": peak_rss_mb()}


def _prefill_only(peer, model, spec, tokens):
    import torch

    prompt = tokens(1, spec["prompt"])
    if peer == "rwkv_pip":
        model.forward(prompt[0].tolist(), None)
    else:
        with torch.inference_mode():
            model(prompt, use_cache=True)


def run_ceilings(reps: int) -> dict:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gflops = 2 * 2048**3 / statistics.median(timed(lambda: a @ b, reps)) / 1e9
    src, dst = torch.randn(2**28), torch.empty(2**28)  # 1 GiB each
    copy_gbs = 2 * src.numel() * 4 / statistics.median(timed(lambda: dst.copy_(src), reps)) / 1e9
    return {"matmul_gflops": gflops, "copy_gbs": copy_gbs}


# --- the driver ----------------------------------------------------------------------------------------------


def floors(ceilings: dict) -> dict:
    """Seconds (decode: per token) a perfect implementation would need on this machine."""
    import torch

    from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM

    config = RWKV7Config.from_json_file(PRESET)
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = config.vocab_size * config.hidden_size
    rate = ceilings["matmul_gflops"] * 1e9  # FLOP/s; a token costs 2 FLOP per matmul parameter
    state_bytes = config.num_hidden_layers * config.num_heads * config.head_dim**2 * 4 * 2
    decode_bytes = (config.param_count() - head) * 4 + state_bytes  # every matrix but the embedding table
    return {
        "prefill_1x512": 2 * matmul_params * 512 / rate,
        "prefill_1x512_last": 2 * ((matmul_params - head) * 512 + head) / rate,
        "prefill_4x512": 2 * matmul_params * 2048 / rate,
        "decode_b1": decode_bytes / (ceilings["copy_gbs"] * 1e9),
        "train_2x256": 3 * 2 * matmul_params * 512 / rate,
    }


def throughput(case: str, seconds: float) -> str:
    spec = CASES[case]
    if spec["kind"] == "decode":
        return f"{seconds * 1000:.1f} ms/tok"
    return f"{spec['batch'] * spec['seq'] / seconds:.1f} tok/s"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rwkv7-bench"))
    parser.add_argument("--out", default=os.path.join(REPO, "bench_results.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        job = json.loads(args.worker)
        result = run_ceilings(job["reps"]) if job["case"] == "ceilings" else run_case(**job)
        print("RESULT " + json.dumps(result))
        return

    peers, cases = args.peers.split(","), args.cases.split(",")
    paths = prepare_weights(args.workdir)

    def worker(job: dict) -> dict:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, cwd=REPO
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"benchmark worker {job} failed:\n{done.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT ") :])

    ceilings = worker({"case": "ceilings", "reps": 2 * args.reps + 1})
    floor = floors(ceilings)
    results = {}
    for case in cases:
        for round_index in range(args.rounds):
            for peer in peers:
                if (peer, case) in UNSUPPORTED:
                    continue
                print(f"round {round_index + 1}/{args.rounds}: {peer:9s} {case} ...", file=sys.stderr, flush=True)
                run = worker({"peer": peer, "case": case, "path": paths[peer], "reps": args.reps})
                pooled = results.setdefault(
                    (case, peer), {"peer": peer, "case": case, "times": [], "peak_rss_mb": 0.0}
                )
                pooled["times"] += run["times"]
                pooled["peak_rss_mb"] = max(pooled["peak_rss_mb"], run["peak_rss_mb"])
        for peer in peers:
            if (case, peer) in results:
                results[(case, peer)]["median"] = statistics.median(results[(case, peer)]["times"])

    print(f"\nmachine: fp32 matmul {ceilings['matmul_gflops']:.1f} GFLOP/s, copy {ceilings['copy_gbs']:.1f} GB/s, 2 threads")
    header = f"{'case':20s} {'peer':9s} {'median':>14s} {'x floor':>8s} {'ours faster by':>15s} {'peak RSS MB':>12s}"
    print(header + "\n" + "-" * len(header))
    report = {"ceilings": ceilings, "floors_s": floor, "cases": {}}
    for case in cases:
        ours = results.get((case, "ours"))
        for peer in peers:
            if (case, peer) not in results:
                continue
            r = results[(case, peer)]
            speedup = ours["median"] / r["median"] if ours else float("nan")
            r["x_floor"] = r["median"] / floor[case]
            r["ours_speedup"] = 1 / speedup if ours else None
            print(
                f"{case:20s} {peer:9s} {throughput(case, r['median']):>14s} {r['x_floor']:>8.2f} "
                f"{(r['ours_speedup'] or float('nan')):>14.2f}x {r['peak_rss_mb']:>12.0f}"
            )
            report["cases"].setdefault(case, {})[peer] = r
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
