"""`transformers serve` for RWKV-7: the same command line, with this package's model known to the server.

    python scripts/serve.py models/rwkv7-tiny-default --host 127.0.0.1 --port 8000 [--continuous-batching]

transformers serve (5.25) reads a folder's config with `AutoConfig` and loads its model with
`getattr(transformers, config.architectures[0])`, in a process it starts with `spawn`; our classes are neither in
`transformers` nor registered in that process. Importing this file registers them (`import modeling_rwkv7`) and
names `RWKV7ForCausalLM` in the `transformers` namespace; the spawned model process imports this file again (as
`__mp_main__`), so it gets both too. The launcher is not needed once transformers serve loads a model whose
architecture it does not ship through `AutoModelForCausalLM` (which our import registers, and which honours a
folder's `auto_map` with `--trust-remote-code`), rather than by its name in the `transformers` namespace.
"""

import sys

from transformers.cli.serving import model_manager

import modeling_rwkv7

# the `transformers` module the server's loader reads (importing transformers.processing_utils makes a new one, so
# the one `import transformers` gave before may not be it)
model_manager.transformers.RWKV7ForCausalLM = modeling_rwkv7.RWKV7ForCausalLM


if __name__ == "__main__":
    from transformers.cli.transformers import app

    app(["serve", *sys.argv[1:]], prog_name="transformers")
