"""bitsandbytes optimizers for the Trainer's `optim` names (adamw_8bit, paged_adamw_32bit, lion_8bit, rmsprop_bnb,
ademamix, ...), built with the reference's arguments: the bit width and paging come from the name, Adam-style betas
and eps from the TrainingArguments, the rest from optim_args. bitsandbytes runs these on the CPU as well (paged
variants fall back to unpaged memory there, with bitsandbytes' own warning)."""
from __future__ import annotations

import torch
from torch import nn

from loom.training.optim_options import check_optim_options, is_true


def build_bnb_optimizer(name: str, groups: list[dict], args, options: dict[str, str],
                        model: nn.Module) -> torch.optim.Optimizer:
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise ImportError(f"optim={name!r} needs the bitsandbytes package: pip install bitsandbytes") from None
    bits = 8 if "8bit" in name else 32
    kwargs: dict = {"lr": args.learning_rate, "optim_bits": bits}
    if "rmsprop" in name:
        cls = bnb_optim.RMSprop
        check_optim_options(options, ("alpha", "eps", "momentum", "weight_decay", "centered"), name)
        kwargs.update({k: float(v) for k, v in options.items() if k != "centered"})
        if "centered" in options:
            kwargs["centered"] = is_true(options["centered"])
    else:
        kwargs["is_paged"] = name.startswith("paged_")
        if "ademamix" in name:
            cls = bnb_optim.AdEMAMix
            check_optim_options(options, ("beta1", "beta2", "beta3", "alpha", "eps", "t_alpha", "t_beta3"), name)
            kwargs.update(betas=(float(options.get("beta1", args.adam_beta1)),
                                 float(options.get("beta2", args.adam_beta2)), float(options.get("beta3", 0.9999))),
                          alpha=float(options.get("alpha", 5.0)), eps=float(options.get("eps", args.adam_epsilon)))
            kwargs.update({k: int(options[k]) for k in ("t_alpha", "t_beta3") if k in options})
        else:
            check_optim_options(options, (), name)
            kwargs["betas"] = (args.adam_beta1, args.adam_beta2)
            if "lion" in name:
                cls = bnb_optim.Lion
            else:
                cls, kwargs["eps"] = bnb_optim.AdamW, args.adam_epsilon
    optimizer = cls(groups, **kwargs)
    if bits == 8:
        # embeddings keep 32-bit optimizer state (8-bit state is unstable for them), as the reference does
        manager = bnb_optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
