"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?", arXiv 2410.01201): recurrent
cells whose gates read the input only, so a whole window's gate products are one matrix product
and the time recurrence is an elementwise linear one, h_t = a_t * h_{t-1} + b_t::

    minGRU   z = sigmoid(W_z x_t)                          a_t = 1 - z       b_t = z g(W_h x_t)
    minLSTM  f = sigmoid(W_f x_t), i = sigmoid(W_i x_t)    a_t = f / (f+i)   b_t = i / (f+i) g(W_h x_t)

    g(x) = x + 0.5 for x >= 0, sigmoid(x) below: positive, so every h is (the paper's log-space form)

Biases are in every W. One layer's weights are one Linear(I, G*H), rows [z | h~] or [f | i | h~].
The same equations run three ways (``--impl``), on the same parameters:

    scratch  the step equations in a Python loop over time (`gru_step` / `lstm_step`): the reference
    fused    the paper's parallel scan in log space, from the carried h0 (`log_scan`):
             h_t = A_t h0 + exp(a*_t + logcumsumexp_s<=t(log b_s - a*_s)),  a*_t = sum_s<=t log a_s,
             A_t = exp(a*_t) (h0 enters linearly, so a zero or carried state needs no logarithm),
             in chunks of CHUNK steps for float32's sake
    fast     the linear recurrence in a time loop with its own backward, in C where a compiler is
             (`charlm.model.minkernel`), else one torch op a step: on the CPU torch's
             logcumsumexp is a scalar loop, far slower than either

Each way computes the gate products of the whole window as one matrix product first. The stack
(`MinStack`) adds what makes deep stacks train, each an option (`ModelConfig`): pre-normalisation
of each layer's input and of the stack's output (`norm`), residual connections where a layer's
input and output widths agree (`residual`), and a feed-forward block after each layer (`ffn`)::

    x --norm--> gates --scan from h0[k]--> h --dropout--> (+ x) --[+ ffn(norm(x)), dropout]--> next
    last layer --norm--> output (B, T, H)

The carried state is h alone, (layers, B, H), as for a GRU: truncated BPTT, resume, beam search and
the ONNX step treat it alike. `MinStepper` is the sampler's one-character step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from charlm.errors import UsageError
from charlm.model import minkernel
from charlm.model.config import MIN_GATES, NORMS
from charlm.model.dropout import dropout as drop

EPS = 1e-5  # of both norms
CHUNK = 16  # steps of the log-space scan done at once (precision, see log_scan)


def g(x: Tensor) -> Tensor:
    """x + 0.5 for x >= 0, sigmoid(x) below: continuous, positive, linear growth."""
    return torch.sigmoid(x.clamp(max=0)) + x.clamp(min=0)


def log_g(x: Tensor) -> Tensor:
    """log g(x), without forming g(x) for very negative x (log sigmoid(x) = -softplus(-x))."""
    return torch.where(x >= 0, torch.log(x.clamp(min=0) + 0.5), -F.softplus(-x))


# --- one time step: the equations -------------------------------------------------------------
# gates: (B, G*H) pre-activations of one step, rows as the layer's Linear; h_prev: (B, H).


def gru_step(gates: Tensor, h_prev: Tensor) -> Tensor:
    k, cand = gates.chunk(2, -1)
    z = torch.sigmoid(k)  # update gate
    return (1 - z) * h_prev + z * g(cand)


def lstm_step(gates: Tensor, h_prev: Tensor) -> Tensor:
    kf, ki, cand = gates.chunk(3, -1)
    f, i = torch.sigmoid(kf), torch.sigmoid(ki)  # forget and input gates, normalised to sum 1
    return (f * h_prev + i * g(cand)) / (f + i)


STEPS = {"mingru": gru_step, "minlstm": lstm_step}


def coefficients(cell: str, gates: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) of h_t = a_t h_{t-1} + b_t for a window's gates (B, T, G*H)."""
    if cell == "mingru":
        k, cand = gates.chunk(2, -1)
        z = torch.sigmoid(k)
        return torch.sigmoid(-k), z * g(cand)
    kf, ki, cand = gates.chunk(3, -1)
    f, i = torch.sigmoid(kf), torch.sigmoid(ki)
    total = f + i
    return f / total, i / total * g(cand)


def log_coefficients(cell: str, gates: Tensor) -> tuple[Tensor, Tensor]:
    """(log a, log b), computed in log space as the paper's listings do."""
    if cell == "mingru":
        k, cand = gates.chunk(2, -1)
        log_z = -F.softplus(-k)
        return log_z - k, log_z + log_g(cand)  # log(1 - z) = log z - k
    kf, ki, cand = gates.chunk(3, -1)
    diff = F.softplus(-kf) - F.softplus(-ki)  # log i - log f
    return -F.softplus(diff), -F.softplus(-diff) + log_g(cand)


def log_scan(log_a: Tensor, log_b: Tensor, h0: Tensor, chunk: int = CHUNK) -> Tensor:
    """h (B, T, H) of the recurrence from h0 (B, H), in parallel within chunks of `chunk` steps
    (Heinsen's scan from a zero state), the chunks' states then carried across in one loop::

        local = exp(a* + logcumsumexp(log b - a*))     a* = cumsum(log a) within the chunk
        h     = local + exp(a*) * (state entering the chunk)

    log h = a* + logcumsumexp(...) adds two terms of size |a*|, which grows with the steps
    summed: in float32 a whole 512-step window errs by ~1e-4, a 16-step chunk by ~2e-6."""
    B, T, H = log_b.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:  # a = 1, b = 0: the padded steps keep the state
        log_a = F.pad(log_a, (0, 0, 0, pad))
        log_b = F.pad(log_b, (0, 0, 0, pad), value=torch.finfo(log_b.dtype).min / 4)
    log_a, log_b = log_a.view(B, n, chunk, H), log_b.view(B, n, chunk, H)
    a_star = log_a.cumsum(2)
    local = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, 2))
    decay = torch.exp(a_star)
    starts, h = [], h0
    for j in range(n):
        starts.append(h)
        h = local[:, j, -1] + decay[:, j, -1] * h
    h = local + decay * torch.stack(starts, 1)[:, :, None]
    return h.reshape(B, n * chunk, H)[:, :T]


class _FastLayer(torch.autograd.Function):
    """One layer's recurrence from its gates (B, T, G*H) and h0 (B, H), by hand both ways.

    forward: the coefficients over the window at once, then h_t = a_t h_{t-1} + b_t, one op a
    step. backward: c_t = dh_t + a_{t+1} c_{t+1} (c = dL/db), one op a step, then at once, with
    b = (1 - a) g(cand) (both cells: i' = 1 - f', z = 1 - a) and D = c h_{t-1} - c g(cand):
        minGRU   dk = -D a (1 - a)                         (a = sigmoid(-k))
        minLSTM  dk_f = D a (1 - a) (1 - f),  dk_i = -D a (1 - a) (1 - i)   (a = sigmoid(log f - log i))
        dcand = c (1 - a) g'(cand),  g' = 1 for cand >= 0, else g (1 - g);   dh0 = a_1 c_1
    """

    @staticmethod
    def forward(ctx, cell: str, gates: Tensor, h0: Tensor) -> Tensor:
        ctx.cell, ctx.compiled = cell, minkernel.usable(gates, h0)
        if ctx.compiled:  # the same arithmetic, fused into one pass a step (mincells_kernel.c)
            h = minkernel.forward(cell == "minlstm", gates, h0)
            ctx.save_for_backward(gates, h0, h)
            return h
        H = h0.shape[-1]
        if cell == "mingru":
            k, cand = gates[..., :H], gates[..., H:]
            a, f, i = torch.sigmoid(-k), None, None
        else:
            kf, ki, cand = gates.split(H, -1)
            f, i = torch.sigmoid(kf), torch.sigmoid(ki)
            a = f / (f + i)
        gc = g(cand)
        b = (1 - a).mul_(gc)
        h = torch.empty_like(b)
        prev = h0
        for t in range(b.shape[1]):
            prev = torch.addcmul(b[:, t], a[:, t], prev, out=h[:, t])
        ctx.save_for_backward(gates, h0, a, gc, h, f, i)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh: Tensor):
        if ctx.compiled:
            gates, h0, h = ctx.saved_tensors
            return None, *minkernel.backward(ctx.cell == "minlstm", gates, h0, h, dh.contiguous())
        gates, h0, a, gc, h, f, i = ctx.saved_tensors
        H, T = h0.shape[-1], dh.shape[1]
        c = torch.empty_like(a)
        c[:, T - 1] = dh[:, T - 1]
        for t in range(T - 2, -1, -1):
            torch.addcmul(dh[:, t], a[:, t + 1], c[:, t + 1], out=c[:, t])
        ip = 1 - a
        D = torch.cat([h0[:, None], h[:, :-1]], 1).sub_(gc).mul_(c)
        Daa = D.mul_(a).mul_(ip)
        dgates = torch.empty_like(gates)
        if ctx.cell == "mingru":
            torch.neg(Daa, out=dgates[..., :H])
        else:
            torch.mul(Daa, 1 - f, out=dgates[..., :H])
            torch.mul(Daa, i - 1, out=dgates[..., H: 2 * H])
        dgc = c.mul(ip)
        slope = torch.where(gates[..., -H:] >= 0, 1.0, gc * (1 - gc))
        torch.mul(dgc, slope, out=dgates[..., -H:])
        return None, dgates, a[:, 0] * c[:, 0]


# --- the stack ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


def make_norm(kind: str, size: int) -> nn.Module | None:
    if kind not in NORMS:
        raise UsageError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")
    if kind == "none":
        return None
    return nn.LayerNorm(size, eps=EPS) if kind == "layer" else RMSNorm(size)


def _normed(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


class FeedForward(nn.Module):
    """x -> W_down gelu(W_up norm(x)), mult * size wide inside."""

    def __init__(self, size: int, mult: int, norm: str):
        super().__init__()
        self.norm = make_norm(norm, size)
        self.up = nn.Linear(size, mult * size)
        self.down = nn.Linear(mult * size, size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(_normed(self.norm, x))))


class MinBlock(nn.Module):
    """One layer: [norm] -> gates (one Linear over the window) -> scan -> [residual] [+ ffn]."""

    def __init__(self, cell: str, input_size: int, hidden: int, residual: bool, norm: str, ffn: int):
        super().__init__()
        self.norm = make_norm(norm, input_size)
        self.gates = nn.Linear(input_size, MIN_GATES[cell] * hidden)
        self.residual = residual and input_size == hidden
        self.ffn = FeedForward(hidden, ffn, norm) if ffn else None


class MinStack(nn.Module):
    """The recurrent layers of a min cell, batch first, with nn.GRU's interface:
    (x (B, T, I), h0 (layers, B, H) or None) -> (output (B, T, H), h_n (layers, B, H))."""

    def __init__(self, cell: str, impl: str, input_size: int, hidden: int, layers: int = 1,
                 dropout: float = 0.0, locked: bool = False, residual: bool = True,
                 norm: str = "layer", ffn: int = 0):
        super().__init__()
        if cell not in MIN_GATES:
            raise UsageError(f"unknown min cell {cell!r}; choose one of: {', '.join(MIN_GATES)}")
        if impl not in ("fused", "scratch", "fast"):
            raise UsageError(f"unknown implementation {impl!r}; choose one of: fused, scratch, fast")
        self.cell, self.impl, self.hidden_size, self.num_layers = cell, impl, hidden, layers
        self.dropout, self.locked = float(dropout), bool(locked)  # on the branches between layers
        self.blocks = nn.ModuleList(
            MinBlock(cell, input_size if k == 0 else hidden, hidden, residual, norm, ffn)
            for k in range(layers))
        self.norm_out = make_norm(norm, hidden)
        self.options = f"residual={residual}, norm={norm}, ffn={ffn}"

    def scan(self, gates: Tensor, h0: Tensor) -> Tensor:
        """h (B, T, H) of one layer from its gates (B, T, G*H) and h0 (B, H)."""
        if self.impl == "scratch":
            step, h, out = STEPS[self.cell], h0, []
            for t in range(gates.shape[1]):
                h = step(gates[:, t], h)
                out.append(h)
            return torch.stack(out, 1)
        if gates.dtype in (torch.float16, torch.bfloat16):  # autocast: the scan in float32
            gates, h0 = gates.float(), h0.float()
        if self.impl == "fused":
            return log_scan(*log_coefficients(self.cell, gates), h0)
        return _FastLayer.apply(self.cell, gates.contiguous(), h0.contiguous())

    def forward(self, x: Tensor, state: Tensor | None = None):
        B, layers = x.shape[0], self.num_layers
        h0 = state if state is not None else x.new_zeros(layers, B, self.hidden_size)
        finals = []
        for k, block in enumerate(self.blocks):
            u = _normed(block.norm, x)
            if self.impl == "scratch":  # the reference: every product per step
                gates = torch.stack([block.gates(u[:, t]) for t in range(u.shape[1])], 1)
            else:
                gates = block.gates(u)
            h = self.scan(gates, h0[k])
            finals.append(h[:, -1])
            p = self.dropout if k < layers - 1 else 0.0  # the last: CharLM's output dropout
            h = drop(h, p, self.training, self.locked)
            x = x + h if block.residual else h
            if block.ffn is not None:
                x = x + drop(block.ffn(x), p, self.training, self.locked)
        return _normed(self.norm_out, x), torch.stack(finals).to(h0.dtype)

    def extra_repr(self) -> str:
        return (f"{self.cell}, impl={self.impl}, hidden={self.hidden_size}, "
                f"layers={self.num_layers}, dropout={self.dropout}"
                f"{' (locked)' if self.locked else ''}, {self.options}")


class MinStepper:
    """One character per call for the sampler (`charlm.inference.sample`), from detached weights, with as
    few ops a step as can be (a step's arithmetic is tiny; each op costs microseconds to launch).
    The first layer's (a, b) depend on the character alone, so they are a table: its step is a
    lookup and one multiply-add::

        table[v] = [a | b | x] of the first layer for input(v)     (V, 2H [+ I when residual])
        h = a * h + b;  layers above: norm, one addmm, the update (one C call where the kernel
        is, else the step equations); then the output norm
    """

    def __init__(self, stack: MinStack, inputs: Tensor):
        """`inputs`: (V, I), the first layer's input vector for each character id."""
        self.cell, self.H, self.lstm = stack.cell, stack.hidden_size, stack.cell == "minlstm"
        first = stack.blocks[0]
        with torch.no_grad():
            a, b = coefficients(self.cell, first.gates(_normed(first.norm, inputs)))
            parts = [a, b] + ([inputs] if first.residual else [])
            self.table = torch.cat(parts, -1).contiguous()
        self.blocks = [(_step_norm(blk.norm), blk.gates.weight.detach().t().contiguous(),
                        blk.gates.bias.detach(), blk.residual, blk.ffn) for blk in stack.blocks]
        self.norm_out = _step_norm(stack.norm_out)

    @staticmethod
    def split(state: Tensor) -> list[Tensor]:
        return list(state.unbind(0))

    @torch.no_grad()
    def step(self, ids: Tensor, states: list[Tensor]) -> Tensor:
        """ids (B,); updates `states` (per layer h) in place; returns the stack's output (B, H)."""
        H = self.H
        row = self.table.index_select(0, ids)
        x = h = states[0] = torch.addcmul(row[:, H: 2 * H], row[:, :H], states[0])
        for k, (norm, w, bias, residual, ffn) in enumerate(self.blocks):
            if k:
                gates = torch.addmm(bias, x if norm is None else norm(x), w)
                if minkernel.usable(gates, states[k]):
                    h = minkernel.forward(self.lstm, gates, states[k])
                else:
                    h = STEPS[self.cell](gates, states[k])
                states[k] = h
            x = (row[:, 2 * H:] if k == 0 else x) + h if residual else h
            if ffn is not None:
                x = x + ffn(x)
        return x if self.norm_out is None else self.norm_out(x)


def _step_norm(norm: nn.Module | None):
    """`norm` as one functional call on detached weights (no module dispatch a step)."""
    if isinstance(norm, nn.LayerNorm):
        w, b = norm.weight.detach(), norm.bias.detach()
        return lambda x: F.layer_norm(x, w.shape, w, b, EPS)
    return norm


def parameter_count(cell: str, input_size: int, hidden: int, layers: int, norm: str, ffn: int) -> int:
    """Parameters of a MinStack with these settings (for sizing it against another model)."""
    gates = MIN_GATES[cell] * hidden
    count = sum(gates * (i + 1) for i in [input_size] + [hidden] * (layers - 1))
    per_norm = {"none": 0, "layer": 2, "rms": 1}[norm]
    count += per_norm * (input_size + hidden * (layers - 1) + hidden)
    if ffn:
        count += layers * (2 * ffn * hidden * hidden + ffn * hidden + hidden + per_norm * hidden)
    return count

