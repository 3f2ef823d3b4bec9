"""The strategies the lessons teach, one module each, for any causal LM transformers loads:

* :mod:`.accel` — Accelerate's big-model API: device maps, CPU/disk offload, bitsandbytes int8.
* :mod:`.tp` — DeepSpeed-Inference tensor parallelism (the recipe's flow), built from
  :mod:`.autotp` (how AutoTP cuts a model), :mod:`.tp_int8` (int8 under TP) and
  :mod:`.tp_shards` (pre-sharded checkpoints).
* :mod:`.zero` — ZeRO-Inference: stage 3 with parameters offloaded to CPU or NVMe.
* :mod:`.bloom` — everything only BLOOM needs (ALiBi per rank, DeepSpeed's fused kernels).
"""
