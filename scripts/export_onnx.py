"""Export an RWKV-7 causal LM to ONNX: a decoding step and a fixed-length prefill, the state as explicit inputs
and outputs (see `modeling_rwkv7/export_rwkv7.py`), checked against the eager model in onnxruntime.

    python scripts/export_onnx.py models/rwkv7-tiny-default out/onnx --prefill-length 64

writes out/onnx/decode.onnx ([batch, 1] tokens) and out/onnx/prefill_64.onnx ([batch, 64] tokens; a longer prompt
goes in pieces of 64, the first one left-padded with attention_mask 0). Both take input_ids, attention_mask and
the state tensors (zeros for a fresh sequence) and return logits and the new state. ExecuTorch would take the same
`torch.export` program (`RWKV7StateFunction`) through `executorch.exir.to_edge` and a backend partitioner
(XNNPACK); not done here: ExecuTorch is not installed.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_rwkv7 import RWKV7ForCausalLM  # noqa: E402
from modeling_rwkv7.export_rwkv7 import RWKV7StateFunction, export_onnx  # noqa: E402


def check_with_onnxruntime(model, path, seq_len: int, batch_size: int, steps: int = 1, seed: int = 0) -> float:
    """Run `steps` calls of the ONNX file at `path` in onnxruntime (CPU) on random tokens, feeding the state back,
    and return the largest absolute difference from the eager model's logits and states."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    function = RWKV7StateFunction(model).eval()
    generator = torch.Generator().manual_seed(seed)
    state = function.initial_state(batch_size)
    worst = 0.0
    for _ in range(steps):
        input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator)
        mask = torch.ones_like(input_ids)
        with torch.no_grad():
            expected = function(input_ids, mask, *state)
        feeds = dict(zip(["input_ids", "attention_mask", *function.state_names()], (input_ids, mask, *state)))
        wanted = {i.name for i in session.get_inputs()}  # inputs the graph does not read are dropped by the exporter
        outputs = session.run(None, {name: t.numpy() for name, t in feeds.items() if name in wanted})
        worst = max(worst, *(float(np.abs(o - e.numpy()).max()) for o, e in zip(outputs, expected)))
        state = tuple(torch.from_numpy(o) for o in outputs[1:])
    return worst


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder (save_pretrained / converter output)")
    parser.add_argument("output_dir")
    parser.add_argument("--prefill-length", type=int, default=64, help="tokens per prefill call (default 64)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    if args.prefill_length <= 0 or args.batch_size <= 0:
        parser.error(
            f"--prefill-length and --batch-size must be positive, got {args.prefill_length}, {args.batch_size}"
        )

    model = RWKV7ForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    os.makedirs(args.output_dir, exist_ok=True)
    for name, seq_len in (("decode", 1), (f"prefill_{args.prefill_length}", args.prefill_length)):
        path = os.path.join(args.output_dir, f"{name}.onnx")
        export_onnx(model, path, seq_len, args.batch_size)
        report = f"{path}: [{args.batch_size}, {seq_len}] tokens"
        if not args.no_check:
            steps = 8 if seq_len == 1 else 2
            error = check_with_onnxruntime(model, path, seq_len, args.batch_size, steps=steps)
            report += f", onnxruntime vs eager over {steps} calls: max |diff| {error:.2e}"
        print(report)


if __name__ == "__main__":
    main()
