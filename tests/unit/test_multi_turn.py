"""Multi-turn episodes, token in / token out: what an episode's ids are made of, its limits, concurrency of
environment steps, grouping by group id, and why the design never re-tokenizes the conversation.

The engine here is a scripted `GenerationEngine` (a player with a fixed strategy, like the bisecting player
of the old text-loop test): what is under test is the loop around it. The real vLLM engine plays these
episodes in tests/functional/test_grpo_multiturn.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from megatron_rl.algorithms.registry import get_advantage
from megatron_rl.data.chat import render_prompt
from megatron_rl.environments.base import Environment, StepResult
from megatron_rl.environments.guessing_game import GuessingGame
from megatron_rl.environments.multi_turn import EpisodeLimits, run_episodes
from megatron_rl.environments.turns import TurnRenderer
from megatron_rl.generation.base import GenerationEngine, Sample, SamplingSettings
from megatron_rl.grpo.batch import Rollouts
from megatron_rl.models.tiny import build_tokenizer

TOK = build_tokenizer()
EOS = TOK.convert_tokens_to_ids("<|im_end|>")
GAME = GuessingGame(low=0, high=7)


class Player(GenerationEngine):
    """Guesses by bisection from the hints in its token context; `reply` may override a turn's tokens."""

    def __init__(self, reply=None) -> None:
        self.calls: list[int] = []
        self.reply = reply

    def generate(self, prompts, sampling):
        self.calls.append(len(prompts))
        out = []
        for p in prompts:
            text = TOK.decode(p, skip_special_tokens=False).replace("<|reserved_7|>", "")
            lo, hi = 0, 7
            for guess, hint in zip(
                [int(t.split("<|im_end|>")[0]) for t in text.split("<|im_start|>assistant\n")[1:-1]],
                [t.split("<|im_end|>")[0] for t in text.split("<|im_start|>user\n")[2:]],
            ):
                lo, hi = (guess + 1, hi) if hint == "higher" else (lo, guess - 1)
            ids = TOK(str((lo + hi) // 2), add_special_tokens=False)["input_ids"] + [EOS]
            if self.reply is not None:
                ids = self.reply(p, ids)
            ids = ids[: sampling.max_new_tokens]
            reason = "stop" if ids[-1] == EOS else "length"
            # vLLM's text: the sampled tokens detokenized, special tokens skipped
            lps = [-0.1 * (k + 1) for k in range(len(ids))]
            out.append([Sample(ids, lps, reason, TOK.decode(ids, skip_special_tokens=True), 5)])
        return out

    def update_weights(self, weights, version, reset_prefix_cache=True):
        return {}


def digit(text: str) -> int:
    return TOK(text, add_special_tokens=False)["input_ids"][0]


def starts(secrets, per_group=1):
    prompt = [{"role": "user", "content": GAME.prompt()}]
    ids = render_prompt(TOK, GAME.prompt())
    return [(prompt, ids, {"answer": str(s)}, k // per_group) for k, s in enumerate(secrets)]


def play(secrets, engine=None, env=GAME, limits=EpisodeLimits(3, 4, 256), per_group=1, workers=4):
    engine = engine or Player()
    batch = run_episodes(engine, env, starts(secrets, per_group), SamplingSettings(seed=0), TurnRenderer(TOK),
                         limits, workers)  # fmt: skip
    return batch, engine


def test_observation_tokens_are_the_templates_next_turn_rendered_once():
    r = TurnRenderer(TOK)
    assert r.turn_end == "<|im_end|>\n"
    ids = r.observation_ids([{"role": "user", "content": "higher"}], EOS)
    # the model sampled <|im_end|>; the template's newline after it and the next turns are the observation
    want = "\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n"
    assert TOK.decode(ids, skip_special_tokens=False) == want
    two = r.observation_ids([{"role": "tool", "content": "4"}, {"role": "tool", "content": "5"}], ord("x"))
    text = TOK.decode(two, skip_special_tokens=False)
    assert text.startswith("<|im_end|>\n<|im_start|>tool\n4<|im_end|>")  # a turn cut short is closed first
    assert text.endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n")


def test_episode_ids_are_prompt_then_sampled_tokens_and_observations():
    batch, engine = play([5, 7, 3])
    by_secret = {t.metadata["answer"]: t for t in batch.trajectories}
    t = by_secret["5"]  # bisection: 3 (higher), 5
    assert t.finish_reason == "stop" and t.reward == 1.0 and len(t.turn_spans) == 2
    convo = TOK.decode(t.prompt_ids + t.response_ids, skip_special_tokens=False)
    turns = "assistant\n3<|im_end|>\n<|im_start|>user\nhigher<|im_end|>\n<|im_start|>assistant\n5<|im_end|>"
    assert convo.endswith(turns)
    # loss mask exactly on the sampled tokens, each with its engine logprob and weight version
    model = [i for i, m in enumerate(t.loss_mask) if m]
    assert model == [k for a, b in t.turn_spans for k in range(a, b)]
    assert [t.response_ids[i] for i in model] == [digit("3"), EOS, digit("5"), EOS]
    assert all(t.engine_logprobs[i] < 0 for i in model)
    assert all(lp == 0 and v == -1 for lp, v, m in zip(t.engine_logprobs, t.token_versions, t.loss_mask) if not m)
    assert [t.token_versions[i] for i in model] == [5] * 4
    assert by_secret["7"].finish_reason == "max_turns" and by_secret["7"].reward == 0.0  # 3, 5, 6: not found
    assert by_secret["3"].reward == 1.0 and len(by_secret["3"].turn_spans) == 1
    # every waiting episode went to the engine in one call per round: 3, then 2, then 1 episodes
    assert engine.calls == [3, 2, 1]
    assert batch.trajectories[1].stats["turns"] == 3.0


def test_limits_per_turn_and_per_episode():
    ramble = Player(reply=lambda prompt, ids: [ord("x")] * 10)  # never ends its turn
    batch, _ = play([5], engine=ramble)
    t = batch.trajectories[0]
    assert t.finish_reason == "length" and t.turn_spans == [(0, 4)]  # max_new_tokens=4 per turn
    # the cut turn is still scored: rambling does not escape the cost of a wasted guess
    batch, _ = play([5], engine=ramble, env=GuessingGame(wasted_cost=0.5))
    assert batch.trajectories[0].reward == -0.5 and batch.trajectories[0].finish_reason == "length"
    prompt_len = len(render_prompt(TOK, GAME.prompt()))
    # budget: room for the first turn and its observation, not for a whole second turn
    budget = prompt_len + 2 + 26 + 1
    batch, _ = play([5], limits=EpisodeLimits(3, 4, budget))
    t = batch.trajectories[0]
    assert t.finish_reason == "truncated" and len(t.prompt_ids) + len(t.response_ids) == budget
    assert t.turn_spans[-1][1] - t.turn_spans[-1][0] == 1  # the second turn was cut at the budget
    # an observation that does not fit is not appended
    batch, _ = play([5], limits=EpisodeLimits(3, 4, prompt_len + 2 + 10))
    t = batch.trajectories[0]
    assert t.finish_reason == "truncated" and len(t.response_ids) == 2


class SlowForOne(Environment):
    """The first episode's step blocks until every other episode has finished: with a loop that waited
    for all steps before generating again, it would time out."""

    def __init__(self, others: int) -> None:
        self.others, self.finished, self.lock = others, 0, threading.Lock()
        self.released = threading.Event()

    def score(self, responses, metadata):
        return [0.0] * len(responses)

    def step(self, histories, metadata):
        history, meta = histories[0], metadata[0]
        if meta["answer"] == "slow":
            assert self.released.wait(timeout=10), "the other episodes were stalled by this step"
            return [StepResult(None, 1.0, True)]
        turns = sum(m["role"] == "assistant" for m in history)
        if turns < 3:
            return [StepResult({"role": "user", "content": "again"}, 0.0, False, tool_calls=1)]
        with self.lock:
            self.finished += 1
            if self.finished == self.others:
                self.released.set()
        return [StepResult(None, 0.5, True, tool_calls=1, tool_errors=1)]


def test_a_slow_environment_step_does_not_stall_the_other_episodes():
    env = SlowForOne(others=3)
    engine = Player(reply=lambda prompt, ids: ids)
    items = starts([0, 0, 0, 0])
    items[0] = (items[0][0], items[0][1], {"answer": "slow"}, 0)
    start = time.perf_counter()
    limits = EpisodeLimits(5, 4, 256)
    batch = run_episodes(engine, env, items, SamplingSettings(seed=0), TurnRenderer(TOK), limits, 4)
    assert time.perf_counter() - start < 5
    assert [t.reward for t in batch.trajectories] == [1.0, 0.5, 0.5, 0.5]
    assert engine.calls[0] == 4 and engine.calls[1:] == [3, 3]  # the others went on without episode 0
    assert [t.stats["tool_calls"] for t in batch.trajectories] == [0.0, 3.0, 3.0, 3.0]
    assert batch.trajectories[1].stats["tool_errors"] == 1.0


class FailsOn(GuessingGame):
    def step(self, histories, metadata):
        if metadata[0]["answer"] == "6":
            raise RuntimeError("tool crashed")
        return super().step(histories, metadata)


def test_a_failed_episode_shrinks_its_group_and_advantages_follow_group_ids():
    # two groups of 3 episodes; one episode of group 0 fails
    batch, _ = play([5, 6, 7, 3, 7, 2], env=FailsOn(), per_group=3)
    assert batch.failed == [(1, "RuntimeError: tool crashed")]
    rollouts = Rollouts.from_trajectories(batch.trajectories, group_size=3)
    assert rollouts.groups().tolist() == [0, 0, 1, 1, 1]
    assert rollouts.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]  # bisection misses only 7 in 3 turns
    adv = get_advantage("grpo")(rollouts.rewards, rollouts.groups(), normalize_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, 1 / 3, -2 / 3, 1 / 3])
    with pytest.raises(RuntimeError, match="every episode's environment step failed"):
        play([6], env=FailsOn())


def test_re_tokenizing_the_rendered_conversation_would_change_the_tokens():
    """A tiny model early in training samples any of its tokens, including special ones its text drops
    (vLLM detokenizes with skip_special_tokens) and byte sequences that spell a special token. Rendering the
    conversation from its text and tokenizing it again gives other ids than the engine sampled: the trainer
    would score tokens the engine never produced, and miss ones it did."""
    reserved = TOK.convert_tokens_to_ids("<|reserved_7|>")
    quirks = iter([[reserved, digit("3"), EOS]])
    batch, _ = play([5], engine=Player(reply=lambda prompt, ids: next(quirks, ids)))
    t = batch.trajectories[0]
    ours = t.prompt_ids + t.response_ids
    messages = [{"role": "user", "content": GAME.prompt()}]
    for a, b in t.turn_spans:
        text = TOK.decode(t.response_ids[a:b], skip_special_tokens=True)  # what the engine returns as text
        messages.append({"role": "assistant", "content": text})
        messages.append({"role": "user", "content": "higher"})
    rendered = TOK.apply_chat_template(messages[:-1], tokenize=False)
    retokenized = TOK(rendered, add_special_tokens=False)["input_ids"]
    assert reserved in ours and reserved not in retokenized  # the sampled special token is gone
    first_difference = next(i for i, (x, y) in enumerate(zip(ours, retokenized)) if x != y)
    assert first_difference == len(t.prompt_ids)  # right at the model's first token
    # (with a BPE tokenizer, a model that spells a word in pieces gets merged pieces back: the same drift)
    # and the trajectory keeps exactly what was sampled, in place
    a, b = t.turn_spans[0]
    assert t.response_ids[a:b] == [reserved, digit("3"), EOS]


def test_observation_tokens_carry_no_loss():
    """What the loss mask guarantees, stated exactly: replacing an episode's observation tokens by others of
    the same length leaves the loss and its gradient with respect to every model token's logprob unchanged,
    and the gradient at observation positions is zero. (The parameters' gradient does change: observations
    are the context of the turns after them, as they were when the engine sampled those turns.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_rl.algorithms.registry import get_policy_loss
    from megatron_rl.data.collate import collate_sequences
    from megatron_rl.models.tiny import tiny_config

    t = play([5])[0].trajectories[0]  # guesses 3, "higher", 5
    assert len(t.turn_spans) == 2
    other = [ord("z") if m == 0 else tok for tok, m in zip(t.response_ids, t.loss_mask)]  # same length
    torch.manual_seed(0)
    cfg = {k: v for k, v in tiny_config("llama").items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()

    def step(response_ids):
        r = Rollouts([t.prompt_ids], [response_ids], [t.engine_logprobs], ["stop"], [{}], 1,
                     loss_mask=[t.loss_mask], advantages=torch.tensor([1.0]))  # fmt: skip
        seq = r.sequences()[0]
        logits = model(seq["ids"].unsqueeze(0)).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(1, seq["ids"][1:, None])[:, 0]
        seq["old_lp"] = lp.detach()
        return seq, lp

    settings = dict(clip_low=0.2, clip_high=0.28, dual_clip=None, kl_coef=0.0, kl_estimator="k3", tis_cap=2.0)
    loss_fn = get_policy_loss("clipped_pg")

    def loss_and_grad(seq, lp):
        leaf = lp.detach().clone().requires_grad_(True)
        loss_sum, count, _ = loss_fn(leaf.unsqueeze(0), collate_sequences([seq]), **settings)
        (loss_sum / count).backward()
        return (loss_sum / count).item(), leaf.grad

    seq_a, lp_a = step(t.response_ids)
    seq_b, lp_b = step(other)
    observed = seq_a["mask"] == 0  # positions whose target is a prompt or observation token
    assert (seq_a["mask"] == seq_b["mask"]).all() and seq_a["mask"].sum() == 4
    loss_a, grad_a = loss_and_grad(seq_a, lp_a)
    assert (grad_a[observed] == 0).all() and (grad_a[~observed] != 0).all()
    # B's tokens, and B's logprobs at observation positions (other targets, other values); at the model's
    # tokens A's logprobs (holding their context fixed)
    mixed = torch.where(observed, lp_b, lp_a)
    assert not torch.equal(mixed, lp_a)
    loss_mixed, grad_mixed = loss_and_grad({**seq_b, "old_lp": mixed.detach()}, mixed)
    assert loss_mixed == loss_a and torch.equal(grad_mixed, grad_a)
    # the whole step through the model differs: the observation is context for the second turn
    grads = []
    for seq, lp in ((seq_a, lp_a), (seq_b, lp_b)):
        model.zero_grad()
        loss_sum, count, _ = loss_fn(lp.unsqueeze(0), collate_sequences([seq]), **settings)
        (loss_sum / count).backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


def test_episode_batches_select_concat_and_build_sequences_by_group_id():
    first = Rollouts.from_trajectories(play([5, 7, 3, 2], per_group=2)[0].trajectories, group_size=2)
    second = Rollouts.from_trajectories(play([1, 4], per_group=2)[0].trajectories, group_size=2)
    for r in (first, second):
        r.advantages = get_advantage("grpo")(r.rewards, r.groups())
    both = Rollouts.concat([first, second])
    assert both.groups().tolist() == [0, 0, 1, 1, 2, 2]  # the second draw's group 0 became group 2
    kept = both.select_groups([2, 0])
    assert [t["answer"] for t in kept.metadata] == ["1", "4", "5", "7"]
    assert kept.advantages.tolist() == pytest.approx(both.advantages[[4, 5, 0, 1]].tolist())
    seq = kept.sequences()[2]  # secret 5: guesses 3, 5; the loss on the 4 sampled tokens only
    assert seq["mask"].sum() == 4 and torch.equal(seq["mask"], seq["resp"])
    t = kept.trajectory(2)
    start = len(t.prompt_ids) - 1
    assert seq["mask"][start:].tolist() == [float(m) for m in t.loss_mask]
    assert seq["engine_lp"][start:].tolist() == pytest.approx(t.engine_logprobs)
    # the overlong filter drops a cut episode's loss but keeps its tokens for the mismatch metric
    kept.finish_reasons[2] = "truncated"
    assert kept.sequences(mask_truncated=True)[2]["mask"].sum() == 0


def test_episode_setup_from_the_recipe_and_its_errors():
    from megatron_rl.config.compose import compose
    from megatron_rl.errors import UserError
    from megatron_rl.grpo.episodes import episode_setup

    setup = episode_setup(compose("tiny_multiturn"), TOK)
    assert setup.limits == EpisodeLimits(max_turns=2, max_new_tokens=4, max_tokens=256)
    assert episode_setup(compose("tiny"), TOK) is None  # single-turn
    with pytest.raises(UserError, match="max_episode_tokens=512 exceeds generation.max_model_len=256"):
        episode_setup(compose("tiny_multiturn", ["env.max_episode_tokens=512"]), TOK)
    # env.kwargs is free-form: a new entry needs no '+', and it reaches the environment's constructor
    cfg = compose("tiny_multiturn", ["env.kwargs.high=9", "env.kwargs.show_range=true"])
    assert cfg.env.kwargs.high == 9 and cfg.env.kwargs.show_range is True
