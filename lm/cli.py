"""The `attnlab` command line: train, eval, generate, data prepare, info, bench, demo.

Problems with the user's input (config, data, checkpoints, arguments) are printed as one-line
`error:` messages with exit status 2; a run stopped because its steps kept failing exits with 3.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from attention.ops.dispatch import ImplUnavailable
    from lm.checkpoint import CheckpointError
    from lm.config import ConfigError
    from lm.data import DataError
    from lm.tracking import TrackingError
    from lm.train import RunError

    return ConfigError, DataError, RunError, CheckpointError, TrackingError, ImplUnavailable


def cmd_train(args) -> int:
    from lm.config import load_config
    from lm.train import train

    res = train(load_config(args.config, args.set), init_from=args.init_from, restart=args.restart)
    return 3 if res.status == "diverged" else 0


def cmd_eval(args) -> int:
    from lm.eval import evaluate

    res = evaluate(args.run_dir, max_batches=args.batches, overrides=args.set)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['run']} step {res['step']}: loss {res['eval_loss']:.4f} nats/token, "
              f"ppl {res['eval_ppl']:.3f}, {res['eval_bpb']:.4f} bits/byte ({res['eval_tokens']} tokens)"
              + "".join(f", {clause}" for clause in res["summary"]))
    return 0


def cmd_generate(args) -> int:
    import jax
    import jax.numpy as jnp

    from lm.generate import generate_ids
    from lm.train import load_run, open_data

    cfg, setup, params, step = load_run(args.run_dir)
    tok = open_data(cfg).tokenizer()
    if tok is None:
        raise SystemExit(f"error: {args.run_dir} was trained on {cfg.data.source}, which has no tokenizer to "
                         f"encode a text prompt")
    ids = tok.encode(args.prompt)
    if not ids:
        raise SystemExit("error: --prompt encodes to no tokens; give a non-empty prompt")
    if args.max_new_tokens < 1:
        raise SystemExit("error: --max-new-tokens must be at least 1")
    prompt = jnp.asarray([ids], jnp.int32)
    out = generate_ids(setup.mdef, params, prompt, jax.random.PRNGKey(args.seed), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    print(tok.decode([int(x) for x in out[0]]))
    return 0


def cmd_data_prepare(args) -> int:
    from lm import data

    source = args.source[0] if args.source == ["stdlib"] else args.source
    path = data.prepare(source, args.tokenizer, args.out, overwrite=args.overwrite)
    store = data.open_store(path)
    print(f"{path}: vocab {store.vocab_size}, train {store.n_tokens('train'):,} tokens, "
          f"val {store.n_tokens('val'):,} tokens")
    return 0


def cmd_info(args) -> int:
    from lm.config import load_config
    from lm.info import model_info

    info = model_info(load_config(args.config, args.set))
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
    t.add_argument("config")
    t.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start a fresh run from the parameters of RUN_DIR's newest checkpoint that match this "
                        "model by path and shape (e.g. adapt a baseline to SP-KV); ignored on resume")
    t.add_argument("--restart", action="store_true",
                   help="train again from step 0 a run directory that has history (metrics, corrupt checkpoints) "
                        "but no usable checkpoint; its old metrics.jsonl is kept as metrics.<time>.jsonl")
    with_set(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="loss / perplexity / bits per byte of a run on its held-out split")
    e.add_argument("run_dir")
    e.add_argument("--batches", type=int, default=None, help="at most this many held-out batches")
    e.add_argument("--json", action="store_true")
    with_set(e)
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="sample text from a trained run")
    g.add_argument("run_dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("data", help="data preparation")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="tokenize a corpus into a token store")
    dp.add_argument("--source", nargs="+", required=True, help="stdlib, or .txt/.jsonl/.parquet files, dirs, globs")
    dp.add_argument("--tokenizer", required=True, help="byte | bpe:N | path/to/tokenizer.json")
    dp.add_argument("--out", required=True)
    dp.add_argument("--overwrite", action="store_true")
    dp.set_defaults(fn=cmd_data_prepare)

    i = sub.add_parser("info", help="parameters, FLOPs per token, KV-cache bytes per token (no training)")
    i.add_argument("config")
    i.add_argument("--json", action="store_true")
    with_set(i)
    i.set_defaults(fn=cmd_info)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bs = bsub.add_parser("step", help="train-step tokens/s and MFU of a config on synthetic tokens")
    bs.add_argument("config")
    bs.add_argument("--steps", type=int, default=5)
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--write", default=None, metavar="FILE.md", help="also write a results table to this file")
    with_set(bs)
    bs.set_defaults(fn=cmd_bench_step)

    bo = bsub.add_parser("ops", help="forward+backward time of each attention op against sequence length")
    from lm.bench.ops import add_arguments as add_ops_arguments

    add_ops_arguments(bo)
    bo.set_defaults(fn=cmd_bench_ops)

    dm = sub.add_parser("demo", help="train a config, evaluate it and compare with the corpus unigram entropy")
    dm.add_argument("config")
    with_set(dm)
    dm.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from lm.runtime import enable_compile_cache

    enable_compile_cache()
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
