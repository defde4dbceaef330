"""verl's reward loop calling the PRM: :class:`PRMRewardManager` (``reward.reward_manager.source=importlib``).

verl 0.9.1 serves the PRM (``reward.reward_model.*``: a vLLM pooling server per replica, verl's
reward router in front) and runs this manager in its reward-loop workers; see prm.py for the steps
and scores it returns as reward extra info.
"""

from __future__ import annotations

import asyncio
import json
import os

from shear_verl.baselines.prm import (
    PRM_SEPARATOR, SPLIT_STEP_CHAR, STEP_ENDS_KEY, STEP_SCORES_KEY, PRMError, prm_input_ids, scores_from_pooling,
    separator_id, split_token_ids, step_ends, step_texts,
)


def settings_help(config) -> str:
    rm = config.reward.reward_model
    return (f"reward.reward_model.model_path={rm.get('model_path')}, enable={rm.get('enable')}, "
            f"enable_resource_pool={rm.get('enable_resource_pool')}, rollout.name={rm.rollout.get('name')}, "
            f"reward.reward_kwargs.prm_timeout_s={prm_kwargs(config)['prm_timeout_s']}")


def prm_kwargs(config) -> dict:
    """``reward.reward_kwargs.prm_*`` with their defaults (verl keeps manager knobs there, cf. dapo).

    ``prm_split_step``: a step ends at every response token whose text ends with it (PURE's
    ``split_step_char``, a blank line by default)."""
    given = dict(config.reward.get("reward_kwargs", None) or {})
    dump = given.get("prm_dump_dir", None)
    return {"prm_separator": str(given.get("prm_separator", PRM_SEPARATOR)),
            "prm_split_step": str(given.get("prm_split_step", SPLIT_STEP_CHAR)),
            "prm_timeout_s": float(given.get("prm_timeout_s", 600.0)),
            "prm_dump_dir": str(dump) if dump else None}


def dump_scored(dump_dir: str, input_ids: list[int], ends: list[int], scores: list[float]) -> None:
    """Append one scored rollout (the PRM's input ids, the step ends and scores) to
    ``<dump_dir>/prm-<pid>.jsonl``: what the PRM saw and gave, to inspect its credit or re-score it."""
    os.makedirs(dump_dir, exist_ok=True)
    line = json.dumps({"input_ids": input_ids, STEP_ENDS_KEY: ends, STEP_SCORES_KEY: scores})
    with open(os.path.join(dump_dir, f"prm-{os.getpid()}.jsonl"), "a") as f:
        f.write(line + "\n")


async def post_pooling(router_address: str, model: str, input_ids: list[int], timeout_s: float) -> list:
    """One request to the PRM through verl's reward router; vLLM's ``/pooling`` token_classify rows.

    Not verl's RewardLoopWorker._post_request: the manager has no handle on it, and it retries 16 times
    with no time limit; here a failure or a timeout raises at once.
    """
    import aiohttp

    payload = {"model": model, "input": input_ids, "task": "token_classify"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"http://{router_address}/pooling", json=payload) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise PRMError(f"HTTP {resp.status}: {body[:500]}")
            return json.loads(body)["data"][0]["data"]


def _naive_base():
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    return NaiveRewardManager


class PRMRewardManager(_naive_base()):
    """verl's naive reward manager (the rule's verifiable reward) plus the PRM's per-step scores.

    Set ``reward.reward_manager.source=importlib``, ``reward.reward_manager.module.path=<this file>``,
    ``reward.reward_manager.name=PRMRewardManager`` and ``reward.reward_model.enable=true`` (with
    ``enable_resource_pool=true``: the rule's reward needs the rollout's ground truth, which verl's
    reward loop has only on that streaming path). ``reward.reward_kwargs.prm_timeout_s`` (600) limits
    each request; ``reward.reward_kwargs.prm_dump_dir`` (unset: off) keeps every scored rollout (dump_scored).
    """

    def __init__(self, config, tokenizer, compute_score, reward_router_address=None, reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score, reward_router_address, reward_model_tokenizer)
        if reward_router_address is None or reward_model_tokenizer is None:
            raise PRMError("PRMRewardManager got no PRM: set reward.reward_model.enable=true and "
                           f"reward.reward_model.model_path ({settings_help(config)})")
        self.prm_kwargs = prm_kwargs(config)
        self.split_ids = split_token_ids(tokenizer, self.prm_kwargs["prm_split_step"])
        self.sep_id = separator_id(reward_model_tokenizer, self.prm_kwargs["prm_separator"])
        self.model = str(config.reward.reward_model.model_path)
        # The PRM's router is ours; the naive manager would pass it to the rule function, which plain
        # rule functions do not accept. (Toggling it per call raced between concurrent rollouts.)
        self.prm_router, self.reward_router_address = reward_router_address, None

    async def run_single(self, data) -> dict:
        out = await super().run_single(data)  # the rule's verifiable reward
        item = data[-1:][0]
        response = item.batch["responses"]  # [T]
        length = int(item.batch["attention_mask"][-response.shape[-1]:].sum())
        ends = step_ends(response, length, self.split_ids)
        texts = await self.loop.run_in_executor(None, lambda: step_texts(
            self.tokenizer, response, ends, self.prm_kwargs["prm_split_step"]))
        messages = list(item.non_tensor_batch["raw_prompt"])
        ids = prm_input_ids(self.reward_model_tokenizer, messages, texts, self.prm_kwargs["prm_separator"])
        try:
            rows = await asyncio.wait_for(
                post_pooling(self.prm_router, self.model, ids, self.prm_kwargs["prm_timeout_s"]),
                timeout=self.prm_kwargs["prm_timeout_s"])
            scores = scores_from_pooling(rows, ids, self.sep_id, len(ends))
        except (Exception, asyncio.TimeoutError) as exc:  # every failure names the settings; no default score
            raise PRMError(f"the process reward model failed to score a rollout ({type(exc).__name__}: {exc}); "
                           f"{settings_help(self.config)}") from exc
        if self.prm_kwargs["prm_dump_dir"]:
            dump_scored(self.prm_kwargs["prm_dump_dir"], ids, ends, scores)
        out["reward_extra_info"][STEP_ENDS_KEY] = ends
        out["reward_extra_info"][STEP_SCORES_KEY] = scores
        return out
