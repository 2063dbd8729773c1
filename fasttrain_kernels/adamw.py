"""AdamW with torch.optim.AdamW's math and state, one multi-tensor Triton launch per parameter group.

Imports from fasttrain_kernels: _backend, _multi_tensor, _specialization, clip_grad_norm.

For each parameter p with gradient g (times the clip coefficient when clipping is
folded in), moments m and v, and step t (counted per parameter, as torch does):

    p = p * (1 - lr * weight_decay)                            decoupled weight decay
    m = m + (1 - beta1) * (g - m)
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The update is bound by memory traffic: in fp32 it reads p, g, m, v and writes p, m,
v, 28 bytes per parameter, in a single pass (fasttrain_kernels/_multi_tensor.py spreads every
tensor of a group over the programs of one launch). lr and the steps are device
tensors read by the kernel, so a step never waits for the host; with `lr` given as a
tensor (updated in place) a step can be captured in a CUDA graph.

Mixed precision. bf16 and fp16 parameters get an fp32 master copy ("master_param"
in their state); the moments are always fp32. The update runs on the master and
the parameter receives its rounding, so the result is exactly what fp32 AdamW
would compute, rounded once. We chose this over stochastic rounding of the bf16
parameter itself, which would move 22 bytes per parameter instead of 28 (reads p,
g: 2 + 2, m, v: 8; writes p: 2, m, v: 8) and store 12 bytes instead of 16. SR is
unbiased only on average: each step adds up to one bf16 ulp (2^-8 relative) of
noise per weight, and the outcome depends on a random stream. Master weights are
deterministic and match fp32 AdamW, for 27% more traffic and 4 more bytes per parameter.

Gradient clipping folds in: with `max_grad_norm`, the step computes the global
norm (fasttrain_kernels/clip_grad_norm.py, one read of the gradients) and scales each
gradient as it loads it, so clipping costs the norm pass only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import overload

import torch
from torch import Tensor

from fasttrain_kernels import _multi_tensor
from fasttrain_kernels._backend import tl, triton, use_triton
from fasttrain_kernels._specialization import Specialization
from fasttrain_kernels.clip_grad_norm import clip_coefficient, grad_norm

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP32_STATE = ("exp_avg", "exp_avg_sq", "master_param")  # kept fp32 whatever the parameter's dtype


@triton.jit
def _load(ptr, index, numel, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + index, mask=index < numel, other=0.0)
    else:
        return tl.load(ptr + index)


@triton.jit
def _store(ptr, index, value, numel, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + index, value, mask=index < numel)
    else:
        tl.store(ptr + index, value)


@triton.jit
def _adamw_block(
    index,
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    master,
    numel,
    decay,
    step_size,
    bias_correction2_sqrt,
    coefficient,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    HAS_MASTER: tl.constexpr,
    CLIP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The update of the elements at `index` (masked to `numel` when MASKED)."""
    g = _load(grad, index, numel, MASKED).to(tl.float32)
    if CLIP:
        g = g * coefficient
    if HAS_MASTER:
        p = _load(master, index, numel, MASKED)
    else:
        p = _load(param, index, numel, MASKED).to(tl.float32)
    m = _load(exp_avg, index, numel, MASKED)
    v = _load(exp_avg_sq, index, numel, MASKED)
    # The order of torch's ops: mul_, lerp_, mul_ + addcmul_, then addcdiv_ by the denominator.
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    p = p - step_size * (m / (tl.sqrt(v) / bias_correction2_sqrt + eps))
    _store(exp_avg, index, m, numel, MASKED)
    _store(exp_avg_sq, index, v, numel, MASKED)
    if HAS_MASTER:
        _store(master, index, p, numel, MASKED)
    _store(param, index, p.to(param.dtype.element_ty), numel, MASKED)


@triton.jit
def _adamw_kernel(
    rows_ptr,
    chunks_ptr,
    lr_ptr,
    coefficient_ptr,
    param_type_ptr,
    grad_type_ptr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    HAS_MASTER: tl.constexpr,
    CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The update of one CHUNK of one parameter. Table row: (param, grad, exp_avg, exp_avg_sq, step,
    master, numel); without a master copy its column repeats param's address and is not used.

    The addresses come from a table, so Triton knows nothing of their alignment, and an element
    count of unknown divisibility in the mask would keep every access scalar. So a whole chunk
    (all but each tensor's last) runs unmasked, and with ALIGNED (every address in the table
    16-byte aligned, checked on the host) the pointers say so: 16-byte vector loads and stores."""
    chunk = tl.program_id(0)
    row = rows_ptr + tl.load(chunks_ptr + 2 * chunk) * 7
    start = tl.multiple_of(tl.load(chunks_ptr + 2 * chunk + 1), CHUNK)  # chunks start at multiples of CHUNK
    param = tl.load(row).to(tl.pointer_type(param_type_ptr.dtype.element_ty))
    grad = tl.load(row + 1).to(tl.pointer_type(grad_type_ptr.dtype.element_ty))
    exp_avg = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    exp_avg_sq = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
    master = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)
    if ALIGNED:
        param, grad = tl.multiple_of(param, 16), tl.multiple_of(grad, 16)
        exp_avg, exp_avg_sq = tl.multiple_of(exp_avg, 16), tl.multiple_of(exp_avg_sq, 16)
        master = tl.multiple_of(master, 16)

    lr = tl.load(lr_ptr)
    decay = 1.0 - lr * weight_decay
    step_size = lr / (1.0 - tl.exp(step * log_beta1))  # beta**t as exp(t log beta): t stays on the device
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2))
    coefficient = 1.0
    if CLIP:
        coefficient = tl.load(coefficient_ptr)
    if start + CHUNK <= numel:
        for offset in range(0, CHUNK, BLOCK):
            _adamw_block(
                start + offset + tl.arange(0, BLOCK),
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                master,
                numel,
                decay,
                step_size,
                bias_correction2_sqrt,
                coefficient,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                HAS_MASTER,
                CLIP,
                False,
            )
    else:
        for offset in range(0, CHUNK, BLOCK):
            _adamw_block(
                start + offset + tl.arange(0, BLOCK),
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                master,
                numel,
                decay,
                step_size,
                bias_correction2_sqrt,
                coefficient,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                HAS_MASTER,
                CLIP,
                True,
            )


def _constexprs(param_dtype: torch.dtype, clip: bool, aligned: bool) -> dict[str, int]:
    """The kernel's compile-time arguments for a launch over parameters of `param_dtype`."""
    return dict(
        HAS_MASTER=param_dtype != torch.float32,
        CLIP=clip,
        ALIGNED=aligned,
        CHUNK=_multi_tensor.CHUNK,
        BLOCK=_multi_tensor.BLOCK,
    )


def specializations() -> list[Specialization]:
    """What FusedAdamW compiles: per parameter dtype it takes (gradients in the same dtype), with and
    without clipping folded in; the betas, eps, weight decay and learning rate are run-time values."""
    f32 = torch.float32
    return [
        Specialization.of(
            _adamw_kernel,
            None,
            _constexprs(dtype, clip, aligned),
            rows_ptr=torch.int64,
            chunks_ptr=torch.int64,
            lr_ptr=f32,
            coefficient_ptr=f32,
            param_type_ptr=dtype,
            grad_type_ptr=dtype,
            one_minus_beta1=0.1,
            beta2=0.999,
            one_minus_beta2=0.001,
            log_beta1=-0.1,
            log_beta2=-0.001,
            eps=1e-8,
            weight_decay=0.1,
        )
        for dtype in PARAM_DTYPES
        for clip in (False, True)
        for aligned in (False, True)
    ]


def plain_adamw(group: dict) -> bool:
    """Whether a parameter group (or a saved one) of torch.optim.AdamW's keys asks for plain AdamW, the one update
    FusedAdamW makes."""
    return not group.get("amsgrad") and not group.get("maximize") and group.get("decoupled_weight_decay", True)


def _torch_update(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    coefficient: Tensor | None,
) -> None:
    """The same update with PyTorch foreach ops (the CPU path)."""
    has_master = "master_param" in states[0]
    targets = [s["master_param"] for s in states] if has_master else params
    exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    g: list[Tensor] | tuple[Tensor, ...] = [x.float() for x in grads]
    if coefficient is not None:
        g = torch._foreach_mul(g, coefficient)
    torch._foreach_mul_(targets, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    for target, m, v, state in zip(targets, exp_avgs, exp_avg_sqs, states):
        t = state["step"].item()  # a CPU tensor: no sync
        target.addcdiv_(m, v.sqrt() / math.sqrt(1 - beta2**t) + eps, value=-lr / (1 - beta1**t))
    if has_master:
        torch._foreach_copy_(params, targets)


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW(params, lr, betas, eps, weight_decay) in Triton kernels; see the module docstring.

    Same math, param groups (each with its own lr / weight_decay / betas / eps, lr
    changeable between steps as schedulers do) and state_dict layout (`step`,
    `exp_avg`, `exp_avg_sq` per parameter; plus `master_param` for bf16/fp16 ones),
    so a state saved by either loads into the other. Parameters without a gradient
    are skipped; sparse gradients raise. Parameters must be contiguous fp32, bf16 or
    fp16 tensors.

    `max_grad_norm`: clip the gradients to this global L2 norm inside the step (the
    gradients themselves are left unscaled). `grad_norm()` computes the norm early,
    for logging or a finiteness check, and the next step reuses it.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_grad_norm: float | None = None,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"FusedAdamW: invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {betas}")
        if not 0.0 <= eps or not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: invalid eps {eps} or weight_decay {weight_decay}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"FusedAdamW: max_grad_norm must be positive or None, not {max_grad_norm}")
        # The last three keys are torch.optim.AdamW's: without them, AdamW loading our state would
        # default decoupled_weight_decay to False and silently become Adam with L2 regularisation.
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=False,
            maximize=False,
            decoupled_weight_decay=True,
        )
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._grad_norm: Tensor | None = None  # from grad_norm(), for the next step
        self._tables: dict = {}  # kernel work lists, by (group, dtypes)
        self._lr: dict[int, Tensor] = {}  # device copies of float learning rates, by group

    def add_param_group(self, param_group: dict) -> None:
        """torch's, refusing a group that asks for what the kernel does not do (it would run plain AdamW)."""
        if not plain_adamw(param_group):
            raise ValueError("FusedAdamW: amsgrad, maximize and coupled weight decay are not supported")
        super().add_param_group(param_group)

    def _gradients(self) -> list[tuple[int, dict, list[Tensor]]]:
        """(index, group, parameters with a gradient) for every group; checks what the kernels need."""
        work = []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                if p.dtype not in PARAM_DTYPES or not p.is_contiguous():
                    raise RuntimeError(
                        f"FusedAdamW needs contiguous float32/bfloat16/float16 parameters, "
                        f"got a {p.dtype} one of shape {tuple(p.shape)} and strides {p.stride()}"
                    )
            work.append((index, group, params))
        return work

    @staticmethod
    def _grad(p: Tensor) -> Tensor:
        grad = p.grad
        assert grad is not None  # _gradients() keeps only the parameters that have one
        return grad if grad.is_contiguous() else grad.contiguous()

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The global L2 norm of the current gradients (fp32, on their device); the next step() reuses it."""
        grads = [self._grad(p) for _, _, params in self._gradients() for p in params]
        self._grad_norm = grad_norm(grads, self._tables)
        return self._grad_norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_norm = None  # it was the norm of these gradients
        super().zero_grad(set_to_none)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.dtype != torch.float32:
                state["master_param"] = p.detach().float()
        return state

    def _device_lr(self, index: int, lr: float | Tensor, device: torch.device) -> Tensor:
        if isinstance(lr, Tensor):
            return lr.to(device=device, dtype=torch.float32)
        buffer = self._lr.get(index)
        if buffer is None or buffer.device != device:
            buffer = self._lr[index] = torch.empty((), dtype=torch.float32, device=device)
        return buffer.fill_(lr)  # a launch with the value, not a host sync

    @overload  # as torch.optim.Optimizer.step: None without a closure
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW update of every parameter with a gradient; returns closure() if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._gradients()
        coefficient = None
        if self.max_grad_norm is not None and any(params for _, _, params in work):
            norm = self._grad_norm if self._grad_norm is not None else self.grad_norm()
            coefficient = clip_coefficient(norm, self.max_grad_norm)
        self._grad_norm = None
        steps = [self._state(p)["step"] for _, _, params in work for p in params]
        if steps:
            torch._foreach_add_(steps, 1.0)
        for index, group, params in work:
            buckets: dict[tuple, list[Tensor]] = {}
            for p in params:  # one launch per (parameter dtype, gradient dtype): the pointers are typed
                assert p.grad is not None  # _gradients() keeps only the parameters that have one
                buckets.setdefault((p.dtype, p.grad.dtype), []).append(p)
            for key, bucket in buckets.items():
                self._update(index, group, key, bucket, coefficient)
        return loss

    def _update(self, index: int, group: dict, key: tuple, params: list[Tensor], coefficient: Tensor | None) -> None:
        beta1, beta2 = group["betas"]
        grads = [self._grad(p) for p in params]
        states = [self.state[p] for p in params]
        if not use_triton(params[0]):
            _torch_update(
                params,
                grads,
                states,
                float(group["lr"]),
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                coefficient,
            )
            return
        has_master = params[0].dtype != torch.float32
        columns = [
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            [s["master_param"] for s in states] if has_master else params,
        ]
        table = self._tables.setdefault((index, *key), _multi_tensor.TensorTable())
        rows, chunks = table(columns)
        constexprs = _constexprs(params[0].dtype, clip=coefficient is not None, aligned=table.aligned)
        lr = self._device_lr(index, group["lr"], params[0].device)
        _adamw_kernel[(chunks.shape[0],)](
            rows,
            chunks,
            lr,
            lr if coefficient is None else coefficient,
            params[0],
            grads[0],
            1 - beta1,
            beta2,
            1 - beta2,  # 1 - beta in double, rounded once, as torch's scalars are
            math.log(beta1) if beta1 > 0 else -math.inf,
            math.log(beta2) if beta2 > 0 else -math.inf,
            group["eps"],
            group["weight_decay"],
            **constexprs,
        )

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, except that moments and master weights stay fp32 for bf16/fp16 parameters (torch
        would cast them to the parameter's dtype) and `step` becomes an fp32 tensor on the parameter's
        device. Also loads torch.optim.AdamW's state; Adam's, amsgrad or maximize are refused."""
        for group in state_dict["param_groups"]:
            if not plain_adamw(group):
                raise ValueError("FusedAdamW: this state is not plain AdamW's (amsgrad, maximize or coupled decay)")
        kept = {pid: {k: v for k, v in s.items() if k in FP32_STATE} for pid, s in state_dict["state"].items()}
        rest = {pid: {k: v for k, v in s.items() if k not in FP32_STATE} for pid, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in kept:
                state = self.state[p]
                for k, v in kept[pid].items():
                    state[k] = v.detach().to(device=p.device, dtype=torch.float32, copy=True).contiguous()
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device).clone()
                if p.dtype != torch.float32 and "master_param" not in state:  # saved by torch's AdamW
                    state["master_param"] = p.detach().float()
        self._tables.clear()
        self._lr.clear()
