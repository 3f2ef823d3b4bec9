#!/usr/bin/env python
"""Recipe: DeepSpeed ZeRO-Inference (ZeRO stage 3, weights offloaded to CPU or NVMe).

The blog's ``bloom-ds-zero-inference.py`` on today's libraries.  Examples::

    # the embedded tiny BLOOM on this machine (one rank, no offload)
    python recipes/ds_zero_inference.py --benchmark --batch_size 1,8
    # weights in swap files on a local drive (O_DIRECT, libaio), 4-bit group-wise weights
    python recipes/ds_zero_inference.py --name small --nvme_offload_path /mnt/nvme/zero --quant_bits 4
    # two ranks, each generating its own prompts (unique streams)
    deepspeed --num_accelerators 2 recipes/ds_zero_inference.py --cpu_offload   # CPU: DS_ACCELERATOR=cpu
    # BLOOM-176B on 8 GPUs, one stream per GPU, weights in CPU RAM
    deepspeed --num_gpus 8 recipes/ds_zero_inference.py --name bigscience/bloom --dtype bf16 \\
        --cpu_offload --batch_size 1,8 --benchmark
"""
import copy

from bloomkit import cli, memory, models, results
from bloomkit.measure import bench, harness
from bloomkit.strategies import zero
from bloomkit.errors import UserError, cli_entry


@cli_entry
def main(argv=None):
    p = cli.common_parser(__doc__.splitlines()[1])
    g = p.add_argument_group("ds-zero")
    g.add_argument("--cpu_offload", action="store_true", help="keep the parameters in CPU memory")
    g.add_argument("--nvme_offload_path", default=None,
                   help="keep the parameters in swap files in this directory (a fast local drive)")
    g.add_argument("--quant_bits", type=int, choices=zero.QUANT_BITS, default=None,
                   help="ZeRO-Inference group-wise weight quantization (--dtype int8 means 8)")
    g.add_argument("--quant_group_size", type=cli.positive_int, default=None,
                   help="weights per quantization group (divides the hidden size); default: the "
                        "largest of 64, 32, 16, ... that divides it")
    g.add_argument("--aio_buffer_count", type=cli.positive_int, default=zero.DEFAULT_BUFFER_COUNT,
                   help="NVMe read buffers (each as large as the largest weight partition)")
    g.add_argument("--kv_offload", action="store_true",
                   help="KV cache offloaded to CPU layer by layer (transformers' offloaded "
                        "cache; CUDA only)")
    args = p.parse_args(argv)

    if args.compile:
        raise UserError("--compile does not apply to ZeRO-Inference: ZeRO-3 gathers each layer's "
                        "weights in hooks around every module's forward, which a compiled graph "
                        "cannot capture; drop --compile (or use recipes/accelerate_inference.py or "
                        "recipes/ds_inference.py to compile)")
    if args.dtype == "nf4":
        raise UserError("--dtype nf4 is bitsandbytes' 4-bit load, an Accelerate feature; "
                        "ZeRO-Inference quantizes its own way: --quant_bits 4 (or 8)")
    mode = zero.offload_mode(args.cpu_offload, args.nvme_offload_path)
    s = cli.prepare(args)  # shared flags, model path, --json_out: before anything expensive
    device, dtype, path = s["device"], s["dtype"], s["path"]
    quant_bits = args.quant_bits or (8 if dtype == "int8" else None)
    compute = ("bf16" if device == "cuda" else "fp32") if dtype == "int8" else dtype
    if args.kv_offload and device != "cuda":
        raise UserError("--kv_offload moves the KV cache from the GPU to CPU memory and needs "
                        "CUDA; drop it on CPU")
    config = models.load_config(path)
    group = zero.quant_group_size(config, args.quant_group_size) if quant_bits else None
    rank, world = zero.dist_env(device)

    info = zero.offload_info(config, mode, dtype=compute, world_size=world, quant_bits=quant_bits)
    plan = None
    if mode == "nvme":
        plan = zero.plan_nvme_buffers(config, compute, world, args.aio_buffer_count)
        if info["nvme_note"] and rank == 0:
            print(f"note: --nvme_offload_path: {info['nvme_note']}", flush=True)
        zero.check_nvme_path(args.nvme_offload_path, memory.weight_bytes(config, compute))
        info["async_io"] = zero.check_async_io()
        info.update(nvme_path=args.nvme_offload_path, aio_buffer_count=plan.buffer_count,
                    aio_buffer_size=plan.buffer_size, aio_locked_bytes=plan.locked_bytes)
    rank, world = zero.init_distributed(device)
    ds = zero.ds_config(config.hidden_size, dtype=compute, offload=mode,
                        nvme_path=args.nvme_offload_path, world_size=world, buffers=plan,
                        quant_bits=quant_bits, quant_group_size=group or 64)

    def load(path, _dtype, device):
        model = zero.load_model(path, compute, ds, device)
        info["partition_bytes"] = zero.partition_bytes(model)
        if mode == "nvme":  # what is on the disk while the model runs
            info["swap_after_load"] = zero.swap_summary(args.nvme_offload_path)
        return model

    extra = {"cache_implementation": "offloaded"} if args.kv_offload else {}

    reads = zero.DiskReads()  # bytes this rank reads from disk per generated token

    @reads.wrap
    def gen_fn(model, tok, rows, n):
        mine = zero.rank_prompts(len(rows), s["base_prompts"], rank, world)
        return zero.stream_generate(model, tok, mine, n, world_size=world, **extra)

    options = {"offload": mode, "quant_bits": quant_bits or 0, "kv_offload": args.kv_offload,
               "variant": info["variant"], "zero": info}
    run_args = copy.copy(args)  # the records are completed (disk reads, streams) and written below
    run_args.json_out = None
    if world > 1:  # every stream is checked against its own prompts, below
        run_args.verify = False
    with zero.swap_session(args.nvme_offload_path, rank):
        records = bench.run_recipe(run_args, strategy="ds-zero", load=load, options=options,
                          world_size=world, generate_fn=gen_fn, is_main=rank == 0,
                          token_multiplier=world)
    zero.with_disk_reads(records, reads)
    if rank == 0:
        for r in records:
            if world > 1 and args.verify and r["status"] == "ok":
                r["quality"] = zero.verify_streams(path, r)
                print(f"ds-zero streams bs={r['batch_size']}: identical={r['quality']['identical']}",
                      flush=True)
            z = r["options"]["zero"]
            if mode == "nvme" and "disk_read_bytes_per_token" in z:
                print(f"ds-zero {z['variant']} bs={r['batch_size']}: {z['swapped_partitions']} "
                      f"partitions on disk, {z['disk_read_bytes_per_step'] / 2**20:.2f} MiB read "
                      f"from disk per step ({z['disk_read_bytes_per_token'] / 2**20:.3f} MiB per "
                      "token)", flush=True)
        if args.json_out:
            results.write_json(args.json_out, records[0] if len(records) == 1 else records)
    harness.cuda_sync()


if __name__ == "__main__":
    main()
