"""The Python API on `nn.Module`s: align, merge and interpolate the networks you hold.

    import deepalign
    aligned = deepalign.align(ref, other, method="weight_matching")   # other's function
    merged = deepalign.merge(ref, other, data="digits")               # the average, aligned
    report = deepalign.interpolate(ref, aligned, data="digits")       # barriers on the line

Any module torch.fx can trace works (residual and normalisation layers included); a plain
`nn.Sequential` of Linear/Conv2d layers runs on the chain's faster path. Settings come from
the project's params.yaml where there is one, else from the defaults shipped with the package
(`params=` names another file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from deepalign.core.arch import Arch, ModuleArch, check_fits
from deepalign.core.chain import arch_of
from deepalign.core.data import Dataset, load_dataset
from deepalign.core.lmc import barriers
from deepalign.core.lmc import interpolate as interpolate_line
from deepalign.core.permspec import apply_permutation
from deepalign.core.weightspace import WeightSpace, check_same_shapes
from deepalign.errors import DeepAlignError
from deepalign.merging import merge_networks
from deepalign.methods import Problem
from deepalign.methods import align as align_pair
from deepalign.settings import bn_reset_images, data_cfg, methods_cfg, params_file
from deepalign.usermodel import input_shape_for

Data = str | Dataset | None


def _dataset(data: Data, params: Path | None) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    return load_dataset(data_cfg(params_file(params), data))


def network_arch(
    module: nn.Module, input_shape: tuple[int, ...] | None = None, data: Dataset | None = None
) -> Arch:
    """The architecture of `module`: a chain where it is a plain Sequential, else traced as
    it is. The input shape: given, else the data set's (flattened for a Linear first layer),
    else guessed from the first layer."""
    shape = input_shape_for(module, input_shape, data)
    try:
        return arch_of(module, shape)
    except DeepAlignError:
        return ModuleArch(copy.deepcopy(module).float().eval(), shape, type(module).__name__)


def _weights(arch: Arch, module: nn.Module) -> WeightSpace:
    state = {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}
    return arch.weightspace(state).map(lambda t: t.float())


def _module_with(module: nn.Module, arch: Arch, ws: WeightSpace) -> nn.Module:
    """A copy of `module` holding `ws` (its dtypes, its integer buffers)."""
    out = copy.deepcopy(module)
    own = out.state_dict()
    state = arch.state_dict(ws, {k: v for k, v in own.items() if not v.is_floating_point()})
    out.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return out


def _pair(ref: nn.Module, other: nn.Module, shape, data: Dataset | None):
    arch = network_arch(ref, shape, data)
    a, b = _weights(arch, ref), _weights(arch, other)
    check_same_shapes(a, b, ("ref", "other"))
    if data is not None:
        check_fits(arch, data.image_shape, data.n_classes, data.name)
    return arch, a, b


def align(
    ref: nn.Module,
    other: nn.Module,
    method: str = "weight_matching",
    data: Data = None,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
) -> nn.Module:
    """A copy of `other` whose hidden units are permuted to match `ref`'s; it computes
    `other`'s function. Data-driven methods need `data` (a data set name or a `Dataset`)."""
    dataset = _dataset(data, params)
    arch, a, b = _pair(ref, other, input_shape, dataset)
    problem = Problem.of(a, b, arch, dataset.train if dataset else None)
    result = align_pair(method, problem, methods_cfg(params_file(params)))
    return _module_with(other, arch, apply_permutation(b, result.perm, arch.spec))


def merge(
    *models: nn.Module,
    method: str = "weight_matching",
    weights: list[float] | None = None,
    data: Data = None,
    repair: bool = False,
    reset_bn: bool = True,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
) -> nn.Module:
    """The weighted average of the models after aligning them (two: by `method`; more: by
    MergeMany); BatchNorm statistics recomputed on `data`'s training images, REPAIR on
    request."""
    if len(models) < 2:
        raise DeepAlignError(f"merge needs at least 2 models, got {len(models)}")
    dataset = _dataset(data, params)
    arch = network_arch(models[0], input_shape, dataset)
    nets = [_weights(arch, m) for m in models]
    train = dataset.train if dataset else None
    cfg = methods_cfg(params_file(params))
    images = bn_reset_images(params_file(params)) if reset_bn else 0
    result = merge_networks(arch, nets, method, cfg, weights, train, repair, images)
    return _module_with(models[0], arch, result)


def interpolate(
    ref: nn.Module,
    other: nn.Module,
    data: Data = "digits",
    points: int = 25,
    reset_bn: bool = True,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
) -> dict[str, float | list[float]]:
    """Loss and accuracy on the test split along the straight line from `ref` to `other`:
    the barrier metrics and the curve itself (BatchNorm statistics recomputed for every point
    unless `reset_bn` is false)."""
    dataset = _dataset(data, params)
    if dataset is None:
        raise DeepAlignError("interpolate needs a data set")
    arch, a, b = _pair(ref, other, input_shape, dataset)
    count = bn_reset_images(params_file(params)) if reset_bn else 0
    reset = dataset.train.x[:count] if count else None
    with torch.no_grad():
        curve = interpolate_line(arch, a, b, dataset.test, points, reset)
    line = {
        "lambda": curve.lambdas.tolist(),
        "loss": curve.loss.tolist(),
        "acc": curve.acc.tolist(),
    }
    return barriers(curve) | line
