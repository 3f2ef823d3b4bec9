#!/usr/bin/env python
"""Recipe: big-model inference with Hugging Face Accelerate (device maps, offload, int8).

The blog's ``bloom-accelerate-inference.py``, on today's libraries.  Examples::

    # the embedded tiny BLOOM on this machine, with the blog's timing method
    python recipes/accelerate_inference.py --benchmark --batch_size 1,8
    # weights beyond 1 MiB of CPU RAM go to disk
    python recipes/accelerate_inference.py --max_memory cpu=1MiB --offload_folder /tmp/offload
    # BLOOM-176B on 8x80GB, keeping GPU 0 light for activations
    python recipes/accelerate_inference.py --name bigscience/bloom --dtype bf16 \\
        --device_map balanced_low_0 --batch_size 1,8,16,32 --benchmark
"""
from bloomkit import cli
from bloomkit.measure import bench
from bloomkit.strategies import accel
from bloomkit.errors import UserError, cli_entry


@cli_entry
def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[1])
    g = p.add_argument_group("accelerate")
    g.add_argument("--device_map", choices=accel.DEVICE_MAPS, default="auto",
                   help="how modules are placed; balanced_low_0 keeps GPU 0 light for generate")
    g.add_argument("--max_memory", default=None,
                   help="per-device caps as device=size pairs, e.g. 0=30GiB,1=70GiB,cpu=100GiB")
    g.add_argument("--offload_folder", default=None,
                   help="directory for weights that fit neither GPUs nor --max_memory cpu")
    args = p.parse_args(argv)
    if args.compile and (args.offload_folder or args.max_memory or args.dtype in ("int8", "nf4")):
        raise UserError("--compile needs the whole model in one device's memory with plain weights; "
                        "drop --compile, or --max_memory/--offload_folder and int8")
    max_memory = accel.parse_max_memory(args.max_memory)
    accel.check_offload_folder(args.offload_folder)

    def load(path, dtype, device):
        return accel.load_model(path, dtype, device_map=args.device_map, max_memory=max_memory,
                                offload_folder=args.offload_folder, device=device)

    options = {"device_map": args.device_map, "max_memory": args.max_memory,
               "offload_folder": args.offload_folder}
    bench.run_recipe(args, strategy="accelerate", load=load, options=options)


if __name__ == "__main__":
    main()
