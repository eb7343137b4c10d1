"""Convert an official RWKV-7 `.pth` (or an fla-hub RWKV-7 folder) into a Hub-ready transformers folder.

    python scripts/convert_official_checkpoint.py RWKV-x070-World-1.5B.pth out/rwkv7-1.5b --dtype bfloat16 \
        --base-model BlinkDL/rwkv7-g1

Same as `python -m modeling_rwkv7.convert_rwkv7`; `--help` lists the options.
"""

from modeling_rwkv7.convert_rwkv7 import main

if __name__ == "__main__":
    main()
