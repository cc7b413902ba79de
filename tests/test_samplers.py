import json
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from lpt_peft.training.samplers import ClassBalancedBatchSampler, DualBatchSampler, InstanceBalancedBatchSampler

# Long-tailed: a head of 60 images down to classes with 3, 2 and 1 images (fewer than samples_per_class=4).
COUNTS = [60, 40, 25, 15, 10, 8, 6, 5, 4, 3, 2, 1]


def long_tailed_labels(counts=COUNTS, seed=0):
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    order = np.random.default_rng(seed).permutation(len(labels))
    return [labels[i] for i in order]


LABELS = long_tailed_labels()


def cb_sampler(**kwargs):
    args = {"labels": LABELS, "batch_size": 8, "samples_per_class": 4, "num_replicas": 1, "rank": 0, "seed": 0}
    return ClassBalancedBatchSampler(**{**args, **kwargs})


def class_groups(batch, samples_per_class=4):
    return [batch[i : i + samples_per_class] for i in range(0, len(batch), samples_per_class)]


def test_class_balanced_batch_structure():
    sampler = cb_sampler(batch_size=12, num_batches=300)
    counts = Counter(LABELS)
    saw_repeat = set()
    for batch in sampler:
        assert len(batch) == 12
        groups = class_groups(batch)
        classes = [LABELS[group[0]] for group in groups]
        assert len(set(classes)) == 3
        for cls, group in zip(classes, groups):
            assert all(LABELS[i] == cls for i in group)
            if counts[cls] >= 4:
                assert len(set(group)) == 4, f"class {cls} with {counts[cls]} images drawn with replacement"
            elif len(set(group)) < 4:
                saw_repeat.add(cls)
    # Classes with fewer images than samples_per_class must repeat; the 1-image class always does.
    assert saw_repeat == {9, 10, 11}


def test_class_balanced_covers_classes_uniformly():
    num_batches = 3000
    sampler = cb_sampler(batch_size=16, num_batches=num_batches)  # 4 of 12 classes per batch
    class_freq = Counter()
    image_freq = Counter()
    for batch in sampler:
        class_freq.update(LABELS[group[0]] for group in class_groups(batch))
        image_freq.update(batch)
    expected = num_batches * 4 / len(COUNTS)  # 1000 per class, binomial std ~27
    for cls in range(len(COUNTS)):
        assert abs(class_freq[cls] - expected) < 0.15 * expected, (cls, class_freq[cls])
    # Every image of every class gets drawn (uniformly within the class, loosely: the head class's images).
    assert set(image_freq) == set(range(len(LABELS)))
    head = [image_freq[i] for i, label in enumerate(LABELS) if label == 0]
    assert max(head) < 3 * min(head)


def test_class_balanced_skips_classes_without_images():
    labels = [0, 0, 0, 0, 2, 2, 2, 2, 4, 4]
    sampler = ClassBalancedBatchSampler(labels, 4, samples_per_class=2, num_classes=6, num_replicas=1, rank=0)
    assert sampler.class_counts.tolist() == [4, 0, 4, 0, 2, 0]
    drawn = {labels[i] for batch in sampler.iter_epoch(0) for i in batch}
    drawn |= {labels[i] for epoch in range(1, 20) for batch in sampler.iter_epoch(epoch) for i in batch}
    assert drawn == {0, 2, 4}


def test_class_balanced_default_length_and_sharding():
    sampler = cb_sampler()
    assert len(sampler) == -(-len(LABELS) // 8)
    ranks = [cb_sampler(num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-len(LABELS) // 16)
    wide = cb_sampler(batch_size=16)  # one rank with twice the classes: the same global draw
    for epoch in (0, 5):
        batches = [list(s.iter_epoch(epoch)) for s in ranks]
        for b0, b1 in zip(*batches):
            classes0 = {LABELS[i] for i in b0}
            classes1 = {LABELS[i] for i in b1}
            assert len(classes0) == len(classes1) == 2
            assert not classes0 & classes1
            assert not set(b0) & set(b1)
        assert [b0 + b1 for b0, b1 in zip(*batches)] == list(wide.iter_epoch(epoch))[: len(ranks[0])]


def test_class_balanced_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of samples_per_class"):
        cb_sampler(batch_size=10)
    with pytest.raises(ValueError, match=r"needs 13 distinct classes .* only 12 classes have images"):
        cb_sampler(batch_size=52)
    with pytest.raises(ValueError, match=r"needs 14 distinct classes .* 2 rank"):
        cb_sampler(batch_size=28, num_replicas=2, rank=1)
    with pytest.raises(TypeError, match="integer class indices"):
        ClassBalancedBatchSampler([0.0, 1.0, 1.5], 2, samples_per_class=1)
    with pytest.raises(ValueError, match=r"labels\[1\] = -1"):
        ClassBalancedBatchSampler(torch.tensor([0, -1, 1]), 2, samples_per_class=1)
    with pytest.raises(ValueError, match=r"labels\[2\] = 5 .*num_classes=3"):
        ClassBalancedBatchSampler(np.array([0, 1, 5]), 2, samples_per_class=1, num_classes=3)
    with pytest.raises(ValueError, match="rank"):
        cb_sampler(num_replicas=2, rank=2)
    # labels as list, array and tensor give the same sampler
    ref = list(cb_sampler().iter_epoch(1))
    assert list(cb_sampler(labels=np.array(LABELS)).iter_epoch(1)) == ref
    assert list(cb_sampler(labels=torch.tensor(LABELS)).iter_epoch(1)) == ref


def reference_instance_batches(num_samples, batch_size, num_replicas, rank, seed, epoch, drop_last=False):
    """The documented draw, spelled out: permute with a generator seeded by SeedSequence([seed, STREAM_INSTANCES=2,
    epoch]), pad by wrap-around, rank r takes block r."""
    epoch_seed = int(np.random.SeedSequence([seed, 2, epoch]).generate_state(1, np.uint64)[0]) >> 1
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    global_batch = batch_size * num_replicas
    num_steps = num_samples // global_batch if drop_last else -(-num_samples // global_batch)
    perm = [perm[i % num_samples] for i in range(num_steps * global_batch)]
    steps = [perm[i : i + global_batch] for i in range(0, len(perm), global_batch)]
    return [step[rank * batch_size : (rank + 1) * batch_size] for step in steps]


@pytest.mark.parametrize("num_samples", [96, 103, 5])
def test_instance_balanced_two_ranks(num_samples):
    ranks = [InstanceBalancedBatchSampler(num_samples, 8, num_replicas=2, rank=r, seed=3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-num_samples // 16)
    for epoch in (0, 1):
        for r, sampler in enumerate(ranks):
            sampler.set_epoch(epoch)
            assert list(sampler) == reference_instance_batches(num_samples, 8, 2, r, 3, epoch)
        shares = [[i for batch in s.iter_epoch(epoch) for i in batch] for s in ranks]
        assert all(len(batch) == 8 for s in ranks for batch in s.iter_epoch(epoch))
        assert set(shares[0]) | set(shares[1]) == set(range(num_samples))  # complete
        padding = len(shares[0]) + len(shares[1]) - num_samples
        assert padding == -num_samples % 16
        if padding == 0:
            assert not set(shares[0]) & set(shares[1])  # disjoint
        else:
            # Only the padded copies repeat: every index is drawn once, plus `padding` repeats.
            multiplicity = Counter(shares[0] + shares[1])
            assert sum(multiplicity.values()) - len(multiplicity) == padding
    # Global batches equal the single-process batches of size R * B.
    single = InstanceBalancedBatchSampler(num_samples, 16, num_replicas=1, rank=0, seed=3)
    assert [b0 + b1 for b0, b1 in zip(*(s.iter_epoch(4) for s in ranks))] == list(single.iter_epoch(4))


def test_instance_balanced_drop_last():
    ranks = [InstanceBalancedBatchSampler(103, 8, drop_last=True, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    shares = [[i for batch in s for i in batch] for s in ranks]
    assert len(set(shares[0] + shares[1])) == 96 and not set(shares[0]) & set(shares[1])
    assert list(ranks[1].iter_epoch(2)) == reference_instance_batches(103, 8, 2, 1, 0, 2, drop_last=True)
    with pytest.raises(ValueError, match="leaves no batch"):
        InstanceBalancedBatchSampler(10, 8, drop_last=True, num_replicas=2, rank=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda seed: InstanceBalancedBatchSampler(50, 4, num_replicas=2, rank=1, seed=seed),
        lambda seed: cb_sampler(num_replicas=2, rank=1, seed=seed),
    ],
    ids=["instance", "class"],
)
def test_samplers_are_deterministic_and_use_no_global_rng(make):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = list(make(0).iter_epoch(0))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert list(make(0).iter_epoch(0)) == first
    assert list(make(0).iter_epoch(1)) != first
    assert list(make(1).iter_epoch(0)) != first
    sampler = make(0)
    assert list(sampler) == first  # epoch 0 by default
    sampler.set_epoch(1)
    assert list(sampler) == list(make(0).iter_epoch(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: InstanceBalancedBatchSampler(50, 4, num_replicas=2, rank=0, **kw),
        lambda **kw: cb_sampler(num_replicas=2, rank=1, **kw),
        lambda **kw: DualBatchSampler(
            cb_sampler(num_batches=11, **kw), InstanceBalancedBatchSampler(len(LABELS), 20, num_replicas=1, rank=0)
        ),
    ],
    ids=["instance", "class", "dual"],
)
def test_skip_resumes_with_the_remaining_batches(make):
    sampler = make()
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip_batches(4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip is one-shot
    sampler.skip_batches(len(full))
    assert list(sampler) == []
    with pytest.raises(ValueError, match="already consumed"):
        sampler.skip_batches(len(full) + 1)
    if not isinstance(sampler, DualBatchSampler):
        resumed = make(start_batch=2)
        resumed.set_epoch(3)
        assert list(resumed) == full[2:]


def test_dual_sampler_layout_and_cycling():
    cb = cb_sampler(num_batches=10)
    ib = InstanceBalancedBatchSampler(len(LABELS), 18, num_replicas=1, rank=0, seed=7)
    assert len(LABELS) == 179 and len(ib) == 10
    dual = DualBatchSampler(cb, ib)
    assert len(dual) == 10 and dual.split_sizes == (8, 18) and dual.passes_per_epoch == 1
    dual.set_epoch(2)
    assert cb.epoch == 2
    batches = list(dual)
    assert [b[:8] for b in batches] == list(cb.iter_epoch(2))
    assert [b[8:] for b in batches] == list(ib.iter_epoch(2))  # no cycling: exactly the ib epoch

    # A short instance-balanced sampler is cycled through fresh sub-epochs.
    short_ib = InstanceBalancedBatchSampler(len(LABELS), 40, num_replicas=1, rank=0, seed=7)  # 5 batches
    dual = DualBatchSampler(cb_sampler(num_batches=12), short_ib)
    assert len(dual) == 12 and dual.passes_per_epoch == 3
    dual.set_epoch(1)
    ib_parts = [b[8:] for b in dual]
    want = list(short_ib.iter_epoch(3)) + list(short_ib.iter_epoch(4)) + list(short_ib.iter_epoch(5))[:2]
    assert ib_parts == want
    assert set(sum(ib_parts[:5], [])) == set(range(len(LABELS)))  # a full pass covers everything
    assert ib_parts[:5] != ib_parts[5:10]

    with pytest.raises(ValueError, match="shard alike"):
        DualBatchSampler(cb_sampler(num_replicas=2, rank=0), ib)
    with pytest.raises(TypeError, match="ClassBalancedBatchSampler"):
        DualBatchSampler(ib, ib)


class IndexDataset(Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"index": index, "label": self.labels[index]}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dataloader_round_trip(num_workers):
    cb = cb_sampler(num_batches=6, num_replicas=2, rank=1)
    ib = InstanceBalancedBatchSampler(len(LABELS), 8, num_replicas=2, rank=1)
    dual = DualBatchSampler(cb, ib)
    dual.set_epoch(1)
    expected = list(dual.iter_epoch(1))
    loader = DataLoader(IndexDataset(LABELS), batch_sampler=dual, num_workers=num_workers)
    assert len(loader) == 6
    dual.skip_batches(2)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == expected[2:]
    for batch in batches:
        cb_labels, ib_labels = torch.split(batch["label"], dual.split_sizes)
        assert cb_labels.tolist() == [LABELS[i] for i in batch["index"][:8]]
        assert len(set(cb_labels.tolist())) == 2 and len(ib_labels) == 8


def _distributed_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        cb = ClassBalancedBatchSampler(LABELS, 8, seed=5)  # num_replicas/rank from torch.distributed
        ib = InstanceBalancedBatchSampler(len(LABELS), 8, seed=5)
        result = {"shard": [cb.num_replicas, cb.rank], "cb": list(cb), "ib": list(ib)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_defaults_come_from_torch_distributed(tmp_path):
    assert cb_sampler(num_replicas=None, rank=None).num_replicas == 1  # not initialised: single process
    # fork: spawning fresh interpreters would re-import torch in each (seconds on a small machine).
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_distributed_worker, args=args, nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["shard"] == [2, rank]
        assert result["cb"] == list(cb_sampler(num_replicas=2, rank=rank, seed=5))
        assert result["ib"] == list(InstanceBalancedBatchSampler(len(LABELS), 8, num_replicas=2, rank=rank, seed=5))


def test_one_seeding_scheme_is_seedsequence_seeded_torch_generators():
    from lpt_peft.data.seeding import torch_generator as seeded_generator
    from lpt_peft.training.samplers import create_sampler

    draw = torch.randint(0, 1000, (8,), generator=seeded_generator(42, 3, 1, 7))
    seed = int(np.random.SeedSequence([42, 3, 1, 7]).generate_state(1, np.uint64)[0]) >> 1  # 63 bits
    assert torch.equal(draw, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(draw, torch.randint(0, 1000, (8,), generator=seeded_generator(42, 3, 1, 8)))
    assert torch.equal(  # negative keys are taken mod 2**64
        torch.rand(3, generator=seeded_generator(-1)), torch.rand(3, generator=seeded_generator(2**64 - 1))
    )
    # The registry builds the same samplers as the classes.
    dual = create_sampler("dual", LABELS, 8, samples_per_class=2, num_replicas=1, rank=0, seed=5)
    cb = ClassBalancedBatchSampler(LABELS, 8, samples_per_class=2, num_replicas=1, rank=0, seed=5)
    ib = InstanceBalancedBatchSampler(len(LABELS), 8, num_replicas=1, rank=0, seed=5)
    assert list(dual.iter_epoch(2)) == list(DualBatchSampler(cb, ib).iter_epoch(2)) and dual.split_sizes == (8, 8)
    with pytest.raises(ValueError, match=r"Sampler 'instance_balanced' does not accept option\(s\) \['samples_per_c"):
        create_sampler("instance_balanced", LABELS, 8, samples_per_class=2)
    with pytest.raises(ValueError, match=r"Unknown sampler 'nope'; registered samplers are \["):
        create_sampler("nope", LABELS, 8)
