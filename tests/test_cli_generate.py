"""`glmc generate` / `glmc chat` and the embedded API on a random tiny model with a tokenizer built here."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_tokenizer import build_sentencepiece, build_tiktoken

import glmc
from glmc.assets import SHIPPED_MODEL
from glmc.cli import main
from glmc.modeling_patches.checkpoint import random_model, save_checkpoint
from glmc.modeling_patches.config import variant
from glmc.modeling_patches.tokenizer import load_tokenizer
from glmc.runtime.chat_format import chat_prompt, raw_prompt, stop_ids

CONTEXT = 64


def make_model_dir(d, family: str):
    """A random 2-layer model of `family` whose vocabulary is exactly its tokenizer's, saved with it."""
    build_tiktoken(d) if family == "glm4" else build_sentencepiece(d)
    tok = load_tokenizer(d, family)
    name = {"chatglm3": "chatglm3-6b", "glm4": "glm-4-9b-chat"}[family]
    config = variant(name, num_layers=2, hidden_size=64, ffn_hidden_size=96, num_heads=4, head_dim=16,
                     vocab_size=tok.vocab_size, seq_length=CONTEXT)
    save_checkpoint(random_model(config, seed=1, std=0.5), d)
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model"), "chatglm3")


def greedy_oracle(d, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy decoding by full recomputation (no cache, no streaming): what the CLI must print."""
    from glmc.modeling_patches.checkpoint import load_model
    model, tok = load_model(d), load_tokenizer(d)
    ids, stops = list(prompt_ids), set(stop_ids(tok))
    for _ in range(max_new):
        x = torch.tensor([ids])
        logits, _ = model(x, torch.arange(len(ids))[None], torch.ones_like(x), model.empty_cache(1))
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


def test_generate_raw_prints_the_greedy_continuation(model_dir, capsys):
    tok = load_tokenizer(model_dir)
    expected = tok.decode(greedy_oracle(model_dir, raw_prompt(tok, "hello world"), 12))
    assert main(["generate", "--model", str(model_dir), "--raw", "--max-new-tokens", "12", "hello world"]) == 0
    out = capsys.readouterr().out
    assert out == expected + "\n" and expected.strip()


def test_generate_chat_template_and_subprocess(model_dir, capsys):
    tok = load_tokenizer(model_dir)
    generated = tok.decode(greedy_oracle(model_dir, chat_prompt(tok, [{"role": "user", "content": "hi"}]), 10))
    reply = generated.split("\n", 1)[1].strip() if "\n" in generated else generated.strip()  # metadata line off
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "10", "hi"]) == 0
    assert capsys.readouterr().out == reply + "\n"
    proc = subprocess.run([sys.executable, "-m", "glmc.cli", "generate", "--model", str(model_dir),
                           "--max-new-tokens", "10", "hi"], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, reply + "\n"), proc.stderr


def test_too_long_prompt_is_a_clear_error(model_dir, capsys):
    long_prompt = "hello world " * 60
    assert main(["generate", "--model", str(model_dir), "--raw", long_prompt]) == 2
    err = capsys.readouterr().err
    assert "model's context is 64 tokens" in err and str(model_dir) in err
    assert main(["generate", "--model", str(model_dir / "nope"), "hi"]) == 2
    assert "nope: model directory does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--top-p", "0", "hi"]) == 2
    assert "top_p=0.0 is out of range" in capsys.readouterr().err


def test_default_model_is_the_shipped_one(capsys):
    code = main(["generate", "--max-new-tokens", "3", "--raw", "The"])
    if SHIPPED_MODEL.is_dir():
        assert code == 0
    else:
        assert code == 2 and f"the shipped model is missing: {SHIPPED_MODEL}" in capsys.readouterr().err


def test_chat_piped_with_history_and_reset(model_dir):
    lines = ["hello", "and then?", "/reset", "hello", "/exit", "never read"]
    proc = subprocess.run([sys.executable, "-m", "glmc.cli", "chat", "--model", str(model_dir),
                           "--max-new-tokens", "8"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split("\n")
    model = glmc.load(model_dir)
    first = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=8)
    second = model.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                         {"role": "user", "content": "and then?"}], max_new_tokens=8)
    assert out == [first, second, "(history cleared)", first, ""]


def test_api_batch_equals_one_by_one_and_glm4(tmp_path):
    for family, d in (("chatglm3", make_model_dir(tmp_path / "c3", "chatglm3")),
                      ("glm4", make_model_dir(tmp_path / "g4", "glm4"))):
        model = glmc.load(d)
        assert model.tokenizer.family == family
        prompts = ["hello world, a longer prompt", "hi"]
        batch = model.generate_batch(prompts, max_new_tokens=6)
        assert batch == [model.generate(p, max_new_tokens=6) for p in prompts]
        sampled = [model.generate("hello", temperature=1.0, top_p=0.9, seed=3, max_new_tokens=6) for _ in range(2)]
        assert sampled[0] == sampled[1]
        with pytest.raises(glmc.errors.GlmcError, match="unknown sampling option 'temp'"):
            model.generate("hi", temp=1.0)


def test_system_message(model_dir, capsys):
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
    expected = glmc.load(model_dir).chat(msgs, max_new_tokens=6)
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "6", "--system", "Answer briefly.",
                 "hi"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", "--model", str(model_dir), "--raw", "--system", "x", "hi"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err
