"""LoRA as one product with the merged weight, for training on a CPU.

peft computes an adapted Linear as `x Wᵀ + s · (x Aᵀ) Bᵀ`: besides the base product, two rank-r products in
the forward, four in the backward, a scaling and an addition of two activations, and (under autocast) a
second cast of `x`. Without adapter dropout this is `x (W + s·BA)ᵀ`, the same function, so `fuse` computes
it that way: one product with the merged weight in the forward; in the backward one for the input's gradient
and four rank-r ones for the adapters' (`∂A = s·((∂y B)ᵀ x)`, `∂B = s·(∂y)ᵀ (x Aᵀ)`). Rank-r products are
slow for their size on a CPU (bench/README.md, the profile), and element-wise work is a third of a bf16 step.

In fp32 the two agree to rounding (tested). Under bf16 autocast the merged weight is rounded to bf16 as a
whole, where peft rounds W and adds the adapters' product separately: the adapters' share carries the
rounding of W's magnitude, the rounding autocast already applies to W itself.

The merged weight is kept for the backward: one weight-sized tensor per adapted module. That is nothing for
the models a CPU trains and gigabytes for a large model on a GPU, where rank-r products are cheap anyway and
nothing was measured, so the pipeline fuses on the CPU only.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MergedLoRA(torch.autograd.Function):
    """`x (W + s·BA)ᵀ + b` with gradients for A and B only (W and b are frozen)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        # W + s·BA at W's precision, then rounded once (under autocast BA itself is a bf16 product: its rounding,
        # relative to the small BA, is far below the rounding of the sum)
        merged = (weight + scale * (b @ a)).to(dtype)
        ctx.scale, ctx.dtypes = scale, (a.dtype, b.dtype)
        x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
        ctx.save_for_backward(x, merged, a, b)
        return F.linear(x, merged, None if bias is None else bias.to(dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, a, b = ctx.saved_tensors
        grad = grad.to(x.dtype)
        rows, grads = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_a = ctx.scale * ((grads @ b).t() @ rows)
        grad_b = ctx.scale * (grads.t() @ (rows @ a.t()))
        grad_x = grad @ merged if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1]), None


def fusable(module: nn.Module) -> bool:
    """A peft LoRA Linear whose one active adapter is plain LoRA without dropout or bias, on a frozen nn.Linear
    (its bias too: `MergedLoRA` gives the base no gradient)."""
    from peft.tuners.lora.layer import Linear

    if type(module) is not Linear or len(module.active_adapters) != 1 or module.fan_in_fan_out:
        return False
    name = module.active_adapters[0]
    base = module.base_layer
    return (type(base) is nn.Linear and not base.weight.requires_grad and name in module.lora_A
            and (base.bias is None or not base.bias.requires_grad)
            and isinstance(module.lora_dropout[name], nn.Identity) and not module.use_dora[name]
            and module.lora_B[name].bias is None and module.lora_A[name].bias is None)


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.merged or self.disable_adapters or args or kwargs:  # peft's own forward covers these (and adapter_names)
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    return MergedLoRA.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                            self.scaling[name])


def fuse(model: nn.Module) -> int:
    """Train every fusable LoRA module of `model` through `MergedLoRA`; returns how many."""
    fused = [m for m in model.modules() if fusable(m)]
    for m in fused:
        m.forward = types.MethodType(_fused_forward, m)
    return len(fused)
