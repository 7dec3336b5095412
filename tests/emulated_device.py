"""An emulated accelerator for CPU-only CI: tells tensors "on the rank's device" from "on the host".

NCCL takes only CUDA tensors, and CI has no GPU: a CPU tensor handed to a collective goes
unnoticed under gloo and crashes the first multi-GPU job. Under `emulated_device()` every tensor
has a placement. Memory and maths are untouched (everything is a CPU tensor); only placement is
tracked, and `tensor.device` reports `DEVICE` (`cpu:0`, which torch treats as the CPU but which
compares unequal to `cpu`) for tensors on the emulated device, so code that writes
`device=x.device` or compares devices behaves as it would on a GPU. The context also:
- makes every torch.distributed collective reject a tensor that is not on DEVICE, as NCCL does
  (whoever calls it: sslforge's gateway, DeepSpeed, anything else);
- registers DEVICE as the rank's communication device in `sslforge.distributed`;
- names DEVICE as DeepSpeed's accelerator device, as DeepSpeed's CUDA accelerator names the
  rank's GPU (its CPU accelerator would otherwise move the module back to "cpu").

Placement rules (a TorchFunctionMode sees every torch call made from Python):
- a call naming a device (`device=` of factories and `new_*`, `.to(...)`, `.cpu()`) puts its
  result there; a move between host and DEVICE always returns a copy, as a real transfer does;
- `x.data = y` gives `x` the placement of `y` (how `Module.to` moves parameters);
- any other call puts its new tensors on DEVICE when any tensor input is there; a call that
  returns one of its inputs (in-place ops, no-op conversions) leaves its placement alone;
- `.grad` of a tensor on DEVICE is on DEVICE (the rule above: the tensor is the input);
- the gradients autograd hands a custom Function's backward for outputs on DEVICE are on DEVICE
  (autograd keeps a gradient on its tensor's device, but creates it in C++ where no mode sees
  it), and that backward runs under the mode: `loss.backward()` is itself a torch call, so the
  whole backward pass would otherwise run with the mode suspended. Node hooks (public autograd
  API) do both, before and after each such backward;
- `.numpy()` of a tensor on DEVICE raises, as it does for CUDA tensors.

Limits (what it cannot catch): mixing placements in one op (a CUDA op would raise; here the
result goes to DEVICE); tensors created in C++ with no Python call (other than the gradients
above) are host tensors, so a library that hands such a tensor to a collective would be flagged
falsely; the check sits on `torch.distributed`'s module functions, so a collective bound
earlier by name (`from torch.distributed import all_reduce`) or called from C++ is not checked;
one device per process (`cpu:0`), so a rank using two GPUs cannot be modelled; object
collectives (`all_gather_object`, `broadcast_object_list`) are not checked (torch stages their
bytes on the backend's device itself); a custom backward that raises leaves the mode entered on
that thread (the test fails anyway).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from typing import Any, Callable, Iterator
from unittest import mock

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from sslforge import distributed

DEVICE = torch.device("cpu", 0)
HOST = torch.device("cpu")
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "broadcast",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
               "gather", "scatter", "send", "recv", "isend", "irecv")
CHECKED: collections.Counter[str] = collections.Counter()  # collectives checked, by name

# Tensors on DEVICE, by id with an identity check (a tensor's == is elementwise); weak, so a
# freed tensor leaves and a new one reusing its id is not mistaken for it.
_ON_DEVICE: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
_HOOKED: "weakref.WeakSet[torch.autograd.graph.Node]" = weakref.WeakSet()  # nodes are compared by identity
_DEVICE_GETTER = torch.Tensor.device.__get__
_DATA_SETTER = torch.Tensor.data.__set__


def on_device(tensor: torch.Tensor) -> bool:
    return _ON_DEVICE.get(id(tensor)) is tensor


def _place(tensor: torch.Tensor, device: torch.device) -> None:
    if device == DEVICE:
        _ON_DEVICE[id(tensor)] = tensor
    elif on_device(tensor):
        del _ON_DEVICE[id(tensor)]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _as_placement(device: Any) -> torch.device | None:
    """DEVICE or HOST for a device argument; None for anything else (dtypes, other devices)."""
    if isinstance(device, torch.Tensor):
        return DEVICE if on_device(device) else HOST
    if not isinstance(device, (str, torch.device)):
        return None
    device = torch.device(device)
    return DEVICE if device == DEVICE else HOST if device.type == "cpu" else None


def _target(func: Callable[..., Any], args: tuple, kwargs: dict) -> torch.device | None:
    """Where a call explicitly puts its result, if it names a device."""
    if func is torch.Tensor.cpu:
        return HOST
    if kwargs.get("device") is not None:
        return _as_placement(kwargs["device"])
    if func is torch.Tensor.to:
        for arg in args[1:]:
            placement = _as_placement(arg)
            if placement is not None:
                return placement
    return None


class _Placement(TorchFunctionMode):
    """Tracks placements by the rules in the module docstring."""

    def _hook_custom_backward(self, inputs: list[torch.Tensor]) -> None:
        for t in inputs:
            node = t.grad_fn
            if isinstance(node, torch.autograd.function.BackwardCFunction) and on_device(t) and node not in _HOOKED:
                node.register_prehook(self._enter_backward)
                node.register_hook(self._exit_backward)
                _HOOKED.add(node)

    def _enter_backward(self, grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
        for grad in grad_outputs:
            if grad is not None:
                _place(grad, DEVICE)
        self.__enter__()

    def _exit_backward(self, grad_inputs: tuple, grad_outputs: tuple) -> None:
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func == _DEVICE_GETTER:
            return DEVICE if on_device(args[0]) else func(*args)
        if func is torch.Tensor.numpy and on_device(args[0]):
            raise TypeError(f"can't convert {DEVICE} (emulated accelerator) tensor to numpy. "
                            "Use Tensor.cpu() to copy the tensor to host memory first.")
        if func == _DATA_SETTER:
            func(*args)
            _place(args[0], DEVICE if on_device(args[1]) else HOST)
            return None
        inputs = list(_tensors((args, kwargs)))
        self._hook_custom_backward(inputs)
        out = func(*args, **kwargs)
        named = _target(func, args, kwargs)
        target = named if named is not None else DEVICE if any(on_device(t) for t in inputs) else None
        if target is None:
            return out
        if isinstance(out, torch.Tensor) and any(out is t for t in inputs):
            if named is None or on_device(out) == (named == DEVICE):
                return out  # in-place op or no-op conversion: the tensor stays where it is
            out = out.clone()  # a transfer between host and device copies
        for t in _tensors(out):
            if not any(t is i for i in inputs):
                _place(t, target)
        return out


def _guarded(name: str, collective: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(collective)
    def call(*args: Any, **kwargs: Any) -> Any:
        for t in _tensors((args, kwargs)):
            if not on_device(t):
                raise RuntimeError(f"torch.distributed.{name} was given a host tensor {tuple(t.shape)}: "
                                   f"NCCL takes only tensors on the rank's device ({DEVICE}, emulated)")
        CHECKED[name] += 1
        return collective(*args, **kwargs)
    return call


@contextlib.contextmanager
def emulated_device() -> Iterator[torch.device]:
    """Run the body with DEVICE as this rank's accelerator; yields DEVICE (use it as env.device)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    CHECKED.clear()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            accelerator, "device_name", lambda device_index=None: HOST.type if device_index is None else str(DEVICE)))
        stack.enter_context(mock.patch.object(accelerator, "current_device_name", lambda: str(DEVICE)))
        for name in COLLECTIVES:
            if hasattr(dist, name):
                stack.enter_context(mock.patch.object(dist, name, _guarded(name, getattr(dist, name))))
        stack.callback(distributed.set_comm_device, distributed.set_comm_device(DEVICE))
        stack.enter_context(_Placement())
        yield DEVICE
