"""`glmc compile CONFIG.yaml [OVERLAY.yaml ...] [--set key=value ...]`: one YAML in, a verified build directory out."""

from __future__ import annotations

import argparse
import signal
import threading

from glmc.compiler import schema

EPILOG = f"""\
examples:
  glmc compile compile_configs/glmc-tiny-int8.yaml
  glmc compile compile_configs/chatglm3-6b-int4.yaml --set model.checkpoint=/models/chatglm3-6b
  glmc compile compile_configs/models/glm-4-9b-chat.yaml compile_configs/precisions/int8-kv8.yaml \\
      --set limits.max_sequence_length=8192 --set 'targets=[onnxruntime,tensorrt]'
  glmc compile compile_configs/glmc-tiny-fp32.yaml --check      # validate only, build nothing
  glmc compile compile_configs/glmc-tiny-fp32.yaml --plan --set verify.steps=4   # what would rerun

Several YAML files are merged left to right (a file can also say `extends: other.yaml`); --set wins last.
Stages (load, quantize, export, simplify, lower:TARGET, engine:tensorrt, verify, package) are cached in
cache_dir by a hash of their inputs: changing a key reruns only the stages that read it and those after.

config keys (key, default, meaning):
{schema.describe()}
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml", help="compile config(s); later files overlay earlier")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one key (YAML value: 8, true, [a,b]); repeatable")
    p.add_argument("--force", action="store_true", help="rerun every stage, ignoring the stage cache")
    p.add_argument("--check", action="store_true", help="validate the config, print it resolved, build nothing")
    p.add_argument("--plan", action="store_true",
                   help="list the stages, the config keys each depends on, and which are cached; build nothing")
    p.add_argument("-o", "--output", help="build directory (same as --set output=DIR)")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    cfg = schema.load(args.configs, overrides)
    if args.check:
        print(cfg.to_json())
        return 0
    from glmc.compiler.pipeline import compile_config, plan
    if args.plan:
        print(f"{cfg.name} {cfg.precision_tag} -> {cfg.output} (stage cache: {cfg.cache_dir})")
        for stage in plan(cfg):
            cached = (cfg.cache_dir / stage.dir_name / "stage.json").is_file()
            status = "lazy" if stage.name == "load" else ("cached" if cached and not args.force else "runs")
            reads = ", ".join(stage.reads + list(stage.deps)) or "-"
            print(f"  {stage.name:18s} {status:7s} {stage.hash[:12]}  reads: {reads}")
        return 0
    # SIGTERM (kill, a CI timeout) cleans up like Ctrl-C: the temp build directory and the lock are removed
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        compile_config(cfg, force=args.force)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt
