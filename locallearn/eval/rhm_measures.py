"""What each block of a network trained on the Random Hierarchy Model has learned.

Three measures on a frozen :class:`~locallearn.nets.base.BlockNet` (the hierarchical CNN: block
``l`` (1-based) has ``s**(L-l)`` positions, position ``j`` sees tokens ``j*s**l .. (j+1)*s**l - 1``,
the subtree of one node at depth ``L-l``). Every measure returns rows
``{"measure", "layer", "depth", "value", "chance", ...}``.

**Latent probes** (:func:`latent_probes`). A linear probe (multinomial logistic regression,
:func:`~locallearn.eval.probe.fit_linear_probe`) from the activations of block ``l`` at position
``j`` to the symbol of a tree node containing that position's subtree: the node it covers (depth
``L-l``) or one of its ancestors (depth ``d < L-l``; the ancestor of position ``j`` at depth ``d``
is node ``j // s**(L-l-d)``). Only these ``(layer, depth)`` pairs are defined: deeper nodes are
not covered by a single position. By default one probe serves all positions of a block (positions
are extra samples): the grammar and the convolution are the same at every position, so the node's
symbol should be decodable the same way everywhere. A shared probe cannot tell a left from a
right child, which matters for ancestors only; ``per_position=True`` fits one probe per position
instead (fewer samples each) and averages their accuracies. Probes are fitted on one sample set
and scored on another (held-out) set. Beside each accuracy:

- ``chance``: the majority baseline, the test frequency of the most frequent training label
  (latent symbols are not exactly uniform: the rules are drawn at random);
- ``uniform_chance``: ``1 / n_symbols`` (``1/v`` for a latent, ``1/n_classes`` for the class);
- ``input_patch``: the same probe on the raw one-hot tokens of the patch the position covers: what
  a linear read-out of the input already gives.

Rows with ``features="flat"`` probe the class from the whole flattened output of every block.

Rows with ``split="synonyms"`` test generalisation to unseen synonyms, for the node a position
covers: the probe is fitted on the nodes whose own rule choice (which of the ``m`` synonymous
tuples the node expands into) is below ``m // 2`` and scored on the nodes with the other choices.
Where every node pattern occurs in the training set, a wide random network already separates
them and the plain probe saturates; this split asks whether synonyms share one representation.

**Synonym sensitivity** (:func:`synonym_sensitivity`). For base samples ``x`` and versions ``x'``
with every rule choice that produces depth ``k`` or beyond redrawn
(:meth:`~locallearn.data.rhm.RHM.resample_synonyms`: symbols at depths ``< k`` kept),
``S(k, l) = mean ||f_l(x) - f_l(x')||^2 / mean ||f_l(x_i) - f_l(x_j)||^2`` over random pairs,
``f_l`` the flattened output of block ``l``. Low values mean invariance; a block whose output is a
function of the symbols its positions cover (depth ``L-l``) has ``S(k, l) = 0`` for
``k > L-l``. Layer 0 rows are the one-hot input itself, a reference. When the denominator is zero
(the block's output is the same for every input, e.g. all units dead) the ratio is undefined: the
value is NaN and the row has ``degenerate=True``.

**Masking** (:func:`feedback_matrices`, :func:`input_specific_variance`, :func:`masking`). Backprop
delivers to the pre-activation of block ``l`` the error ``delta_l = D_l M_l(x) e`` with ``e`` the
output error, ``D_l`` the block's own ReLU gate and ``M_l(x) = W_{l+1}^T D_{l+1} ... W_L^T D_L
W_out^T``, the Jacobian of the logits with respect to the block's output (units x classes). DFA
delivers ``D_l B_l e`` with a fixed ``B_l``: both have the own gate ``D_l``, so the measure is taken
on ``M_l`` alone, the part that comes from the blocks above. Input specificity:

    V_l = sum over entries of Var_x[M_l(x)] / sum over entries of E_x[M_l(x)^2]

in ``[0, 1]``: 0 for a fixed matrix (DFA, and the top block under backprop, whose ``M_L =
W_out^T``), 1 when the feedback averages to zero over inputs. ``mode="mean-gates"`` computes the
feedback of the no-masking control (gates above replaced by their batch mean), which is the same
for every input of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from locallearn.data.rhm import RHM
from locallearn.eval.probe import fit_linear_probe
from locallearn.nets.base import BlockNet

Encode = Callable[[torch.Tensor], torch.Tensor]
FEEDBACK_MODES = ("backprop", "mean-gates")


# ---------------------------------------------------------------------------- helpers
@torch.no_grad()
def layer_features(net: BlockNet, x: torch.Tensor, batch_size: int = 2048) -> list[torch.Tensor]:
    """Outputs of every block, ``(N, C_l, P_l)`` each, computed in chunks without gradients."""
    chunks = [net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    if not chunks:
        raise ValueError("rhm measures: no samples")
    return [torch.cat([c[level] for c in chunks]) for level in range(len(chunks[0]))]


def node_labels(rhm: RHM, latents: list[torch.Tensor], layer: int, depth: int) -> torch.Tensor:
    """``(N, s**(L-layer))`` symbols at ``depth`` of the node containing each position of a block.

    Args:
        latents: :meth:`RHM.latents` of the samples.
        layer: block, 1-based; its position ``j`` covers the node ``j`` at depth ``L-layer``.
        depth: ``0 <= depth <= L-layer``; the ancestor of position ``j`` is node
            ``j // s**(L-layer-depth)``.
    """
    L, s = rhm.L, rhm.s
    if not 1 <= layer <= L:
        raise ValueError(f"rhm measures: layer={layer} is invalid: must be in [1, {L}]")
    if not 0 <= depth <= L - layer:
        raise ValueError(
            f"rhm measures: depth={depth} is invalid for layer {layer}: must be in [0, {L - layer}]"
        )
    positions = torch.arange(s ** (L - layer), device=latents[depth].device)
    return latents[depth][:, positions // s ** (L - layer - depth)]


def _positions_as_samples(h: torch.Tensor) -> torch.Tensor:
    """``(N, C, P)`` to ``(N * P, C)``, sample-major."""
    n, c, p = h.shape
    return h.permute(0, 2, 1).reshape(n * p, c)


def _patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, V, T)`` one-hot input to ``(N, V * size, T // size)``: the tokens of every patch."""
    n, v, t = x.shape
    return x.reshape(n, v, t // size, size).permute(0, 1, 3, 2).reshape(n, v * size, t // size)


def _probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    weight_decay: float,
    steps: int,
) -> float:
    w, b = fit_linear_probe(train_x, train_y, n_classes, weight_decay, steps)
    pred = (test_x.to(torch.float32) @ w.t() + b).argmax(1)
    return float((pred == test_y).float().mean())


def _majority(train_y: torch.Tensor, test_y: torch.Tensor, n_classes: int) -> float:
    top = int(torch.bincount(train_y.reshape(-1), minlength=n_classes).argmax())
    return float((test_y.reshape(-1) == top).float().mean())


def _probe_pair(
    train_h: torch.Tensor,
    train_y: torch.Tensor,
    test_h: torch.Tensor,
    test_y: torch.Tensor,
    n_classes: int,
    per_position: bool,
    weight_decay: float,
    steps: int,
) -> float:
    """Accuracy of a probe from ``(N, C, P)`` features to ``(N, P)`` labels."""
    if not per_position:
        return _probe_accuracy(
            _positions_as_samples(train_h), train_y.reshape(-1),
            _positions_as_samples(test_h), test_y.reshape(-1),
            n_classes, weight_decay, steps,
        )
    accs = [
        _probe_accuracy(
            train_h[:, :, j], train_y[:, j], test_h[:, :, j], test_y[:, j],
            n_classes, weight_decay, steps,
        )
        for j in range(train_h.shape[2])
    ]
    return sum(accs) / len(accs)


# ---------------------------------------------------------------------------- probes
def latent_probes(
    net: BlockNet,
    rhm: RHM,
    train_tokens: torch.Tensor,
    test_tokens: torch.Tensor,
    encode: Encode | None = None,
    per_position: bool = False,
    flat: bool = True,
    synonym_split: bool = True,
    input_baseline: bool = True,
    weight_decay: float = 1e-4,
    steps: int = 100,
) -> list[dict[str, Any]]:
    """Probe accuracy of every block for the latents of the nodes containing its positions.

    Fitted on ``train_tokens``, scored on ``test_tokens`` (see the module docstring).

    Args:
        encode: tokens to network input (default ``rhm.one_hot``).
        per_position: one probe per position instead of one shared by the positions.
        flat: add rows (``features="flat"``) probing the class from each block's whole output.
        synonym_split: add rows (``split="synonyms"``) fitted and scored on disjoint synonyms.
        input_baseline: add ``input_patch``, the same probe on the raw one-hot patch.

    Returns:
        Rows ``{"measure": "probe", "layer", "depth", "value", "chance", "uniform_chance",
        "features", "split", "input_patch"}``; ``split`` is ``"random"`` (the given sets) or
        ``"synonyms"``.
    """
    if len(train_tokens) < 2 or len(test_tokens) < 1:
        raise ValueError("rhm measures: probes need >= 2 training and >= 1 test samples")
    encode = encode or rhm.one_hot
    x_train, x_test = encode(train_tokens), encode(test_tokens)
    h_train, h_test = layer_features(net, x_train), layer_features(net, x_test)
    if len(h_train) != rhm.L:
        raise ValueError(f"rhm measures: the network has {len(h_train)} blocks, the RHM L={rhm.L}")
    (lat_train, ch_train), (lat_test, ch_test) = rhm.parse(train_tokens), rhm.parse(test_tokens)
    one_hot_train, one_hot_test = rhm.one_hot(train_tokens), rhm.one_hot(test_tokens)
    rows: list[dict[str, Any]] = []
    for layer in range(1, rhm.L + 1):
        ht, he = h_train[layer - 1], h_test[layer - 1]
        if ht.dim() != 3 or ht.shape[2] != rhm.s ** (rhm.L - layer):
            raise ValueError(
                f"rhm measures: block {layer} output {tuple(ht.shape[1:])} does not have "
                f"s**(L-l) = {rhm.s ** (rhm.L - layer)} positions"
            )
        size = rhm.s**layer
        pt, pe = _patches(one_hot_train, size), _patches(one_hot_test, size)
        for depth in range(0, rhm.L - layer + 1):
            yt = node_labels(rhm, lat_train, layer, depth)
            ye = node_labels(rhm, lat_test, layer, depth)
            n_sym = rhm.n_symbols(depth)
            row: dict[str, Any] = {
                "measure": "probe", "layer": layer, "depth": depth,
                "value": _probe_pair(ht, yt, he, ye, n_sym, per_position, weight_decay, steps),
                "chance": _majority(yt, ye, n_sym), "uniform_chance": 1.0 / n_sym,
                "features": "position", "split": "random",
            }
            if input_baseline:
                row["input_patch"] = _probe_pair(
                    pt, yt, pe, ye, n_sym, per_position, weight_decay, steps
                )
            rows.append(row)
        if synonym_split and rhm.m >= 2:
            rows.append(_synonym_split_row(
                rhm, layer, ht, he, pt, pe, lat_train, lat_test, ch_train, ch_test,
                input_baseline, weight_decay, steps,
            ))
    if flat:
        rows += _flat_rows(rhm, h_train, h_test, lat_train[0][:, 0], lat_test[0][:, 0],
                           (one_hot_train, one_hot_test) if input_baseline else None,
                           weight_decay, steps)
    return rows


def _flat_rows(rhm: RHM, h_train: list[torch.Tensor], h_test: list[torch.Tensor],
               yt: torch.Tensor, ye: torch.Tensor,
               inputs: tuple[torch.Tensor, torch.Tensor] | None,
               weight_decay: float, steps: int) -> list[dict[str, Any]]:
    """The class probed from each block's whole output (``features="flat"``); with ``inputs``
    (the one-hot training and test inputs) the same probe on the whole input beside it."""
    whole = None
    if inputs is not None:
        whole = _probe_accuracy(inputs[0].flatten(1), yt, inputs[1].flatten(1), ye,
                                rhm.n_classes, weight_decay, steps)
    rows: list[dict[str, Any]] = []
    for layer in range(1, rhm.L + 1):
        row = {
            "measure": "probe", "layer": layer, "depth": 0,
            "value": _probe_accuracy(
                h_train[layer - 1].flatten(1), yt, h_test[layer - 1].flatten(1), ye,
                rhm.n_classes, weight_decay, steps,
            ),
            "chance": _majority(yt, ye, rhm.n_classes),
            "uniform_chance": 1.0 / rhm.n_classes, "features": "flat", "split": "random",
        }
        if whole is not None:
            row["input_patch"] = whole
        rows.append(row)
    return rows


def _synonym_split_row(
    rhm: RHM,
    layer: int,
    h_train: torch.Tensor,
    h_test: torch.Tensor,
    p_train: torch.Tensor,
    p_test: torch.Tensor,
    lat_train: list[torch.Tensor],
    lat_test: list[torch.Tensor],
    ch_train: list[torch.Tensor],
    ch_test: list[torch.Tensor],
    input_baseline: bool,
    weight_decay: float,
    steps: int,
) -> dict[str, Any]:
    """Probe of the covered node's symbol, fitted on choices ``< m // 2``, scored on the rest."""
    depth = rhm.L - layer
    half = rhm.m // 2
    fit = ch_train[depth].reshape(-1) < half
    score = ch_test[depth].reshape(-1) >= half
    y_fit = lat_train[depth].reshape(-1)[fit]
    y_score = lat_test[depth].reshape(-1)[score]
    if len(y_fit) < 2 or len(y_score) < 1:
        raise ValueError("rhm measures: too few samples for the synonym-split probe")
    n_sym = rhm.n_symbols(depth)

    def acc(a: torch.Tensor, b: torch.Tensor) -> float:
        return _probe_accuracy(
            _positions_as_samples(a)[fit], y_fit, _positions_as_samples(b)[score], y_score,
            n_sym, weight_decay, steps,
        )

    row: dict[str, Any] = {
        "measure": "probe", "layer": layer, "depth": depth, "value": acc(h_train, h_test),
        "chance": _majority(y_fit, y_score, n_sym), "uniform_chance": 1.0 / n_sym,
        "features": "position", "split": "synonyms",
    }
    if input_baseline:
        row["input_patch"] = acc(p_train, p_test)
    return row


# ---------------------------------------------------------------------------- sensitivity
def _sq_dist_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten(1).double() - b.flatten(1).double()).pow(2).sum(1).mean())


def sensitivity_ratio(f: torch.Tensor, f_resampled: torch.Tensor, pairs: torch.Tensor) -> float:
    """``mean ||f - f'||^2 / mean ||f_i - f_j||^2`` over the ``(2, M)`` index ``pairs``.

    NaN when the denominator is zero relative to the features' size (a constant output).
    """
    num = _sq_dist_mean(f, f_resampled)
    den = _sq_dist_mean(f[pairs[0]], f[pairs[1]])
    scale = float(f.flatten(1).double().pow(2).sum(1).mean())
    if den <= 1e-12 * max(scale, 1e-30):
        return math.nan
    return num / den


def random_pairs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(2, n)`` indices of distinct samples: consecutive entries of a random permutation."""
    if n < 2:
        raise ValueError("rhm measures: sensitivity needs >= 2 samples")
    perm = torch.randperm(n, generator=generator)
    return torch.stack([perm, torch.roll(perm, -1)])


def synonym_sensitivity(
    net: BlockNet,
    rhm: RHM,
    tokens: torch.Tensor,
    generator: torch.Generator,
    encode: Encode | None = None,
    include_input: bool = True,
) -> list[dict[str, Any]]:
    """``S(k, l)`` for every block ``l`` and depth ``k`` in ``1..L`` (see the module docstring).

    Args:
        tokens: base samples ``(N, s**L)``, ``N >= 2``.
        generator: CPU generator for the redrawn synonyms and the random pairs.
        include_input: add layer-0 rows, the sensitivity of the one-hot input itself.

    Returns:
        Rows ``{"measure": "sensitivity", "layer", "depth": k, "value", "chance": None,
        "degenerate"}``; ``value`` is NaN and ``degenerate`` True for a constant output.
    """
    encode = encode or rhm.one_hot
    pairs = random_pairs(len(tokens), generator)
    x = encode(tokens)
    base = layer_features(net, x)
    if include_input:
        base = [x] + base
    first = 0 if include_input else 1
    rows: list[dict[str, Any]] = []
    for k in range(1, rhm.L + 1):
        x_new = encode(rhm.resample_synonyms(tokens, k, generator))
        new = layer_features(net, x_new)
        if include_input:
            new = [x_new] + new
        for i, (f, f_new) in enumerate(zip(base, new)):
            value = sensitivity_ratio(f, f_new, pairs)
            rows.append({
                "measure": "sensitivity", "layer": first + i, "depth": k, "value": value,
                "chance": None, "degenerate": math.isnan(value),
            })
    rows.sort(key=lambda r: (r["layer"], r["depth"]))
    return rows


# ---------------------------------------------------------------------------- masking
def _forward_from(
    net: BlockNet, level: int, h: torch.Tensor, gates: list[torch.Tensor] | None
) -> torch.Tensor:
    """Logits computed from the output ``h`` of block ``level`` (0-based).

    With ``gates`` (one per block, ``None`` entries ignored) the nonlinearity of every block
    above is replaced by multiplication with the given fixed gate.
    """
    for k in range(level + 1, len(net.blocks)):
        block = net.blocks[k]
        a = block.pre(h)
        h = a * gates[k] if gates is not None else block.post(a)
    if net.readout is None:
        raise ValueError("rhm measures: masking needs a network with a read-out")
    return net.readout(h.flatten(1))


def feedback_matrices(
    net: BlockNet, x: torch.Tensor, mode: str = "backprop"
) -> list[torch.Tensor]:
    """``M_l(x)``: Jacobian of the logits w.r.t. each block's output, ``(N, units_l, n_out)``.

    ``units_l = C_l * P_l`` (channels times positions, flattened channel-major). ``mode``:
    ``backprop`` (the true gates of the blocks above) or ``mean-gates`` (the gates above replaced
    by their mean over the batch, as the no-masking control does). One backward per output.
    """
    if mode not in FEEDBACK_MODES:
        valid = ", ".join(FEEDBACK_MODES)
        raise ValueError(f"rhm measures: mode={mode!r} is unknown; valid: {valid}")
    with torch.no_grad():
        pres = []
        h = x
        outs = []
        for block in net.blocks:
            a = block.pre(h)
            h = block.post(a)
            pres.append(a)
            outs.append(h)
    gates = None
    if mode == "mean-gates":
        gates = [(a > 0).to(a.dtype).mean(0, keepdim=True) for a in pres]
    mats = []
    for level, h_out in enumerate(outs):
        h_in = h_out.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = _forward_from(net, level, h_in, gates)
            cols = []
            for c in range(logits.shape[1]):
                (g,) = torch.autograd.grad(
                    logits[:, c].sum(), h_in, retain_graph=c + 1 < logits.shape[1]
                )
                cols.append(g.flatten(1))
        mats.append(torch.stack(cols, -1).detach())
    return mats


def fixed_feedback_matrices(feedback: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Fixed matrices ``B_l`` (block output shape x ``n_out``) repeated for ``n`` inputs."""
    return [b.reshape(1, -1, b.shape[-1]).expand(n, -1, -1) for b in feedback]


def input_specific_variance(mats: torch.Tensor) -> float:
    """``sum Var_x[M(x)] / sum E_x[M(x)^2]`` over the entries of ``(N, ...)`` matrices.

    0 for a matrix that does not depend on the input; 0 also when every entry is 0.
    """
    m = mats.double().flatten(1)
    second = float(m.pow(2).mean(0).sum())
    if second == 0.0:
        return 0.0
    var = float(m.var(0, unbiased=False).sum())
    return min(max(var / second, 0.0), 1.0)


def masking(
    net: BlockNet,
    x: torch.Tensor,
    mode: str = "backprop",
    feedback: list[torch.Tensor] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Input specificity ``V_l`` of the feedback that reaches every block (module docstring).

    Args:
        x: a batch of network inputs.
        mode: ``backprop`` or ``mean-gates``; ignored when ``feedback`` is given.
        feedback: fixed feedback matrices ``B_l`` (DFA), one per block, shaped
            ``(*block_output_shape, n_out)``.
        extra: keys added to every row (e.g. ``state="trained"``).

    Returns:
        Rows ``{"measure": "masking", "layer", "depth": None, "value", "chance": None,
        "feedback", ...extra}``.
    """
    if len(x) < 2:
        raise ValueError("rhm measures: masking needs >= 2 samples")
    if feedback is not None:
        mats = fixed_feedback_matrices(feedback, len(x))
        kind = "fixed"
    else:
        mats = feedback_matrices(net, x, mode)
        kind = mode
    return [
        {"measure": "masking", "layer": level + 1, "depth": None,
         "value": input_specific_variance(m), "chance": None, "feedback": kind, **extra}
        for level, m in enumerate(mats)
    ]
