"""Native executor: a converted model's whole forward as one C call (``native/program.c``).

The graph runtime's generated Python calls one native kernel per op. At batch 1 each call costs
~10 us of Python (ctypes, an output tensor, a layout view): 1-3 ms per forward on the CNNs of
benchmarks/, most of what separated quanta from OpenVINO there. When every node of the traced
graph has a native kernel (:mod:`.native_lowering` decides) the forward becomes a list of steps
over numbered buffers: 0 the float input, 1 the output (a new tensor per call), the others in
one arena planned here once for the building call's input shape. A call is one
``qk_program_run``; anything that does not fit the program (another input shape or dtype, a
tensor that needs grad, a dropout switched to training, a second thread while one runs) gets
None and runs the generated Python. ``QUANTA_NATIVE_PROGRAM=0`` turns the executor off.
"""

from __future__ import annotations

import ctypes
import os
import threading
from enum import IntEnum
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from quanta.errors import NonFiniteInputError
from quanta.kernels import eltwise, native


class Kind(IntEnum):
    """Step kinds, numbered as in program.c."""

    QUANTIZE, OP, ADD, ADD_FIXED, ADD_TABLE, MAX_POOL, AVG_POOL, GATE, CLAMP, TO_NCHW, PAD, CAT = range(12)


class Step(ctypes.Structure):
    """Mirror of ``qk_step`` in program.c."""

    _fields_ = [("kind", ctypes.c_int64), ("src0", ctypes.c_int64), ("src1", ctypes.c_int64),
                ("dst", ctypes.c_int64), ("op", ctypes.c_void_p), ("i", ctypes.c_int64 * 12),
                ("f", ctypes.c_float * 8)]


class Refused(Exception):
    """The forward has a node without a native step (the message says which and why)."""


INPUT, OUTPUT = 0, 1
_ALIGN = 64


class Value:
    """A tensor of the program: its buffer, its view of it, its dtype and qparams (int8)."""

    __slots__ = ("buffer", "shape", "stride", "dtype", "qparams", "pad")

    def __init__(self, buffer: int, t: torch.Tensor, qparams: tuple[float, int] | None,
                 pad: tuple[int, int, int, int] | None = None) -> None:
        self.buffer, self.shape, self.stride, self.dtype = buffer, tuple(t.shape), t.stride(), t.dtype
        self.qparams = qparams
        self.pad = pad  # (top, bottom, left, right): the float input padded with zeros, not yet done


class NativeProgram:
    """The planned steps of one forward for one input shape; ``__call__`` runs them or returns
    None when a call does not match (the caller then runs the generated Python)."""

    def __init__(self, steps: list[Step], buffer_offsets: list[int], arena_bytes: int, shape: tuple,
                 output: Value, output_bytes: int, keep: list, dropouts: list[nn.Module],
                 labels: list[str]) -> None:
        self.lib = native.load()
        self.steps = (Step * len(steps))(*steps)
        self.count = len(steps)
        self.arena = torch.empty(max(arena_bytes, 1) + _ALIGN, dtype=torch.uint8)
        base = (self.arena.data_ptr() + _ALIGN - 1) // _ALIGN * _ALIGN
        self.pointers = np.array([0, 0] + [base + o for o in buffer_offsets], dtype=np.uint64)
        self.pointers_address = self.pointers.ctypes.data
        self.shape, self.output, self.output_elements = shape, output, output_bytes // 4
        self.keep, self.dropouts = keep, dropouts  # primitives and tables the steps point at
        self.lock = threading.Lock()
        self.labels = labels  # the graph node of each step

    def __call__(self, x: torch.Tensor, seconds: np.ndarray | None = None) -> torch.Tensor | None:
        """The forward of ``x``, or None if this program does not apply to it. ``seconds``: a
        float64 array that receives each step's wall time (:meth:`profile`)."""
        if x.shape != self.shape or x.dtype != torch.float32 or x.requires_grad or not x.is_contiguous() \
                or any(m.training for m in self.dropouts) or not self.lock.acquire(blocking=False):
            return None
        try:
            out = torch.empty(self.output_elements, dtype=torch.float32)
            self.pointers[0], self.pointers[1] = x.data_ptr(), out.data_ptr()
            status = self.lib.qk_program_run(self.steps, self.count, self.pointers_address,
                                             None if seconds is None else seconds.ctypes.data)
        finally:
            self.lock.release()
        if status == 1:
            raise NonFiniteInputError("input holds NaN or Inf")
        if status:
            raise RuntimeError(f"native program failed: {native.last_error()}")
        return out.as_strided(self.output.shape, self.output.stride)

    def profile(self, x: torch.Tensor, repeats: int = 20) -> list[tuple[str, str, float]]:
        """(graph node, step kind, median seconds) of every step over ``repeats`` runs on ``x``."""
        runs = np.zeros((repeats, self.count))
        for r in range(repeats):
            if self(x, runs[r]) is None:
                raise ValueError(f"this program runs float32 inputs of shape {list(self.shape)}")
        medians = np.median(runs, axis=0)
        return [(label, Kind(s.kind).name, float(t)) for label, s, t in zip(self.labels, self.steps, medians,
                                                                            strict=True)]


def enabled() -> bool:
    return os.environ.get("QUANTA_NATIVE_PROGRAM", "1") != "0" and native.load() is not None


class Tape:
    """Steps in order over numbered buffers, with each buffer's size, writer and last reader;
    :meth:`finish` plans the arena and makes the program."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.sizes: list[int] = [0, 0]  # bytes per buffer (the input and output: per call)
        self.born: list[int] = [0, 0]  # the step that writes each buffer
        self.last_read: list[int] = [0, 0]
        self.labels: list[str] = []
        self.cat_tables: list[np.ndarray] = []  # CAT steps' part lists (buffer numbers renumbered too)
        self.label = ""  # the graph node whose steps are being appended

    def new(self, t: torch.Tensor, qparams: tuple[float, int] | None) -> Value:
        """A fresh buffer for the step about to be appended, holding ``t``'s elements."""
        if not eltwise._dense(t):
            raise Refused(f"a {list(t.shape)} value with gaps in memory")
        self.sizes.append(t.numel() * t.element_size())
        self.born.append(len(self.steps))
        self.last_read.append(len(self.steps))
        return Value(len(self.sizes) - 1, t, qparams)

    def _read(self, v: Value) -> int:
        self.last_read[v.buffer] = max(self.last_read[v.buffer], len(self.steps))
        return v.buffer

    def step(self, kind: Kind, dst: Value, a: Value, b: Value | None = None, op: int | None = None,
             ints: tuple = (), floats: tuple = ()) -> None:
        s = Step(kind=int(kind), src0=self._read(a), src1=-1 if b is None else self._read(b), dst=dst.buffer,
                 op=op)
        s.i[:len(ints)] = [int(v) for v in ints]
        s.f[:len(floats)] = [float(v) for v in floats]
        self.steps.append(s)
        self.labels.append(self.label)

    def cat_step(self, dst: Value, parts: list[tuple[Value, int, np.ndarray | None]], rows: int) -> list:
        """A CAT step: each output row is the parts' rows (of the given byte lengths, each through
        its 256-byte requantize table or copied) in turn. Returns what the step points into."""
        table = np.array([[self._read(v), length, 0 if lut is None else lut.ctypes.data]
                          for v, length, lut in parts], dtype=np.int64)
        self.cat_tables.append(table)
        self.step(Kind.CAT, dst, parts[0][0], op=table.ctypes.data,
                  ints=(rows, len(parts), sum(length for _, length, _ in parts)))
        return [table] + [lut for _, _, lut in parts if lut is not None]

    def finish(self, output: Value, input_shape: tuple, keep: list,
               dropouts: list[nn.Module]) -> NativeProgram:
        """The program computing ``output``; ``keep``: objects its steps point into."""
        if output.buffer == INPUT:
            raise Refused("the output is the input itself")
        buffers = self._renumber(output.buffer)
        offsets, arena = self._plan(buffers)
        return NativeProgram(self.steps, offsets, arena, input_shape, output, self.sizes[output.buffer], keep,
                             dropouts, self.labels)

    def _renumber(self, output: int) -> list[int]:
        """Arena buffers in order (2, 3, ...); the output's buffer becomes buffer 1."""
        order = [b for b in range(2, len(self.sizes)) if b != output]
        number = {INPUT: INPUT, output: OUTPUT, **{b: i + 2 for i, b in enumerate(order)}}
        for s in self.steps:
            s.src0 = number[s.src0] if s.src0 >= 0 else -1
            s.src1 = number[s.src1] if s.src1 >= 0 else -1
            s.dst = number[s.dst]
        for table in self.cat_tables:
            table[:, 0] = [number[b] for b in table[:, 0]]
        return order

    def _plan(self, buffers: list[int]) -> tuple[list[int], int]:
        """Arena offsets: a buffer reuses a block whose last reader ran before its writer."""
        blocks: list[list[int]] = []  # [offset, size, last read]
        offsets, end = [], 0
        for b in buffers:
            need = (self.sizes[b] + _ALIGN - 1) // _ALIGN * _ALIGN
            free = [blk for blk in blocks if blk[1] >= need and blk[2] < self.born[b]]
            if free:
                blk = min(free, key=lambda k: k[1])
                blk[2] = self.last_read[b]
            else:
                blk = [end, need, self.last_read[b]]
                blocks.append(blk)
                end += need
            offsets.append(blk[0])
        return offsets, end


MAX_SHAPES = 4  # input shapes with a program each; later shapes run the generated Python


class Programs:
    """The native programs of one traced forward, one per input shape: the building call's, then
    each new shape's on its first call (the graph interpreted again at that shape, and the program
    checked against the generated forward ``fn``, whose result that call returns). ``build``:
    :func:`.native_lowering.build`."""

    def __init__(self, build: Any, graph: fx.Graph, keys: dict[fx.Node, str], sites: dict[str, Any],
                 model: nn.Module, fn: Any, interpret: Any, x: torch.Tensor, values: dict[fx.Node, Any],
                 expected: Any) -> None:
        self.build, self.graph, self.keys, self.sites, self.model = build, graph, keys, sites, model
        self.fn, self.interpret = fn, interpret
        self.by_shape: dict[torch.Size, NativeProgram | None] = {}
        self.first = "off (QUANTA_NATIVE_PROGRAM=0 or no native kernels)"  # the building shape's note
        if enabled():
            self.first = self._add(x, values, expected)

    @property
    def note(self) -> str:
        more = sum(p is not None for p in list(self.by_shape.values())[1:])
        return self.first + (f" (and {more} more input shapes)" if more else "")

    def _add(self, x: torch.Tensor, values: dict[fx.Node, Any], expected: Any) -> str:
        """Build and check the program for ``x``'s shape; what happened, for the status."""
        program = None
        try:
            program = self.build(self.graph, values, self.keys, self.sites, self.model)
            got = program(x)
        except Refused as exc:
            note = f"off: {exc}"
        except Exception as exc:  # noqa: BLE001 - the program is an optimization: the Python forward runs
            note = f"off: {type(exc).__name__}: {exc}"
        else:
            note = f"{program.count} steps in one C call per forward"
            if not (isinstance(expected, torch.Tensor) and got is not None and got.dtype == expected.dtype
                    and got.shape == expected.shape and torch.equal(got, expected)):
                note = "off: its output differed from the generated forward's"
        self.by_shape[x.shape] = None if note.startswith("off") else program
        return note

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The forward of ``x`` by its shape's program, or None (the caller runs ``fn``)."""
        program = self.by_shape.get(x.shape)
        if program is not None:
            return program(x)
        if x.shape in self.by_shape or len(self.by_shape) >= MAX_SHAPES or not self.by_shape \
                or x.dtype != torch.float32 or x.requires_grad:
            return None
        expected = self.fn(x)
        self._add(x, self.interpret(x), expected)
        return expected
