"""torch.compile for our networks: the step networks compiled in place, eager again where torch cannot compile them.

A diffusion segmenter's forward is a whole reverse loop (``segmenter.py``); compiling it would unroll every step
into one graph. What runs once per step is a plain tensor function, the denoiser's forward: that is what gets
compiled (``network.compile_targets``, the names of those submodules). Compilation is in place (the module's
``forward`` is replaced): parameters, state_dict keys and checkpoints stay as they are, and DDP wraps the network as
before.

torch compiles on the first call. Where it cannot (an operator its backend has no code for, a graph it cannot
capture), the compiled forward raises a ``torch._dynamo`` / ``torch._inductor`` error; ``CompiledForward`` then says
why, once, and runs that module eagerly from then on: a training or a prediction never stops because of compile.
Any other error (out of memory), and input the eager forward rejects too (dynamo reports a bad shape as its own
error), is the model's and is raised as the eager forward raises it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException


class CompiledForward:
    """``module.forward`` compiled, falling back to the eager forward (for good) on a compile error."""

    def __init__(self, module: nn.Module, name: str, log: Callable[[str], None], backend="inductor"):
        self.eager = module.forward
        self.compiled: Optional[Callable] = torch.compile(self.eager, backend=backend)
        self.name, self.log = name, log

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except TorchDynamoException as error:
                # input the eager forward rejects too (dynamo reports it as its own error): the model's, raised here
                result = self.eager(*args, **kwargs)
                self.compiled = None
                cause = getattr(error, "inner_exception", None) or error  # a backend's own error, if it raised one
                first_line = (str(cause).strip().splitlines() or [""])[0]
                self.log(f"torch.compile cannot compile {self.name} ({type(error).__name__}, {type(cause).__name__}: "
                         f"{first_line}); it runs eagerly.")
                return result
        return self.eager(*args, **kwargs)


def compile_targets(network: nn.Module) -> dict:
    """{name: submodule} of what ``compile_step_networks`` compiles: the network's ``compile_targets`` (names of its
    step networks), or the whole network for one without a reverse loop (DSM's: one forward per window)."""
    names = getattr(network, "compile_targets", None)
    if names is None:
        return {"network": network}
    return {name: network.get_submodule(name) for name in names}


def compile_step_networks(network: nn.Module, log: Callable[[str], None] = print, backend="inductor") -> list:
    """Compile ``network``'s step networks in place (idempotent). -> the names compiled now or before."""
    targets = compile_targets(network)
    for name, module in targets.items():
        if not isinstance(module.__dict__.get("forward"), CompiledForward):
            module.forward = CompiledForward(module, name, log, backend)
    return list(targets)


def decompile_step_networks(network: nn.Module) -> None:
    """Undo ``compile_step_networks``: every step network runs its eager forward again."""
    for module in compile_targets(network).values():
        if isinstance(module.__dict__.get("forward"), CompiledForward):
            del module.forward  # the class's forward again


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module``'s forward goes through torch.compile (and has not fallen back to eager)."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, CompiledForward) and forward.compiled is not None
