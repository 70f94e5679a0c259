"""The `attnlab` command line: train, eval, generate, data prepare, info, bench, plan, kernels lower/tune, demo.

Problems with the user's input (config, data, checkpoints, arguments) are printed as one-line
`error:` messages with exit status 2; a run stopped because its steps kept failing exits with 3; a process of a
multi-process run whose peer is gone exits with 4 (lm/distributed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


class UsageError(ValueError):
    """A command-line argument that names nothing known."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from attention.ops.dispatch import ImplUnavailable
    from lm.checkpoint import CheckpointError
    from lm.config import ConfigError
    from lm.data import DataError
    from lm.design_hybrid import DesignError
    from lm.distributed import LaunchError
    from lm.report import ReportError
    from lm.storage import StorageError
    from lm.tracking import TrackingError
    from lm.train import RunError

    return (ConfigError, DataError, RunError, CheckpointError, TrackingError, ImplUnavailable, UsageError,
            LaunchError, ReportError, DesignError, StorageError)


def cmd_train(args) -> int:
    from lm import distributed
    from lm.config import load_config

    # Before anything touches a device: the process's place in a multi-process run, its simulated CPU devices.
    distributed.initialize(distributed.resolve(args.coordinator, args.num_processes, args.process_id,
                                               cpu_devices=args.cpu_devices, timeout_s=args.init_timeout))
    from lm.train import train

    try:
        res = train(load_config(args.config, args.set), init_from=args.init_from, restart=args.restart)
    except _user_errors():
        distributed.finish(ok=False)  # the other processes of a multi-process run learn how this one ended
        raise
    except BaseException:
        distributed.finish(ok=False, own_error=False)
        raise
    distributed.finish(ok=True)
    return 3 if res.status == "diverged" else 0


def cmd_eval(args) -> int:
    from lm.eval import beyond_lines, evaluate
    from lm.evals import Request

    beyond = Request(recall=args.recall, recall_pairs=args.recall_pairs, recall_samples=args.recall_samples,
                     needle=args.needle, needle_lengths=args.needle_lengths, needle_depths=args.needle_depths,
                     needle_samples=args.needle_samples, needle_filler=args.needle_filler, slide=args.slide,
                     decode=args.decode, decode_batch=args.decode_batch, decode_prompt=args.decode_prompt,
                     decode_steps=args.decode_steps, decode_repeats=args.decode_repeats,
                     cache_policy=args.cache_policy, cache_budget=args.cache_budget, cache_window=args.cache_window)
    res = evaluate(args.run_dir, max_batches=args.batches, overrides=args.set, as_in_training=args.as_in_training,
                   beyond=beyond)
    if args.json:
        print(json.dumps(res))
    else:
        bits = f", {res['eval_bpb']:.4f} bits/byte" if "eval_bpb" in res else ""
        print(f"{res['run']} step {res['step']}: loss {res['eval_loss']:.4f} nats/token, "
              f"ppl {res['eval_ppl']:.3f}{bits}, accuracy {res['eval_acc']:.4f}"
              + "".join(f", {clause}" for clause in res["summary"]))
        print(f"  {res['eval_tokens']:,} tokens in {res['batches']} batches: {res['scored']}")
        for line in beyond_lines(res):
            print(line)
    return 0


def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from lm.generate import GenerationError, generate_sliding, plan_length, sampling_settings
    from lm.train import load_run
    from lm.train.rundir import local_run_dir, open_run_data

    # The arguments first: a mistake there is reported before the run is loaded.
    sampling = sampling_settings(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    cfg, setup, params, step = load_run(args.run_dir)
    tok = open_run_data(local_run_dir(args.run_dir), cfg, lambda message: print(message, file=sys.stderr)).tokenizer()
    if tok is None:
        raise GenerationError(f"{args.run_dir} was trained on {cfg.data.source}, which has no tokenizer to encode "
                              f"a text prompt")
    ids = tok.encode(args.prompt)
    if not ids:
        raise GenerationError("--prompt encodes to no tokens; give a non-empty prompt")
    plan = plan_length(cfg, n_prompt=len(ids), max_new_tokens=args.max_new_tokens, slide=args.slide,
                       extrapolate=args.extrapolate)
    if plan.note:
        print(f"note: {plan.note}", file=sys.stderr)
    prompt = jnp.asarray([ids], jnp.int32)
    out = generate_sliding(setup.mdef, params, prompt, jax.random.PRNGKey(args.seed),
                           max_new_tokens=args.max_new_tokens, window=plan.window or len(ids) + args.max_new_tokens,
                           **sampling)
    print(tok.decode([int(x) for x in out[0]]))
    return 0


def cmd_data_prepare(args) -> int:
    from lm import data

    def spec(entries):
        return entries[0] if entries == ["stdlib"] else entries

    path = data.prepare(spec(args.source), args.tokenizer, args.out, overwrite=args.overwrite,
                        val_fraction=args.val_fraction, val_source=spec(args.val_source) if args.val_source else None,
                        workers=args.workers, shard_tokens=args.shard_tokens, num_parts=args.num_parts, part=args.part)
    if path is None:  # this part is finished, others are not yet: there is no store to open
        return 0
    store = data.open_store(path)
    print(f"{path}: vocab {store.vocab_size}, train {store.n_tokens('train'):,} tokens, "
          f"val {store.n_tokens('val'):,} tokens")
    return 0


def cmd_info(args) -> int:
    from pathlib import Path

    from lm.config import load_config
    from lm.info import model_info, spkv_capacity

    run_dir = Path(args.config) if Path(args.config).is_dir() else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir} is a directory but no run directory (no config.yaml); give a config file or a "
                         f"run directory")
    cfg = load_config(run_dir / "config.yaml" if run_dir else args.config, args.set)
    info = model_info(cfg)
    if run_dir is not None:
        info |= {f"spkv_cache_capacity/{name}": s for name, s in spkv_capacity(run_dir, cfg).items()}
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def cmd_bench_step(args) -> int:
    from lm.bench.step import bench_step

    res = bench_step(args.config, args.set, steps=args.steps, write=args.write)
    print(json.dumps(res) if args.json else "\n".join(f"{k}: {v}" for k, v in res.items()))
    return 0


def cmd_bench_ops(args) -> int:
    from lm.bench.ops import bench

    bench(args, "attnlab " + " ".join(sys.argv[1:]))
    return 0


def cmd_bench_decode(args) -> int:
    from lm.bench.decode import bench

    bench(args, "attnlab " + " ".join(sys.argv[1:]))
    return 0


def cmd_plan(args) -> int:
    from lm.plan import format_lines, plan

    res = plan(args.config, args.set, args.mesh_axes)
    print(json.dumps(res) if args.json else "\n".join(format_lines(res)))
    for warning in res["warnings"] if args.json else ():
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_kernels_lower(args) -> int:
    from kernels_pallas import catalog

    if args.kernel is not None and args.kernel not in catalog.kernels():
        raise UsageError(f"unknown kernel {args.kernel!r}; the catalogue holds {', '.join(catalog.kernels())}")
    if args.report:
        return _kernels_report(args)
    if args.platform is None:
        raise UsageError("kernels lower needs --platform tpu|cuda (or --report for the structure of every kernel)")
    failed = 0
    for r in catalog.lower_all(args.platform, only=args.kernel):
        failed += not r["ok"]
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            status = "ok  " if r["ok"] else "FAIL"
            detail = f"{r['pallas_calls']} pallas calls" if r["ok"] else r["error"]
            print(f"{status} {r['platform']} {r['kernel']:<8} {r['shape']:<40} {r['seconds']:5.2f}s  {detail}",
                  flush=True)
    if failed:
        print(f"{failed} kernel shape(s) failed to lower for {args.platform}", file=sys.stderr)
    return 1 if failed else 0


def _kernels_report(args) -> int:
    from kernels_pallas import platform
    from lm.bench import kernels as report

    if any(t < 1 for t in args.T):
        raise UsageError(f"--T takes positive token counts, got {args.T}")
    if args.ptxas and not report.ptxas_available():
        raise UsageError("--ptxas needs the triton package (it ships ptxas): pip install 'attnlab[ptxas]'")
    targets = ("tpu", "gpu") if args.platform is None else (platform.normalize(args.platform),)
    for row in report.report_rows(tuple(args.T), only=args.kernel, ptxas=args.ptxas, targets=targets):
        print(json.dumps(row) if args.json else report.format_row(row), flush=True)
    return 0


def cmd_kernels_tune(args) -> int:
    import jax

    from kernels_pallas.flash import gpu_tiles, tiles
    from lm.bench import flash_tiles

    if jax.default_backend() != "gpu":
        raise UsageError(f"kernels tune times the flash kernels on the GPU it runs on; this machine's backend is "
                         f"{jax.default_backend()} (the GPU suite runs it: experiments/bench/gpu_suite.sh)")
    if args.T < 1 or args.reps < 1 or any(d < 1 for d in args.D):
        raise UsageError(f"--T, --reps and --D take positive numbers; got {args.T}, {args.reps}, {args.D}")
    kind, table = tiles.device_kind(), args.table or gpu_tiles.TABLE
    timings = gpu_tiles.tune(flash_tiles.measure_on_device(args.T, args.reps), kind, args.D, path=table)
    for key, times in timings.items():
        ran = [(t, c) for t, c in times if t is not None]
        best_s, best = min(ran, key=lambda tc: tc[0])
        print(f"{kind} {key}: {len(ran)} of {len(times)} candidates ran; best {best_s * 1e3:.2f} ms {best.as_json()}",
              flush=True)
    print(f"wrote {table}")
    return 0


def cmd_demo(args) -> int:
    from lm.demo import demo

    return demo(args.config, args.set)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="Pretrain and measure attention variants.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_set(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")

    t = sub.add_parser("train", help="train (or resume) the run a config describes")
    t.add_argument("config", help="the run's YAML config, e.g. configs/tiny/softmax.yaml")
    t.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start a fresh run from the parameters of RUN_DIR's newest checkpoint that match this "
                        "model by path and shape (e.g. adapt a baseline to SP-KV); ignored on resume")
    t.add_argument("--restart", action="store_true",
                   help="train again from step 0 a run directory that has history (metrics, corrupt checkpoints) "
                        "but no usable checkpoint; its old metrics.jsonl is kept as metrics.<time>.jsonl")
    mp = t.add_argument_group("multi-process (one run over several hosts; see lm/distributed.py)")
    mp.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="address of process 0 and a free port, the same for every process (else "
                         "$JAX_COORDINATOR_ADDRESS, or SLURM/TPU-pod detection)")
    mp.add_argument("--num-processes", default=None, type=int, metavar="N", help="how many processes the run has")
    mp.add_argument("--process-id", default=None, type=int, metavar="I", help="this process's index, 0..N-1")
    mp.add_argument("--init-timeout", default=300, type=int, metavar="S",
                    help="seconds to wait for all processes to join (default 300)")
    mp.add_argument("--cpu-devices", default=None, type=int, metavar="N",
                    help="simulated host devices per process on a CPU (tests, planning a mesh on a laptop)")
    with_set(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="loss / perplexity / bits per byte of a run on its held-out split; optionally "
                                     "associative recall, needle retrieval, decode speed and cache bytes")
    e.add_argument("run_dir", help="a run directory, runs/<name>; its newest checkpoint is scored")
    e.add_argument("--batches", type=int, default=None, metavar="N",
                   help="score only the first N held-out batches (default: every full batch of the split)")
    e.add_argument("--as-in-training", action="store_true",
                   help="score the batches training's evals score (the first train.eval_steps), reproducing the "
                        "last eval_loss in metrics.jsonl")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    er = e.add_argument_group("associative recall (MQAR, at data.seq_len, in the run's own tokens)")
    er.add_argument("--recall", action="store_true",
                    help="also score synthetic associative recall: argmax accuracy on the queried values")
    er.add_argument("--recall-pairs", type=int, nargs="+", default=None, metavar="N",
                    help="key-value pairs per sequence (default: those of 4 8 16 32 that fit data.seq_len)")
    er.add_argument("--recall-samples", type=int, default=64, metavar="N", help="sequences per N (default 64)")
    en = e.add_argument_group("needle retrieval (a key -> value string planted in filler, asked at the end)")
    en.add_argument("--needle", action="store_true",
                    help="also score needle retrieval: share of needles whose value tokens are all predicted")
    en.add_argument("--needle-lengths", type=int, nargs="+", default=None, metavar="L",
                    help="sequence lengths (default: data.seq_len/4, /2, x1 and x2 where the model can run past "
                         "data.seq_len); past it RoPE/NoPE models extrapolate, learned positions need --slide")
    en.add_argument("--needle-depths", type=float, nargs="+", default=None, metavar="F",
                    help="where the needle sits in the filler, 0 = start, 1 = end (default 0.1 0.5 0.9)")
    en.add_argument("--needle-samples", type=int, default=16, metavar="N",
                    help="sequences per length and depth (default 16)")
    en.add_argument("--needle-filler", choices=("text", "random"), default=None,
                    help="held-out text (default with a token store) or random tokens")
    en.add_argument("--slide", action="store_true",
                    help="needle lengths past data.seq_len: score the last data.seq_len tokens only (the widest "
                         "window `generate --slide` reads) instead of extrapolating")
    ed = e.add_argument_group("decode speed and measured KV-cache bytes")
    ed.add_argument("--decode", action="store_true",
                    help="also time greedy decoding with the model's real caches and measure their bytes")
    ed.add_argument("--decode-batch", type=int, default=8, metavar="B", help="sequences decoded at once (default 8)")
    ed.add_argument("--decode-prompt", type=int, default=None, metavar="P",
                    help="prompt tokens prefilled into the cache (default: data.seq_len minus the steps)")
    ed.add_argument("--decode-steps", type=int, default=None, metavar="N",
                    help="timed decode steps (default 32, at most data.seq_len/2)")
    ed.add_argument("--decode-repeats", type=int, default=5, metavar="R",
                    help="timed repeats of the N steps; the median is reported (default 5)")
    ed.add_argument("--cache-policy", choices=("spkv", "sink-window", "h2o", "random"), default=None,
                    help="decode through pruned caches under this policy (attention/cache_policies.py): the held-out "
                         "batches' loss (beside the full forward's), recall with --recall, speed and bytes")
    ed.add_argument("--cache-budget", type=int, default=None, metavar="B",
                    help="keys each softmax layer holds per sequence and KV head, window included (needed but for "
                         "spkv, which otherwise keeps spkv.cache.capacity beside its window)")
    ed.add_argument("--cache-window", type=int, default=None, metavar="W",
                    help="recent keys always held (default: the layer's SP-KV window, else half the budget; "
                         "sink-window: the budget less 4 sinks)")
    with_set(e)
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir", help="a run directory, runs/<name>; its newest checkpoint generates")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate (default 64); prompt and new tokens must fit the context the model "
                        "was trained on (data.seq_len), unless --slide or --extrapolate")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, greater than 0 (default 0.8); --greedy for the most likely token")
    g.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens, K >= 1 (default 40)")
    g.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the most likely tokens whose probabilities add up to P, 0 < P <= 1 "
                        "(default: off)")
    g.add_argument("--greedy", action="store_true",
                   help="take the most likely token at every step instead of sampling")
    g.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    g.add_argument("--slide", action="store_true",
                   help="past data.seq_len tokens, generate in a sliding window of that length (when full, it "
                        "goes on from its last half)")
    g.add_argument("--extrapolate", action="store_true",
                   help="past data.seq_len tokens, run the model at positions it never trained at (RoPE, NoPE; "
                        "learned positions up to model.max_seq_len)")
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="tokenize a corpus into a token store")
    dp.add_argument("--source", nargs="+", required=True,
                    help="stdlib, or .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet files, dirs, globs")
    dp.add_argument("--tokenizer", required=True, help="byte | bpe:N | path/to/tokenizer.json")
    dp.add_argument("--out", required=True, metavar="DIR", help="directory of the token store to write")
    dp.add_argument("--overwrite", action="store_true",
                    help="replace an existing token store at --out (never anything else)")
    dp.add_argument("--val-fraction", type=float, default=None, metavar="F",
                    help="share of the documents held out for eval (split by document, default 0.02)")
    dp.add_argument("--val-source", nargs="+", default=None, metavar="FILES",
                    help="a separate validation corpus (e.g. SlimPajama's validation split): its documents are the val "
                         "split and every --source document is train, instead of --val-fraction")
    dp.add_argument("--workers", type=int, default=None, metavar="N",
                    help="tokenizer processes (default: the machine's cores, at most one per 8 MB of input; 1 "
                         "tokenizes in this process)")
    dp.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                    help="tokens per shard file (default 100000000); a rerun after a kill continues after the last "
                         "finished shard")
    dp.add_argument("--num-parts", type=int, default=1, metavar="N",
                    help="split the input files into N parts (by size, in order), e.g. one per machine")
    dp.add_argument("--part", type=int, default=None, metavar="I",
                    help="prepare only part I (0..N-1); the last part to finish combines them into --out (or run "
                         "the command without --part); the machines must share --out's file system")
    dp.set_defaults(fn=cmd_data_prepare)

    i = sub.add_parser("info", help="parameters, FLOPs per token, KV-cache bytes per token (no training)")
    i.add_argument("config", help="a YAML config, e.g. configs/tiny/softmax.yaml, or a run directory (for an SP-KV "
                                  "run also a spkv.cache.capacity from its measured densities)")
    i.add_argument("--json", action="store_true", help="print the result as one JSON object")
    with_set(i)
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bs = bsub.add_parser("step", help="train-step tokens/s and MFU of a config on synthetic tokens")
    bs.add_argument("config", help="a YAML config, e.g. configs/bench/cpu_d512_l8.yaml")
    bs.add_argument("--steps", type=int, default=5, help="timed steps after compilation (default 5)")
    bs.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bs.add_argument("--write", default=None, metavar="FILE.md", help="also write a results table to this file")
    with_set(bs)
    bs.set_defaults(fn=cmd_bench_step)

    bo = bsub.add_parser("ops", help="forward+backward time of each attention op against sequence length")
    from lm.bench import add_ops_arguments

    add_ops_arguments(bo)
    bo.set_defaults(fn=cmd_bench_ops)

    pl_ = sub.add_parser("plan", help="compile the train step for abstract shapes on a mesh and report per-device "
                                      "memory and compiled FLOPs (nothing is materialised)")
    pl_.add_argument("config", help="a YAML config, e.g. configs/paper_qkv/300m/qkv.yaml")
    pl_.add_argument("--mesh", default=None, metavar="data=N,fsdp=N,tensor=N",
                     help="mesh axes (default: the config's); on a CPU the devices are simulated")
    pl_.add_argument("--json", action="store_true", help="print the result as one JSON object")
    with_set(pl_)
    pl_.set_defaults(fn=cmd_plan)

    k = sub.add_parser("kernels", help="Pallas kernel tools")
    ksub = k.add_subparsers(dest="kernels_cmd", required=True)
    kl = ksub.add_parser("lower", help="lower every Pallas kernel (forward and backward) for a TPU or GPU, on "
                                       "any machine, at representative shapes; one line per kernel and shape")
    kl.add_argument("--platform", default=None, choices=("tpu", "cuda", "gpu"),
                    help="tpu: Mosaic lowering (TPU v5p rules); cuda/gpu: Triton lowering (H200); with --report, "
                         "only that target's rows (default both)")
    kl.add_argument("--kernel", default=None, help="only this kernel family (e.g. flash)")
    kl.add_argument("--json", action="store_true", help="one JSON object per line")
    kl.add_argument("--report", action="store_true",
                    help="the structure of each kernel at bf16, D=128, 16 heads: grid and programs, dots by operand "
                         "dtype and bf16 FLOP share, loop trip counts, TPU VMEM per grid step (tile-padded, "
                         "double-buffered) against each chip")
    kl.add_argument("--T", type=int, nargs="+", default=[8192, 32768], metavar="N",
                    help="token counts for --report (default 8192 32768)")
    kl.add_argument("--ptxas", action="store_true",
                    help="with --report: registers, spills and shared memory per GPU kernel for sm_90a "
                         "(compiles each Triton module; needs the triton package)")
    kl.set_defaults(fn=cmd_kernels_lower)
    kt = ksub.add_parser("tune", help="time the flash kernels' candidate tiles on this GPU (forward and backward, "
                                      "bf16, GQA 16/4) and write the fastest into its table entry")
    kt.add_argument("--T", type=int, default=8192, help="tokens of the timed call (default 8192)")
    kt.add_argument("--D", type=int, nargs="+", default=[64, 128], help="head dims to tune (default 64 128)")
    kt.add_argument("--reps", type=int, default=5, help="timed repetitions per candidate (median)")
    kt.add_argument("--table", default=None, help="the table to update (default kernels_pallas/flash/gpu_tiles.json)")
    kt.set_defaults(fn=cmd_kernels_tune)

    bd = bsub.add_parser("decode", help="decode-step time and memory bandwidth of softmax_decode, K,V and K=V")
    from lm.bench import add_decode_arguments

    add_decode_arguments(bd)
    bd.set_defaults(fn=cmd_bench_decode)

    dm = sub.add_parser("demo", help="train a config, evaluate it and compare with the corpus unigram entropy")
    dm.add_argument("config", help="the YAML config to train, e.g. configs/tiny/softmax.yaml")
    with_set(dm)
    dm.set_defaults(fn=cmd_demo)
    from lm.design_hybrid import add_parser as add_design_parser
    from lm.report.cli import add_parser as add_report_parser
    from lm.sweep.cli import add_parser as add_sweep_parser

    add_sweep_parser(sub)
    add_report_parser(sub)
    add_design_parser(sub)
    return p


def _simulate_devices(args) -> None:
    """`plan --mesh` on a CPU: as many host devices as the mesh needs, set before jax starts."""
    from lm.plan import devices_needed, parse_mesh

    args.mesh_axes = parse_mesh(args.mesh)
    n = devices_needed(args.mesh_axes)
    if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax  # imported already (the parser's modules use it), but no device has been touched yet

        jax.config.update("jax_num_cpu_devices", n)


def main(argv: list[str] | None = None) -> int:
    program = argv is None  # run as the program (not called with arguments): the process exits after this
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from lm import stop

        # Before anything else (the parser's modules import jax): a SIGTERM or SIGHUP while the run starts up is
        # held for the loop, which then stops cleanly, instead of ending the process; as the program, also while it
        # exits.
        from lm import distributed

        with stop.early(restore=not program):
            try:
                code = _main(argv)
            except BaseException:
                if program and distributed.part_failed():  # jax would abort in its exit barrier after this
                    traceback.print_exc()
                    distributed.exit_now(1)
                raise
        if program and distributed.part_failed():
            distributed.exit_now(code)
        return code
    return _main(argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lm.runtime import enable_compile_cache, keep_host_memory

    keep_host_memory()
    if args.cmd == "plan":
        try:
            _simulate_devices(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    enable_compile_cache()
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # A full disk or a directory that cannot be written is the user's to fix, not a traceback; any other
        # OSError (a missing file the code should have checked, ...) is a bug and propagates.
        import errno

        advice = {errno.ENOSPC: "free space", errno.EDQUOT: "free space (or raise the quota)",
                  errno.EROFS: "make it writable or use another directory",
                  errno.EACCES: "check its permissions or use another directory",
                  errno.EPERM: "check its permissions or use another directory"}.get(e.errno)
        if advice is None:
            raise
        what = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file write"
        reason = (e.strerror or os.strerror(e.errno)).lower()
        print(f"error: {what}: {reason} ({errno.errorcode[e.errno]}); {advice} and run the command again",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m lm.cli`: run the imported module's main, so that UsageError is one class whoever raises it.
    from lm.cli import main as cli_main

    sys.exit(cli_main())
