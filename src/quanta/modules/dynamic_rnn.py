"""Dynamic int8 recurrent modules: LSTM, LSTMCell, GRU, GRUCell.

Buffers mirror the float modules' parameter names (``weight_ih_l0`` int8 with
``weight_ih_l0_scale`` / ``weight_ih_l0_zero_point``, ``bias_ih_l0`` float32, ...). Each layer
and direction multiplies the whole input sequence by W_ih in one dynamic int8 matmul (the
sequence is quantized as one tensor), then runs the recurrence step by step with ``h`` quantized
on the fly for h @ W_hh. Gate math (sigmoid/tanh, cell update) stays float32, as in the float
modules (gate order i, f, g, o for LSTM; r, z, n for GRU).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence

from quanta.config import QuantSpec
from quanta.errors import QuantizedInputError, UnsupportedModelError
from quanta.modules.dynamic import DynamicModule


def _lstm_gates(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_gates(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    ir, iz, in_ = gi.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    n = torch.tanh(in_ + r * hn)
    return (1.0 - z) * n + z * h


class _DynamicRNNBase(DynamicModule):
    """Shared by DynamicQuantizedLSTM and DynamicQuantizedGRU."""

    gate_count = 4
    cell_state = True

    def __init__(self, float_module: nn.LSTM | nn.GRU, weight_spec: QuantSpec, backend: str = "auto",
                 per_row: bool = False, layer_name: str = "") -> None:
        kind = type(float_module).__name__
        if getattr(float_module, "proj_size", 0):
            raise UnsupportedModelError(
                f"{layer_name or kind}: {kind}(proj_size={float_module.proj_size}) has no dynamic int8 kernel"
            )
        super().__init__(weight_spec, backend, per_row)
        self.layer_name = layer_name
        self.input_size, self.hidden_size = float_module.input_size, float_module.hidden_size
        self.num_layers, self.bidirectional = float_module.num_layers, float_module.bidirectional
        self.batch_first, self.has_bias = float_module.batch_first, float_module.bias
        self.directions = 2 if self.bidirectional else 1
        for layer in range(self.num_layers):
            for suffix in self._suffixes():
                for kind_ in ("ih", "hh"):
                    name = f"_l{layer}{suffix}"
                    weight = getattr(float_module, f"weight_{kind_}{name}")
                    self.add_int8_weight(f"weight_{kind_}{name}", weight, weight_spec)
                    bias = getattr(float_module, f"bias_{kind_}{name}") if self.has_bias else None
                    self.add_float(f"bias_{kind_}{name}", bias)

    def _suffixes(self) -> list[str]:
        return ["", "_reverse"][: self.directions]

    def _check_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if isinstance(x, PackedSequence):
            raise UnsupportedModelError(
                f"{self.describe()}: PackedSequence input is not supported by dynamic int8 RNNs; "
                "pass a padded tensor"
            )
        x = self.float_input(x)
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_size:
            raise QuantizedInputError(
                f"{self.describe()} expects [seq, batch, {self.input_size}] (or batch_first, or unbatched "
                f"[seq, {self.input_size}]) input, got shape {tuple(x.shape)}"
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        return x, unbatched

    def _state(self, hx: torch.Tensor | None, batch: int, unbatched: bool, what: str) -> torch.Tensor:
        shape = (self.num_layers * self.directions, batch, self.hidden_size)
        if hx is None:
            return torch.zeros(shape)
        hx = self.float_input(hx, what)
        if unbatched:
            hx = hx.unsqueeze(1)
        if tuple(hx.shape) != shape:
            raise QuantizedInputError(
                f"{self.describe()}: {what} must have shape {shape}, got {tuple(hx.shape)}"
            )
        return hx

    def _direction(self, x: torch.Tensor, name: str, h: torch.Tensor, c: torch.Tensor | None,
                   reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        steps, batch = x.shape[0], x.shape[1]
        gi = self.matmul(f"weight_ih{name}", x.reshape(steps * batch, -1), getattr(self, f"bias_ih{name}"))
        gi = gi.reshape(steps, batch, -1)
        w_hh, b_hh = f"weight_hh{name}", getattr(self, f"bias_hh{name}")
        out = []
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            gh = self.matmul(w_hh, h, b_hh)
            if self.cell_state:
                h, c = _lstm_gates(gi[t] + gh, c)
            else:
                h = _gru_gates(gi[t], gh, h)
            out.append(h)
        if reverse:
            out.reverse()
        return torch.stack(out), h, c

    def _run(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None):  # noqa: ANN202
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes()):
                i = layer * self.directions + d
                seq, h, c = self._direction(x, f"_l{layer}{suffix}", h0[i], None if c0 is None else c0[i],
                                            reverse=d == 1)
                outs.append(seq)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return x, torch.stack(h_n), (torch.stack(c_n) if c0 is not None else None)

    def _finish(self, out: torch.Tensor, unbatched: bool) -> torch.Tensor:
        if unbatched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, batch_first={self.batch_first}, "
                f"weight_bits={self.weight_bits}, per_row={self.per_row}, backend={self.backend}")


class DynamicQuantizedLSTM(_DynamicRNNBase):
    """``nn.LSTM`` (multi-layer, bidirectional, batch_first) with int8 weights; float32 in and out."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):  # noqa: ANN201
        x, unbatched = self._check_input(x)
        batch = x.shape[1]
        h0 = self._state(None if hx is None else hx[0], batch, unbatched, "h0")
        c0 = self._state(None if hx is None else hx[1], batch, unbatched, "c0")
        out, h_n, c_n = self._run(x, h0, c0)
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return self._finish(out, unbatched), (h_n, c_n)


class DynamicQuantizedGRU(_DynamicRNNBase):
    """``nn.GRU`` (multi-layer, bidirectional, batch_first) with int8 weights; float32 in and out."""

    gate_count = 3
    cell_state = False

    @torch.no_grad()
    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None):  # noqa: ANN201
        x, unbatched = self._check_input(x)
        h0 = self._state(hx, x.shape[1], unbatched, "h0")
        out, h_n, _ = self._run(x, h0, None)
        return self._finish(out, unbatched), (h_n.squeeze(1) if unbatched else h_n)


class _DynamicCellBase(DynamicModule):
    def __init__(self, float_module: nn.LSTMCell | nn.GRUCell, weight_spec: QuantSpec, backend: str = "auto",
                 per_row: bool = False, layer_name: str = "") -> None:
        super().__init__(weight_spec, backend, per_row)
        self.layer_name = layer_name
        self.input_size, self.hidden_size = float_module.input_size, float_module.hidden_size
        for kind in ("ih", "hh"):
            self.add_int8_weight(f"weight_{kind}", getattr(float_module, f"weight_{kind}"), weight_spec)
            self.add_float(f"bias_{kind}", getattr(float_module, f"bias_{kind}"))

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        x = self.float_input(x)
        if x.dim() not in (1, 2) or x.shape[-1] != self.input_size:
            raise QuantizedInputError(
                f"{self.describe()} expects [batch, {self.input_size}] or [{self.input_size}] input, "
                f"got shape {tuple(x.shape)}"
            )
        return (x.unsqueeze(0), True) if x.dim() == 1 else (x, False)

    def _hidden(self, h: torch.Tensor | None, batch: int, unbatched: bool, what: str) -> torch.Tensor:
        if h is None:
            return torch.zeros(batch, self.hidden_size)
        h = self.float_input(h, what)
        if unbatched:
            h = h.unsqueeze(0)
        if tuple(h.shape) != (batch, self.hidden_size):
            raise QuantizedInputError(
                f"{self.describe()}: {what} must have shape {(batch, self.hidden_size)}, got {tuple(h.shape)}"
            )
        return h

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, weight_bits={self.weight_bits}, "
                f"per_row={self.per_row}, backend={self.backend}")


class DynamicQuantizedLSTMCell(_DynamicCellBase):
    """``nn.LSTMCell`` with int8 weights: ``(h, c) = cell(x, (h, c))``, float32 in and out."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):  # noqa: ANN201
        x, unbatched = self._input(x)
        h = self._hidden(None if hx is None else hx[0], x.shape[0], unbatched, "h")
        c = self._hidden(None if hx is None else hx[1], x.shape[0], unbatched, "c")
        gates = self.matmul("weight_ih", x, self.bias_ih) + self.matmul("weight_hh", h, self.bias_hh)
        h, c = _lstm_gates(gates, c)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class DynamicQuantizedGRUCell(_DynamicCellBase):
    """``nn.GRUCell`` with int8 weights: ``h = cell(x, h)``, float32 in and out."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        x, unbatched = self._input(x)
        h = self._hidden(hx, x.shape[0], unbatched, "h")
        gi, gh = self.matmul("weight_ih", x, self.bias_ih), self.matmul("weight_hh", h, self.bias_hh)
        h = _gru_gates(gi, gh, h)
        return h.squeeze(0) if unbatched else h
