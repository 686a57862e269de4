#!/usr/bin/env python3
"""Build, train and save glmc-tiny: the small ChatGLM3-architecture model that ships in glmc/assets/glmc-tiny/.

Reproducible end to end on a CPU:

    python scripts/train_tiny.py                      # corpus -> tokenizer -> training -> glmc/assets/glmc-tiny/
    python scripts/train_tiny.py --bench              # 1-minute throughput trial (tokens/s, fp32 vs bf16)

Corpus (offline, deterministic): the text that ships with this Python interpreter's standard library:
  * every docstring (module, class, function, method) of the stdlib's .py files, found with `ast` (no import),
    files in sorted order, test suites and vendored third-party code left out; each is written as a small
    reference entry: "module.qualname(signature)" + newline + the cleaned docstring;
  * the Python Language Reference topics that `pydoc` ships (`pydoc_data.topics`), sorted by topic name.
Held-out split: whole source files (and whole pydoc topics) whose sha1(name) falls in the first 6% go to
validation, so held-out perplexity is measured on modules the model never saw.

A share of training samples (--chat-share) are ChatGLM3 chat turns built from the same docstrings:
[gMASK] sop <|user|> "\n" "What does X do?" <|assistant|> "\n" <first paragraph of X's docstring> </s>.

Tokenizer: SentencePiece BPE trained on the training split (byte_fallback, identity normalisation so that
newlines and indentation survive as in ChatGLM's own tokenizer); the 9 ChatGLM3 special tokens are appended
after the SentencePiece vocabulary (ids sp.vocab_size() + 0..8).

Everything intermediate goes to runs/train_tiny/ (git-ignored); the asset directory is written to a temporary
sibling and renamed into place, so it is never half-written.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "train_tiny"
ASSET = ROOT / "glmc" / "assets" / "glmc-tiny"

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]
EOS_ID = 2  # SentencePiece </s>; a ChatGLM3 stop id

# Parts of the stdlib that are not documentation prose: test suites, vendored code, tool scripts.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "ensurepip", "_vendor",
                 "lib2to3", "turtledemo", "pydoc_data", "__phello__", "config-3.11-x86_64-linux-gnu"}
VAL_PERCENT = 6


# ---------------------------------------------------------------------------------------------- corpus

def _signature(node: ast.AST) -> str:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = ast.unparse(node.args)
        if args.startswith("self, ") or args == "self":
            args = args[6:] if args != "self" else ""
        return f"({args})"
    return ""


def _docstrings(tree: ast.Module, module: str) -> list[tuple[str, str, str]]:
    """(kind, qualified name with signature, cleaned docstring) for the module and every class/function in it."""
    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(("module", module, doc))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{node.name}"
                if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                    pass  # private helpers: documented inconsistently; still visit classes' members below
                else:
                    d = ast.get_docstring(node, clean=True)
                    if d and len(d) >= 24:
                        kind = "class" if isinstance(node, ast.ClassDef) else "function"
                        out.append((kind, name + _signature(node), d))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name)
    visit(tree.body, module)
    return out


def extract_corpus() -> dict:
    """The documents (train/val), in a fixed order, with the exact sources listed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict] = []
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not (set(p.relative_to(stdlib).parts[:-1]) & EXCLUDED_DIRS)
                   and not p.name.startswith("test_"))
    for path in files:
        rel = path.relative_to(stdlib).as_posix()
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for kind, name, doc in _docstrings(tree, module):
            docs.append({"source": rel, "kind": kind, "name": name, "text": f"{name}\n{doc.strip()}\n"})
    import pydoc_data.topics as topics
    for key in sorted(topics.topics):
        text = topics.topics[key].strip()
        if text:
            docs.append({"source": f"pydoc_data/topics.py:{key}", "kind": "topic", "name": key, "text": text + "\n"})
    for d in docs:
        group = d["source"].split(":")[0] if d["kind"] != "topic" else d["source"]
        d["split"] = "val" if int(hashlib.sha1(group.encode()).hexdigest(), 16) % 100 < VAL_PERCENT else "train"
    text_hash = hashlib.sha256("\x00".join(d["text"] for d in docs).encode()).hexdigest()
    return {"python": sys.version.split()[0], "stdlib": str(stdlib), "files": len(files), "documents": docs,
            "sha256": text_hash}


def chat_pairs(docs: list[dict]) -> list[tuple[str, str]]:
    """("What does X do?", first paragraph) from function/class docstrings of the training split."""
    pairs = []
    for d in docs:
        if d["kind"] not in ("function", "class", "module"):
            continue
        name = d["name"].split("(")[0]
        body = d["text"].split("\n", 1)[1]
        para = body.split("\n\n")[0].strip()
        if 30 <= len(para) <= 400:
            q = f"What does {name} do?" if d["kind"] != "module" else f"What is the {name} module?"
            pairs.append((q, para))
    return pairs


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list[dict], vocab: int, out: Path) -> Path:
    import sentencepiece as spm
    text_file = out / "tokenizer_train.txt"
    with text_file.open("w", encoding="utf-8") as f:
        for d in docs:
            if d["split"] == "train":
                # One SentencePiece "sentence" per line; newlines inside are learned through byte fallback.
                for line in d["text"].split("\n"):
                    if line.strip():
                        f.write(line + "\n")
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=8192, shuffle_input_sentence=False, num_threads=1, input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix.with_suffix(".model")


class Tok:
    """SentencePiece + ChatGLM3 specials appended after it (what glmc's ChatGLM3 tokenizer does)."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n = self.sp.vocab_size()
        self.special = {name: self.n + i for i, name in enumerate(SPECIAL_TOKENS)}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def prefix(self) -> list[int]:
        return [self.special["[gMASK]"], self.special["sop"]]

    def chat(self, question: str, answer: str | None = None) -> list[int]:
        ids = self.prefix() + [self.special["<|user|>"]] + self.encode("\n") + self.encode(question)
        ids += [self.special["<|assistant|>"]]
        if answer is not None:
            ids += self.encode("\n") + self.encode(answer) + [EOS_ID]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.n])


def tokenize(docs: list[dict], tok: Tok, split: str, chat_share: float, seed: int) -> torch.Tensor:
    """One stream: each document as [gMASK] sop text </s>; chat turns interleaved at a fixed share."""
    rng = random.Random(seed)
    sel = [d for d in docs if d["split"] == split]
    samples = [tok.prefix() + tok.encode(d["text"]) + [EOS_ID] for d in sel]
    if chat_share > 0:
        plain_tokens = sum(len(s) for s in samples)
        pairs = chat_pairs(sel)
        chats = [tok.chat(q, a) for q, a in pairs]
        budget = int(plain_tokens * chat_share / (1 - chat_share))
        rng.shuffle(chats)
        taken, used = [], 0
        for c in chats:
            if used >= budget:
                break
            taken.append(c)
            used += len(c)
        samples += taken
    rng.shuffle(samples)
    return torch.tensor([t for s in samples for t in s], dtype=torch.int32)


# ---------------------------------------------------------------------------------------------- model

def make_config(args, vocab: int):
    from glmc.modeling_patches.config import variant
    padded = (vocab + 63) // 64 * 64
    return variant("chatglm3-6b", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                   num_heads=args.hidden // 64, num_kv_heads=2, head_dim=64, vocab_size=padded,
                   seq_length=args.context, torch_dtype="float16")


def init_model(config, seed: int):
    from glmc.modeling_patches.modeling_chatglm import GLMForCausalLM
    torch.manual_seed(seed)
    model = GLMForCausalLM(config)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
                p.normal_(0.0, std / math.sqrt(2 * config.num_layers))  # GPT-2 style residual scaling
            else:
                p.normal_(0.0, std)
    return model


def batch_loss(model, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    b, s = x.shape
    inp, tgt = x[:, :-1].long(), x[:, 1:].long()
    pos = torch.arange(s - 1).expand(b, -1)
    mask = torch.ones(b, s - 1, dtype=torch.int64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(inp, pos, mask, model.empty_cache(b))
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, batch: int, max_batches: int | None = None) -> float:
    """Perplexity over non-overlapping windows of the held-out stream (every token predicted once)."""
    model.train()  # same (reference) attention path as training; no dropout in this model
    n = (len(data) - 1) // seq
    windows = data[: n * seq + 1]
    total, count = 0.0, 0
    for i, start in enumerate(range(0, n, batch)):
        if max_batches is not None and i >= max_batches:
            break
        idx = range(start, min(start + batch, n))
        x = torch.stack([windows[j * seq: j * seq + seq + 1] for j in idx])
        loss = batch_loss(model, x, autocast=False)
        total += loss.item() * x.shape[0] * seq
        count += x.shape[0] * seq
    return math.exp(total / max(count, 1))


def sample_batch(data: torch.Tensor, seq: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    return torch.stack([data[s: s + seq + 1] for s in starts.tolist()])


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------- saving

def tokenizer_config(sp_vocab: int) -> dict:
    added = {str(sp_vocab + i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True} for i, name in enumerate(SPECIAL_TOKENS)}
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|user|>", "<|observation|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<unk>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "unk_token": "<unk>",
    }


def write_asset(model, tok_path: Path, sp_vocab: int, meta: dict, dest: Path) -> None:
    from glmc.modeling_patches.checkpoint import save_checkpoint
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = copy.deepcopy(model).to(torch.float16).eval()  # the fp32 master weights stay untouched
    save_checkpoint(half, tmp)
    shutil.copy(tok_path, tmp / "tokenizer.model")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(sp_vocab), indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------- main

def greedy(model, tok: Tok, prompt_ids: list[int], n: int, stop=(EOS_ID,)) -> str:
    from glmc.runtime.backend_torch import TorchBackend
    from glmc.runtime.generate import SamplingConfig, generate
    model.eval()
    cfg = SamplingConfig(max_new_tokens=n, stop_token_ids=list(stop))
    out = generate(TorchBackend(model), [prompt_ids], cfg)[0]
    return tok.decode(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--context", type=int, default=1024, help="seq_length written to config.json")
    ap.add_argument("--vocab", type=int, default=4096, help="SentencePiece vocabulary size")
    ap.add_argument("--seq", type=int, default=256, help="training window")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--chat-share", type=float, default=0.08)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (only if measured faster)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=200, help="write the asset dir every N steps too")
    ap.add_argument("--bench", action="store_true", help="measure tokens/s (fp32 and bf16) and exit")
    ap.add_argument("--out", type=Path, default=ASSET)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    corpus = extract_corpus()
    docs = corpus["documents"]
    n_train = sum(d["split"] == "train" for d in docs)
    chars = {s: sum(len(d["text"]) for d in docs if d["split"] == s) for s in ("train", "val")}
    print(f"corpus: Python {corpus['python']} stdlib {corpus['stdlib']}: {corpus['files']} files, {len(docs)} docs "
          f"({n_train} train / {len(docs) - n_train} val), {chars['train']} / {chars['val']} chars, "
          f"sha256 {corpus['sha256'][:16]}", flush=True)

    tok_path = train_tokenizer(docs, args.vocab, WORK)
    tok = Tok(tok_path)
    train = tokenize(docs, tok, "train", args.chat_share, args.seed)
    val = tokenize(docs, tok, "val", 0.0, args.seed)
    print(f"tokenizer: {tok.n} pieces + {len(SPECIAL_TOKENS)} specials; train {len(train)} tokens, val {len(val)} "
          f"tokens ({chars['train'] / len(train):.2f} chars/token) [{time.time() - t0:.0f}s]", flush=True)

    config = make_config(args, tok.n + len(SPECIAL_TOKENS))
    model = init_model(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {config.num_layers} layers, hidden {config.hidden_size}, ffn {config.ffn_hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv groups x {config.head_dim}, vocab {config.vocab_size}: "
          f"{n_params / 1e6:.2f} M parameters", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    if args.bench:
        for autocast in (False, True):
            m = init_model(config, args.seed)
            m.train()
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            times = []
            for _i in range(8 if not autocast else 4):  # bf16 is ~40x slower on this AVX2-only CPU: keep it short
                x = sample_batch(train, args.seq, args.batch, gen)
                t = time.time()
                loss = batch_loss(m, x, autocast)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                times.append(time.time() - t)
            dt = sorted(times[1:])[len(times[1:]) // 2]
            print(f"bench {'bf16' if autocast else 'fp32'}: {dt:.3f} s/step, {args.batch * args.seq / dt:.0f} tokens/s "
                  f"(loss {loss.item():.2f})", flush=True)
        return

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "word_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "word_embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    tokens_per_step = args.batch * args.seq
    print(f"training: {args.steps} steps x {tokens_per_step} tokens = {args.steps * tokens_per_step / 1e6:.1f} M tok "
          f"({args.steps * tokens_per_step / len(train):.1f} epochs), bf16 autocast {args.bf16}", flush=True)

    def snapshot(step: int, val_ppl: float, train_secs: float) -> None:
        meta = {"script": "scripts/train_tiny.py", "args": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()},
                "corpus": {"python": corpus["python"], "files": corpus["files"], "documents": len(docs),
                           "sha256": corpus["sha256"], "train_tokens": len(train), "val_tokens": len(val)},
                "parameters": n_params, "steps": step, "tokens_seen": step * tokens_per_step,
                "train_seconds": round(train_secs),
                "train_cpu_seconds": round(time.process_time() - cpu0), "val_perplexity": round(val_ppl, 3)}
        write_asset(model, tok_path, tok.n, meta, args.out)
        print(f"  wrote {args.out} (step {step}, val ppl {val_ppl:.2f})", flush=True)

    t_train, cpu0 = time.time(), time.process_time()
    ema = None
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        x = sample_batch(train, args.seq, args.batch, gen)
        loss = batch_loss(model, x, args.bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d} loss {loss.item():.3f} (ema {ema:.3f}) lr {opt.param_groups[0]['lr']:.2e} "
                  f"{(step + 1) * tokens_per_step / el:.0f} tok/s {el / 60:.1f} min "
                  f"(cpu {(time.process_time() - cpu0) / 60:.1f} min)", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ppl = evaluate(model, val, args.seq, 16, max_batches=8)
            print(f"  val ppl (partial) {ppl:.2f}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            snapshot(step + 1, evaluate(model, val, args.seq, 16, max_batches=8), time.time() - t_train)
    train_secs = time.time() - t_train
    val_ppl = evaluate(model, val, args.seq, 16)
    train_ppl = evaluate(model, train[: len(val)], args.seq, 16)
    print(f"done: {train_secs / 60:.1f} min training; held-out perplexity {val_ppl:.2f} "
          f"(train-split sample {train_ppl:.2f})", flush=True)
    snapshot(args.steps, val_ppl, train_secs)

    model.eval()
    for prompt in ("json.dumps", "Return the", "The with statement"):
        text = greedy(model, tok, tok.prefix() + tok.encode(prompt), 60)
        print(f"--- greedy: {prompt!r}\n{prompt}{text}", flush=True)
    for q in ("What does os.path.join do?", "What is the json module?"):
        print(f"--- chat: {q!r}\n{greedy(model, tok, tok.chat(q), 60, stop=(EOS_ID, tok.special['<|user|>']))}",
              flush=True)


if __name__ == "__main__":
    main()
