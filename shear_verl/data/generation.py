"""Generators (`evaluation.Generator`) for real checkpoints.

`VLLMGenerator` (vLLM's offline engine) is what evaluation runs on GPUs; `HFGenerator`
(transformers' `generate`) is the fallback where vLLM or an accelerator is missing: slow, but the
same prompts, sampling and grading, so a small model can be evaluated end to end anywhere.

Prompts are rendered to token ids by verl's Continuous Token builder, the function verl's agent
loop uses for training rollouts, so evaluation sees exactly the prompts training saw.
"""

from __future__ import annotations

import gc
import importlib.util
from collections.abc import Sequence

from shear_verl.data.evaluation import Generator, Messages, Sampling

BACKENDS = ("auto", "vllm", "hf")


def _prompt_builder(tokenizer, model_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    model_type = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).model_type
    return create_continuous_token_builder(tokenizer, hf_model_type=model_type)


class VLLMGenerator:
    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        trust_remote_code: bool = False,
    ):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError("the vllm backend needs vLLM: pip install vllm (or pass --backend hf)") from exc

        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.builder = _prompt_builder(self.llm.get_tokenizer(), model_path, trust_remote_code)

    def generate(self, prompts: Sequence[Messages], n: int, sampling: Sampling) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
        )
        token_prompts = [{"prompt_token_ids": list(self.builder.build_initial_tokens(list(p)))} for p in prompts]
        outputs = self.llm.generate(token_prompts, params)
        return [[o.text for o in out.outputs] for out in outputs]

    def close(self) -> None:
        """Free the GPU before the next checkpoint's engine starts."""
        del self.llm
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except ImportError:
            pass
        gc.collect()


class HFGenerator:
    """transformers' sampling, one prompt at a time (n samples as `num_return_sequences`), on the
    current accelerator if there is one, else on the CPU."""

    def __init__(self, model_path: str, *, dtype: str = "bfloat16", trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        accelerator = torch.accelerator.current_accelerator()
        self.device = accelerator if accelerator is not None else torch.device("cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(self.device).eval()
        self.builder = _prompt_builder(self.tokenizer, model_path, trust_remote_code)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def generate(self, prompts: Sequence[Messages], n: int, sampling: Sampling) -> list[list[str]]:
        import torch

        torch.manual_seed(sampling.seed)
        out = []
        for messages in prompts:
            ids = torch.tensor([list(self.builder.build_initial_tokens(list(messages)))], device=self.device)  # [1, P]
            with torch.no_grad():
                seqs = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature if sampling.temperature > 0 else None,
                    top_p=sampling.top_p,
                    max_new_tokens=sampling.max_tokens,
                    num_return_sequences=n,
                    pad_token_id=self.pad_token_id,
                )  # [n, P + R]
            out.append(self.tokenizer.batch_decode(seqs[:, ids.shape[1] :], skip_special_tokens=True))
        return out

    def close(self) -> None:
        del self.model
        gc.collect()


def make_generator(backend: str, model_path: str, **vllm_kwargs) -> Generator:
    """`auto`: vLLM when it is installed and an accelerator is present, else transformers."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        import torch

        has_vllm = importlib.util.find_spec("vllm") is not None
        backend = "vllm" if has_vllm and torch.accelerator.current_accelerator() is not None else "hf"
    if backend == "vllm":
        return VLLMGenerator(model_path, **vllm_kwargs)
    return HFGenerator(model_path, dtype=vllm_kwargs.get("dtype", "bfloat16"),
                       trust_remote_code=vllm_kwargs.get("trust_remote_code", False))
