"""Convert an official RWKV-7 `.pth` (or an fla-hub, native-layout or converted RWKV-7 folder) into a transformers
folder: ours by default (code + `auto_map`, Hub-ready), or with `--layout native` the layout of transformers' own
RWKV-7 (`Rwkv7ForCausalLM`), which both its classes and ours load.

    python scripts/convert_official_checkpoint.py RWKV-x070-World-1.5B.pth out/rwkv7-1.5b --dtype bfloat16 \
        --base-model BlinkDL/rwkv7-g1
    python scripts/convert_official_checkpoint.py out/rwkv7-1.5b out/rwkv7-1.5b-native --layout native

Same as `python -m modeling_rwkv7.convert_rwkv7`; `--help` lists the options.
"""

from modeling_rwkv7.convert_rwkv7 import main

if __name__ == "__main__":
    main()
