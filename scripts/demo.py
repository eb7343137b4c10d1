"""Demo: load the built-in default RWKV-7 model, run a forward pass, generate text with the recurrent state, and
encode a feature sequence the way the Edifice seed's users do.

    python scripts/demo.py [--model DIR_OR_PRESET] [--prompt TEXT] [--max-new-tokens N]
"""

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model, RWKV7Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")


def load_language_model(name: str):
    """A trained model folder, or a preset JSON from configuration/ (random weights)."""
    if os.path.isdir(name):
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval(), "trained weights from " + name
    preset = name if name.endswith(".json") else os.path.join(REPO, "configuration", f"{name}.json")
    torch.manual_seed(0)
    return RWKV7ForCausalLM(RWKV7Config.from_json_file(preset)).eval(), f"random weights, preset {preset}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="model folder or preset name (default: the shipped tiny model)"
    )
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    model, origin = load_language_model(args.model)
    config = model.config
    print(f"modeling_rwkv7: RWKV-7 ({origin})")
    print(
        f"  {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads} heads of {config.head_dim}, "
        f"vocab {config.vocab_size}: {config.param_count():,} parameters"
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model) if os.path.isdir(args.model) else RWKV7Tokenizer()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        start = time.perf_counter()
        out = model(**inputs, use_cache=True)
        elapsed = time.perf_counter() - start
    cache = out.cache
    print(
        f"\nforward pass: {inputs['input_ids'].shape[1]} tokens -> logits {tuple(out.logits.shape)} "
        f"in {elapsed * 1000:.1f} ms"
    )
    print(
        f"  recurrent state: {len(cache.layers)} layers x (wkv {tuple(cache.layers[0].recurrent_state.shape)} fp32 "
        f"+ 2 shift vectors) = {cache.nbytes / 1024:.0f} KiB, whatever the length"
    )

    start = time.perf_counter()
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.2)
    elapsed = time.perf_counter() - start
    new_tokens = generated.shape[1] - inputs["input_ids"].shape[1]
    print(
        f"\ngreedy generation, {new_tokens} new tokens in {elapsed:.2f} s "
        f"({elapsed / max(new_tokens, 1) * 1000:.1f} ms/token):"
    )
    print("  " + tokenizer.decode(generated[0], skip_special_tokens=True).replace("\n", "\n  "))

    # the Edifice seed's use case: continuous features [batch, seq, 287] -> [batch, 256]
    encoder_config = RWKV7Config.from_json_file(os.path.join(REPO, "configuration", "seed-default.json"))
    encoder = RWKV7Model(encoder_config).eval()
    features = torch.randn(2, encoder_config.window_size, encoder_config.input_size)
    with torch.no_grad():
        pooled = encoder(inputs_embeds=features).pooler_output
        cache = encoder.init_cache(batch_size=2)
        for t in range(features.shape[1]):
            streamed = encoder(inputs_embeds=features[:, t : t + 1], cache=cache).pooler_output
    print(
        f"\nsequence encoder (seed defaults, {encoder_config.param_count():,} parameters): "
        f"features {tuple(features.shape)} "
        f"-> pooled {tuple(pooled.shape)}; streamed frame by frame with the cache: "
        f"max diff {(streamed - pooled).abs().max():.1e}"
    )


if __name__ == "__main__":
    main()
