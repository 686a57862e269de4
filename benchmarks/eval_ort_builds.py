"""Perplexity of lowered models as ONNX Runtime runs them, on glmc's held-out text (what `glmc eval` does in torch).

    python benchmarks/eval_ort_builds.py int8=build/glmc-tiny-int8/onnx/onnxruntime/model.onnx \\
        fp32=build/glmc-tiny-fp32/onnx/onnxruntime/model.onnx [--model DIR] [--json out.json]

`glmc eval` measures the weights' quantization on torch models; a build's onnxruntime lowering may change the math
further (int8 activations in MatMulNBits, the CPU default for int8/int4 weights). Each held-out window of 256
tokens goes through the lowered graph in one forward (session options from its runtime config, 1 thread), and its
full logits are compared with the float32 torch model's: perplexity, relative logits error, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from glmc.artifact import session_of
from glmc.compiler.schema import shipped_model
from glmc.modeling_patches.checkpoint import load_model
from glmc.modeling_patches.tokenizer import load_tokenizer
from glmc.quantization.evaluate import heldout_windows, window_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="NAME=MODEL.onnx")
    ap.add_argument("--model", type=Path, default=None, help="the float checkpoint (default: the shipped model)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    ckpt = args.model or shipped_model()
    windows = heldout_windows(load_tokenizer(ckpt).encode, max_length=256)
    base = load_model(ckpt, "float32")
    refs = [window_logits(base, w, w.shape[1])[:-1] for w in windows]
    out = {}
    for name, path in (a.split("=", 1) for a in args.models):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(session_of(path).disabled_optimizers))
        pasts = [i for i in s.get_inputs() if i.name.startswith("past_key_values")]
        nll, n, top, err, ref_sq = 0.0, 0, 0, 0.0, 0.0
        for w, ref in zip(windows, refs, strict=True):
            length = w.shape[1]
            feed = {"input_ids": w.numpy(), "position_ids": np.arange(length)[None],
                    "attention_mask": np.ones((1, length), np.int64)}
            for p in pasts:
                feed[p.name] = np.zeros((1, p.shape[1], 0, p.shape[3]), np.float32)
            logits = torch.from_numpy(s.run(["logits"], feed)[0][0, :-1].astype(np.float32))
            target = w[0, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            n += len(target)
            err += float((logits.double() - ref.double()).pow(2).sum())
            ref_sq += float(ref.double().pow(2).sum())
            top += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        out[name] = {"perplexity": float(np.exp(nll / n)), "rel_error": (err / ref_sq) ** 0.5, "top1": top / n,
                     "tokens": n}
        print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
