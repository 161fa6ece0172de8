"""The Random Hierarchy Model (RHM): a synthetic dataset with a known hidden hierarchy.

A class (depth 0) is rewritten by one of ``m`` production rules into ``s`` symbols (depth 1), each
of which is rewritten by one of its ``m`` rules into ``s`` symbols one level down, and so on for
``L`` levels; the ``s**L`` symbols at depth ``L`` are the visible tokens, from a vocabulary of
``v``. Rules are drawn without replacement at every level, so the grammar is unambiguous: every
token string has at most one derivation tree, which :meth:`RHM.parse` recovers.

Rules and the sampling of datasets without replacement reproduce, bit for bit, the reference
generator of the RHM literature (Cagnetta, Petrini, Tomasini, Favero, Wyart, PRX 2024) for the same
seeds; decoding extends it to any ``P_max`` (Python integers beyond ``2**63``).

Example::

    rhm = RHM(v=8, n_classes=8, m=4, s=2, L=3, seed_rules=0)
    train, test = rhm.sample(n_train=1000, n_test=200, seed_sample=1)
    x = rhm.one_hot(train.tokens[:64])          # (64, v, s**L) float
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

INT64_MAX = 2**63 - 1
#: Largest ``P_max`` for which ``n_train=-1`` (the whole dataset) is accepted.
MAX_FULL_DATASET = 2**27


def _check_int(name: str, value: object, low: int, high: int | None = None, what: str = "") -> int:
    """Return ``value`` if it is an integer in ``[low, high]``, else raise a one-line ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"RHM: {name}={value!r} is not an integer") from None
    assert isinstance(value, int)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"RHM: {name}={value} is invalid: must be {rng}{extra}")
    return value


@dataclass
class RHMData:
    """A set of RHM samples.

    Attributes:
        tokens: ``(N, s**L)`` integer tensor (``uint8`` when ``v <= 256``, else ``int16``),
            the visible tokens left to right.
        labels: ``(N,)`` ``int64`` tensor of classes.
        indices: ``(N,)`` ``int64`` tensor of the dataset indices the samples were decoded from,
            or ``None`` (samples drawn with replacement, or indices beyond int64).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: torch.device | str) -> RHMData:
        """The same samples on ``device``."""
        idx = None if self.indices is None else self.indices.to(device)
        return RHMData(self.tokens.to(device), self.labels.to(device), idx)


class RHM:
    """A Random Hierarchy Model with fixed production rules.

    Args:
        v: vocabulary size (symbols at every depth below the class), ``>= 2``.
        n_classes: number of classes, ``1 <= n_classes * m <= v**s``.
        m: synonyms per symbol (rules per symbol), ``1 <= m <= v**(s-1)``.
        s: branching factor (symbols produced by one rule), ``>= 2``.
        L: depth, ``>= 1``; inputs have ``s**L`` tokens.
        seed_rules: seed of Python's ``random`` for drawing the rules.

    Attributes:
        rules: list of ``L`` ``int64`` tensors; ``rules[0]`` is ``(n_classes, m, s)`` and rewrites
            a class, ``rules[l]`` for ``l >= 1`` is ``(v, m, s)``. ``rules[l][a, j]`` are the ``s``
            symbols at depth ``l + 1`` produced by symbol ``a`` at depth ``l`` with choice ``j``.
        P_max: number of distinct inputs (exact Python int).
        P_star: ``n_classes * m**L``, the sample complexity of deep networks (exact Python int).
    """

    def __init__(self, v: int, n_classes: int, m: int, s: int, L: int, seed_rules: int = 0):
        self.v = _check_int("v", v, 2)
        self.s = _check_int("s", s, 2)
        self.L = _check_int("L", L, 1)
        self.m = _check_int("m", m, 1, self.v ** (self.s - 1), "m <= v**(s-1)")
        self.n_classes = _check_int(
            "n_classes", n_classes, 1, self.v**self.s // self.m, "n_classes*m <= v**s"
        )
        self.seed_rules = _check_int("seed_rules", seed_rules, 0)
        self.rules = self._draw_rules()
        # rules as (n_parents * m, s) int32 tables, row = parent * m + choice: fast gathers
        self._flat_rules = [r.reshape(-1, self.s).to(torch.int32) for r in self.rules]
        self._parse_tables = self._build_parse_tables()

    # ------------------------------------------------------------------ structure
    def __repr__(self) -> str:
        return (
            f"RHM(v={self.v}, n_classes={self.n_classes}, m={self.m}, s={self.s}, L={self.L}, "
            f"seed_rules={self.seed_rules})"
        )

    @property
    def input_size(self) -> int:
        """Number of tokens of one input, ``s**L``."""
        return self.s**self.L

    @property
    def P_max(self) -> int:
        """``n_classes * m**((s**L - 1) / (s - 1))``: the number of distinct inputs."""
        return self.n_classes * self.m ** self.n_nodes_above_tokens

    @property
    def P_star(self) -> int:
        """``n_classes * m**L``: the training-set size deep networks need."""
        return self.n_classes * self.m**self.L

    @property
    def n_nodes_above_tokens(self) -> int:
        """Number of rule applications in one tree, ``(s**L - 1) / (s - 1)``."""
        return (self.s**self.L - 1) // (self.s - 1)

    @property
    def token_dtype(self) -> torch.dtype:
        """Compact storage type of tokens: ``uint8`` when ``v <= 256``, else ``int16``."""
        return torch.uint8 if self.v <= 256 else torch.int16

    def n_symbols(self, depth: int) -> int:
        """Number of distinct symbols at ``depth``: ``n_classes`` at 0, ``v`` below."""
        return self.n_classes if depth == 0 else self.v

    def _draw_rules(self) -> list[torch.Tensor]:
        rng = random.Random(self.seed_rules)
        tuples = list(itertools.product(range(self.v), repeat=self.s))
        top = rng.sample(tuples, self.n_classes * self.m)
        rules = [torch.tensor(top, dtype=torch.int64).reshape(self.n_classes, self.m, self.s)]
        for _ in range(self.L - 1):
            level = rng.sample(tuples, self.v * self.m)
            rules.append(torch.tensor(level, dtype=torch.int64).reshape(self.v, self.m, self.s))
        return rules

    def _build_parse_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per level, ``(parent, choice)`` tables indexed by the base-``v`` code of an s-tuple.

        Entries of tuples that no rule produces are ``-1``.
        """
        powers = torch.tensor([self.v ** (self.s - 1 - j) for j in range(self.s)])
        tables = []
        for rule in self.rules:
            n_par = rule.shape[0]
            codes = (rule * powers).sum(-1).reshape(-1)
            parent = torch.full((self.v**self.s,), -1, dtype=torch.int64)
            choice = torch.full((self.v**self.s,), -1, dtype=torch.int64)
            parent[codes] = torch.arange(n_par).repeat_interleave(self.m)
            choice[codes] = torch.arange(self.m).repeat(n_par)
            tables.append((parent, choice))
        return tables

    # ------------------------------------------------------------------ trees
    def expand(self, labels: torch.Tensor, choices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Symbols at every depth of the trees given by classes and rule choices.

        Args:
            labels: ``(N,)`` classes.
            choices: ``L`` tensors, ``choices[l]`` of shape ``(N, s**l)`` with values in
                ``[0, m)``: the rule chosen by each node at depth ``l``, left to right.

        Returns:
            ``L + 1`` ``int64`` tensors, element ``d`` of shape ``(N, s**d)``: the latents.
        """
        return self._expand(labels, choices, keep_all=True)

    def _expand(
        self, labels: torch.Tensor, choices: Sequence[torch.Tensor], keep_all: bool
    ) -> list[torch.Tensor]:
        sym = labels.to(torch.int32).reshape(-1, 1)
        out = [sym.to(torch.int64)] if keep_all else []
        for level, table in enumerate(self._flat_rules):
            c = choices[level].to(torch.int32)
            flat = (sym * self.m + c).reshape(-1)
            sym = torch.index_select(table.to(sym.device), 0, flat)
            sym = sym.reshape(c.shape[0], c.shape[1] * self.s)
            if keep_all:
                out.append(sym.to(torch.int64))
        return out if keep_all else [sym]

    def _tokens(self, labels: torch.Tensor, choices: Sequence[torch.Tensor]) -> torch.Tensor:
        return self._expand(labels, choices, keep_all=False)[0].to(self.token_dtype)

    def parse(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Recover the derivation trees of token strings (bottom-up, vectorised).

        Returns:
            ``(latents, choices)`` as in :meth:`expand`.

        Raises:
            ValueError: if a string is not generated by this grammar.
        """
        tokens = self._check_tokens(tokens)
        sym = tokens.to(torch.int64)
        powers = torch.tensor(
            [self.v ** (self.s - 1 - j) for j in range(self.s)], device=sym.device
        )
        latents = [sym]
        choices: list[torch.Tensor] = []
        for level in range(self.L - 1, -1, -1):
            parent_t, choice_t = self._parse_tables[level]
            codes = (sym.reshape(sym.shape[0], -1, self.s) * powers).sum(-1)
            parent = parent_t.to(sym.device)[codes]
            if bool((parent < 0).any()):
                raise ValueError(
                    f"RHM.parse: some token strings are not generated by this grammar "
                    f"(no rule at depth {level} produces them)"
                )
            choices.append(choice_t.to(sym.device)[codes])
            sym = parent
            latents.append(sym)
        return latents[::-1], choices[::-1]

    def latents(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Symbols at every depth ``0..L`` of each sample's tree (``(N, s**d)`` at depth ``d``)."""
        return self.parse(tokens)[0]

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.input_size:
            raise ValueError(
                f"RHM: tokens must have shape (N, {self.input_size}), got {tuple(tokens.shape)}"
            )
        return tokens

    # ------------------------------------------------------------------ decoding
    def decode(self, indices: torch.Tensor | Sequence[int]) -> RHMData:
        """Decode dataset indices in ``[0, P_max)`` into samples (see :meth:`sample`).

        Vectorised on ``int64`` tensors when ``P_max <= 2**63 - 1``; indices given as Python
        integers are decoded exactly for any ``P_max``.
        """
        labels, choices = self._decode_choices(indices)
        tokens = self._tokens(labels, choices)
        idx = None
        if isinstance(indices, torch.Tensor):
            idx = indices.to(torch.int64)
        elif self.P_max <= INT64_MAX:
            idx = torch.tensor(list(indices), dtype=torch.int64)
        return RHMData(tokens, labels, idx)

    def _decode_choices(
        self, indices: torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.P_max <= INT64_MAX:
            if not isinstance(indices, torch.Tensor):
                indices = torch.tensor(list(indices), dtype=torch.int64)
            return self._decode_int64(indices)
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        return self._decode_bigint(list(indices))

    def _decode_int64(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        idx = idx.to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.P_max):
            raise ValueError(f"RHM: indices must be in [0, P_max={self.P_max})")
        per = self.P_max // self.n_classes
        labels = idx // per
        r = idx % per
        # the remainder is a base-m number whose digits, most significant first, are the rule
        # choices of level 0, then level 1 left to right, and so on
        return labels, self._split_levels(self._base_m_digits(r))

    def _base_m_digits(self, r: torch.Tensor) -> torch.Tensor:
        """``(N, n_nodes)`` base-``m`` digits of ``r``, most significant first."""
        n = self.n_nodes_above_tokens
        m = self.m
        if m == 1:
            return torch.zeros(r.shape[0], n, dtype=torch.int64, device=r.device)
        if m & (m - 1) == 0:  # power of two: shifts and masks
            bits = m.bit_length() - 1
            shifts = torch.tensor([bits * (n - 1 - j) for j in range(n)], device=r.device)
            return (r.unsqueeze(1) >> shifts) & (m - 1)
        small = m**n <= 2**31 - 1  # int32 division is about twice as fast
        dtype = torch.int32 if small else torch.int64
        pw = torch.tensor([m ** (n - 1 - j) for j in range(n)], dtype=dtype, device=r.device)
        return (r.to(dtype).unsqueeze(1) // pw) % m

    def _split_levels(self, digits: torch.Tensor) -> list[torch.Tensor]:
        """Split ``(N, n_nodes)`` choices (level by level, left to right) into per-level views."""
        sizes = [self.s**level for level in range(self.L)]
        return list(torch.split(digits, sizes, dim=1))

    def _decode_bigint(self, idx: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n = len(idx)
        labels = torch.empty(n, dtype=torch.int64)
        choices = [torch.empty(n, self.s**lv, dtype=torch.int64) for lv in range(self.L)]
        per0 = self.P_max // self.n_classes
        for row, i in enumerate(idx):
            if not 0 <= i < self.P_max:
                raise ValueError(f"RHM: indices must be in [0, P_max={self.P_max})")
            per = per0
            labels[row] = i // per
            r = i % per
            for level in range(self.L):
                size = self.s**level
                per //= self.m**size
                q, r = divmod(r, per)
                digits = [0] * size
                for j in range(size - 1, -1, -1):
                    q, digits[j] = divmod(q, self.m)
                choices[level][row] = torch.tensor(digits)
        return labels, choices

    # ------------------------------------------------------------------ sampling
    def sample(
        self, n_train: int, n_test: int = 0, seed_sample: int = 0
    ) -> tuple[RHMData, RHMData]:
        """Draw disjoint training and test sets without replacement.

        As the reference generator: seed Python's ``random`` with ``seed_sample`` and take
        ``random.sample(range(P_max), n_train + n_test)``; the first ``n_train`` indices form the
        training set. ``n_train=-1`` gives the whole dataset in index order and an empty test set
        (allowed up to ``P_max <= 2**27``).
        """
        n_test = _check_int("n_test", n_test, 0)
        seed_sample = _check_int("seed_sample", seed_sample, 0)
        if isinstance(n_train, int) and not isinstance(n_train, bool) and n_train == -1:
            if self.P_max > MAX_FULL_DATASET:
                raise ValueError(
                    f"RHM: n_train=-1 (whole dataset) needs P_max <= {MAX_FULL_DATASET}, "
                    f"got P_max={self.P_max}"
                )
            all_idx = torch.arange(self.P_max, dtype=torch.int64)
            return self.decode(all_idx), self.decode(all_idx[:0])
        n_train = _check_int("n_train", n_train, 0, None, "or -1 for the whole dataset")
        if n_train + n_test > self.P_max:
            raise ValueError(
                f"RHM: n_train + n_test = {n_train + n_test} is invalid: must be <= "
                f"P_max = {self.P_max}"
            )
        idx = sample_indices(random.Random(seed_sample), self.P_max, n_train + n_test)
        if self.P_max <= INT64_MAX:
            t = torch.tensor(idx, dtype=torch.int64)
            return self.decode(t[:n_train]), self.decode(t[n_train:])
        return self.decode(idx[:n_train]), self.decode(idx[n_train:])

    def sample_with_replacement(self, n: int, generator: torch.Generator) -> RHMData:
        """``n`` i.i.d. samples: class uniform, every node's rule choice uniform and independent."""
        n = _check_int("n", n, 0)
        labels = torch.randint(self.n_classes, (n,), generator=generator)
        choices = [
            torch.randint(self.m, (n, self.s**lv), generator=generator) for lv in range(self.L)
        ]
        return RHMData(self._tokens(labels, choices), labels)

    def stream(self, batch_size: int, generator: torch.Generator):
        """Endless iterator of batches drawn with replacement (for infinite-data training)."""
        batch_size = _check_int("batch_size", batch_size, 1)
        while True:
            yield self.sample_with_replacement(batch_size, generator)

    def resample_synonyms(
        self, tokens: torch.Tensor, k: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Redraw every rule choice that produces depth ``k`` or beyond.

        Symbols at depths ``< k`` are kept; ``k = L`` redraws only the lowest-level synonyms,
        ``k = 1`` keeps only the class. Returns new tokens of the same dtype.
        """
        k = _check_int("k", k, 1, self.L, "a depth of the tree")
        latents, choices = self.parse(tokens)
        dev = tokens.device
        new = [
            c if level < k - 1 else torch.randint(
                self.m, tuple(c.shape), generator=generator, device=generator.device
            ).to(dev)
            for level, c in enumerate(choices)
        ]
        return self._tokens(latents[0][:, 0], new).to(tokens.dtype)

    # ------------------------------------------------------------------ encodings
    def one_hot(
        self,
        tokens: torch.Tensor,
        whiten: bool = False,
        mask: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """One-hot encode tokens as ``(N, v, s**L)`` on the tokens' device.

        Args:
            whiten: map each entry ``x`` to ``(x - 1/v) / sqrt(1 - 1/v)`` (zero mean, unit
                column norm).
            mask: optional ``(N, s**L)`` boolean; masked positions get the constant ``v**-0.5``
                in every channel (after whitening).
        """
        x = torch.zeros(tokens.shape[0], self.v, tokens.shape[1], dtype=dtype, device=tokens.device)
        x.scatter_(1, tokens.to(torch.int64).unsqueeze(1), 1.0)
        if whiten:
            x = (x - 1.0 / self.v) / math.sqrt(1.0 - 1.0 / self.v)
        if mask is not None:
            x = x.masked_fill(mask.unsqueeze(1), self.v**-0.5)
        return x

    def last_token_task(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-last-token task: ``(mask, targets)``; the target is the last token."""
        mask = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        mask[:, -1] = True
        return mask, tokens[:, -1].to(torch.int64)

    def random_mask_task(
        self, tokens: torch.Tensor, p: float, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random-token masking: ``(mask, targets)``.

        Every position is masked independently with probability ``p``; ``targets`` holds the
        original token at masked positions and ``-100`` (ignored by cross-entropy) elsewhere.
        """
        if not 0.0 < p < 1.0:
            raise ValueError(f"RHM: mask probability p={p} is invalid: must be in (0, 1)")
        r = torch.rand(tokens.shape, generator=generator, device=generator.device)
        mask = r.to(tokens.device) < p
        ignore = torch.full(tokens.shape, -100, dtype=torch.int64, device=tokens.device)
        targets = torch.where(mask, tokens.to(torch.int64), ignore)
        return mask, targets

    # ------------------------------------------------------------------ display
    def describe_tree(self, labels: torch.Tensor, tokens: torch.Tensor, row: int) -> str:
        """A text rendering of one sample's tree, one depth per line."""
        latents = self.latents(tokens[row : row + 1])
        lines = []
        for d, lat in enumerate(latents):
            syms = lat[0].tolist()
            label = "class" if d == 0 else ("tokens" if d == self.L else f"depth {d}")
            width = self.s ** (self.L - d)
            cells = [str(x).center(3 * width) for x in syms]
            lines.append(f"{label:>8} |" + "".join(cells))
        return "\n".join(lines)


def sample_indices(rng: random.Random, n: int, k: int) -> list[int]:
    """``rng.sample(range(n), k)``, extended to any ``n``.

    Below ``2**63`` this is exactly Python's ``random.sample``. For larger ``n`` (where ``range``
    has no length) it runs the same set-based selection that ``random.sample`` uses for large
    populations, drawing each index as ``random.randrange(n)`` does (rejection sampling on
    ``getrandbits(n.bit_length())``).
    """
    if n <= INT64_MAX:
        return rng.sample(range(n), k)
    return _sample_set(rng, n, k)


def _sample_set(rng: random.Random, n: int, k: int) -> list[int]:
    """The set-based branch of ``random.sample`` for a population ``range(n)``."""
    bits = n.bit_length()
    selected: set[int] = set()
    out = []
    for _ in range(k):
        j = _randbelow(rng, n, bits)
        while j in selected:
            j = _randbelow(rng, n, bits)
        selected.add(j)
        out.append(j)
    return out


def _randbelow(rng: random.Random, n: int, bits: int) -> int:
    r = rng.getrandbits(bits)
    while r >= n:
        r = rng.getrandbits(bits)
    return r
