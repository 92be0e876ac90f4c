"""Eval-mode constants derived from parameters (folded BatchNorms, LiteMLA's tap-major depthwise weights),
computed once per parameter state.

Folding a BatchNorm costs a handful of small ops; done on every forward it would dispatch more ops
than the fused block saves (a launch each on a GPU). The result is kept on the module and reused
while its sources are unchanged.
"""

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .._tune import Site
from ..ops._common import direct_autograd, optimizer_steps
from ..ops._conv_bn_act_cudnn import forget_graph_vectors

_SLOT = "_linattn_constants"
_SITE = "_linattn_site"


class EvalConstants(nn.Module):
    """Mixin for modules that fold parameters in eval mode: `self.eval_constants(sources, compute, settings)`."""

    def train(self, mode: bool = True):
        # BatchNorm updates its running statistics in train mode without bumping their version
        # counters, so any mode switch (model.train() / model.eval()) drops what was folded
        self._drop_constants()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half(): what was folded (and the call sites holding it) is for the old tensors; dropped
        # now rather than kept alive, on the old device, until the next call
        self._drop_constants()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # pickling and deepcopy leave the folded constants behind: their key holds the old tensors' ids, so a copy
        # folds again anyway, and they made a saved L0 58% larger
        state = dict(self.__dict__)
        state.pop(_SLOT, None)
        return state

    def _drop_constants(self) -> None:
        self.__dict__.pop(_SLOT, None)
        forget_graph_vectors()  # the fp32 copies cuDNN's graph takes of per-channel vectors, parameters among them
        for name, value in self.__dict__.items():
            if name.startswith(_SITE):
                value.entry = None

    def call_site(self, name: str = "") -> Site:
        """The Site (linattn/_tune.py) of the module's planned op call (`name`: another call of it, such as the
        separable pair it starts), made on first use (so a module pickled without one gets one)."""
        slot = _SITE + name
        site = self.__dict__.get(slot)
        if site is None:
            site = self.__dict__[slot] = Site()
        return site

    def eval_constants(
        self, sources: Sequence[Tensor | None], compute: Callable[[], tuple], settings: tuple = ()
    ) -> tuple:
        """compute() (tensors derived from `sources` and `settings`), cached on the module until either changes.

        A source changes when it is replaced, moved, cast or modified in place (load_state_dict, an
        optimizer step): the key holds each source's identity, storage address, dtype, device, version
        counter, shape and strides, the count of optimizer steps (a fused optimizer bumps no version counter:
        ops/_common.py optimizer_steps) and the hashable `settings` (e.g. a BatchNorm's eps); a weak reference to each
        source tells a freed one from a new tensor that reuses its identity and address. The cache is also
        dropped when the module's mode is switched or it is moved or cast (`.to()`). A source rebound through
        `.data` is seen by its address or layout (the result may hold a source itself, whose layout a call
        site's launch was prepared for: linattn/_tune.py Site); writes into `.data` (which has its own version
        counter) are not: call `.eval()` again after them. Computed inline, not cached, while torch.compile traces (the
        compiler sees the arithmetic), for inference-mode sources (they have no version counter) and for sources
        without storage (functorch transforms, tensor subclasses).

        While autograd needs the sources' gradients, where nothing but autograd is at work (ops/_common.py
        direct_autograd) and compute() gives tensors (a list of them stays inline: autograd does not see into
        lists): a call whose sources changed since the last (a training step) computes inline and keeps the
        result; a call whose sources did not gets the kept tensors as views that are differentiable in the
        sources (_Recomputed: its backward, if one runs, computes them again under autograd, so the gradients
        are those of computing them inline). An eval model called without torch.no_grad then folds nothing
        after its first call: a ConvBNAct's BatchNorm fold is about ten small ops, a GPU launch each.
        """
        if torch.compiler.is_compiling():
            return compute()
        grad = False
        key = [settings, optimizer_steps()]
        try:  # one pass, no generators: every eager forward of a fused block runs this (host time per call)
            for t in sources:
                if t is None:
                    continue
                grad = grad or t.requires_grad
                key.append((id(t), t.data_ptr(), t.dtype, t.device, t._version, t.shape, t.stride()))
        except RuntimeError:  # no version counter (inference tensors), no storage (vmap'd parameters, DTensor)
            return compute()
        given = [t for t in sources if t is not None] if grad and torch.is_grad_enabled() else None
        if given is not None and not direct_autograd(*given):
            return compute()
        key = tuple(key)
        cached = self.__dict__.get(_SLOT)
        hit = cached is not None and cached[0] == key and None not in [ref() for ref in cached[2]]
        if given is not None:
            if hit and _tensors(cached[1]):
                return _Recomputed.apply(compute, cached[1], *given)
            # a source changed since (a training step, or the first call): computed once, inline, and kept
            result = compute()
            if _tensors(result):
                self.__dict__[_SLOT] = (key, tuple(t if t is None else t.detach() for t in result), _refs(sources))
            return result
        if not hit:
            # normal tensors even under torch.inference_mode, so a later call with autograd on can use them
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, compute(), _refs(sources))
            self.__dict__[_SLOT] = cached
        return cached[1]


def _refs(sources: Sequence[Tensor | None]) -> tuple:
    return tuple(weakref.ref(t) for t in sources if t is not None)


def _tensors(values: tuple) -> bool:
    return all(t is None or isinstance(t, Tensor) for t in values)


class _Recomputed(torch.autograd.Function):
    """eval_constants' cached tensors as views, differentiable in their sources: the backward runs compute()
    again under autograd and hands the sources its gradients (the same ops in the same order as computing the
    constants inline, so the same gradients); sources modified in place since the forward raise as for any
    saved tensor."""

    @staticmethod
    def forward(ctx, compute, cached, *sources):
        ctx.compute, ctx.sources = compute, sources
        ctx.save_for_backward(*sources)
        return tuple(t if t is None else t.view_as(t) for t in cached)

    @staticmethod
    def backward(ctx, *grads):
        ctx.saved_tensors  # noqa: B018 (the version check of the sources)
        wanted = [i for i, needed in enumerate(ctx.needs_input_grad[2:]) if needed]
        higher = torch.is_grad_enabled()  # a backward with create_graph: the gradients differentiable in turn
        with torch.enable_grad():
            outputs = ctx.compute()
        used = [(o, g) for o, g in zip(outputs, grads) if o is not None and g is not None and o.requires_grad]
        found = torch.autograd.grad(
            [o for o, _ in used], [ctx.sources[i] for i in wanted], [g for _, g in used], allow_unused=True,
            create_graph=higher,
        ) if used else [None] * len(wanted)  # fmt: skip
        result = [None] * len(ctx.sources)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, None, *result)
