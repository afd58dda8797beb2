"""Echo: build a chat language model end to end and see what each step did."""

import os as _os

__version__ = "0.1.0"

# bf16 matrix products on a CPU go through oneDNN, which JIT-builds a kernel for every new
# shape (~4.5 ms) and keeps it in two caches of 1,024 entries each (oneDNN's primitives,
# ideep's computations). Answers and pairs bring new lengths every training step, so a bf16
# stage's memory climbed ~50 MB a step until both were full (the smollm2-cpu preset peaked at
# 10.7 GB). A step uses ~20 shapes, each many times (every layer), so 64 entries keep a
# step's kernels and bound the rest. Read lazily at torch's first oneDNN call, so set here,
# before any; a value the user set wins.
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
for _name in KERNEL_CACHES:
    _os.environ.setdefault(_name, "64")
