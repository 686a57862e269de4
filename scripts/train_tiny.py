#!/usr/bin/env python3
"""Build, train, evaluate and save glmc-tiny: the small ChatGLM3-architecture model in glmc/assets/glmc-tiny/.

Three stages, each runnable alone (intermediate files in runs/train_tiny/, git-ignored):

    python scripts/train_tiny.py prepare     # here (needs sentencepiece): corpus -> tokenizer -> runs/train_tiny/data/
    python scripts/train_tiny.py train --device cuda --minutes 6 --out DIR   # needs torch + this repo only
    python scripts/train_tiny.py eval DIR [BASELINE_DIR]  # held-out ppl, bits/byte, Q/A score -> DIR/training.json
    python scripts/train_tiny.py all         # the three in a row on this CPU (slow), into glmc/assets/glmc-tiny/

Corpus (offline, deterministic for a given interpreter and set of installed packages):
  * every docstring (module, class, function, method) of the stdlib's .py files, read with `ast` (no import),
    files in sorted order, test suites and vendored code left out; each is one document:
    "module.qualname(signature)" + newline + the cleaned docstring;
  * the Python Language Reference topics that `pydoc` ships (`pydoc_data.topics`), sorted by topic name;
  * the same docstrings of the installed third-party packages in THIRD_PARTY (sorted; tests, vendored code,
    examples and benchmarks left out), their distribution versions recorded.
Splits by whole source file (or pydoc topic), by sha1(path) % 100: < 6 held-out ("val", never trained on,
the same stdlib files as the first glmc-tiny's held-out set), 6..7 "dev" (picks the checkpoint), else train.

Chat turns, laid out as glmc's ChatGLM3 chat format does ([gMASK] sop <|user|> encode("\n") encode(question)
<|assistant|> encode("\n") encode(answer) </s>), are made from the training docstrings' first paragraphs:
"What does X do?", "What is the X module?" and, for docstrings that start with a verb ("Return ...",
"Join ..."), "How do I <get> ...?" -> "Use X. <paragraph>". They are shuffled in with the documents.

Tokenizer: SentencePiece BPE trained on the training split (byte fallback, identity normalisation so that
newlines and indentation survive as in ChatGLM's own tokenizer); the 9 ChatGLM3 special tokens are appended
after the SentencePiece vocabulary (ids sp.vocab_size() + 0..8). The `prepare` stage also writes the piece
table, so that `train` decodes its samples without sentencepiece.

Training (`train`): random windows of the token stream; on CUDA bf16 autocast, fused AdamW, torch.compile
(eager if it fails), flash attention through F.scaled_dot_product_attention over the model's own parameters
(checked against the model's forward at start), residual dropout; the learning rate follows warmup + cosine
over --steps, or over the wall-clock budget --minutes. The asset (fp16 safetensors via glmc's save_checkpoint,
tokenizer, config, training.json) is written to a temporary sibling and renamed into place.

Evaluation (`eval`, also at the end of `train` for the new model): on the held-out documents, perplexity per
token and bits per UTF-8 byte (comparable across tokenizers), each document scored from its own start; and the
question/answer score on held-out docstrings: greedy answers to "What does X do?" through glmc's chat format,
compared with the first sentence of X's docstring (exact match of the first sentence, and ROUGE-L F1 of the
answer's first sentence against it).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "runs" / "train_tiny"
DATA = WORK / "data"
ASSET = ROOT / "glmc" / "assets" / "glmc-tiny"

SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]
EOS_ID = 2  # SentencePiece </s>; a ChatGLM3 stop id

# Parts of the stdlib that are not documentation prose: test suites, vendored code, tool scripts.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "ensurepip", "_vendor",
                 "lib2to3", "turtledemo", "pydoc_data", "__phello__", "config-3.11-x86_64-linux-gnu"}
# Installed packages whose docstrings join the corpus (import names, in site-packages), and what is left out.
THIRD_PARTY = ("_pytest", "anyio", "attr", "click", "dateutil", "docutils", "fastapi", "filelock", "flask", "fsspec",
               "huggingface_hub", "hypothesis", "jedi", "jinja2", "jsonschema", "libcst", "markdown_it", "mpmath",
               "mypy", "networkx", "numpy", "onnx", "onnx_ir", "onnxscript", "packaging", "parso", "pluggy",
               "prompt_toolkit", "pydantic", "pygments", "requests", "rich", "safetensors", "scipy", "sentencepiece",
               "sortedcontainers", "starlette", "sympy", "tokenizers", "torch", "tqdm", "transformers", "yaml")
THIRD_PARTY_EXCLUDED = {"test", "tests", "testing", "_vendor", "vendor", "vendored", "_vendored", "externals",
                        "extern", "third_party", "benchmarks", "examples", "_examples", "__pycache__"}
VAL_PERCENT, DEV_PERCENT = 6, 2
QA_VAL, QA_TRAIN = 400, 200  # held-out / training questions scored (a fixed sample: first by sha1(question))
VERBS = {"add", "apply", "build", "calculate", "check", "close", "compute", "convert", "copy", "create", "decode",
         "delete", "encode", "evaluate", "find", "format", "generate", "get", "join", "load", "make", "open",
         "parse", "read", "register", "remove", "render", "replace", "reset", "return", "run", "save", "send",
         "set", "sort", "split", "start", "stop", "update", "wait", "write"}


# ---------------------------------------------------------------------------------------------- corpus

def _signature(node) -> str:
    import ast
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = ast.unparse(node.args)
        if args.startswith("self, ") or args == "self":
            args = args[6:] if args != "self" else ""
        return f"({args})"
    return ""


def _docstrings(tree, module: str) -> list[tuple[str, str, str]]:
    """(kind, qualified name with signature, cleaned docstring) for the module and every class/function in it."""
    import ast
    out = []
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        out.append(("module", module, doc))

    def visit(body: list, prefix: str) -> None:
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


def _file_docs(path: Path, rel: str, module: str, source: str) -> list[dict]:
    import ast
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    return [{"source": source, "kind": kind, "name": name, "text": f"{name}\n{doc.strip()}\n"}
            for kind, name, doc in _docstrings(tree, module)]


def split_of(group: str) -> str:
    bucket = int(hashlib.sha1(group.encode()).hexdigest(), 16) % 100
    return "val" if bucket < VAL_PERCENT else "dev" if bucket < VAL_PERCENT + DEV_PERCENT else "train"


def extract_corpus() -> dict:
    """The documents (train/dev/val), in a fixed order, with the exact sources listed."""
    import importlib.metadata
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    docs: list[dict] = []
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not (set(p.relative_to(stdlib).parts[:-1]) & EXCLUDED_DIRS)
                   and not p.name.startswith("test_"))
    for path in files:
        rel = path.relative_to(stdlib).as_posix()
        docs += _file_docs(path, rel, rel[:-3].replace("/", ".").removesuffix(".__init__"), rel)
    import pydoc_data.topics as topics
    for key in sorted(topics.topics):
        text = topics.topics[key].strip()
        if text:
            docs.append({"source": f"pydoc_data/topics.py:{key}", "kind": "topic", "name": key, "text": text + "\n"})
    dists = importlib.metadata.packages_distributions()
    versions, n_third = {}, 0
    for pkg in sorted(THIRD_PARTY):
        root = site / pkg
        if not root.is_dir():
            continue
        versions[pkg] = ", ".join(f"{d}=={importlib.metadata.version(d)}" for d in sorted(set(dists.get(pkg, []))))
        pfiles = sorted(p for p in root.rglob("*.py")
                        if not (set(p.relative_to(site).parts[:-1]) & THIRD_PARTY_EXCLUDED)
                        and not p.name.startswith("test_") and p.name != "conftest.py")
        n_third += len(pfiles)
        for path in pfiles:
            rel = path.relative_to(site).as_posix()
            docs += _file_docs(path, rel, rel[:-3].replace("/", ".").removesuffix(".__init__"), f"site-packages/{rel}")
    for d in docs:
        d["stdlib"] = not d["source"].startswith("site-packages/")
        d["split"] = split_of(d["source"] if d["kind"] == "topic" else d["source"].split(":")[0])
    text_hash = hashlib.sha256("\x00".join(d["text"] for d in docs).encode()).hexdigest()
    return {"python": sys.version.split()[0], "stdlib": str(stdlib), "files": len(files), "third_party_files": n_third,
            "packages": versions, "documents": docs, "sha256": text_hash}


def first_paragraph(doc: dict) -> str:
    return doc["text"].split("\n", 1)[1].split("\n\n")[0].strip()


def first_sentence(text: str) -> str:
    """The first sentence of a paragraph, whitespace collapsed ("e.g." and "os.path" do not end it)."""
    t = " ".join(text.split())
    m = re.search(r"(?<!e\.g)(?<!i\.e)[.!?](?=\s+[A-Z0-9`'\"(*:]|\s*$)", t)
    return t[: m.end()] if m else t


def chat_pairs(d: dict) -> list[tuple[str, str]]:
    """The chat turns made from one document's first paragraph (none for topics or unusable paragraphs)."""
    if d["kind"] not in ("function", "class", "module"):
        return []
    name = d["name"].split("(")[0]
    para = first_paragraph(d)
    if not 20 <= len(para) <= 600:
        return []
    if d["kind"] == "module":
        return [(f"What is the {name} module?", para)]
    pairs = [(f"What does {name} do?", para)]
    sentence = first_sentence(para)
    words = sentence.rstrip(".").split(" ")
    verb = words[0].lower()
    for suffix in ("es", "s"):
        if verb not in VERBS and verb.endswith(suffix) and verb[: -len(suffix)] in VERBS:
            verb = verb[: -len(suffix)]
    if verb in VERBS and len(words) >= 3 and sentence.endswith(".") and words[0][:1].isupper():
        verb = "get" if verb == "return" else verb
        pairs.append((f"How do I {verb} {' '.join(words[1:])}?", f"Use {name}. {para}"))
    return pairs


def qa_sample(docs: list[dict], split: str, n: int) -> list[dict]:
    """The scored questions: "What does X do?" / "What is the X module?" -> the first sentence, a fixed sample."""
    out = []
    for d in docs:
        if d["split"] != split:
            continue
        for q, para in chat_pairs(d)[:1]:
            out.append({"question": q, "reference": first_sentence(para), "stdlib": d["stdlib"],
                        "source": d["source"]})
    out.sort(key=lambda x: hashlib.sha1(x["question"].encode()).hexdigest())
    seen, unique = set(), []
    for x in out:  # overloads and re-exports ask the same question: keep the first
        if x["question"] not in seen:
            seen.add(x["question"])
            unique.append(x)
    return unique[:n]


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(docs: list[dict], vocab: int, out: Path) -> Path:
    import sentencepiece as spm
    text_file = out / "tokenizer_train.txt"
    with text_file.open("w", encoding="utf-8") as f:
        for d in docs:
            if d["split"] == "train":
                # One SentencePiece "sentence" per line; newlines inside are learned through byte fallback.
                lines = d["text"].split("\n") + [x for q, a in chat_pairs(d) for x in (q, a)]
                for line in lines:
                    if line.strip():
                        f.write(line + "\n")
    prefix = out / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=8192, shuffle_input_sentence=False, num_threads=1, input_sentence_size=0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    text_file.unlink()
    return prefix.with_suffix(".model")


class Pieces:
    """Decoding with the piece table alone (no sentencepiece needed): byte pieces <0xNN>, '▁' is a space."""

    def __init__(self, pieces: list[str]):
        self.n = len(pieces)
        self.bytes = []
        for i, p in enumerate(pieces):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", p):
                self.bytes.append(bytes([int(p[3:5], 16)]))
            elif i < 3:  # <unk> <s> </s>
                self.bytes.append(b"")
            else:
                self.bytes.append(p.replace("\u2581", " ").encode())

    def decode(self, ids) -> str:
        text = b"".join(self.bytes[i] for i in ids if 0 <= i < self.n).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text  # the dummy prefix, as SentencePiece drops it


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


def prepare(args) -> None:
    """Corpus -> tokenizer -> token streams and evaluation sets in runs/train_tiny/data/ (compact files)."""
    t0 = time.time()
    DATA.mkdir(parents=True, exist_ok=True)
    corpus = extract_corpus()
    docs = corpus["documents"]
    count = {s: sum(d["split"] == s for d in docs) for s in ("train", "dev", "val")}
    chars = {s: sum(len(d["text"]) for d in docs if d["split"] == s) for s in ("train", "dev", "val")}
    print(f"corpus: Python {corpus['python']}: {corpus['files']} stdlib + {corpus['third_party_files']} third-party "
          f"files, {len(docs)} docs (train/dev/val {count}), chars {chars}, sha256 {corpus['sha256'][:16]} "
          f"[{time.time() - t0:.0f}s]", flush=True)
    tok_path = train_tokenizer(docs, args.vocab, DATA)
    tok = Tok(tok_path)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.n)]
    rng = random.Random(args.seed)
    streams, chat_tokens = {}, 0
    for split in ("train", "dev", "val"):
        sel = [d for d in docs if d["split"] == split]
        samples = [tok.prefix() + ids + [EOS_ID] for ids in tok.sp.encode([d["text"] for d in sel])]
        if split == "train":
            chats = [tok.chat(q, a) for d in sel for q, a in chat_pairs(d)]
            chat_tokens = sum(len(c) for c in chats)
            corpus["chat_turns"] = len(chats)
            samples += chats
        rng.shuffle(samples)
        streams[split] = np.array([t for s in samples for t in s], dtype=np.uint16)
        np.save(DATA / f"{split}.npy", streams[split])
    # Held-out documents for bits per byte: token ids per document (the new tokenizer), and the texts.
    val_docs = [d for d in docs if d["split"] == "val"]
    ids = tok.sp.encode([d["text"] for d in val_docs])
    np.savez(DATA / "val_docs.npz", tokens=np.array([t for x in ids for t in x], dtype=np.uint16),
             offsets=np.cumsum([0] + [len(x) for x in ids]), nbytes=[len(d["text"].encode()) for d in val_docs],
             stdlib=[d["stdlib"] for d in val_docs])
    (DATA / "val_docs.json").write_text(json.dumps([{"text": d["text"], "stdlib": d["stdlib"]} for d in val_docs]))
    qa = {"val": qa_sample(docs, "val", QA_VAL), "train": qa_sample(docs, "train", QA_TRAIN)}
    for items in qa.values():
        for x in items:
            x["ids"] = tok.chat(x["question"])
    (DATA / "qa.json").write_text(json.dumps(qa, indent=0))
    (DATA / "pieces.json").write_text(json.dumps(pieces))
    dec = Pieces(pieces)
    for d in val_docs[:300]:  # the piece-table decoder is the SentencePiece decoder
        assert dec.decode(tok.encode(d["text"])) == tok.sp.decode(tok.encode(d["text"])), d["name"]
    meta = {k: v for k, v in corpus.items() if k != "documents"}
    meta.update({"documents": len(docs), "split_documents": count, "split_chars": chars,
                 "tokens": {s: len(v) for s, v in streams.items()}, "chat_tokens": chat_tokens,
                 "val_docs": len(val_docs), "val_bytes": int(sum(len(d["text"].encode()) for d in val_docs)),
                 "val_bytes_stdlib": int(sum(len(d["text"].encode()) for d in val_docs if d["stdlib"])),
                 "sp_vocab": tok.n, "seed": args.seed})
    (DATA / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"tokenizer: {tok.n} pieces + {len(SPECIAL_TOKENS)} specials; tokens {meta['tokens']} "
          f"({chars['train'] / len(streams['train']):.2f} chars/token), {corpus['chat_turns']} chat turns "
          f"({chat_tokens} tokens), Q/A {len(qa['val'])} held-out / {len(qa['train'])} trained "
          f"[{time.time() - t0:.0f}s]", flush=True)


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


def fast_logits(model, ids: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """The model's forward for training windows (positions 0..S-1, no padding, no cache) over its own parameters,
    with attention through F.scaled_dot_product_attention (flash on CUDA) and residual dropout."""
    import torch.nn.functional as F

    from glmc.modeling_patches.ops.attention import apply_rotary
    c = model.config
    b, s = ids.shape
    cos, sin = model.cos_cache[None, :s], model.sin_cache[None, :s]
    x = model.transformer.embedding.word_embeddings(ids)
    for layer in model.transformer.encoder.blocks():
        at = layer.self_attention
        h = layer.input_layernorm(x)
        q, k, v = at.query_key_value(h).split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                                               c.num_kv_heads * c.head_dim], dim=-1)
        q = apply_rotary(q.view(b, s, c.num_heads, c.head_dim), cos.to(q.dtype), sin.to(q.dtype)).transpose(1, 2)
        k = apply_rotary(k.view(b, s, c.num_kv_heads, c.head_dim), cos.to(k.dtype), sin.to(k.dtype)).transpose(1, 2)
        v = v.view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # head i uses kv head i // G
        x = x + F.dropout(at.dense(o.transpose(1, 2).reshape(b, s, -1)), dropout, model.training)
        x = x + F.dropout(layer.mlp(layer.post_attention_layernorm(x)), dropout, model.training)
    return model.transformer.output_layer(model.transformer.encoder.final_layernorm(x))


def check_fast_forward(model, seq: int) -> float:
    """fast_logits == the model's own forward (float32, CPU): the largest absolute logit difference."""
    m = copy.deepcopy(model).float().cpu().eval()
    assert not m.config.residual_post_layernorm
    x = torch.randint(0, m.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = m(x, torch.arange(seq).expand(2, -1), torch.ones(2, seq, dtype=torch.int64), m.empty_cache(2))
        diff = (fast_logits(m, x) - ref).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"fast forward differs from the model's forward by {diff}")
    return diff


def lr_at(progress: float, peak: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup over the first `warmup` of progress, then cosine to floor x peak at progress 1."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    t = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
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
    half = copy.deepcopy(model).to(device="cpu", dtype=torch.float16).eval()  # the fp32 master weights stay
    # shards of at most ~11 MB: no tracked file of the repository over the 20 MB clone-weight limit
    save_checkpoint(half, tmp, layout="sharded-safetensors", shard_bytes=11 << 20)
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


# ---------------------------------------------------------------------------------------------- evaluation

def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased word and punctuation tokens."""
    a = re.findall(r"\w+|[^\w\s]", candidate.lower())
    b = re.findall(r"\w+|[^\w\s]", reference.lower())
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


@torch.no_grad()
def doc_scores(model, docs: list[list[int]], prefix: list[int], window: int, device: str) -> list[float]:
    """Sum of -log p (nats) of each document's tokens and </s>, after [gMASK] sop, in windows of `window`
    positions that each start fresh (identical for any tokenizer; documents longer than a window lose context)."""
    model.eval()
    rows = []  # (doc index, input ids, number of leading positions whose prediction is not scored)
    for i, ids in enumerate(docs):
        seq = prefix + list(ids) + [EOS_ID]
        for start in range(0, len(seq) - 1, window):
            chunk = seq[start: start + window + 1]
            rows.append((i, chunk, len(prefix) - 1 if start == 0 else 0))
    rows.sort(key=lambda r: -len(r[1]))  # longest first: each batch's first row sets its width
    out = [0.0] * len(docs)
    batch_tokens = 16384 if device == "cuda" else 4096
    k = 0
    while k < len(rows):
        n = max(1, batch_tokens // len(rows[k][1]))
        group = rows[k: k + n]
        k += n
        width = max(len(r[1]) for r in group)
        x = torch.zeros(len(group), width, dtype=torch.int64)
        valid = torch.zeros(len(group), width - 1, dtype=torch.bool)
        for j, (_, chunk, skip) in enumerate(group):
            x[j, : len(chunk)] = torch.tensor(chunk)
            valid[j, skip: len(chunk) - 1] = True
        x, valid = x.to(device), valid.to(device)
        logits = fast_logits(model, x[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        sums = (nll.view(len(group), -1) * valid).sum(1).tolist()
        for (i, _, _), v in zip(group, sums, strict=True):
            out[i] += v
    return out


def heldout(model, docs: list[list[int]], nbytes: list[int], stdlib: list[bool], prefix: list[int], window: int,
            device: str) -> dict:
    """Perplexity per token and bits per byte on the held-out documents, all and stdlib only."""
    nll = doc_scores(model, docs, prefix, window, device)
    res = {}
    for name, keep in (("all", [True] * len(docs)), ("stdlib", stdlib)):
        tot = sum(v for v, k in zip(nll, keep, strict=True) if k)
        toks = sum(len(d) + 1 for d, k in zip(docs, keep, strict=True) if k)
        byt = sum(b for b, k in zip(nbytes, keep, strict=True) if k)
        res[name] = {"documents": sum(keep), "tokens": toks, "bytes": byt, "perplexity": round(math.exp(tot / toks), 3),
                     "bits_per_byte": round(tot / math.log(2) / byt, 4)}
    return res


def qa_answers(model, prompts: list[list[int]], decode, stops: list[int], device: str, max_new: int = 64) -> list[str]:
    """Greedy answers through glmc's generation loop (batched, shortest prompts together)."""
    from glmc.runtime.backend_torch import TorchBackend
    from glmc.runtime.generate import SamplingConfig, generate
    model.eval()
    backend = TorchBackend(model)
    cfg = SamplingConfig(max_new_tokens=max_new, stop_token_ids=stops)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, list[int]] = {}
    bs = 100 if device == "cuda" else 25
    for k in range(0, len(order), bs):
        idx = order[k: k + bs]
        for i, o in zip(idx, generate(backend, [prompts[i] for i in idx], cfg), strict=True):
            outs[i] = o
    return [decode(outs[i]).strip() for i in range(len(prompts))]


def qa_score(items: list[dict], answers: list[str]) -> dict:
    """Exact match of the answer's first sentence with the reference first sentence, and their ROUGE-L F1."""
    got = [first_sentence(a) for a in answers]
    n = max(1, len(items))
    return {"questions": len(items),
            "exact_match": round(sum(g == x["reference"] for g, x in zip(got, items, strict=True)) / n, 4),
            "rouge_l_f1": round(sum(rouge_l(g, x["reference"]) for g, x in zip(got, items, strict=True)) / n, 4)}


def evaluate_model(model, encode, chat, decode, stops: list[int], prefix: list[int], device: str,
                   qa_limit: int | None = None, docs_ids: list[list[int]] | None = None) -> dict:
    """Held-out ppl/bpb and the Q/A scores for one model with its own tokenizer (functions given; chat None:
    the prompts tokenized by `prepare`)."""
    val_docs = json.loads((DATA / "val_docs.json").read_text())
    qa = json.loads((DATA / "qa.json").read_text())
    if docs_ids is None:
        docs_ids = [encode(d["text"]) for d in val_docs]
    nbytes = [len(d["text"].encode()) for d in val_docs]
    t = time.time()
    res: dict = {"heldout": heldout(model, docs_ids, nbytes, [d["stdlib"] for d in val_docs], prefix, 1024, device)}
    res["heldout_seconds"] = round(time.time() - t, 1)
    t = time.time()
    for split, key in (("val", "qa_heldout"), ("train", "qa_trained")):
        items = qa[split][:qa_limit] if qa_limit else qa[split]
        answers = qa_answers(model, [x["ids"] if chat is None else chat(x["question"]) for x in items], decode,
                             stops, device)
        res[key] = qa_score(items, answers)
        if split == "val":
            sub = [i for i, x in enumerate(items) if x["stdlib"]]
            res["qa_heldout_stdlib"] = qa_score([items[i] for i in sub], [answers[i] for i in sub])
        res[key]["samples"] = [{"q": x["question"], "ref": x["reference"], "answer": a}
                               for x, a in list(zip(items, answers, strict=True))[:8]]
    res["qa_seconds"] = round(time.time() - t, 1)
    return res


def eval_dirs(args) -> None:
    """`eval`: each model directory with its own tokenizer (glmc's), on the same held-out text; the scores go
    into the first directory's training.json ("evaluation"), the others' as baselines."""
    from glmc.modeling_patches.checkpoint import load_model
    from glmc.modeling_patches.tokenizer import load_tokenizer
    from glmc.runtime.chat_format import chat_prompt, prefix_ids
    torch.set_num_threads(args.threads)
    results = {}
    corpus_hash = json.loads((DATA / "meta.json").read_text())["sha256"]
    for i, d in enumerate(args.dirs):
        key = os.path.relpath(Path(d).resolve(), ROOT)
        own = json.loads((Path(d) / "training.json").read_text()).get("evaluation", {}) \
            if (Path(d) / "training.json").is_file() else {}
        if i > 0 and own.get("corpus_sha256") == corpus_hash and key in own.get("models", {}) \
                and not args.qa_limit:  # a baseline already scored on this corpus by this command: reuse
            results[key] = own["models"][key]
            print(f"{d}: reused its own evaluation ({(Path(d) / 'training.json')})", flush=True)
            continue
        t = time.time()
        model = load_model(d, dtype="float32", device=args.device)
        tok = load_tokenizer(d)
        stops = [tok.special("eos"), tok.special("<|user|>"), tok.special("<|observation|>")]
        res = evaluate_model(model, tok.encode, lambda q, tok=tok: chat_prompt(tok, [{"role": "user", "content": q}]),
                             tok.decode, stops, prefix_ids(tok), args.device, args.qa_limit)
        res["parameters"] = sum(p.numel() for p in model.parameters())
        res["seconds"] = round(time.time() - t)
        results[key] = res
        print(f"{d}: {json.dumps({k: v for k, v in res.items()}, indent=1)}", flush=True)
    first = Path(args.dirs[0])
    meta_path = first / "training.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    data_meta = json.loads((DATA / "meta.json").read_text())
    meta["evaluation"] = {
        "command": "python scripts/train_tiny.py eval " + " ".join(os.path.relpath(p, ROOT) for p in args.dirs),
        "corpus_sha256": data_meta["sha256"], "device": args.device,
        "models": results}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {meta_path}", flush=True)


# ---------------------------------------------------------------------------------------------- training

def train(args) -> None:
    device = args.device
    torch.manual_seed(args.seed)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    meta = json.loads((DATA / "meta.json").read_text())
    pieces = Pieces(json.loads((DATA / "pieces.json").read_text()))
    sp_vocab = meta["sp_vocab"]
    special = {name: sp_vocab + i for i, name in enumerate(SPECIAL_TOKENS)}
    streams = {s: torch.from_numpy(np.load(DATA / f"{s}.npy").astype(np.int64)).to(device) for s in ("train", "dev")}
    train_data = streams["train"]
    config = make_config(args, sp_vocab + len(SPECIAL_TOKENS))
    model = init_model(config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    diff = check_fast_forward(model, 64)
    print(f"model: {config.num_layers} layers, hidden {config.hidden_size}, ffn {config.ffn_hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv groups x {config.head_dim}, vocab {config.vocab_size}: "
          f"{n_params / 1e6:.2f} M parameters ({2 * n_params / 1e6:.1f} MB fp16); fast forward matches "
          f"(max |diff| {diff:.1e}); train {len(train_data)} tokens", flush=True)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "word_embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "word_embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=device == "cuda")
    bf16 = device == "cuda" or args.bf16
    seq, batch = args.seq, args.batch
    offsets = torch.arange(seq + 1, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def loss_fn(x: torch.Tensor, dropout: float) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = fast_logits(model, x[:, :-1], dropout)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

    step_loss = loss_fn
    compiled = False
    if device == "cuda" and not args.no_compile:
        try:
            step_loss = torch.compile(loss_fn)
            compiled = True
        except Exception as e:  # noqa: BLE001 - eager is the fallback
            print(f"torch.compile unavailable ({e}); eager", flush=True)

    def sample(data: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g, device=device)
        return data[starts[:, None] + offsets]

    dev_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    dev_batches = [sample(streams["dev"], batch, dev_gen) for _ in range(args.dev_batches)]

    @torch.no_grad()
    def dev_loss() -> float:
        model.eval()
        tot = sum(loss_fn(x, 0.0).item() for x in dev_batches)
        model.train()
        return tot / len(dev_batches)

    budget = args.minutes * 60 if args.minutes else None
    tokens_per_step = batch * seq
    length = f"{args.minutes:.1f} min" if budget else f"{args.steps} steps"
    print(f"training: batch {batch} x {seq} = {tokens_per_step} tokens/step, {length}, lr {args.lr}, "
          f"dropout {args.dropout}, "
          f"bf16 {bf16}, compile {compiled}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}",
          flush=True)
    model.train()
    # First step separately: compilation (if any) stays out of the time budget; eager if it fails.
    t_compile = time.time()
    try:
        loss = step_loss(sample(train_data, batch, gen), args.dropout)
        loss.backward()
    except Exception as e:
        if not compiled:
            raise
        print(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager", flush=True)
        step_loss, compiled = loss_fn, False
        opt.zero_grad(set_to_none=True)
        loss = step_loss(sample(train_data, batch, gen), args.dropout)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    compile_secs = time.time() - t_compile
    print(f"first step (compile {compiled}) {compile_secs:.1f}s, loss {loss.item():.3f}", flush=True)

    t_train, cpu0 = time.time(), time.process_time()
    best: tuple[float, int, dict | None] = (float("inf"), 0, None)  # dev loss, step, state
    history = []
    step, last_log, last_eval = 0, 0.0, 0.0
    while True:
        el = time.time() - t_train
        progress = el / budget if budget else step / args.steps
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_loss(sample(train_data, batch, gen), args.dropout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if el - last_log >= args.log_seconds or step == 1:
            last_log = el
            print(f"step {step:6d} loss {loss.item():.3f} lr {lr:.2e} {step * tokens_per_step / max(el, 1e-9):.0f} "
                  f"tok/s {el:.0f}s ({step * tokens_per_step / len(train_data):.2f} epochs)", flush=True)
        if el - last_eval >= args.eval_seconds and step > 1:
            last_eval = el
            dl = dev_loss()
            history.append({"step": step, "seconds": round(el), "dev_loss": round(dl, 4)})
            print(f"  dev loss {dl:.4f} (ppl {math.exp(dl):.2f})", flush=True)
            if dl < best[0]:
                best = (dl, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
    train_secs = time.time() - t_train
    dl = dev_loss()
    history.append({"step": step, "seconds": round(train_secs), "dev_loss": round(dl, 4)})
    kept = step
    if best[2] is not None and best[0] < dl:
        model.load_state_dict(best[2])
        kept, dl = best[1], best[0]
    print(f"done: {step} steps, {step * tokens_per_step / 1e6:.1f} M tokens "
          f"({step * tokens_per_step / len(train_data):.1f} epochs) in {train_secs:.0f}s; kept step {kept} "
          f"(dev loss {dl:.4f})", flush=True)

    tok_path = DATA / "tokenizer.model"
    out = {"script": "scripts/train_tiny.py",
           "command": "python scripts/train_tiny.py " + " ".join(sys.argv[1:]),
           "args": {k: os.path.relpath(v, ROOT) if isinstance(v, Path) else v for k, v in vars(args).items()
                    if k not in ("func", "dirs")},
           "corpus": {k: meta[k] for k in ("python", "files", "third_party_files", "documents", "split_documents",
                                           "split_chars", "sha256", "tokens", "chat_turns", "chat_tokens", "packages")},
           "parameters": n_params, "steps": step, "kept_step": kept, "tokens_per_step": tokens_per_step,
           "tokens_seen": step * tokens_per_step, "epochs": round(step * tokens_per_step / len(train_data), 2),
           "train_seconds": round(train_secs), "compile_seconds": round(compile_secs),
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "train_cpu_seconds": round(time.process_time() - cpu0), "dev_loss": round(dl, 4), "history": history,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_asset(model, tok_path, sp_vocab, out, args.out)
    print(f"wrote {args.out}", flush=True)

    # The shipped (float16) weights, evaluated as glmc loads them.
    from glmc.modeling_patches.checkpoint import load_model
    shipped = load_model(args.out, dtype="float32", device=device)
    vd = np.load(DATA / "val_docs.npz")
    toks, offs = vd["tokens"].astype(np.int64), vd["offsets"]
    docs_ids = [toks[offs[i]: offs[i + 1]].tolist() for i in range(len(offs) - 1)]
    stops = [EOS_ID, special["<|user|>"], special["<|observation|>"]]
    t = time.time()
    res = evaluate_model(shipped, None, None, pieces.decode, stops, [special["[gMASK]"], special["sop"]], device,
                         args.qa_limit, docs_ids)
    res["seconds"] = round(time.time() - t)
    out["evaluation_at_training"] = res
    (args.out / "training.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(res, indent=1), flush=True)
    for prompt in ("json.dumps", "os.path.join"):
        text = sample_text(shipped, [special["[gMASK]"], special["sop"]], prompt, pieces, device)
        print(f"--- greedy {prompt!r}: {text!r}", flush=True)


def sample_text(model, prefix: list[int], prompt: str, pieces: Pieces, device: str) -> str:
    """A raw greedy continuation of a prompt that is encoded by looking its pieces up (no sentencepiece)."""
    from glmc.runtime.backend_torch import TorchBackend
    from glmc.runtime.generate import SamplingConfig, generate
    table = {p: i for i, p in enumerate(json.loads((DATA / "pieces.json").read_text()))}
    ids, text = [], "\u2581" + prompt
    while text:  # greedy longest match, byte fallback
        for n in range(min(len(text), 16), 0, -1):
            if text[:n] in table:
                ids.append(table[text[:n]])
                text = text[n:]
                break
        else:
            ids += [table[f"<0x{b:02X}>"] for b in text[0].encode()]
            text = text[1:]
    out = generate(TorchBackend(model), [prefix + ids], SamplingConfig(max_new_tokens=48, stop_token_ids=[EOS_ID]))
    return prompt + pieces.decode(out[0])


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("prepare", help="corpus, tokenizer, token streams -> runs/train_tiny/data/")
    p.add_argument("--vocab", type=int, default=4096, help="SentencePiece vocabulary size")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=prepare)
    for name in ("train", "all"):
        t = sub.add_parser(name, help="train on runs/train_tiny/data/ -> --out" if name == "train"
                           else "prepare + train + eval on this machine")
        t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        t.add_argument("--layers", type=int, default=4)
        t.add_argument("--hidden", type=int, default=512)
        t.add_argument("--ffn", type=int, default=768)
        t.add_argument("--context", type=int, default=1024, help="seq_length written to config.json")
        t.add_argument("--seq", type=int, default=512, help="training window")
        t.add_argument("--batch", type=int, default=128)
        t.add_argument("--steps", type=int, default=3000, help="schedule length when --minutes is not given")
        t.add_argument("--minutes", type=float, default=0.0, help="train for this wall-clock time instead")
        t.add_argument("--lr", type=float, default=2e-3)
        t.add_argument("--warmup", type=float, default=0.03, help="share of the schedule")
        t.add_argument("--weight-decay", type=float, default=0.1)
        t.add_argument("--dropout", type=float, default=0.1, help="residual dropout")
        t.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (CUDA always uses it)")
        t.add_argument("--no-compile", action="store_true")
        t.add_argument("--seed", type=int, default=1234)
        t.add_argument("--threads", type=int, default=2)
        t.add_argument("--dev-batches", type=int, default=8)
        t.add_argument("--eval-seconds", type=float, default=30.0)
        t.add_argument("--log-seconds", type=float, default=10.0)
        t.add_argument("--qa-limit", type=int, default=0, help="score only the first N questions (0: all)")
        t.add_argument("--out", type=Path, default=ASSET)
        if name == "all":
            t.add_argument("--vocab", type=int, default=4096)
            t.add_argument("--baseline", type=Path, default=None, help="a model directory to compare with")
        t.set_defaults(func=train if name == "train" else run_all)
    e = sub.add_parser("eval", help="score model directories (the first gets the results in its training.json)")
    e.add_argument("dirs", nargs="+", type=Path)
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--qa-limit", type=int, default=0)
    e.set_defaults(func=eval_dirs)
    args = ap.parse_args()
    args.func(args)


def run_all(args) -> None:
    prepare(args)
    train(args)
    args.dirs = [args.out] + ([args.baseline] if args.baseline else [])
    eval_dirs(args)


if __name__ == "__main__":
    main()
