"""Tests of the Random Hierarchy Model generator."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from locallearn.data.rhm import RHM, _sample_set, sample_indices

SMALL = [
    dict(v=3, n_classes=2, m=2, s=2, L=2),
    dict(v=4, n_classes=4, m=2, s=2, L=3),
    dict(v=3, n_classes=3, m=3, s=3, L=2),
    dict(v=5, n_classes=2, m=1, s=2, L=3),
]


def reference_index(rhm: RHM, label: int, choices: list[list[int]]) -> int:
    """Inverse of decoding: the index of a tree from its class and rule choices."""
    r = 0
    for level_choices in choices:
        for c in level_choices:
            r = r * rhm.m + c
    return label * (rhm.P_max // rhm.n_classes) + r


GOLDEN = json.loads((Path(__file__).parent / "data" / "rhm_golden.json").read_text())["cases"]


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _case_id(case: dict) -> str:
    p = case["params"]
    kind = "with" if case["replacement"] else "without"
    return f"v{p['v']}n{p['n']}m{p['m']}s{p['s']}L{p['L']}-{kind}"


def _golden_rhm(case: dict) -> RHM:
    p = case["params"]
    return RHM(v=p["v"], n_classes=p["n"], m=p["m"], s=p["s"], L=p["L"], seed_rules=p["seed_rules"])


@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_rules_equal_the_public_reference_generator(case):
    """Rules as stored from the public reference generator (tests/data/README.md)."""
    rhm = _golden_rhm(case)
    assert [_sha(r) for r in rhm.rules] == case["rules_sha256"]
    assert rhm.rules[0].tolist() == case["rules_level0"]


@pytest.mark.parametrize("case", GOLDEN, ids=_case_id)
def test_samples_equal_the_public_reference_generator(case):
    """Tokens and labels for the same seeds equal the reference's, bit for bit."""
    rhm, p = _golden_rhm(case), case["params"]
    if case["replacement"]:
        data = rhm.sample_with_replacement(
            p["n_train"], torch.Generator().manual_seed(p["seed_sample"])
        )
        tokens, labels = data.tokens, data.labels
    else:
        train, test = rhm.sample(p["n_train"], p["n_test"], seed_sample=p["seed_sample"])
        tokens = torch.cat([train.tokens, test.tokens])
        labels = torch.cat([train.labels, test.labels])
    assert list(tokens.shape) == case["tokens_shape"]
    assert tokens[:4].tolist() == case["tokens_head"]
    assert labels[:4].tolist() == case["labels_head"]
    assert _sha(tokens) == case["tokens_sha256"]
    assert _sha(labels) == case["labels_sha256"]


def test_golden_cases_cover_the_promised_regimes():
    """The stored cases include P_max beyond int64 and both sampling modes."""
    beyond = [c for c in GOLDEN if _golden_rhm(c).P_max > 2**63]
    assert beyond and all(c["replacement"] for c in beyond)
    assert {c["replacement"] for c in GOLDEN} == {True, False}
    assert any(c["params"]["n_train"] == -1 for c in GOLDEN)  # whole datasets


def test_rules_are_unambiguous():
    rhm = RHM(v=6, n_classes=6, m=5, s=2, L=3, seed_rules=3)
    for rule in rhm.rules:
        tuples = [tuple(t) for t in rule.reshape(-1, 2).tolist()]
        assert len(set(tuples)) == len(tuples)


def test_exact_counts_are_python_ints():
    rhm = RHM(v=32, n_classes=32, m=16, s=2, L=5)
    assert isinstance(rhm.P_max, int)
    assert rhm.P_max == 32 * 16**31 == 2**129
    assert rhm.P_star == 32 * 16**5
    rhm3 = RHM(v=4, n_classes=2, m=3, s=3, L=2)
    assert rhm3.P_max == 2 * 3**4


@pytest.mark.parametrize("params", SMALL)
def test_decoding_is_a_bijection_onto_valid_strings(params):
    rhm = RHM(**params, seed_rules=2)
    data, test = rhm.sample(n_train=-1)
    assert len(test) == 0
    assert len(data) == rhm.P_max
    assert torch.equal(data.indices, torch.arange(rhm.P_max))
    distinct = {tuple(t) for t in data.tokens.tolist()}
    assert len(distinct) == rhm.P_max
    # parsing recovers the class and the index of every string
    latents, choices = rhm.parse(data.tokens)
    assert torch.equal(latents[0][:, 0], data.labels)
    for i in range(0, rhm.P_max, max(1, rhm.P_max // 50)):
        ch = [c[i].tolist() for c in choices]
        assert reference_index(rhm, int(data.labels[i]), ch) == i


def test_splits_are_disjoint_and_reproducible():
    rhm = RHM(v=8, n_classes=8, m=4, s=2, L=3, seed_rules=0)
    train, test = rhm.sample(n_train=1000, n_test=300, seed_sample=11)
    assert len(set(train.indices.tolist()) & set(test.indices.tolist())) == 0
    a = {tuple(t) for t in train.tokens.tolist()}
    b = {tuple(t) for t in test.tokens.tolist()}
    assert len(a) == 1000 and len(b) == 300 and not a & b
    assert train.tokens.dtype == torch.uint8 and train.tokens.shape == (1000, 8)
    assert train.labels.dtype == torch.int64
    # reproducible, and another seed gives another set
    again, _ = rhm.sample(n_train=1000, n_test=300, seed_sample=11)
    assert torch.equal(again.tokens, train.tokens)
    other, _ = rhm.sample(n_train=1000, n_test=300, seed_sample=12)
    assert not torch.equal(other.tokens, train.tokens)


def test_set_branch_equals_python_sample():
    n, k = 10**7, 500
    assert _sample_set(random.Random(3), n, k) == random.Random(3).sample(range(n), k)


def test_bigint_decoding_agrees_with_int64():
    rhm = RHM(v=16, n_classes=16, m=4, s=2, L=4, seed_rules=1)
    idx = torch.tensor(random.Random(0).sample(range(rhm.P_max), 300))
    lab64, ch64 = rhm._decode_int64(idx)
    labb, chb = rhm._decode_bigint(idx.tolist())
    assert torch.equal(lab64, labb)
    for a, b in zip(ch64, chb):
        assert torch.equal(a, b)


def test_decoding_beyond_int64():
    rhm = RHM(v=32, n_classes=32, m=16, s=2, L=5, seed_rules=0)
    assert rhm.P_max > 2**63
    train, test = rhm.sample(n_train=50, n_test=10, seed_sample=4)
    assert train.indices is None and len(train) == 50 and len(test) == 10
    idx = sample_indices(random.Random(4), rhm.P_max, 60)
    assert max(idx) > 2**63  # the draw covers the whole range
    latents, choices = rhm.parse(train.tokens)
    for row in range(50):
        ch = [c[row].tolist() for c in choices]
        assert reference_index(rhm, int(train.labels[row]), ch) == idx[row]


def test_latents_are_consistent_with_rules_and_tokens():
    rhm = RHM(v=6, n_classes=4, m=3, s=2, L=3, seed_rules=9)
    data, _ = rhm.sample(n_train=400, seed_sample=0)
    latents, choices = rhm.parse(data.tokens)
    assert [t.shape[1] for t in latents] == [1, 2, 4, 8]
    assert torch.equal(latents[0][:, 0], data.labels)
    assert torch.equal(latents[-1], data.tokens.long())
    for level in range(rhm.L):
        parent = latents[level]
        child = latents[level + 1].reshape(len(data), -1, rhm.s)
        expect = rhm.rules[level][parent, choices[level]]
        assert torch.equal(child, expect)
    assert torch.equal(rhm.expand(data.labels, choices)[-1], data.tokens.long())


def test_parse_rejects_strings_outside_the_grammar():
    rhm = RHM(v=6, n_classes=2, m=2, s=2, L=2, seed_rules=0)
    used = {tuple(t) for t in rhm.rules[1].reshape(-1, 2).tolist()}
    bad = next(t for t in itertools.product(range(6), repeat=2) if t not in used)
    tokens = torch.tensor([list(bad) * 2], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not generated"):
        rhm.parse(tokens)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_synonym_resampling_keeps_upper_depths(k):
    rhm = RHM(v=8, n_classes=8, m=4, s=2, L=3, seed_rules=0)
    data, _ = rhm.sample(n_train=2000, seed_sample=3)
    g = torch.Generator().manual_seed(0)
    new = rhm.resample_synonyms(data.tokens, k, g)
    assert new.dtype == data.tokens.dtype and new.shape == data.tokens.shape
    old_lat = rhm.latents(data.tokens)
    new_lat = rhm.latents(new)
    for d in range(k):
        assert torch.equal(old_lat[d], new_lat[d])
    # the rest is redrawn: most depth-k symbols change (each with prob 1 - 1/m per choice)
    changed = (old_lat[k] != new_lat[k]).float().mean().item()
    assert 0.5 < changed < 0.9
    assert (new != data.tokens).any(dim=1).float().mean() > 0.9


def test_with_replacement_statistics_are_uniform():
    rhm = RHM(v=6, n_classes=5, m=3, s=2, L=3, seed_rules=0)
    g = torch.Generator().manual_seed(0)
    n = 30000
    data = rhm.sample_with_replacement(n, g)
    counts = torch.bincount(data.labels, minlength=5).float()
    assert torch.all((counts / n - 0.2).abs() < 0.015)
    _, choices = rhm.parse(data.tokens)
    for c in choices:
        freq = torch.bincount(c.reshape(-1), minlength=3).float() / c.numel()
        assert torch.all((freq - 1 / 3).abs() < 0.015)
    # independence of the two level-1 choices: joint close to the product
    joint = torch.bincount(choices[1][:, 0] * 3 + choices[1][:, 1], minlength=9).float() / n
    assert torch.all((joint - 1 / 9).abs() < 0.012)
    stream = rhm.stream(64, torch.Generator().manual_seed(1))
    b1, b2 = next(stream), next(stream)
    assert len(b1) == 64 and not torch.equal(b1.tokens, b2.tokens)


def test_encodings_and_tasks():
    rhm = RHM(v=8, n_classes=8, m=4, s=2, L=3)
    data, _ = rhm.sample(n_train=32, seed_sample=0)
    x = rhm.one_hot(data.tokens)
    assert x.shape == (32, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x.argmax(1), data.tokens.long())
    assert torch.allclose(x.sum(1), torch.ones(32, 8))
    w = rhm.one_hot(data.tokens, whiten=True)
    assert torch.allclose(w.sum(1), torch.zeros(32, 8), atol=1e-5)
    assert torch.allclose(w.norm(dim=1), torch.ones(32, 8), atol=1e-5)
    mask, target = rhm.last_token_task(data.tokens)
    assert torch.equal(target, data.tokens[:, -1].long())
    xm = rhm.one_hot(data.tokens, mask=mask)
    assert torch.allclose(xm[:, :, -1], torch.full((32, 8), 8**-0.5))
    assert torch.equal(xm[:, :, :-1], x[:, :, :-1])
    g = torch.Generator().manual_seed(0)
    mask, target = rhm.random_mask_task(data.tokens, 0.25, g)
    assert torch.equal(target[mask], data.tokens.long()[mask])
    assert torch.all(target[~mask] == -100)
    assert 0.1 < mask.float().mean() < 0.4


def test_token_storage_is_compact():
    assert RHM(v=16, n_classes=16, m=4, s=2, L=4).token_dtype == torch.uint8
    big = RHM(v=300, n_classes=2, m=2, s=2, L=1)
    assert big.token_dtype == torch.int16
    data, _ = big.sample(n_train=4)
    assert data.tokens.element_size() <= 2 and int(data.tokens.max()) < 300


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(v=1, n_classes=2, m=1, s=2, L=2), "v"),
        (dict(v=4, n_classes=2, m=1, s=1, L=2), "s"),
        (dict(v=4, n_classes=2, m=1, s=2, L=0), "L"),
        (dict(v=4, n_classes=2, m=0, s=2, L=2), "m"),
        (dict(v=4, n_classes=2, m=5, s=2, L=2), "m"),
        (dict(v=4, n_classes=5, m=4, s=2, L=2), "n_classes"),
        (dict(v=4.0, n_classes=2, m=2, s=2, L=2), "v"),
        (dict(v=4, n_classes=2, m=2, s=2, L="3"), "L"),
        (dict(v=4, n_classes=2, m=2, s=True, L=2), "s"),
        (dict(v=4, n_classes=2, m=2, s=2, L=2, seed_rules=-1), "seed_rules"),
    ],
)
def test_bad_parameters(kwargs, name):
    with pytest.raises(ValueError) as err:
        RHM(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"RHM: {name}=")


def test_bad_sampling_requests():
    rhm = RHM(v=3, n_classes=2, m=2, s=2, L=2)
    with pytest.raises(ValueError, match=r"n_train \+ n_test = 17 .*P_max = 16"):
        rhm.sample(n_train=10, n_test=7)
    with pytest.raises(ValueError, match="n_train=-2"):
        rhm.sample(n_train=-2)
    with pytest.raises(ValueError, match="n_test"):
        rhm.sample(n_train=1, n_test=1.5)
    data, _ = rhm.sample(n_train=4)
    for k in (0, 3, 1.0):
        with pytest.raises(ValueError, match=f"k={k}"):
            rhm.resample_synonyms(data.tokens, k, torch.Generator())
    with pytest.raises(ValueError, match="indices"):
        rhm.decode(torch.tensor([16]))
    huge = RHM(v=16, n_classes=16, m=4, s=2, L=4)
    with pytest.raises(ValueError, match="n_train=-1"):
        huge.sample(n_train=-1)


def test_cli_rhm_info(capsys):
    from locallearn.cli import main

    assert main(["rhm", "info", "v=6", "n_classes=4", "m=3", "L=2", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert f"P_max  = {4 * 3**3}" in out and "P_star = 36" in out
    assert out.count("class ") >= 2
    assert main(["rhm", "info", "m=9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "m=9" in err and "Traceback" not in err
    assert main(["rhm", "info", "bogus=1"]) == 2
    assert "unknown RHM parameter 'bogus'" in capsys.readouterr().err
