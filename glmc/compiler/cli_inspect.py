"""`glmc inspect BUILD`: what a build directory holds, what it was built from, and how it was verified."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from glmc.artifact import MANIFEST, check_files, file_table_of, read_manifest
from glmc.errors import GlmcError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", metavar="BUILD", help="a build directory written by `glmc compile`")
    p.add_argument("--json", action="store_true", help="print the whole manifest.json")
    p.add_argument("--layers", action="store_true", help="also list the TensorRT engine's layers")
    p.add_argument("--check-files", action="store_true",
                   help="rehash every file against the manifest (by default only files changed since the last check "
                        "are rehashed: their size, mtime, ctime or inode differ from the digest memo's)")


def _shape(io: dict) -> str:
    return escape(f"{io['name']} {io['dtype']}[{', '.join(str(d) for d in io['shape'])}]")


def _io_line(items: list[dict]) -> str:
    """One line for a graph's inputs or outputs; the per-layer cache tensors shown once, with their count."""
    shown, cache = [], [i for i in items if i["name"].startswith(("past_key_values.", "present."))]
    shown = [_shape(i) for i in items if i not in cache]
    if cache:
        stem = "past_key_values" if cache[0]["name"].startswith("past") else "present"
        shown.append(_shape({**cache[0], "name": f"{stem}.{{i}}.key/value"}) + f" x{len(cache)}")
    return ", ".join(shown)


def run(args: argparse.Namespace) -> int:
    build = Path(args.build)
    m = read_manifest(build)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    file_table_of(m, build / MANIFEST)
    try:
        return _show(args, build, m)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest edited by hand or cut short
        raise GlmcError(f"{build / MANIFEST}: damaged manifest ({type(e).__name__}: {e}); recompile the build") \
            from None


def _show(args: argparse.Namespace, build: Path, m: dict) -> int:
    con = Console()
    c, p, arch = m["config"], m["precision"], m["model"]
    con.print(f"[bold]{build}[/]  ({m['format']}, built {m['created']}, glmc {m['packages'].get('glmc')})")
    con.print(f"model      {c['model']['name']}: {arch['family']}, {arch['num_layers']} layers, hidden "
              f"{arch['hidden_size']}, {arch['num_heads']} heads / {arch['num_kv_heads']} kv, vocab "
              f"{arch['vocab_size']}  <- {arch['checkpoint']}")
    con.print(f"precision  {p['tag']}  (dtype {p['dtype']}, weights {p['weights']}"
              + (f" g{p['group_size']}" if p['group_size'] else "") + f", kv cache {p['kv_cache']}"
              + (f" per {p['kv_granularity']}" if p['kv_cache'] != 'float' else "")
              + f"); weights in {p['weights_location']}")
    pre = arch.get("checkpoint_quantization", {}).get("weights")
    if pre:  # a pre-quantized checkpoint (AutoAWQ, ChatGLM's int4/int8, glmc quantize): its codes are the weights
        con.print(f"           the checkpoint's weights: int{pre['bits']}" + (f" g{pre['group_size']}" if
                  pre.get("group_size") else "") + (f", {pre['method']}" if pre.get("method") else "") +
                  (" with zero points" if pre.get("zero_point") else "") +
                  (f" ({pre['format']} format)" if pre.get("format") else "") + ", kept as they are")
    lim = c["limits"]
    con.print(f"limits     batch <= {lim['max_batch']}, prompt <= {lim['max_input_length']}, "
              f"sequence <= {lim['max_sequence_length']}")
    con.print(f"tokenizer  {m['tokenizer']['family']}: {', '.join(m['tokenizer']['files']) or 'none'} in "
              f"{m['tokenizer']['dir']}")
    for name, d in m["targets"].items():
        padding = d.get("lowering", {}).get("kv_cache", {}).get("padding")
        note = {"none": " (no padded batches: rows of a batch share one length)"}.get(padding, "")
        con.print(f"target     {name}: {d['onnx']}{note}\n           in:  {_io_line(d['inputs'])}\n"
                  f"           out: {_io_line(d['outputs'])}")
    for name, e in m["engines"].items():
        if name == "cuda":  # glmc's own kernels: the weights as they read them, no engine file
            con.print(f"engine     cuda: {e['path']} ({len(e['files'])} files, {e['bytes']:,} bytes, {e['dtype']}), "
                      f"needs {e['needs']['compute_capability']} and {', '.join(e['needs']['python'])}", markup=False)
            continue
        con.print(f"engine     {name}: {e['path']} ({e['engine_bytes']:,} bytes), {e['library']} {e['version']}, "
                  f"compute capabilities {', '.join(e['compute_capabilities']) or 'of the build GPU'}, "
                  f"profiles {', '.join(e['profiles'])}, {e['engine_layer_count']} engine layers from "
                  f"{e['network_layer_count']} network layers, built in {e['build_seconds']:.1f}s")
        if args.layers:
            layers = json.loads((build / e["layers"]).read_text())["engine_layers"]
            lt = Table(show_edge=False)
            for col in ("layer", "type", "from ONNX nodes"):
                lt.add_column(col)
            for layer in layers:
                lt.add_row(layer["name"], layer["type"], ", ".join(layer["onnx_nodes"]))
            con.print(lt)
    bad, done = check_files(build, m, rehash=args.check_files)
    v = m.get("verification")
    if bad:  # whatever verification said was about other files
        con.print(f"verified   [red]NO: {len(bad)} file(s) differ from the manifest[/] (changed or damaged since "
                  "the build was written; glmc refuses to run it: recompile)")
        for line in bad[:10]:
            con.print(f"           {line}", markup=False)
    elif not v:
        con.print("verified   no (verify.enabled was false)")
    else:
        tol = v.get("tolerance", {})
        con.print(f"verified   {'[green]passed[/]' if v.get('passed') else '[red]FAILED[/]'} against the torch model "
                  f"on {len(v.get('prompts', []))} prompts (tolerance: relative logits error <= {tol.get('rel', '?')}, "
                  f"top-1 >= {tol.get('top1', '?')}, greedy >= {tol.get('greedy_fraction', '?')} of the steps)")
        vt = Table(show_edge=False)
        for col in ("target", "prefill rel", "decode rel", "top-1", "greedy", "result"):
            vt.add_column(col)
        for name, r in v.get("targets", {}).items():
            greedy = f"{r['greedy_agree']}/{r['steps']}" + (" (tie)" if r.get("greedy_diverged_at_tie") else "")
            vt.add_row(name, f"{r['prefill_rel']:.2g}", f"{r['decode_rel']:.2g}", f"{r['top1']:.1%}", greedy,
                       "pass" if r["passed"] else "FAIL")
        con.print(vt)
        for name, why in v.get("not_run", {}).items():
            con.print(f"           {name}: {why}", markup=False)
        if "tensorrt" in v.get("targets", {}):
            con.print("           (tensorrt: the ONNX graph the engine was built from, run in ONNX Runtime; the engine "
                      "itself runs only on a GPU it was built for)")
    st = Table(title="stages", show_edge=False)
    for col in ("stage", "status", "seconds"):
        st.add_column(col)
    for s in m["stages"]:
        st.add_row(s["name"], s["status"], f"{s['seconds']:.2f}")
    con.print(st)
    total = sum(f["bytes"] for f in m["files"].values())
    con.print(f"files      {len(m['files'])} files, {total / 2**20:.1f} MiB")
    if bad:
        names = ", ".join(b.split(":")[0] for b in bad[:10])
        con.print(f"[red]{len(bad)} file(s) differ from the manifest[/]: {escape(names)}")
        return 1
    con.print(f"[green]every file matches its sha256 in the manifest[/] ({done['hashed']} rehashed, "
              f"{done['hashed_bytes'] / 2**20:.1f} MiB; the others unchanged since their last check)")
    return 0
