"""The models the benchmarks run, and the wide MLP generated for the large-model figures.

Torch is imported inside the factories only: ``bench/run.py`` reads the table
without loading any framework.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchModel:
    name: str
    framework: str  # torch | tensorflow | caffe: the converter retool picks
    #: What ``retool convert`` is given: a factory reference, or None when ``prepare`` writes a file.
    source: str | None = None
    #: bench/child.py task that writes the source file(s) into a directory and returns their paths.
    prepare: str | None = None
    convert_args: tuple[str, ...] = ()
    #: Held-out samples for the parity figures (fewer for the big model: it is slow on 2 cores).
    parity_samples: int = 64
    note: str = ""


MODELS: tuple[BenchModel, ...] = (
    BenchModel("torch-cnn", "torch", "fixtures.torch_models:cnn"),
    BenchModel("torch-transformer", "torch", "fixtures.torch_models:transformer"),
    BenchModel("keras-cnn", "tensorflow", prepare="prepare_keras"),
    BenchModel("caffe-net", "caffe", prepare="prepare_caffe"),
    BenchModel("torch-resnet18", "torch", "fixtures.torch_models:resnet18_like", parity_samples=16,
               note="ResNet-18 size, 11.7 M parameters, 224x224 input"),
)

#: The large model: 1024 -> WIDTH x DEPTH hidden (ReLU) -> 1000, fp32.
LARGE_WIDTH, LARGE_DEPTH = 8192, 8  # 553 M parameters, 2.21 GB: past the 2 GiB protobuf limit
QUICK_WIDTH, QUICK_DEPTH = 2048, 8  # 34 M parameters, 0.14 GB: checks the plumbing only
MLP_IN, MLP_OUT = 1024, 1000


def mlp_param_count(width: int, depth: int) -> int:
    return MLP_IN * width + width + depth * (width * width + width) + width * MLP_OUT + MLP_OUT


def _wide_mlp(width: int, depth: int, seed: int = 0):
    import torch
    from torch import nn

    class WideMLP(nn.Module):
        retool_inputs = [f"x:float32:batch,{MLP_IN}"]

        def __init__(self):
            super().__init__()
            dims = [MLP_IN] + [width] * (depth + 1)
            self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
            self.out = nn.Linear(width, MLP_OUT)

        def forward(self, x):
            for layer in self.hidden:
                x = torch.relu(layer(x))
            return self.out(x)

    torch.manual_seed(seed)
    # Build on the meta device, then fill each layer in place: no transient second copy of the weights.
    with torch.device("meta"):
        m = WideMLP()
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in list(m.hidden) + [m.out]:
            bound = 1.0 / lin.in_features ** 0.5
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
    return m.eval()


def wide_mlp():
    """The large model; ``RETOOL_BENCH_MLP=WIDTHxDEPTH`` picks another size (quick mode uses it)."""
    spec = os.environ.get("RETOOL_BENCH_MLP")
    width, depth = (int(v) for v in spec.lower().split("x")) if spec else (LARGE_WIDTH, LARGE_DEPTH)
    return _wide_mlp(width, depth)
