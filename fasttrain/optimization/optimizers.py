"""The optimizers (AdamW, Muon with AdamW, SGD, Adafactor), and the gradient clipping before them.

Imports from fasttrain: compute.device, config, system.errors.

Weight decay regularises matrices that mix features; it is wrong for RMSNorm gains (pulled toward 0, not their natural
1) and biases, and usually unhelpful for embeddings (a row is updated only when its token appears), so those go in a
group with weight_decay = 0. Every optimizer gets the same two groups (SGD's decay is torch's L2 term, the others'
decoupled).

Muon orthogonalises each update of a matrix (Newton-Schulz on its momentum), which only makes sense for the blocks'
hidden matrices, not the embedding lookup, the output head or vectors. So "muon" is a hybrid: Muon for the blocks' 2-D
parameters, AdamW for the rest, each at its own peak rate scaled by the same schedule.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, cast, overload

import torch
from torch import nn

from fasttrain.compute.device import native_bf16
from fasttrain.config import ModelConfig, OptimConfig
from fasttrain.system.errors import UsageError
from fasttrain_kernels.newton_schulz import POLAR_EXPRESS, POLAR_EXPRESS_MARGIN, newton_schulz_reference

# How fast the untied head's best rate falls with the width (optim.head_lr_width): the best of those tried on the main
# job in fp32 was 0.008 at width 128 (0.004, 0.006 and 0.016 worse), 0.004 at 192 (0.003, 0.00533 and 0.008 worse)
# and 0.0025 against 0.004 at 256; 0.004 x (192 / d) ** 1.7 gives 0.008, 0.004 and 0.0025 (docs/performance.md,
# "The head's rate and the width"). muP's output layer under Adam falls as 1 / d; these widths fall faster. Outside
# the widths measured the nearest one's rate: nothing says the fall goes on.
HEAD_LR_POWER = 1.7
HEAD_LR_MEASURED = (128, 256)

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from torch.optim.optimizer import ParamsT

    from fasttrain_kernels.adamw import FusedAdamW

    _MuonBase = torch.optim.Muon
else:  # torch.optim.Muon is torch 2.9's; without it build_optimizer refuses "muon" before building one
    _MuonBase = getattr(torch.optim, "Muon", torch.optim.Optimizer)


class Muon(_MuonBase):
    """torch.optim.Muon (its groups, state and update rule) with Newton-Schulz in `ns_dtype`, on whole or sharded
    matrices. torch's step iterates in bf16 always; this one in bf16 only where bf16 matmuls are native, else fp32 (an
    fp32 run's losses do not depend on the CPU, and emulated bf16 is ~100x slower; newton_schulz_dtype). Under FSDP and
    HSDP the momentum is updated shard by shard, only the iteration sees whole matrices (`orthogonalised`), and the
    state saves and reshards as any FSDP optimizer state; the rate's adjustment reads a DTensor's whole `shape`."""

    def __init__(
        self,
        params: ParamsT,
        ns_dtype: torch.dtype,
        polar_express: bool = False,
        second_moment_beta2: float = 0.0,
        cautious_weight_decay: bool = False,
        **kwargs: Any,
    ):
        if polar_express:
            kwargs["ns_coefficients"] = POLAR_EXPRESS
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        # Kept in the groups beside torch's own settings, so a checkpoint holds what its state was built with.
        extra = dict(
            ns_margin=POLAR_EXPRESS_MARGIN if polar_express else 0.0,
            second_moment_beta2=second_moment_beta2,
            cautious_weight_decay=cautious_weight_decay,
        )
        self.defaults.update(extra)
        for group in self.param_groups:
            group.update(extra)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """As torch's, and a group loaded from a checkpoint saved before a setting existed takes its default."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("ns_margin", "second_moment_beta2", "cautious_weight_decay"):
                group.setdefault(key, self.defaults[key])

    @overload  # as torch.optim.Optimizer.step: None without a closure
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        from torch.optim._muon import _adjust_lr  # torch's own rule, so the rates scale as torch's step does

        loss = None
        if closure is not None:  # as torch's step does
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            buffers: list[torch.Tensor] = []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            for p, g, buffer in zip(params, grads, buffers):
                buffer.lerp_(g, 1 - momentum)
                update = g.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalised(update, group, self.ns_dtype).to(p.dtype)
                if group["second_moment_beta2"]:
                    update = self._neuron_normalised(p, update, group["second_moment_beta2"])
                decay = group["lr"] * group["weight_decay"]
                if group["cautious_weight_decay"]:  # only where the step moves the weight toward 0 as well
                    p.sub_(p * (update * p >= 0) * decay)
                else:
                    p.mul_(1 - decay)
                p.add_(update, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss

    def _neuron_normalised(self, p: torch.Tensor, update: torch.Tensor, beta2: float) -> torch.Tensor:
        """NorMuon (Li et al. 2025, arXiv 2510.05491; nanochat's Muon): `update` with each neuron's part divided by the
        root of a running mean of its mean square, then scaled back to its own norm, evening out the neurons' step sizes
        as Adam would. A neuron is the longer side's vector (a row of a tall or square matrix, a column of a wide one),
        its state one number ("second_moment"); sharded, the reductions are DTensor's."""
        across = -1 if p.shape[0] >= p.shape[1] else -2  # average over the other side
        full = update.float()
        mean_square = full.square().mean(dim=across, keepdim=True)
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(mean_square)
        second_moment = state["second_moment"]
        second_moment.lerp_(mean_square, 1 - beta2)
        scaled = full * second_moment.clamp(min=1e-10).rsqrt()
        # the norm before over the norm after, each the square root of a sum over the matrix
        ratio = (full.square().sum() / scaled.square().sum().clamp(min=1e-20)).sqrt()
        return (scaled * ratio).to(update.dtype)


def is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    """Whether `t` is a DTensor, without importing DTensor's module (about a second of a start, which only a sharded run
    needs): before it is loaded no tensor can be one."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def orthogonalised(update: torch.Tensor, group: dict, dtype: torch.dtype) -> torch.Tensor:
    """Muon's direction for the matrix `update`: Newton-Schulz in `dtype` with `group`'s settings, placed as `update`
    is. A DTensor shard is gathered whole onto every rank of its shard group, each iterating on the whole matrix and
    keeping its own slice: repeated compute, but the simplest correct way (one all-gather per matrix, any placement, no
    collective of our own), and cheap (~1.5 TFLOP a step for the 124M model against ~370 of forward and backward)."""
    steps, coefficients, eps, margin = group["ns_steps"], group["ns_coefficients"], group["eps"], group["ns_margin"]
    if not is_dtensor(update):
        return newton_schulz_reference(update, steps, coefficients, eps, dtype=dtype, margin=margin)
    from torch.distributed.tensor import distribute_tensor

    whole = newton_schulz_reference(update.full_tensor(), steps, coefficients, eps, dtype=dtype, margin=margin)
    # src_data_rank=None: each rank cuts its slice from its own copy (the default would scatter rank 0's)
    return distribute_tensor(whole, update.device_mesh, update.placements, src_data_rank=None)


def param_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = False, exclude: frozenset[int] = frozenset()
) -> list[dict]:
    """Two groups: decayed matrices, and the rest (vectors, and embeddings unless `decay_embeddings`); a tied parameter
    once, as an embedding; ids in `exclude` left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen = set(exclude)
    for p in model.parameters():  # parameters() already skips repeats of a shared tensor
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.ndim >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def own_rate_groups(groups: list[dict], model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """`groups` with the lookup tables (at optim.embedding_lr) and an untied head (at optim.head_lr) each in a group of
    its own, keeping its weight decay; as they are where those keys are 0. An ensemble's heads are its members'."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)] if cfg.embedding_lr else []
    moves = [(table, cfg.embedding_lr) for table in tables]
    for net in [model, *getattr(model, "members", ())]:
        embed, output = getattr(net, "embed", None), getattr(net, "output", None)
        if cfg.head_lr and output is not None and (embed is None or output.weight is not embed.weight):
            moves.append((output.weight, head_rate(cfg, output.weight.shape[1])))
    for p, lr in moves:
        home = next(g for g in groups if any(q is p for q in g["params"]))
        home["params"] = [q for q in home["params"] if q is not p]
        groups.append({"params": [p], "weight_decay": home["weight_decay"], "lr": lr})
    return groups


def head_rate(cfg: OptimConfig, d_model: int) -> float:
    """The untied head's peak rate at width `d_model`: optim.head_lr, scaled by (optim.head_lr_width / width) **
    HEAD_LR_POWER where head_lr_width is set (a narrower head faster, a wider one slower), the width taken within
    HEAD_LR_MEASURED; else head_lr itself."""
    if not cfg.head_lr_width:
        return cfg.head_lr
    narrowest, widest = HEAD_LR_MEASURED
    return cfg.head_lr * (cfg.head_lr_width / min(max(d_model, narrowest), widest)) ** HEAD_LR_POWER


def untied_head_rate(o: OptimConfig, m: ModelConfig) -> float:
    """The peak rate of the head a config builds, where it has its own (`own_rate_groups` puts it in a group of its
    own): optim.head_lr at the model's width (`head_rate`); 0 where optim.head_lr is unset or the head is tied (the
    embedding matrix, at the embedding's rate: `tied_head_note`)."""
    return head_rate(o, m.d_model) if o.head_lr and not m.tie_embeddings else 0.0


def tied_head_note(o: OptimConfig, m: ModelConfig) -> str:
    """A note where optim.head_lr is set for a tied head (base.toml sets it; `--set model.tie_embeddings=true`
    ties it): that head is the embedding matrix, trained at the embedding's rate, so the key does nothing."""
    if not (o.head_lr and m.tie_embeddings):
        return ""
    return (
        f"optim.head_lr = {o.head_lr:g} is an untied head's rate: this head is tied, the embedding matrix, "
        "and trains at the embedding's (optim.embedding_lr, else optim.lr)"
    )


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D parameters of the transformer blocks (attention and MLP weights): what Muon updates."""
    blocks = cast(nn.ModuleList, model.blocks)  # a Transformer's, or an ensemble's members'
    return [p for p in blocks.parameters() if p.ndim == 2 and p.requires_grad]


class Hybrid:
    """Optimizers over disjoint parameters, stepped, cleared and saved as one: what GradScaler, clipping and checkpoints
    use of an optimizer (`param_groups` in order, step, zero_grad, a state_dict keyed by part name)."""

    def __init__(self, **parts: torch.optim.Optimizer):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    def step(self, closure: None = None) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def newton_schulz_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype Muon's Newton-Schulz iterates in: bf16 for a half-precision run (`precision` bf16 or fp16) on a
    device with native bf16 matmuls, else fp32 (an fp32 run is fp32 throughout; see Muon)."""
    return torch.bfloat16 if precision != "fp32" and native_bf16(device) else torch.float32


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device, kernel: bool = False, precision: str = "fp32"
) -> torch.optim.Optimizer | Hybrid:
    """The optimizer that optim.name names, over `model`'s parameters, each group at its own peak lr. `kernel`:
    kernels.FusedAdamW for AdamW (clipping folded in only for AdamW alone, see Updater); `precision`: the run's, which
    Muon's Newton-Schulz follows. All but the AdamW kernel take FSDP's sharded parameters. UsageError for Muon on a
    torch without torch.optim.Muon."""
    if cfg.name == "muon":
        if not hasattr(torch.optim, "Muon"):
            raise UsageError(
                f'optim.name = "muon" needs torch.optim.Muon, added in torch 2.9; this is torch {torch.__version__}'
            )
        matrices = hidden_matrices(model)
        m = cfg.muon
        muon = Muon(
            matrices,
            ns_dtype=newton_schulz_dtype(precision, device),
            lr=m.lr,
            weight_decay=cfg.decay(),
            momentum=m.momentum,
            nesterov=m.nesterov,
            ns_steps=m.ns_steps,
            adjust_lr_fn=m.adjust_lr,
            polar_express=m.orthogonalisation == "polar_express",
            second_moment_beta2=m.second_moment_beta2,
            cautious_weight_decay=m.cautious_weight_decay,
        )
        rest = param_groups(model, cfg.decay(), cfg.decay_embeddings, frozenset(map(id, matrices)))
        rest = own_rate_groups(rest, model, cfg)
        return Hybrid(muon=muon, adamw=_adamw(rest, cfg, device, kernel, clip=False))
    groups = own_rate_groups(param_groups(model, cfg.decay(), cfg.decay_embeddings), model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.sgd.momentum, nesterov=cfg.sgd.nesterov, fused=device.type == "cuda" or None
        )
    if cfg.name == "adafactor":
        a = cfg.adafactor
        return torch.optim.Adafactor(groups, lr=cfg.lr, beta2_decay=a.beta2_decay, eps=(a.eps1 or None, a.eps2), d=a.d)
    return _adamw(groups, cfg, device, kernel, clip=True)


def _adamw(
    groups: list[dict], cfg: OptimConfig, device: torch.device, kernel: bool, clip: bool
) -> torch.optim.Optimizer:
    """torch's AdamW (fused on CUDA), or kernels.FusedAdamW with the clipping in its step if `clip`."""
    if kernel:
        from fasttrain_kernels.adamw import FusedAdamW  # only when asked for

        return FusedAdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            max_grad_norm=(cfg.max_grad_norm or None) if clip else None,
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=device.type == "cuda")


class Updater:
    """What happens to the gradients after the backward: fp16 loss scaling, clipping, the optimizer step.

        updater.scale(loss).backward()       # per micro-batch
        norm = updater.clip_gradients()      # the global norm before clipping
        updater.apply(lr)                    # apply(None): no update; either way the gradients are cleared

    The one place that decides how clipping happens: here for torch's optimizers; with `kernel`, kernels.FusedAdamW
    clips as it reads the gradients, so only the norm is computed here (same math and state_dict, so a checkpoint of one
    resumes with the other). Each group steps at the schedule's rate times its own peak over optim.lr.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: OptimConfig,
        device: torch.device,
        precision: str,
        kernel: bool = False,
        sharded: bool = False,
    ):
        self.optimizer = build_optimizer(model, cfg, device, kernel, precision)
        self.max_grad_norm = cfg.max_grad_norm or math.inf  # 0 disables clipping; the norm is still measured
        self.clip_in_step = kernel and cfg.name == "adamw"
        self.lr_ratios = [group["lr"] / cfg.lr for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.sharded = sharded  # FSDP: the gradients are DTensor shards
        # What the config asks of each group besides the rate: a resumed run applies these, not the saved ones
        self.configured = [
            {
                k: v
                for k, v in group.items()
                if k not in ("params", "lr", "initial_lr") and not isinstance(v, torch.Tensor)
            }
            for group in self.optimizer.param_groups
        ]

    def use_configured_hyperparameters(self) -> list[str]:
        """After a checkpoint's optimizer state is loaded (its groups' settings with it): put back the config's weight
        decay, betas, eps, ...; returns "name: saved -> now" for each that the config changed."""
        changed = []
        for group, configured in zip(self.optimizer.param_groups, self.configured):
            for key, value in configured.items():
                saved = group.get(key)
                same = _as_tuples(saved) == _as_tuples(value)  # a loaded state may hold a tuple as a list
                if not same:
                    changed.append(f"{key}: {saved} -> {value}")
                    group[key] = value
        return sorted(set(changed))

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the fp16 loss scale (itself otherwise), ready for backward()."""
        return self.scaler.scale(loss)

    def clip_gradients(self) -> torch.Tensor:
        """Clip the gradients to a global L2 norm of optim.max_grad_norm; returns the norm before (a device scalar)."""
        # Clip the true gradients, not the fp16-scaled ones. A Hybrid has what GradScaler uses of an optimizer.
        self.scaler.unscale_(cast(torch.optim.Optimizer, self.optimizer))
        if self.clip_in_step:
            return cast("FusedAdamW", self.optimizer).grad_norm()  # what build_optimizer built for `kernel`
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm, foreach=True)
        # FSDP's is a DTensor (already reduced over ranks)
        return cast("DTensor", norm).full_tensor() if self.sharded else norm

    def apply(self, lr: float | None) -> None:
        """One optimizer step at learning rate `lr`, scaled per group (none if `lr` is None; the GradScaler
        also skips it if fp16 gradients overflowed), then clear the gradients."""
        if lr is not None:
            for group, ratio in zip(self.optimizer.param_groups, self.lr_ratios):
                group["lr"] = lr * ratio
            self.scaler.step(cast(torch.optim.Optimizer, self.optimizer))
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _as_tuples(value: Any) -> Any:
    """`value` with every list or tuple in it a tuple (Polar Express's coefficients are a tuple of tuples)."""
    return tuple(map(_as_tuples, value)) if isinstance(value, (tuple, list)) else value
