import pytest
import torch

from polytrain.data.sampler import ShardedBatchSampler


@pytest.mark.parametrize("num_samples", [1, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("batch", [1, 8, 10, 64])
def test_every_sample_exactly_once_per_epoch(num_samples, world_size, batch):
    seen = []
    for rank in range(world_size):
        sampler = ShardedBatchSampler(num_samples, batch, world_size, rank, seed=3)
        for indices in sampler.epoch(2):
            seen.extend(indices.tolist())
    assert sorted(seen) == list(range(num_samples))


def test_union_of_shards_is_the_single_worker_batch():
    single = list(ShardedBatchSampler(50, 12, seed=1).epoch(0))
    shards = [list(ShardedBatchSampler(50, 12, 3, rank, seed=1).epoch(0)) for rank in range(3)]
    for step, batch in enumerate(single):
        assert torch.equal(torch.cat([shards[rank][step] for rank in range(3)]), batch)
        assert max(len(s[step]) for s in shards) - min(len(s[step]) for s in shards) <= 1


def test_epochs_differ_and_repeat_with_the_seed():
    sampler = ShardedBatchSampler(100, 10, seed=0)
    assert not torch.equal(sampler.permutation(0), sampler.permutation(1))
    assert torch.equal(sampler.permutation(1), ShardedBatchSampler(100, 10, seed=0).permutation(1))
    assert not torch.equal(sampler.permutation(1), ShardedBatchSampler(100, 10, seed=1).permutation(1))


def test_resume_from_a_step_continues_the_same_order():
    sampler = ShardedBatchSampler(100, 16, seed=4)
    full = list(sampler.epoch(5))
    assert all(torch.equal(a, b) for a, b in zip(full[3:], sampler.epoch(5, start_step=3)))
    assert sampler.steps_per_epoch() == 7 and sampler.global_batch_len(6) == 4


def test_drop_last_and_invalid_settings():
    assert ShardedBatchSampler(100, 16, drop_last=True).steps_per_epoch() == 6
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        ShardedBatchSampler(10, 2, world_size=2, rank=2)
