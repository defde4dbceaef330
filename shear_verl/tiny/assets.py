"""Offline assets of the tiny run: a BPE tokenizer, a Qwen2 model, the task data.

Everything is built locally (no model hub): the tokenizer is trained in well under a second with
HF ``tokenizers`` and wrapped as a (fast) ``Qwen2Tokenizer`` with a Qwen-style chat template; the
model is ``Qwen2ForCausalLM`` from a config, random-init or warm-started by a short supervised
pass (:mod:`.warmstart`). Builds are cached under ``<root>/<key>`` where the key hashes the spec,
and written to a temporary directory first, so concurrent callers never see a half-written model.

Two tasks: ``parity`` (random-init model, 16-token answers; quick pipeline tests) and
``counting`` (warm-started model, ~80-token answers with known first errors; the main job).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import counting, task
from .warmstart import WarmStart, warm_start

TASKS = {"parity": task, "counting": counting}  # name -> module with make_rows, tokenizer_corpus

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_dataset(make_rows, out_dir: Path, n_train: int, n_val: int, seed: int) -> tuple[Path, Path]:
    """Write a task's ``train.parquet`` and ``val.parquet`` (the format verl's RLHFDataset reads);
    ``make_rows(n, seed, split)`` gives its rows."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1)):
        path = out_dir / f"{split}.parquet"
        pd.DataFrame(make_rows(n, split_seed, split)).to_parquet(path)
        paths.append(path)
    return paths[0], paths[1]


@dataclass(frozen=True)
class TinySpec:
    """What the tiny model, tokenizer and data are made of (all of it keys the cache)."""

    # The task's corpus saturates at 160 tokens: 3 special, 100 printable bytes, 57 merges.
    vocab_size: int = 160
    hidden_size: int = 128
    # vLLM's CPU attention kernels need head_dim 64 (or larger): hidden_size / num_heads.
    num_heads: int = 2
    num_layers: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    n_train: int = 1024
    n_val: int = 64
    seed: int = 0
    task: str = "parity"
    warm_start: WarmStart | None = None  # supervised pass before RL (None: random init)

    @classmethod
    def counting(cls, **changes) -> "TinySpec":
        """The counting task's model: 4 layers (2 do not learn to count in a 2-minute warm start),
        positions for a 32-token prompt and a 96-token answer, warm-started."""
        base = dict(task="counting", num_layers=4, max_position_embeddings=160, warm_start=WarmStart())
        return cls(**{**base, **changes})

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"TinySpec.task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 64:
            raise ValueError(
                f"hidden_size / num_heads must be an integer >= 64 (vLLM-CPU attention); "
                f"got hidden_size={self.hidden_size}, num_heads={self.num_heads}"
            )
        if self.vocab_size < 128:
            raise ValueError(f"vocab_size must be >= 128 (character alphabet + merges), got {self.vocab_size}")

    def key(self) -> str:
        fields = dataclasses.asdict(self)
        if self.task == "parity" and self.warm_start is None:  # keep the parity assets' cache key
            del fields["task"], fields["warm_start"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class TinyAssets:
    model_dir: Path  # HF model + tokenizer (what actor_rollout_ref.model.path points to)
    train_file: Path
    val_file: Path
    spec: TinySpec


def build_tokenizer(spec: TinySpec):
    """A Qwen2 tokenizer (same pre-tokenizer and byte-level BPE) with a tiny trained vocabulary.

    transformers loads any tokenizer next to a ``qwen2`` config as ``Qwen2Tokenizer``, which
    rebuilds Qwen's pre-tokenizer around the saved vocab and merges; training under that very
    pre-tokenizer keeps the saved tokenizer and the loaded one identical. The alphabet is the
    printable ASCII bytes, so every token decodes to text.
    """
    from tokenizers import trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    backend = Qwen2Tokenizer().backend_tokenizer
    alphabet = sorted({c for piece, _ in backend.pre_tokenizer.pre_tokenize_str(string.printable) for c in piece})
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(TASKS[spec.task].tokenizer_corpus(spec.seed), trainer)
    bpe = json.loads(backend.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=bpe["vocab"],
        merges=[tuple(merge) for merge in bpe["merges"]],
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TinySpec, tokenizer):
    """A randomly initialised ``Qwen2ForCausalLM`` sized by ``spec`` (float32)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def build_assets(root: str | os.PathLike, spec: TinySpec = TinySpec()) -> TinyAssets:
    """Build (or reuse the cached) tiny model, tokenizer and data under ``root``."""
    root = Path(root).expanduser().resolve()
    out = root / f"tiny-{spec.key()}"
    assets = TinyAssets(out / "model", out / "data" / "train.parquet", out / "data" / "val.parquet", spec)
    if (out / "spec.json").is_file():
        return assets
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
    try:
        tokenizer = build_tokenizer(spec)
        tokenizer.save_pretrained(tmp / "model")
        model = build_model(spec, tokenizer)
        if spec.warm_start is not None:
            losses = warm_start(model, tokenizer, spec.warm_start)
            (tmp / "warm_start_loss.json").write_text(json.dumps(losses))
        model.save_pretrained(tmp / "model")
        write_dataset(TASKS[spec.task].make_rows, tmp / "data", spec.n_train, spec.n_val, spec.seed)
        (tmp / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1))
        try:
            os.rename(tmp, out)
        except OSError:  # built concurrently by someone else: keep theirs
            if not (out / "spec.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return assets
