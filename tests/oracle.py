"""The ground truth: BlinkDL's `rwkv` package (RWKV_x070, cpu fp32) on random official-format checkpoints."""

import math
import os

os.environ["RWKV_V7_ON"] = "1"  # must be set before `rwkv.model` is imported
os.environ["RWKV_CUDA_ON"] = "0"
os.environ.setdefault("RWKV_JIT_ON", "0")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


def random_official_state_dict(
    vocab_size=1000, hidden_size=256, num_layers=3, head_dim=64, ffn_size=None, ranks=(32, 32, 32, 64), seed=0
) -> dict[str, torch.Tensor]:
    """A random official RWKV-7 state dict at a realistic scale: every tensor non-trivial (no zero matrices that
    would hide a transposition), decays across their whole range."""
    gen = torch.Generator().manual_seed(seed)
    C, H, N, F = hidden_size, hidden_size // head_dim, head_dim, ffn_size or 4 * hidden_size
    d_w, d_a, d_v, d_g = ranks

    def randn(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=gen) * scale + shift

    def uniform(*shape, low=0.0, high=1.0):
        return torch.rand(*shape, generator=gen) * (high - low) + low

    sd = {"emb.weight": randn(vocab_size, C)}
    for i in range(num_layers):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        for m in "rwkvag":
            sd[p + f"att.x_{m}"] = uniform(1, 1, C)
        sd[p + "att.w0"] = uniform(1, 1, C, low=-4.0, high=2.0)
        sd[p + "att.w1"], sd[p + "att.w2"] = randn(C, d_w, scale=0.1), randn(d_w, C, scale=0.1)
        sd[p + "att.a0"] = randn(1, 1, C, scale=0.5)
        sd[p + "att.a1"], sd[p + "att.a2"] = randn(C, d_a, scale=0.1), randn(d_a, C, scale=0.1)
        if i > 0:
            sd[p + "att.v0"] = randn(1, 1, C, scale=0.5)
            sd[p + "att.v1"], sd[p + "att.v2"] = randn(C, d_v, scale=0.1), randn(d_v, C, scale=0.1)
        sd[p + "att.g1"], sd[p + "att.g2"] = randn(C, d_g, scale=0.1), randn(d_g, C, scale=0.1)
        sd[p + "att.k_k"] = randn(1, 1, C, scale=0.1, shift=0.7)
        sd[p + "att.k_a"] = randn(1, 1, C, scale=0.1, shift=1.0)
        sd[p + "att.r_k"] = randn(H, N, scale=0.1)
        for proj in ("receptance", "key", "value", "output"):
            sd[p + f"att.{proj}.weight"] = randn(C, C, scale=1 / math.sqrt(C))
        sd[p + "att.ln_x.weight"], sd[p + "att.ln_x.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
        sd[p + "ffn.x_k"] = uniform(1, 1, C)
        sd[p + "ffn.key.weight"] = randn(F, C, scale=1 / math.sqrt(C))
        sd[p + "ffn.value.weight"] = randn(C, F, scale=1 / math.sqrt(F))
    sd["ln_out.weight"], sd["ln_out.bias"] = randn(C, scale=0.1, shift=1.0), randn(C, scale=0.1)
    sd["head.weight"] = randn(vocab_size, C, scale=1 / math.sqrt(C))
    return sd


def write_official_checkpoint(state_dict: dict, directory, name="rwkv7-random") -> str:
    """Save as `<directory>/<name>.pth`; returns the path without `.pth`, as the `rwkv` package wants it."""
    path = os.path.join(str(directory), name)
    torch.save(state_dict, path + ".pth")
    return path


def load_oracle(path_without_pth: str, strategy: str = "cpu fp32"):
    """The official `rwkv` package model (`RWKV_x070`)."""
    import rwkv.model
    from rwkv.model import RWKV

    model = RWKV(path_without_pth, strategy=strategy)
    model.oracle_dtype = rwkv.model.DTYPE  # a module global in `rwkv`, read again at every forward
    return model


def oracle_logits(oracle, tokens: list[int], state=None):
    """All-position logits [T, V] and the final state (list of 3 tensors per layer: att shift, wkv [H,V,K],
    ffn shift), from one official `forward` call (the sequence path; one token takes the RNN path)."""
    import rwkv.model

    rwkv.model.DTYPE = oracle.oracle_dtype
    if state is not None:
        state = [t.clone() for t in state]
    logits, state = oracle.forward(list(tokens), state, full_output=True)
    if logits.dim() == 1:
        logits = logits[None]
    return logits, state


def fill_zero_matrices(model: torch.nn.Module) -> torch.nn.Module:
    """Fill the matrices the official init leaves at zero (output projections, LoRA down-projections) with random
    values at a trained scale (std 0.5 / sqrt(fan_in), from the global generator), so that every layer of a
    randomly initialised model carries signal to the output. In place; returns the model."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2 and torch.count_nonzero(param) == 0:
                param.normal_(0, 0.5 / param.shape[1] ** 0.5)
    return model


def folder_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor stored in the `*.safetensors` files of a model folder (all shards), read with safetensors
    itself rather than with the package's loaders."""
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors
