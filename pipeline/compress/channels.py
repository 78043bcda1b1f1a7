"""A model's channel groups from one dependency graph, a MAC model over their widths, and channel plans.

Torch-Pruning's dependency graph is traced once; a group is a set of channels that must go together (a
convolution's filters, the BatchNorm after it, the next layer's inputs, every branch of a residual add). Every
layer's MACs are a function of its input and output widths, and each width moves with the groups that touch it
by a fixed share (1 for a convolution, H*W features of a flattened map, a branch's slice of a concatenation), so
the MAC-target search evaluates a plan arithmetically: no copy of the model and no second trace per probe.

A plan keeps, per group, ``ceil(initial * (1 - ratio))`` channels rounded *up* to ``round_to`` (never below the
``max_layer_ratio`` floor, never more than the group has now): no layer loses more than the ratio asks, and
every group, the branches of a concatenation included, stays a multiple of ``round_to`` where its initial width
allows it. Channels a grouped convolution reads or writes go alike from each of its groups (the same positions in
every block, chosen by their summed scores), so it keeps its groups and their widths stay multiples of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import CompressionError
from ..models.trace import locate

log = logging.getLogger(__name__)

_SEARCH_ITERATIONS = 40


@dataclass
class ChannelGroup:
    """One unit of a plan: the channels of a Torch-Pruning group, or of one segment of it where the group spans
    a concatenation (each branch keeps its own count, so round_to holds on every branch)."""

    root: nn.Module
    handler: Callable
    name: str
    initial: int  # channels when traced: what ratios and max_layer_ratio refer to
    width: int  # channels now
    prunable: bool
    graph_group: int  # the Torch-Pruning group this is a segment of (the channels are pruned together with it)
    positions: np.ndarray  # this segment's channels among that group's (its root's indices)
    #: a grouped convolution reads or writes these channels in this many equal blocks: they go alike from every
    #: block (the same positions within each), so widths stay multiples of it
    blocks: int = 1


class ChannelGroups:
    """The groups of one model, traced once and kept current across prunes."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ignored: list[nn.Module], round_to: int | None,
                 max_layer_ratio: float) -> None:
        import torch_pruning as tp

        self.model, self.example, self.ignored = model, example, ignored
        self.round_to, self.max_layer_ratio = round_to or 1, max_layer_ratio
        graph, layer, exc = locate(model, lambda: tp.DependencyGraph().build_dependency(model, example))
        if exc is not None:
            where = f" in layer {layer!r}" if layer else ""
            raise CompressionError(f"cannot trace the model for structured pruning{where}: "
                                   f"{type(exc).__name__}: {exc}") from None
        self.graph = graph
        self._initial: dict[tuple[int, int], int] = {}
        self.refresh()

    # -- the groups and the MAC model, re-read after every prune ------------------------------------------------

    def refresh(self) -> None:
        import torch_pruning as tp

        names = {m: n for n, m in self.model.named_modules()}
        layers = {m for m in self.model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear,
                                                                      nn.modules.batchnorm._BatchNorm))}
        self.groups, self._items = [], []
        for t, g in enumerate(self.graph.get_all_groups(ignored_layers=self.ignored,
                                                        root_module_types=(nn.Conv2d, nn.Conv1d, nn.Linear))):
            root, handler, width = g[0].dep.target.module, g[0].dep.handler, len(g[0].idxs)
            # grouped (not depthwise) convolutions take these channels in blocks: cut alike from each block
            blocks = max([d.target.module.groups for d, _ in g
                          if isinstance(d.target.module, nn.modules.conv._ConvNd) and 1 < d.target.module.groups
                          and not d.target.module.groups == d.target.module.in_channels == d.target.module.out_channels],
                         default=1)
            segments = _segments(g, width, layers)
            # blocks across a concatenation's branches, or blocks that do not divide the width: left alone
            blockable = blocks == 1 or (len(segments) == 1 and width % blocks == 0)
            for k, positions in enumerate(segments):
                name = names.get(root, "?") + (f"[{k}]" if len(segments) > 1 else "")
                initial = self._initial.setdefault((id(root), k), len(positions))
                self.groups.append(ChannelGroup(root, handler, name, initial, len(positions), blockable, t,
                                                positions, blocks if blockable else 1))
            self._items.append(g)
        macs, _, layer_macs, _ = tp.utils.count_ops_and_params(self.model, self.example, layer_wise=True)
        self.macs = int(macs)
        self._table(layer_macs)

    def _table(self, layer_macs: dict) -> None:
        """Per counted layer: MACs = a * in * out + b * out (convolutions, linear) or rate * channels (depthwise,
        BatchNorm, activations, pooling); and the share of each group's channels in its input/output widths."""
        shapes: dict[nn.Module, tuple[torch.Size, torch.Size]] = {}
        produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(tensor) -> (the leaf that made it, tensor)
        source: dict[nn.Module, nn.Module] = {}  # leaf -> the leaf that made its input
        reader: dict[int, nn.Module] = {}  # id(tensor) -> the first leaf that read it
        made: dict[nn.Module, int] = {}  # leaf -> id(its first output)
        kept: list[torch.Tensor] = []  # outputs stay alive during the pass, so that no id is reused

        def before(m, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                reader.setdefault(id(inputs[0]), m)
                hit = produced.get(id(inputs[0]))
                if hit is not None and m not in source:
                    source[m] = hit[0]

        def after(m, inputs, output):
            if not (inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)):
                return
            shapes.setdefault(m, (inputs[0].shape, output.shape))
            if m not in made and output.shape[1:2] == inputs[0].shape[1:2]:
                made[m] = id(output)
                kept.append(output)
            maker = m
            if not layer_macs.get(m):  # Dropout, Identity: channels pass through
                maker = source.get(m) if output.shape[1:2] == inputs[0].shape[1:2] else None
            if maker is not None:
                produced[id(output)] = (maker, output)

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [h for m in leaves for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
        try:
            with torch.no_grad():
                self.model(self.example)
        finally:
            for h in handles:
                h.remove()
        leaves = [m for m in leaves if layer_macs.get(m)]
        rows = [m for m in leaves if m in shapes]
        index = {m: i for i, m in enumerate(rows)}
        n = len(rows)
        self._a, self._b, self._rate = np.zeros(n), np.zeros(n), np.zeros(n)
        self._in, self._out, self._ch = np.zeros(n), np.zeros(n), np.zeros(n)
        self._fixed = self.macs - sum(int(layer_macs[m]) for m in rows)  # layers no hook saw (not expected)
        for i, m in enumerate(rows):
            total, (ins, outs) = int(layer_macs[m]), shapes[m]
            if isinstance(m, nn.modules.conv._ConvNd) and not m.groups == m.in_channels == m.out_channels:
                spatial = int(np.prod(outs[2:])) * outs[0]
                a = int(np.prod(m.kernel_size)) * spatial / m.groups
                b = spatial if m.bias is not None else 0
                self._in[i], self._out[i] = m.in_channels, m.out_channels
            elif isinstance(m, nn.Linear):
                a, b = int(np.prod(ins[:-1])), (1 if m.bias is not None else 0)
                self._in[i], self._out[i] = m.in_features, m.out_features
            else:
                a = b = 0
            if a and abs(a * self._in[i] * self._out[i] + b * self._out[i] - total) <= 1e-6 * total + 1:
                self._a[i], self._b[i] = a, b
            else:  # depthwise, BatchNorm, activations, pooling; or a layer called twice: linear in its channels
                self._ch[i] = outs[1] if len(outs) > 1 else 1
                self._rate[i] = total / self._ch[i]
        self._s_in, self._s_out, self._s_ch = (np.zeros((n, len(self.groups))) for _ in range(3))
        graph = self.graph
        segments_of: dict[int, list[int]] = {}
        for j, g in enumerate(self.groups):
            segments_of.setdefault(g.graph_group, []).append(j)
        for t, items in enumerate(self._items):
            members = segments_of.get(t, [])
            width = sum(self.groups[j].width for j in members)
            where = np.zeros(width, dtype=int)  # root index -> its segment among ``members``
            for seg, j in enumerate(members):
                where[self.groups[j].positions] = seg
            sizes = np.array([self.groups[j].width for j in members], dtype=float)
            for item in items:
                i = index.get(item.dep.target.module)
                roots = [r for r in (item.root_idxs or []) if r is not None and r < width]
                if i is None or not roots:
                    continue
                share = np.bincount(where[roots], minlength=len(members)) / sizes
                out, into = graph.is_out_channel_pruning_fn(item.dep.handler), graph.is_in_channel_pruning_fn(
                    item.dep.handler)
                for seg, j in enumerate(members):
                    if out:
                        self._s_out[i, j] = max(self._s_out[i, j], share[seg])
                    if into:
                        self._s_in[i, j] = max(self._s_in[i, j], share[seg])
                    self._s_ch[i, j] = max(self._s_ch[i, j], share[seg])
        # activations and pooling are not nodes of the graph (it sees them as tensor ops) and keep their channel
        # count: their channels are those of the layer that made their input (in execution order) or, after a
        # functional op (a residual add), of the layer that reads their output (in reverse order)
        for i, m in enumerate(rows):
            if self._rate[i] and not self._s_ch[i].any() and source.get(m) in index:
                p = index[source[m]]
                self._s_ch[i] = self._s_out[p] if self._a[p] else self._s_ch[p]
        for i in reversed(range(n)):
            m = rows[i]
            nxt = reader.get(made.get(m, -1))
            while nxt is not None and nxt not in index:  # through Flatten (of a 1x1 map), Dropout, Identity
                nxt = reader.get(made.get(nxt, -1))
            if self._rate[i] and not self._s_ch[i].any() and nxt is not None:
                c = index[nxt]
                self._s_ch[i] = self._s_in[c] if self._a[c] else self._s_ch[c]

    def widths(self) -> np.ndarray:
        return np.array([g.width for g in self.groups], dtype=float)

    def predict(self, keeps: np.ndarray) -> float:
        """MACs of the model after every group ``j`` is cut to ``keeps[j]`` channels."""
        removed = self.widths() - keeps
        cin = self._in - self._s_in @ removed
        cout = self._out - self._s_out @ removed
        ch = self._ch - self._s_ch @ removed
        return float((self._a * cin * cout).sum() + (self._b * cout).sum() + (self._rate * ch).sum() + self._fixed)

    # -- plans --------------------------------------------------------------------------------------------------

    def step(self, g: ChannelGroup) -> int:
        """The unit a group's width moves by: round_to, and a whole number of channels per block."""
        return math.lcm(self.round_to, g.blocks)

    def _round_up(self, n: int, g: ChannelGroup) -> int:
        r = self.step(g)
        up = -(-n // r) * r
        return up if up <= g.initial else g.initial

    def floors(self) -> np.ndarray:
        """The fewest channels each group may keep: max_layer_ratio's floor, rounded up; 1 (a block) at least."""
        out = []
        for g in self.groups:
            floor = self._round_up(max(1, math.ceil(g.initial * (1 - self.max_layer_ratio) - 1e-9)), g)
            out.append(min(floor, g.width) if g.prunable else g.width)
        return np.array(out, dtype=float)

    def _bound(self, wanted: np.ndarray) -> np.ndarray:
        """Per group: ``wanted`` rounded up to its step, between the floor and the width it has now."""
        floors, widths = self.floors(), self.widths()
        up = np.array([self._round_up(int(w), g) for w, g in zip(wanted, self.groups)], dtype=float)
        return np.minimum(np.maximum(up, floors), widths)

    def keeps_at(self, ratio: float, scores: list[torch.Tensor] | None = None) -> np.ndarray:
        """What each group keeps when ``ratio`` of its initial channels go (``scores``: one global ranking
        instead, ``ratio`` of all initial channels go, lowest scores first)."""
        initial = np.array([g.initial for g in self.groups], dtype=float)
        if scores is None:
            return self._bound(np.ceil(initial * (1 - ratio) - 1e-9))
        ranked = [s for s in scores if s is not None]
        counts = self.widths()
        if not ranked:
            return counts
        keep_total = int(math.ceil(sum(g.initial for g, s in zip(self.groups, scores) if s is not None)
                                   * (1 - ratio) - 1e-9))
        flat = torch.cat(ranked)
        if keep_total < len(flat):
            threshold = torch.topk(flat, keep_total).values[-1] if keep_total > 0 else float("inf")
            counts = np.array([g.width if s is None else int((s >= threshold).sum())
                               for g, s in zip(self.groups, scores)], dtype=float)
        return self._bound(counts)

    def plan_for_macs(self, goal: float, scores: list[torch.Tensor] | None) -> tuple[np.ndarray, float, int]:
        """The least pruning whose predicted MACs are at most ``goal``: bisection on the ratio (the MACs fall
        with it, in steps where round_to makes groups jump together), then channels given back, ``round_to`` at a
        time, to the groups cut hardest while the goal still holds. Returns the keeps, the ratio and the number
        of plans evaluated."""
        hi = 0.999 if scores is not None else self.max_layer_ratio
        best = self.keeps_at(hi, scores)
        if self.predict(best) > goal:
            raise TargetOutOfReach(self.predict(best))
        lo, probes = 0.0, 1
        if self.predict(self.keeps_at(lo, scores)) <= goal:
            return self.keeps_at(lo, scores), lo, 2
        for _ in range(_SEARCH_ITERATIONS):
            mid = (lo + hi) / 2
            probes += 1
            lo, hi = (mid, hi) if self.predict(self.keeps_at(mid, scores)) > goal else (lo, mid)
        keeps, ceiling = self.keeps_at(hi, scores), self.widths()
        initial = np.array([g.initial for g in self.groups], dtype=float)
        while True:
            order = np.argsort(keeps / initial, kind="stable")  # the hardest-cut groups first
            for j in order:
                if keeps[j] >= ceiling[j]:
                    continue
                trial = keeps.copy()
                trial[j] = min(ceiling[j], keeps[j] + self.step(self.groups[j]))
                probes += 1
                if self.predict(trial) <= goal:
                    keeps = trial
                    break
            else:
                return keeps, hi, probes

    def plan_toward(self, goal: float, final: np.ndarray) -> tuple[np.ndarray, int]:
        """A step on the way to the plan ``final``: every group moves the same share of the way from its width
        now (rounded up to round_to), the least share whose predicted MACs are at most ``goal``. Intermediate
        steps then never take a group below where the last step wants it."""
        widths = self.widths()

        def at(t: float) -> np.ndarray:
            return np.maximum(self._bound(np.ceil(widths - t * (widths - final) - 1e-9)), final)

        lo, hi, probes = 0.0, 1.0, 0
        for _ in range(_SEARCH_ITERATIONS):
            mid = (lo + hi) / 2
            probes += 1
            lo, hi = (mid, hi) if self.predict(at(mid)) > goal else (lo, mid)
        return at(hi), probes

    # -- scoring and pruning ------------------------------------------------------------------------------------

    def scores(self, importance) -> list[torch.Tensor | None]:
        """One importance per channel of every group (None where the criterion cannot score it)."""
        per_group = []
        for items in self._items:
            imp = importance(items)
            per_group.append(None if imp is None else imp.detach().float().cpu())
        out = []
        for g in self.groups:
            imp = per_group[g.graph_group] if g.prunable else None
            ok = imp is not None and len(imp) == len(self._items[g.graph_group][0].idxs)
            out.append(imp[torch.from_numpy(g.positions)] if ok else None)
            g.prunable = ok
        return out

    def prune(self, keeps: np.ndarray, scores: list[torch.Tensor | None]) -> int:
        """Cut every group to its keep, lowest scores first; then re-read the groups. Returns channels removed."""
        cut: dict[int, list[int]] = {}
        for g, keep, s in zip(self.groups, keeps, scores):
            k = g.width - int(keep)
            if k > 0 and s is not None:
                cut.setdefault(g.graph_group, []).extend(g.positions[_lowest(s, k, g.blocks)].tolist())
        removed = 0
        for t, idxs in cut.items():
            first = self._items[t][0]
            group = self.graph.get_pruning_group(first.dep.target.module, first.dep.handler, sorted(idxs))
            if self.graph.check_pruning_group(group):
                group.prune()
                removed += len(idxs)
            else:
                log.debug("cutting %d channels of the group of %s would empty a layer; left as is", len(idxs),
                          first.dep.target.module)
        self.refresh()
        return removed


def _lowest(scores: torch.Tensor, k: int, blocks: int) -> np.ndarray:
    """The ``k`` channels to cut, lowest scores first: with blocks, the ``k / blocks`` positions whose scores summed
    over the blocks are lowest, taken from every block (a grouped convolution stays grouped)."""
    if blocks == 1:
        return torch.argsort(scores)[:k].numpy()
    seg = len(scores) // blocks
    chosen = torch.argsort(scores.view(blocks, seg).sum(0))[:k // blocks].numpy()
    return np.sort((np.arange(blocks)[:, None] * seg + chosen[None, :]).ravel())


def _segments(group, width: int, layers: set) -> list[np.ndarray]:
    """The group's channels split where layers see different subsets of them (the branches of a
    concatenation, the halves of a split): channels seen by the same layers form one segment."""
    seen: list[list[int]] = [[] for _ in range(width)]
    for n, item in enumerate(group):
        if item.dep.target.module in layers:
            for r in set(item.root_idxs or []):
                if r is not None and r < width:
                    seen[r].append(n)
    by_signature: dict[tuple, list[int]] = {}
    for r, signature in enumerate(seen):
        by_signature.setdefault(tuple(signature), []).append(r)
    return [np.array(v) for v in sorted(by_signature.values(), key=lambda v: v[0])]


class TargetOutOfReach(Exception):
    """No plan within max_layer_ratio reaches the MAC goal; ``best_macs`` is the fewest it can reach."""

    def __init__(self, best_macs: float) -> None:
        self.best_macs = best_macs
