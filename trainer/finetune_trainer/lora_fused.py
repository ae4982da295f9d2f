"""peft's LoRA Linear computed in fewer passes over the activations: two forms of the same function.

peft computes an adapted Linear as `x Wᵀ + s · (x Aᵀ) Bᵀ`: besides the base product, two rank-r products in
the forward, four in the backward, a scaling and an addition of two activations (and of two input gradients
in the backward), and, under autocast, a second cast of `x`.

- `MergedLoRA`, for a CPU: without adapter dropout this is `x (W + s·BA)ᵀ`, so one product with the merged
  weight in the forward; in the backward one for the input's gradient and four rank-r ones for the adapters'
  (`∂A = s·((∂y B)ᵀ x)`, `∂B = s·(∂y)ᵀ (x Aᵀ)`). Rank-r products are slow for their size on a CPU
  (bench/README.md, the profile), and element-wise work is a third of a bf16 step. Under bf16 autocast the
  merged weight is rounded to bf16 as a whole, where peft rounds W and adds the adapters' product separately:
  the adapters' share carries the rounding of W's magnitude, the rounding autocast already applies to W.
- `AccumulatedLoRA`, for a GPU: peft's products in peft's order, but the adapters' product is accumulated into
  the base product's output by the matrix product itself (addmm's α), and in the backward into the input's
  gradient: no activation-sized scaling, addition or second gradient, and one cast of `x`. On a GPU the
  element-wise passes, not the rank-r products, are what the adapters cost (bench/README.md, (d)).

In fp32 both agree with peft to rounding (tested). Where a module's input needs a gradient, each keeps one
weight-sized tensor for the backward (the merged weight; W at the compute precision), as peft's base product under
autocast keeps its cast of W; where it needs none (the first adapted module above frozen layers), neither keeps it.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision the products run at: autocast's on `x`'s device when it is on, else `x`'s. On the meta device
    (models.meta_forward_error's shape checks), which has no autocast state to ask (torch raises), `x`'s."""
    device = x.device.type
    if device == "meta":
        return x.dtype
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def adapter_grads(rows: torch.Tensor, grads: torch.Tensor, down: torch.Tensor, b: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`s·∂y B` (rank-r, for the input's gradient), `∂A = s·(∂y B)ᵀ x` and `∂B = s·∂yᵀ (x Aᵀ)`, from the inputs' rows,
    the output gradient's rows and `down` = x Aᵀ: the same in both forms."""
    up = (grads @ b).mul_(scale)
    return up, up.t() @ rows, grads.t() @ (down * scale)


class MergedLoRA(torch.autograd.Function):
    """`x (W + s·BA)ᵀ + b` with gradients for `x`, A and B (W and b are frozen)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = compute_dtype(x)
        # W + s·BA at W's precision, then rounded once (under autocast BA itself is a bf16 product: its rounding,
        # relative to the small BA, is far below the rounding of the sum)
        merged = (weight + scale * (b @ a)).to(dtype)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype)
        x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
        ctx.save_for_backward(x, merged if ctx.needs_input_grad[0] else None, a, b)  # W: for x's gradient only
        return F.linear(x, merged, None if bias is None else bias.to(dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, a, b = ctx.saved_tensors
        grad = grad.to(x.dtype)
        rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        _, grad_a, grad_b = adapter_grads(rows, grads, rows @ a.t(), b, ctx.scale)
        grad_x = grad @ merged if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None


class AccumulatedLoRA(torch.autograd.Function):
    """`x Wᵀ + b + s·(x Aᵀ) Bᵀ` with gradients for `x`, A and B (W and b are frozen), each sum accumulated by a
    matrix product."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = compute_dtype(x)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        weight, a, b = weight.to(dtype), a.to(dtype), b.to(dtype)
        down = rows @ a.t()
        out = F.linear(rows, weight, None if bias is None else bias.to(dtype))
        out.addmm_(down, b.t(), alpha=scale)
        ctx.save_for_backward(rows, down, weight if ctx.needs_input_grad[0] else None, a, b)  # as MergedLoRA
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, down, weight, a, b = ctx.saved_tensors
        grads = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
        up, grad_a, grad_b = adapter_grads(rows, grads, down, b, ctx.scale)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grads @ weight).addmm_(up, a).reshape(*grad.shape[:-1], rows.shape[-1])
        return grad_x, None, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None


FORMS: dict[str, type[torch.autograd.Function]] = {"cpu": MergedLoRA, "cuda": AccumulatedLoRA}


def fusable(module: nn.Module) -> bool:
    """A peft LoRA Linear whose one active adapter is plain LoRA without dropout or bias, on a frozen nn.Linear
    (its bias too: neither form gives the base a gradient)."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or len(module.active_adapters) != 1 or module.fan_in_fan_out:
        return False
    name = module.active_adapters[0]
    base = module.base_layer
    return (type(base) is nn.Linear and not base.weight.requires_grad and name in module.lora_A
            and (base.bias is None or not base.bias.requires_grad)
            and isinstance(module.lora_dropout[name], nn.Identity) and not module.use_dora[name]
            and module.lora_B[name].bias is None and module.lora_A[name].bias is None)


def forward_through(form: type[torch.autograd.Function]) -> Callable[..., torch.Tensor]:
    """A LoRA Linear's forward computed by `form`."""

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or self.disable_adapters or args or kwargs:  # peft's own forward covers these (adapter_names)
            return type(self).forward(self, x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.base_layer
        return form.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                          self.scaling[name])

    return forward


def fuse(model: nn.Module, form: type[torch.autograd.Function]) -> int:
    """Train every fusable LoRA module of `model` through `form` (FORMS has the one for each device); returns
    how many."""
    fused = [m for m in model.modules() if fusable(m)]
    for m in fused:
        m.forward = types.MethodType(forward_through(form), m)
    return len(fused)
