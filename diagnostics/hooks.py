"""Forward hooks that record the outputs (and inputs) of the selected layers during a probe's forward pass.

Hooks stay registered while a :class:`LayerHooks` is attached but do nothing unless a recording
is in progress. While recording, a hook returns a copy of the layer output, so downstream in-place
operations (``ReLU(inplace=True)``) cannot change the tensor we differentiate with respect to; the
values the model computes are unchanged. How a layer is hooked is up to its adapter
(:meth:`diagnostics.layers.LayerAdapter.attach`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .layers import LayerAdapter

__all__ = ["LayerHooks"]


class LayerHooks:
    """Hooks on the selected layers that record their outputs (and optionally inputs) only inside
    :meth:`recording`; otherwise they return immediately and change nothing. How a layer is hooked
    is up to its adapter (:meth:`LayerAdapter.attach`); this class is the :class:`~diagnostics.layers.Recorder`
    the adapters report to."""

    def __init__(self, adapters: Mapping[str, LayerAdapter]) -> None:
        self.adapters = dict(adapters)
        self._handles: list[RemovableHandle] = []
        # an OrderedDict (weak-referenceable) so that RemovableHandle can remove entries
        self._contexts: OrderedDict[int, Callable[[], AbstractContextManager]] = OrderedDict()
        self._recording = False
        self._keep_inputs = False
        self._forward_done = False
        self.no_grad: list[str] = []  # selected layers that ran with gradients disabled
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in self.adapters}
        self.inputs: dict[str, list[Tensor]] = {n: [] for n in self.adapters}
        # per call: (weak reference to the tensor the layer handed on, its version counter then)
        self.returned: dict[str, list[tuple[weakref.ref, int]]] = {n: [] for n in self.adapters}
        self.current: str | None = None  # layer whose forward is running (for error messages)
        self.last_done: str | None = None  # last selected layer that finished its forward

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def is_recording(self) -> bool:
        """Inside :meth:`recording` and before :meth:`forward_done`."""
        return self._recording and not self._forward_done

    def attach(self) -> None:
        if self._handles:
            return
        groups: dict[tuple[type, int], list[LayerAdapter]] = {}  # adapters sharing a module are hooked together
        for adapter in self.adapters.values():
            groups.setdefault((type(adapter), id(adapter.module)), []).append(adapter)
        for (cls, _), members in groups.items():
            self._handles.extend(cls.attach(members, self))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def attached_for(self) -> Iterator["LayerHooks"]:
        """Attach for the duration of a block if not attached already."""
        owned = not self.attached
        self.attach()
        try:
            yield self
        finally:
            if owned:
                self.detach()

    @contextmanager
    def recording(self, keep_inputs: bool = False) -> Iterator["LayerHooks"]:
        """Record the outputs of one forward pass; :meth:`forward_done` ends the recording (layers
        that run again later, e.g. recomputed by activation checkpointing during a backward pass,
        are not recorded twice)."""
        self._clear()
        self._recording, self._keep_inputs = True, keep_inputs
        try:
            with ExitStack() as stack:
                for factory in list(self._contexts.values()):
                    stack.enter_context(factory())
                yield self
        finally:
            self._recording = self._keep_inputs = False
            self._clear()

    def forward_done(self) -> None:
        self._forward_done = True

    def while_recording(self, factory: Callable[[], AbstractContextManager]) -> RemovableHandle:
        """Enter ``factory()`` around every recording until the returned handle is removed."""
        handle = RemovableHandle(self._contexts)
        self._contexts[handle.id] = factory
        return handle

    def _clear(self) -> None:
        self.current = self.last_done = None
        self._forward_done = False
        self.no_grad = []
        for lst in (*self.outputs.values(), *self.inputs.values(), *self.returned.values()):
            lst.clear()

    def enter(self, name: str) -> None:
        self.current = name

    def record(self, name: str, h: Tensor, x: Tensor | None = None) -> Tensor:
        """Keep ``h`` (made to require grad) as layer ``name``'s output and return a copy for the
        model to use downstream, so later in-place operations cannot change ``h``."""
        if not torch.is_grad_enabled():  # e.g. inside torch.utils.checkpoint(use_reentrant=True)
            self.no_grad.append(name)
        if self._keep_inputs:
            if x is None:
                raise ValueError(f"layer {name!r}: its input could not be captured")
            self.inputs[name].append(x.detach().clone())
        target = h if h.requires_grad else h.detach().requires_grad_(True)
        self.outputs[name].append(target)
        self.current, self.last_done = None, name
        handed_on = target.clone()
        self.returned[name].append((weakref.ref(handed_on), handed_on._version))
        return handed_on
