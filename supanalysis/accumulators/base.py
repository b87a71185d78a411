"""Accumulator: the state, persistence, merging and device handling every accumulator shares.

An accumulator declares three things and writes only its arithmetic:

- ``STATE``: state name -> attribute. A 0-d entry is an int64 count kept as a Python int
  (exact, and cheap to branch on); every other entry is a float64/int64 tensor on one device.
- ``CONFIG``: metadata field -> parser. The fields are saved with the state, passed back to
  the constructor on load, and (except ``OPTIONS``) must agree for two accumulators to merge.
- ``_spec`` (shapes and dtypes for a configuration) and ``_problems`` (what no sequence of
  updates can produce). Both run on every state that comes in, from a file or from
  :meth:`Accumulator.load_state_dict`, before any of it is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import ClassVar, TypeVar

import torch

from ._state import FORMAT_VERSION, Spec, atomic_save, check_device, check_state, load_file_checked, resolve_device

A = TypeVar("A", bound="Accumulator")

#: A metadata parser: (value read from the file or None when absent, field name) -> value, or ValueError.
Parser = Callable[[object, str], object]


class Accumulator:
    """Base of the streaming accumulators (see the module docstring for what a subclass declares)."""

    KIND: ClassVar[str]
    STATE: ClassVar[dict[str, str]]
    CONFIG: ClassVar[dict[str, Parser]]
    #: configuration that belongs to the updates, not to the state: it need not agree to merge
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: constructor keywords for a load: the state already exists on disk, so allocation guards are lifted
    LOAD_KWARGS: ClassVar[dict[str, object]] = {}

    _device: torch.device | None

    # ------------------------------------------------------------------ declared by each accumulator
    @classmethod
    def _spec(cls, config: Mapping[str, object]) -> Spec:
        """Shape and dtype of every state tensor for ``config`` (``None`` in a shape: any length)."""
        raise NotImplementedError

    def _problems(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """What is impossible about ``state`` (shapes and dtypes already checked); empty when valid."""
        raise NotImplementedError

    def _merge_state(self, other: Mapping[str, torch.Tensor]) -> None:
        """Fold another accumulator's state (on this one's device) over disjoint tokens into this one."""
        raise NotImplementedError

    def _all_reduce_tensors(self, group) -> None:
        """All-reduce the tensor state across ranks; the 0-d counts are summed afterwards."""
        raise NotImplementedError

    def _sync(self) -> None:
        """Bring buffered work into the state before it is read, moved or merged (default: none)."""

    # ------------------------------------------------------------------ configuration and device
    def config(self) -> dict[str, object]:
        """The configuration saved with the state (the constructor's arguments)."""
        return {k: getattr(self, k) for k in self.CONFIG}

    def _tensor_attrs(self) -> list[str]:
        return [attr for attr in self.STATE.values() if isinstance(getattr(self, attr), torch.Tensor)]

    @property
    def n_tokens(self) -> int:
        """Tokens accumulated so far."""
        return getattr(self, self.STATE["n_tokens"])

    @property
    def device(self) -> torch.device:
        """Where the state lives (CPU until the first update when no device was given)."""
        return getattr(self, self._tensor_attrs()[0]).device

    def _move(self, device: torch.device) -> None:
        self._sync()
        for attr in self._tensor_attrs():
            setattr(self, attr, getattr(self, attr).to(device))
        self._device = device

    def _adopt(self, *tensors: torch.Tensor) -> None:
        """Check the inputs' device; the first update of an accumulator without one moves the
        state (loaded or empty) there, so a loaded accumulator continues where it stopped."""
        for t in tensors:
            check_device(t.device, "input")
        dev = resolve_device(self._device, *tensors)
        if self._device is None:
            self._move(dev)

    def to(self: A, device: torch.device | str) -> A:
        """Move the state to ``device`` and keep it there."""
        self._move(check_device(device, "device", allow_meta=True))
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (0-d int64 counts on the CPU, the rest on :attr:`device`)."""
        self._sync()
        out = {}
        for key, attr in self.STATE.items():
            v = getattr(self, attr)
            out[key] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state, refusing wrong shapes or dtypes and states no update can produce."""
        where = f"{self.KIND}.load_state_dict"
        check_state(state, self._spec(self.config()), where)
        bad = self._problems(state)
        if bad:
            raise ValueError(f"{where}: inconsistent state ({'; '.join(bad)})")
        dev = self._device or torch.device("cpu")
        for key, attr in self.STATE.items():
            t = state[key]
            setattr(self, attr, int(t) if t.dim() == 0 else t.to(dev).clone().contiguous())

    def merge(self: A, other: A) -> A:
        """Fold another accumulator over disjoint tokens (same configuration) into this one."""
        if not isinstance(other, type(self)):
            raise TypeError(f"other must be a {self.KIND}, got {type(other).__name__}")
        mine, theirs = self._merge_config(), other._merge_config()
        if mine != theirs:
            raise ValueError(f"cannot merge {self.KIND}({_kv(theirs)}) into {self.KIND}({_kv(mine)})")
        self._sync()
        dev = self.device
        self._merge_state({k: v if v.dim() == 0 else v.to(dev) for k, v in other.state_dict().items()})
        return self

    def _merge_config(self) -> dict[str, object]:
        return {k: v for k, v in self.config().items() if k not in self.OPTIONS}

    def all_reduce(self: A, group=None) -> A:
        """Combine the accumulators of every rank of ``group`` (torch.distributed) in place, exactly."""
        import torch.distributed as dist

        self._sync()
        self._all_reduce_tensors(group)
        counts = [attr for key, attr in self.STATE.items() if not isinstance(getattr(self, attr), torch.Tensor)]
        t = torch.tensor([getattr(self, a) for a in counts], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=group)
        for a, v in zip(counts, t.tolist()):
            setattr(self, a, int(v))
        return self

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the state and configuration to ``path`` (safetensors, with a sha256 checksum)."""
        atomic_save(self.state_dict(), {"kind": self.KIND, "version": FORMAT_VERSION, **self.config()}, path)

    @classmethod
    def load(
        cls: type[A], path: str | os.PathLike, device: torch.device | str | None = None, *, trusted: bool = False
    ) -> A:
        """Read a file written by :meth:`save`. The file must carry its checksum unless
        ``trusted=True``; its configuration and state are validated before anything is allocated."""
        tensors, meta = load_file_checked(path, cls.KIND, trusted=trusted)
        config = {}
        for field, parse in cls.CONFIG.items():
            try:
                config[field] = parse(meta.get(field), field)
            except ValueError as exc:
                raise ValueError(f"{path}: bad {cls.KIND} metadata: {exc}") from None
        # The stored tensors must match the metadata before a state of that size is allocated:
        # a corrupt size must not allocate (or run out of memory on) a huge state.
        check_state(tensors, cls._spec(config), f"{path}")
        obj = cls(**config, device=device, **cls.LOAD_KWARGS)
        try:
            obj.load_state_dict(tensors)
        except ValueError as exc:  # name the file, not just the method
            raise ValueError(f"{path}: {exc}") from exc
        return obj

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{self.KIND}({_kv(self.config())}, n_tokens={self.n_tokens}, device={self.device}{self._repr_extra()})"


def copied(attr: str, doc: str) -> property:
    """A read-only property returning a copy of state tensor ``attr`` (callers cannot alter the state)."""
    return property(lambda self: getattr(self, attr).clone(), doc=doc)


def _kv(config: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())
