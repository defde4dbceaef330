"""PRMRewardManager against a real HTTP server on localhost standing in for verl's reward router.

The manager is verl's naive reward manager plus one request per rollout to the PRM's `/pooling`
route; here an aiohttp server plays the router (the only thing mocked: a served PRM needs vLLM and
Ray, which the e2e tests run). A server that answers gives each step p_pos - p_neg at its separator;
one that errors, times out or is not there stops the rollout with PRMError naming the
reward.reward_model.* settings, and no step gets a default score.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import numpy as np
import pytest
import torch
from aiohttp import web
from omegaconf import OmegaConf

from shear_verl.baselines.prm import PRM_SEPARATOR, STEP_ENDS_KEY, STEP_SCORES_KEY, PRMError
from shear_verl.baselines.prm_reward import PRMRewardManager

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def tokenizers():
    """The tiny policy tokenizer (plus a blank-line token) and the PRM's: the same plus ``<extra_0>``."""
    from shear_verl.tiny.assets import TinySpec, build_tokenizer

    policy = build_tokenizer(TinySpec())
    policy.add_tokens(["\n\n"])
    prm = build_tokenizer(TinySpec())
    prm.add_special_tokens({"additional_special_tokens": [PRM_SEPARATOR]})
    return policy, prm


class Router:
    """A localhost aiohttp server in a thread; ``mode`` decides how it answers ``/pooling``."""

    def __init__(self):
        self.mode, self.requests = "ok", []
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/pooling", self.pooling)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.address = "127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def rows(input_ids):
        """[p_neg, p_pos] per token, p_pos a function of the token id and its position."""
        return [[1 - p, p] for p in ((7 * t + 3 * i) % 11 / 10 for i, t in enumerate(input_ids))]

    async def pooling(self, request):
        body = await request.json()
        self.requests.append(body)
        if self.mode == "error":
            return web.Response(status=500, text="CUDA out of memory in the PRM")
        if self.mode == "sleep":
            await asyncio.sleep(3 * TIMEOUT_S)  # past the manager's limit
        return web.json_response({"data": [{"data": self.rows(body["input"])}]})

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def router():
    r = Router()
    yield r
    r.close()


def free_address() -> str:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % s.getsockname()[1]


def config(model_path="/models/tiny-prm", dump_dir=None):
    return OmegaConf.create({"reward": {
        "reward_model": {"enable": True, "enable_resource_pool": True, "model_path": model_path,
                         "rollout": {"name": "vllm"}},
        "reward_kwargs": {"prm_timeout_s": TIMEOUT_S, "prm_dump_dir": dump_dir},
    }})


def rollout(policy, prompt_len=4, pad=3):
    """One rollout as verl's reward loop hands it over: 3 steps (2 blank lines, then EOS), right padding."""
    from verl import DataProto

    ids = []
    for piece in ("a b\n\n", "c d\n\n", "e"):
        ids += policy.encode(piece, add_special_tokens=False)
    ids.append(policy.eos_token_id)
    length = len(ids)
    responses = torch.tensor(ids + [policy.pad_token_id] * pad)[None]  # [1, T]
    attention = torch.tensor([1] * (prompt_len + length) + [0] * pad)[None]  # [1, P + T]
    prompt = np.empty(1, dtype=object)
    prompt[0] = [{"role": "user", "content": "q?"}]
    data = DataProto.from_dict(
        tensors={"responses": responses, "attention_mask": attention},
        non_tensors={"data_source": np.array(["tiny"], dtype=object), "raw_prompt": prompt,
                     "reward_model": np.array([{"ground_truth": "1"}], dtype=object)})
    return data, length


def score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0


def run(address, tokenizers, data, dump_dir=None):
    policy, prm = tokenizers
    loop = asyncio.new_event_loop()  # the manager runs its decoding on the loop it was made in
    asyncio.set_event_loop(loop)
    try:
        manager = PRMRewardManager(config(dump_dir=dump_dir), policy, score, reward_router_address=address,
                                   reward_model_tokenizer=prm)
        return loop.run_until_complete(manager.run_single(data))
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_a_served_prm_scores_every_step_at_its_separator(router, tokenizers, tmp_path):
    router.mode, router.requests = "ok", []
    data, length = rollout(tokenizers[0])
    out = run(router.address, tokenizers, data, dump_dir=str(tmp_path / "prm"))
    assert out["reward_score"] == 1.0  # the rule's verifiable reward, as verl's naive manager gives it
    (request,) = router.requests
    assert (request["model"], request["task"]) == ("/models/tiny-prm", "token_classify")
    sep = tokenizers[1].convert_tokens_to_ids(PRM_SEPARATOR)
    at = [i for i, t in enumerate(request["input"]) if t == sep]
    ends, scores = out["reward_extra_info"][STEP_ENDS_KEY], out["reward_extra_info"][STEP_SCORES_KEY]
    assert len(ends) == len(at) == 3 and ends[-1] == length - 1  # the last step ends at EOS
    rows = Router.rows(request["input"])
    assert scores == pytest.approx([rows[i][1] - rows[i][0] for i in at])
    (dump,) = (tmp_path / "prm").glob("prm-*.jsonl")  # reward.reward_kwargs.prm_dump_dir: what was sent and got
    (line,) = [json.loads(x) for x in dump.read_text().splitlines()]
    assert line == {"input_ids": request["input"], STEP_ENDS_KEY: ends, STEP_SCORES_KEY: scores}


@pytest.mark.parametrize("mode", ["error", "sleep", "unreachable"])
def test_a_failing_prm_stops_the_rollout_naming_the_settings(router, tokenizers, mode):
    router.mode, router.requests = mode, []
    address = free_address() if mode == "unreachable" else router.address
    data, _ = rollout(tokenizers[0])
    with pytest.raises(PRMError) as err:
        run(address, tokenizers, data)
    msg = str(err.value)
    assert "process reward model failed to score a rollout" in msg
    for setting in ("reward.reward_model.model_path=/models/tiny-prm", "reward.reward_model", "enable=True",
                    "enable_resource_pool=True", "rollout.name=vllm", f"reward.reward_kwargs.prm_timeout_s={TIMEOUT_S}"):
        assert setting in msg, (setting, msg)
    want = {"error": "HTTP 500: CUDA out of memory in the PRM", "sleep": "TimeoutError",
            "unreachable": "ClientConnectorError"}[mode]
    assert want in msg, msg
    assert len(router.requests) == (0 if mode == "unreachable" else 1)  # no retry with a default behind it


def test_a_manager_without_a_prm_names_the_settings(tokenizers):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        with pytest.raises(PRMError, match=r"reward.reward_model.enable=true and reward.reward_model.model_path"):
            PRMRewardManager(config(), tokenizers[0], score, reward_router_address=None, reward_model_tokenizer=None)
    finally:
        asyncio.set_event_loop(None)
        loop.close()
