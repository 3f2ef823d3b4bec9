#!/usr/bin/env python
"""Recipe: DeepSpeed-Inference tensor parallelism (AutoTP or kernel injection, int8, pre-sharding).

The blog's ``bloom-ds-inference.py`` on today's libraries; run one process per rank. Examples::

    # TP=2 on this machine's CPU (DeepSpeed's CPU accelerator, ranks over gloo)
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 recipes/ds_inference.py --benchmark --batch_size 1,8
    torchrun --nproc_per_node 2 recipes/ds_inference.py --verify
    # write per-rank shards once, then start fast from them
    deepspeed --num_accelerators 2 recipes/ds_inference.py --name bench --save_shards /tmp/bench-tp2
    deepspeed --num_accelerators 2 recipes/ds_inference.py --load_shards /tmp/bench-tp2
    # BLOOM-176B on 8x80GB, bf16 (AutoTP); the blog's fused kernels need the legacy env
    deepspeed --num_gpus 8 recipes/ds_inference.py --name bigscience/bloom --dtype bf16 \\
        --batch_size 1,8,16,32 --benchmark
"""
from bloomkit import cli
from bloomkit.strategies import tp
from bloomkit.errors import cli_entry


@cli_entry
def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[1])
    tp.add_flags(p)
    tp.run(p.parse_args(argv))


if __name__ == "__main__":
    main()
