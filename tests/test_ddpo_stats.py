"""DDPO's per-prompt reward history (RewardStats): hand-computed advantages, the fallback, eviction,
the per-batch special case and the checkpoint round-trip."""

from __future__ import annotations

import math

import pytest
import torch

from conceptbench.methods._policy import RewardStats
from conceptbench.methods.ddpo import reward_stats
from conceptbench.train import MethodError

A, B, C = "a cat", "a dog", "a fox"


def epoch(stats, pairs):
    """Feed one epoch of (prompt, reward) pairs; return the advantages as a list."""
    prompts, rewards = zip(*pairs)
    return stats.advantages(torch.tensor(rewards), list(prompts)).tolist()


def test_second_epoch_uses_the_buffer_and_the_first_falls_back_to_the_batch():
    stats = RewardStats(buffer_size=4, min_count=4, eps=0.0)
    # Epoch 1: two rewards per prompt < min_count 4, so the batch's mean 7 and std sqrt(27.5).
    first = epoch(stats, [(A, 1.0), (A, 3.0), (B, 10.0), (B, 14.0)])
    s = math.sqrt(((1 - 7) ** 2 + (3 - 7) ** 2 + (10 - 7) ** 2 + (14 - 7) ** 2) / 4)
    assert first == pytest.approx([(1 - 7) / s, (3 - 7) / s, (10 - 7) / s, (14 - 7) / s])
    # Epoch 2: each buffer holds 4. A: [1, 3, 5, 7], mean 4, std sqrt(5); B: [10, 14, 12, 12], mean 12, std sqrt(2).
    second = epoch(stats, [(B, 12.0), (A, 5.0), (B, 12.0), (A, 7.0)])
    assert second == pytest.approx([0.0, 1 / math.sqrt(5), 0.0, 3 / math.sqrt(5)])
    # This epoch alone would have said A: -1, +1 (mean 6, std 1).
    assert epoch(RewardStats(0, 2, eps=0.0), [(A, 5.0), (A, 7.0)]) == [-1.0, 1.0]
    assert {k: list(v) for k, v in stats.history.items()} == {A: [1.0, 3.0, 5.0, 7.0], B: [10.0, 14.0, 12.0, 12.0]}


def test_the_buffer_evicts_the_oldest_rewards_and_a_new_prompt_falls_back():
    stats = RewardStats(buffer_size=4, min_count=4, eps=0.0)
    epoch(stats, [(A, 1.0), (A, 3.0)])
    epoch(stats, [(A, 5.0), (A, 7.0)])
    third = epoch(stats, [(A, 9.0), (A, 9.0), (C, 2.0)])
    assert list(stats.history[A]) == [5.0, 7.0, 9.0, 9.0]  # 1 and 3 are gone
    kept_std = math.sqrt(((5 - 7.5) ** 2 + (7 - 7.5) ** 2 + 2 * (9 - 7.5) ** 2) / 4)
    assert third[:2] == pytest.approx([1.5 / kept_std] * 2)
    # C has one reward in its buffer: the batch [9, 9, 2] gives its statistics (mean 20/3).
    batch_std = math.sqrt((2 * (9 - 20 / 3) ** 2 + (2 - 20 / 3) ** 2) / 3)
    assert third[2] == pytest.approx((2 - 20 / 3) / batch_std)


def _per_batch_before_the_tracker(rewards, prompt_ids, min_count=2, eps=1e-6):
    """The per-batch normalisation as it was before RewardStats, kept here as the oracle."""
    rewards = rewards.float()
    adv = torch.empty_like(rewards)
    glob = (rewards.mean(), rewards.std(unbiased=False)) if rewards.numel() > 1 else (rewards.mean(), torch.tensor(0.0))
    for p in prompt_ids.unique():
        mask = prompt_ids == p
        r = rewards[mask]
        mean, std = (r.mean(), r.std(unbiased=False)) if r.numel() >= min_count else glob
        adv[mask] = (r - mean) / (std + eps)
    return adv


@pytest.mark.parametrize("min_count", [1, 2, 3])
def test_buffer_size_zero_is_exactly_the_per_batch_normalisation(min_count):
    g = torch.Generator().manual_seed(0)
    stats = RewardStats(buffer_size=0, min_count=min_count)
    prompts = [f"prompt {i}" for i in range(5)]
    for _ in range(3):  # several epochs: nothing carries over
        ids = torch.randint(0, 5, (12,), generator=g)  # groups of 0 to several samples, some of one
        rewards = torch.randn(12, generator=g) * 3 + 1
        expected = _per_batch_before_the_tracker(rewards, ids, min_count)
        assert torch.equal(stats.advantages(rewards, [prompts[i] for i in ids]), expected)
    assert stats.history == {}
    single = torch.tensor([4.0])
    oracle = _per_batch_before_the_tracker(single, torch.tensor([0]), min_count)
    assert torch.equal(stats.advantages(single, [A]), oracle)


def test_the_history_round_trips_through_a_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(1)
    prompts = [A, A, A, B, B, B]

    def draw():
        return torch.rand(6, generator=g)

    stats = RewardStats(buffer_size=6, min_count=5)
    for _ in range(2):
        stats.advantages(draw(), prompts)
    torch.save({"method": {"reward_stats": stats.state_dict()}}, tmp_path / "checkpoint.pt")
    restored = RewardStats(buffer_size=6, min_count=5)
    restored.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["method"]["reward_stats"])
    assert restored.history == stats.history and restored.history[A].maxlen == 6

    rewards = draw()
    resumed = restored.advantages(rewards, prompts)
    assert torch.equal(resumed, stats.advantages(rewards, prompts))  # bitwise what the uninterrupted run gives
    assert not torch.allclose(resumed, RewardStats(6, 5).advantages(rewards, prompts))  # an empty history differs
    assert restored.history == stats.history


def test_ddpo_checks_its_stat_args():
    assert reward_stats(0, 2, per_prompt=8).buffer_size == 0
    assert reward_stats(16, 16, per_prompt=8).min_count == 16
    assert reward_stats(4, 4).buffer_size == 4  # random draws: no fixed count per prompt to check against
    with pytest.raises(MethodError, match="stat_buffer_size 4 is below the 8 samples each prompt gets per epoch"):
        reward_stats(4, 4, per_prompt=8)
    with pytest.raises(MethodError, match="stat_min_count 17 exceeds args.stat_buffer_size 16"):
        reward_stats(16, 17, per_prompt=8)
    with pytest.raises(MethodError, match="stat_buffer_size must be >= 0"):
        reward_stats(-1, 2, per_prompt=8)
    with pytest.raises(ValueError, match="3 rewards but 2 prompts"):
        RewardStats(4, 4).advantages(torch.zeros(3), [A, B])
