"""Write ``rhm_golden.json``: rules and samples of the public reference RHM generators.

Not run by the test suite; it documents how the stored numbers were made. It needs the two public
generators extracted into importable packages (their files unchanged, next to an empty
``__init__.py``); see ``tests/data/README.md`` for the exact steps.

    python tests/data/make_rhm_golden.py /tmp/rhmref/tlm /tmp/rhmref/asc tests/data/rhm_golden.json

The tokens, labels and rules are stored as SHA-256 digests of their little-endian int64 bytes, plus
the first rows in clear so that a mismatch can be read.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch

#: sampling without replacement (``random.sample`` of dataset indices), first generator
WITHOUT = [
    dict(v=8, n=8, m=4, s=2, L=3, seed_rules=0, seed_sample=1, n_train=1000, n_test=200),
    dict(v=6, n=5, m=3, s=2, L=4, seed_rules=7, seed_sample=11, n_train=500, n_test=100),
    dict(v=3, n=3, m=3, s=3, L=2, seed_rules=2, seed_sample=0, n_train=-1, n_test=0),
    dict(v=16, n=16, m=4, s=2, L=4, seed_rules=1, seed_sample=5, n_train=300, n_test=50),
    dict(v=5, n=2, m=1, s=2, L=3, seed_rules=3, seed_sample=0, n_train=-1, n_test=0),
]
#: sampling with replacement (class, then every node's rule choice, from one torch generator)
WITH = [
    dict(v=8, n=8, m=4, s=2, L=3, seed_rules=0, seed_sample=3, n_train=400, n_test=0),
    # P_max = 32 * 16**31 = 2**129, beyond int64
    dict(v=32, n=32, m=16, s=2, L=5, seed_rules=0, seed_sample=4, n_train=64, n_test=0),
]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def record(p: dict, rules: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    levels = [rules[i] for i in range(p["L"])]
    return {
        "params": p,
        "rules_sha256": [digest(r) for r in levels],
        "rules_level0": levels[0].tolist(),
        "tokens_shape": list(x.shape),
        "tokens_sha256": digest(x),
        "labels_sha256": digest(y),
        "tokens_head": x[:4].tolist(),
        "labels_head": y[:4].tolist(),
    }


def main(tlm_dir: str, asc_dir: str, out: str) -> None:
    sys.path[:0] = [tlm_dir, asc_dir]
    from ref_asc import random_hierarchy_model as asc
    from ref_tlm import random_hierarchy_model as tlm

    cases = []
    for p in WITHOUT:
        data = tlm.RandomHierarchyModel(
            num_features=p["v"], num_classes=p["n"], num_synonyms=p["m"], tuple_size=p["s"],
            num_layers=p["L"], seed_rules=p["seed_rules"], seed_sample=p["seed_sample"],
            train_size=p["n_train"], test_size=p["n_test"], input_format="long",
        )
        rules = tlm.sample_rules(p["v"], p["n"], p["m"], p["s"], p["L"], seed=p["seed_rules"])
        cases.append({"replacement": False, **record(p, rules, data.features - 1, data.labels)})
    for p in WITH:
        data = asc.RandomHierarchyModel(
            num_features=p["v"], num_classes=p["n"], num_synonyms=p["m"], tuple_size=p["s"],
            num_layers=p["L"], seed_rules=p["seed_rules"], seed_sample=p["seed_sample"],
            train_size=p["n_train"], test_size=p["n_test"], input_format="long", replacement=True,
        )
        cases.append({"replacement": True, **record(p, data.rules, data.features - 1, data.labels)})
    with open(out, "w") as f:
        f.write('{"torch": ' + json.dumps(torch.__version__) + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
