"""Build the rwkv7_wkv kernel: `python scripts/build_kernel.py [--native | --cuda | --check-cpu | --check-cuda]`.
The build code is `modeling_rwkv7.kernel_build` (it ships with the package); see its docstring."""

from modeling_rwkv7.kernel_build import main

if __name__ == "__main__":
    main()
