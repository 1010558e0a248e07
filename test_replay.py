"""
test_replay.py: Selective Sample Replay (replay.py).

    python -m pytest -q test_replay.py
"""
from collections import Counter

import numpy as np
import pytest
import torch

from replay import drop_zero_groups, new_store, nonzero, nonzero_group_share, ssr


def _mk(advs, group="g", start=0):
    return [{"id": start + i, "adv": a, "group": group} for i, a in enumerate(advs)]


def _chi2(counts, probs, n):
    # Pearson's statistic against expected counts n * p
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in probs.items())


# chi-square critical values at p = 0.001 (tables): a wrong law fails, a right one passes (fixed seeds)
CHI2_999 = {2: 13.816, 4: 18.467}


ADVS = [0.5, -1.0, 1.5, 0.0, 2.0, -0.25]  # id 3 has zero advantage


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_replay_ssr_draws_proportional_to_abs_adv_pow_alpha(alpha):
    # hand formula: P(i) = |A_i|^alpha / sum_j |A_j|^alpha over the non-zero ones
    w = {0: 0.5 ** alpha, 1: 1.0, 2: 1.5 ** alpha, 4: 2.0 ** alpha, 5: 0.25 ** alpha}
    probs = {i: v / sum(w.values()) for i, v in w.items()}
    rng, counts, n = np.random.default_rng(0), Counter(), 0
    store = new_store(100)
    store["items"].append({"id": 99, "adv": 5.0, "group": "old"})  # non-empty: no fill needed below
    for _ in range(5000):  # 5000 updates of 4 from 5 useful samples = 20,000 draws
        batch = ssr(_mk(ADVS), store, 4, alpha=alpha, rng=rng)
        assert len(batch) == 4 and not any(s["replayed"] for s in batch)
        counts.update(s["id"] for s in batch)
        n += 4
    assert counts[3] == 0 and 99 not in counts  # zero advantage never drawn; no fill when current suffices
    assert _chi2(counts, probs, n) < CHI2_999[4]
    for i, p in probs.items():  # and each frequency within 4 binomial sigmas
        assert abs(counts[i] / n - p) < 4 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("advs, alpha", [([1e-3, -2e-3, 1.5e-3], 200.0), ([10.0, -9.0, 5.0], 400.0)])
def test_replay_ssr_extreme_alpha_keeps_the_law(advs, alpha):
    # |A|^alpha underflows to 0 for all three (1e-3^200) or overflows to inf (10^400) in float64; the law itself is
    # fine: P(i) = exp(alpha log|A_i| - logsumexp_j alpha log|A_j|), worked in log space here
    logw = [alpha * np.log(abs(a)) for a in advs]
    probs = {i: float(np.exp(v - np.logaddexp.reduce(logw))) for i, v in enumerate(logw)}
    big = max(probs, key=probs.get)
    assert probs[big] > 1 - 1e-9  # 2^-200 and (2/1.5)^-200 next to 1; (9/10)^400 = 5e-19 and (1/2)^400
    rng, store = np.random.default_rng(0), new_store(10)
    store["items"].append({"id": 99, "adv": 5.0, "group": "old"})
    counts = Counter(s["id"] for _ in range(200) for s in ssr(_mk(advs), store, 3, alpha=alpha, rng=rng))
    assert counts == Counter({big: 600})


def test_replay_store_fill_proportional_to_abs_adv_plus_1e4():
    store = new_store(3)
    store["items"].extend([{"id": 0, "adv": 0.1}, {"id": 1, "adv": -0.3}, {"id": 2, "adv": 0.6}])
    w = {0: 0.1001, 1: 0.3001, 2: 0.6001}
    probs = {i: v / sum(w.values()) for i, v in w.items()}
    rng, counts = np.random.default_rng(1), Counter()
    for _ in range(5000):  # nothing useful now: the 3 slots are weighted draws from the store (no full pass)
        batch = ssr(_mk([0.0, 0.0], group="z"), store, 3, rng=rng)
        assert len(batch) == 3 and all(s["replayed"] for s in batch)
        counts.update(s["id"] for s in batch)
    assert _chi2(counts, probs, 15000) < CHI2_999[2]
    assert [s["id"] for s in store["items"]] == [0, 1, 2]  # zero-advantage samples are never stored


def test_replay_fill_takes_whole_store_passes_first():
    store = new_store(3)
    store["items"].extend([{"id": 0, "adv": 1.0}, {"id": 1, "adv": 1.0}, {"id": 2, "adv": 1e-3}])
    for seed in range(20):  # need 7 from 3: two full passes + 1 weighted draw -> each id at least twice
        c = Counter(s["id"] for s in ssr([], store, 7, rng=np.random.default_rng(seed)))
        assert sum(c.values()) == 7 and min(c[0], c[1], c[2]) >= 2


def test_replay_zero_advantage_never_chosen():
    samples = _mk([0.0, 1e-9, -1e-7, 0.7])  # all but id 3 are ~zero under eps = 1e-6
    batch = ssr(samples, new_store(10), 50, rng=np.random.default_rng(0))
    assert len(batch) == 50 and {s["id"] for s in batch} == {3}


def test_replay_store_capacity_eviction_persistence_and_fill_from_earlier_steps():
    rng, store = np.random.default_rng(0), new_store(3)
    ssr(_mk([1.0, 2.0, 0.0, 3.0, 4.0, 5.0]), store, 2, rng=rng, extend_first=False)
    assert [s["id"] for s in store["items"]] == [3, 4, 5]  # 5 non-zero in, capacity 3: ids 0 and 1 evicted
    # step 2: two useful current samples, size 5 -> 2 current + 3 replayed, replays only from step 1
    batch = ssr(_mk([0.5, -0.5, 0.0], group="h", start=10), store, 5, rng=rng, extend_first=False)
    assert len(batch) == 5
    cur = [s for s in batch if not s["replayed"]]
    old = [s for s in batch if s["replayed"]]
    assert len(cur) == 2 and {s["id"] for s in cur} <= {10, 11}
    assert len(old) == 3 and {s["id"] for s in old} <= {3, 4, 5}
    assert [s["id"] for s in store["items"]] == [5, 10, 11]  # then step 2 entered, oldest out
    # step 3 with nothing useful: all from the store, which persisted
    batch = ssr(_mk([0.0, 0.0], group="k", start=20), store, 4, rng=rng, extend_first=False)
    assert len(batch) == 4 and all(s["replayed"] for s in batch)
    assert {s["id"] for s in batch} <= {5, 10, 11}


def test_replay_first_step_never_replays_itself():
    store = new_store(10)
    batch = ssr(_mk([1.0, -1.0]), store, 6, rng=np.random.default_rng(0), extend_first=False)  # repeats of current
    assert len(batch) == 6 and not any(s["replayed"] for s in batch)
    assert len(store["items"]) == 2


def test_replay_store_extended_before_drawing_as_the_code():
    # VL-Rethinker extends the store first: 2 current samples drawn, the other 4 filled from the store, which
    # already holds them (a whole pass over the store while more is missing than it holds, then 2 draws)
    store = new_store(10)
    batch = ssr(_mk([1.0, -1.0]), store, 6, rng=np.random.default_rng(0))
    assert len(batch) == 6 and sum(s["replayed"] for s in batch) == 4 and len(store["items"]) == 2
    replayed = Counter(s["adv"] for s in batch if s["replayed"])
    assert replayed[1.0] >= 1 and replayed[-1.0] >= 1


def test_replay_fixed_output_size():
    rng = np.random.default_rng(0)
    assert ssr([], new_store(4), 8, rng=rng) == []  # nothing now, nothing stored: caller skips
    assert ssr(_mk([0.0, 0.0]), new_store(4), 8, rng=rng) == []
    store = new_store(4)
    assert len(ssr(_mk([1.0] * 10), store, 4, rng=rng)) == 4  # more current than size
    assert len(ssr(_mk([1.0]), store, 9, rng=rng)) == 9  # fewer: filled from the store
    assert len(ssr([], store, 3, rng=rng)) == 3  # none: all replayed
    assert len(ssr(_mk([1.0, 2.0]), new_store(4), 5)) == 5  # default rng


def test_replay_samples_moved_to_cpu_and_keys_kept():
    seq = torch.arange(5)
    logp = torch.randn(5, requires_grad=True) * 2  # non-leaf with a graph: must be detached in the store
    img = {"pixels": torch.ones(4, 3, requires_grad=True) * 1, "grid": torch.tensor([1, 2, 2]), "n": 1}
    s = {"adv": 0.5, "group": 0, "seq": seq, "mask": [0, 1, 1], "logp": logp, "images": [img]}
    store = new_store(2)
    out = ssr([s], store, 1, rng=np.random.default_rng(0))
    assert out[0]["seq"] is seq and out[0]["replayed"] is False and "replayed" not in s  # copies
    kept = store["items"][0]
    assert kept["logp"].device.type == "cpu" and not kept["logp"].requires_grad
    assert torch.equal(kept["logp"], logp.detach()) and kept["mask"] == [0, 1, 1]
    assert not kept["images"][0]["pixels"].requires_grad and kept["images"][0]["n"] == 1
    assert torch.equal(kept["images"][0]["grid"], torch.tensor([1, 2, 2]))
    replayed = ssr([], store, 1, rng=np.random.default_rng(0))[0]
    assert replayed["replayed"] is True and "replayed" not in store["items"][0]


def test_replay_drop_zero_groups_and_share():
    samples = (_mk([0.0, 0.0, 0.0], "a") + _mk([0.5, -0.5, 0.0], "b", 3)
               + _mk([1e-8, -1e-8], "c", 6) + _mk([0.3], "d", 8))
    assert [s["id"] for s in nonzero(samples)] == [3, 4, 8]
    assert [s["id"] for s in drop_zero_groups(samples)] == [3, 4, 5, 8]  # b keeps its zero sample
    assert nonzero_group_share(samples) == 0.5  # b and d of a, b, c, d
    assert nonzero_group_share(samples, eps=1e-9) == 0.75  # c counts with a smaller eps
    assert nonzero_group_share([]) == 0.0 and drop_zero_groups([]) == []


def test_replay_bad_arguments():
    with pytest.raises(ValueError, match="capacity"):
        new_store(0)
    with pytest.raises(ValueError, match="size"):
        ssr(_mk([1.0]), new_store(2), 0)
    with pytest.raises(ValueError, match="alpha"):
        ssr(_mk([1.0]), new_store(2), 2, alpha=-1.0)
