"""The Python API on the networks you hold: align, merge and interpolate.

    import deepalign
    aligned = deepalign.align(ref, other, method="weight_matching")   # other's function
    merged = deepalign.merge(ref, other, data="digits")               # the average, aligned
    report = deepalign.interpolate(ref, aligned, data="digits")       # barriers on the line
    from deepalign.api import train_aligner
    train_aligner(my_networks, "aligner.pt")                          # DEEP-ALIGN on yours
    learned = deepalign.align(ref, other, method="deep_align", aligner="aligner.pt")

A network is an `nn.Module` (any module torch.fx can trace: residual and normalisation layers
included; a plain `nn.Sequential` of Linear/Conv2d layers runs on the chain's faster path) or
the state_dict of a plain `nn.Sequential`; results come back in the form they were given.
Settings are the defaults shipped with the package; `params=` names a file whose keys are
merged over them (no other file is read).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from deepalign.core.arch import Arch, check_fits, check_same_arch
from deepalign.core.data import Dataset, load_dataset, reset_images_of
from deepalign.core.lmc import barriers
from deepalign.core.lmc import interpolate as interpolate_line
from deepalign.core.permspec import apply_permutation
from deepalign.core.weightspace import WeightSpace, check_same_shapes
from deepalign.errors import DeepAlignError
from deepalign.merging import merge_networks
from deepalign.methods import Problem
from deepalign.methods import align as align_pair
from deepalign.settings import bn_reset_images, data_cfg, load_settings, methods_for
from deepalign.usermodel import expand_paths, load_networks, network_arch

Data = str | Dataset | None
Net = nn.Module | Mapping[str, Tensor]
Aligner = str | Path | None


def _dataset(data: Data, params: Path | None) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    return load_dataset(data_cfg(load_settings(params), data))


def _state(network: Net) -> Mapping[str, Tensor]:
    return network.state_dict() if isinstance(network, nn.Module) else network


def _weights(arch: Arch, network: Net) -> WeightSpace:
    state = {k: v.detach() for k, v in _state(network).items() if v.is_floating_point()}
    return arch.weightspace(state).map(lambda t: t.float())


def _result(network: Net, arch: Arch, ws: WeightSpace) -> Net:
    """`ws` in the form and dtypes `network` came in: a copy of the module, or a state_dict
    (its integer buffers and module versions kept)."""
    own = _state(network)
    extras = {k: v for k, v in own.items() if not v.is_floating_point()}
    state = OrderedDict((k, v.to(own[k].dtype)) for k, v in arch.state_dict(ws, extras).items())
    if hasattr(own, "_metadata"):  # module versions, which `_load_from_state_dict` may check
        state._metadata = copy.deepcopy(own._metadata)  # type: ignore[attr-defined]
    if not isinstance(network, nn.Module):
        return state
    out = copy.deepcopy(network)
    out.load_state_dict(state)
    return out


def _archs(networks: tuple[Net, ...], shape, data: Dataset | None) -> Arch:
    """The networks' one architecture: each traced, and refused where any differs from the
    first (another graph, another activation, other shapes)."""
    names = ["ref", *(f"network {i}" for i in range(1, len(networks)))]
    if len(networks) == 2:
        names[1] = "other"
    archs = [network_arch(n, shape, data) for n in networks]
    for arch, name in zip(archs[1:], names[1:]):
        check_same_arch(archs[0], arch, (names[0], name))
    if data is not None:
        check_fits(archs[0], data.image_shape, data.n_classes, data.name)
    return archs[0]


def _nets(networks: tuple[Net, ...], shape, data: Dataset | None):
    arch = _archs(networks, shape, data)
    weights = [_weights(arch, n) for n in networks]
    for k, ws in enumerate(weights[1:], start=1):
        check_same_shapes(weights[0], ws, ("ref", f"network {k}"))
    return arch, weights


def align(
    ref: Net,
    other: Net,
    method: str = "weight_matching",
    data: Data = None,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
    aligner: Aligner = None,
) -> Net:
    """A copy of `other` whose hidden units are permuted to match `ref`'s; it computes
    `other`'s function. Data-driven methods need `data` (a data set name or a `Dataset`);
    learned ones (deep_align) an `aligner` checkpoint, a file or a folder of them."""
    cfg = methods_for(load_settings(params), method, aligner)
    dataset = _dataset(data, params)
    arch, (a, b) = _nets((ref, other), input_shape, dataset)
    problem = Problem.of(a, b, arch, dataset.train if dataset else None)
    result = align_pair(method, problem, cfg)
    return _result(other, arch, apply_permutation(b, result.perm, arch.spec))


def merge(
    *models: Net,
    method: str = "weight_matching",
    weights: list[float] | None = None,
    data: Data = None,
    repair: bool = False,
    reset_bn: bool = True,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
    aligner: Aligner = None,
) -> Net:
    """The weighted average of the models after aligning them (two: by `method`; more: by
    MergeMany); BatchNorm statistics recomputed on `data`'s training images, REPAIR on
    request; a learned `method` reads `aligner` (as in `align`)."""
    if len(models) < 2:
        raise DeepAlignError(f"merge needs at least 2 models, got {len(models)}")
    settings = load_settings(params)
    cfg = methods_for(settings, method, aligner)
    dataset = _dataset(data, params)
    arch, nets = _nets(models, input_shape, dataset)
    train = dataset.train if dataset else None
    images = bn_reset_images(settings) if reset_bn else 0
    result = merge_networks(arch, nets, method, cfg, weights, train, repair, images)
    return _result(models[0], arch, result)


def interpolate(
    ref: Net,
    other: Net,
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
        raise DeepAlignError("interpolate needs a data set: data='digits' or a Dataset")
    arch, (a, b) = _nets((ref, other), input_shape, dataset)
    count = bn_reset_images(load_settings(params)) if reset_bn else 0
    with torch.no_grad():
        curve = interpolate_line(
            arch, a, b, dataset.test, points, reset_images_of(dataset.train, count)
        )
    line = {
        "lambda": curve.lambdas.tolist(),
        "loss": curve.loss.tolist(),
        "acc": curve.acc.tolist(),
    }
    return barriers(curve) | line


def train_aligner(
    networks: Sequence[Net | str | Path] | str | Path,
    out: str | Path = "aligner.pt",
    data: Data = "digits",
    epochs: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    params: Path | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Train DEEP-ALIGN on your networks of one architecture and write it to `out`, for
    `align(..., method="deep_align", aligner=out)`. `networks`: modules or state_dicts, or
    checkpoint files, folders of them and glob patterns; `data`'s training images drive the
    interpolation loss. Settings: the `aligner` section (`params=`), `epochs` over it. An
    interrupted run resumes from `<out>.state.pt`. Returns the best validation numbers."""
    from deepalign.methods.deep_align.train import state_path
    from deepalign.user_aligner import aligner_cfg, train_user_aligner

    cfg = aligner_cfg(load_settings(params), epochs)
    dataset = _dataset(data, params)
    if dataset is None:
        raise DeepAlignError("train_aligner needs a data set: data='digits' or a Dataset")
    out = Path(out)
    arch, weights = _many(networks, input_shape, dataset, skip=(out, state_path(out)))
    return train_user_aligner(arch, weights, dataset, cfg, out, progress)


def _many(
    networks: Sequence[Net | str | Path] | str | Path,
    shape,
    data: Dataset,
    skip: tuple[Path, ...],
) -> tuple[Arch, list[WeightSpace]]:
    """Networks given as objects (traced) or as files, folders and globs (loaded, `skip`
    left out of folders and globs)."""
    entries = [networks] if isinstance(networks, str | Path) else list(networks)
    if entries and all(isinstance(e, str | Path) for e in entries):
        ckpts, arch = load_networks(expand_paths(entries, skip), data)
        return arch, [c.ws for c in ckpts]
    if any(isinstance(e, str | Path) for e in entries):
        raise DeepAlignError("give networks either as objects or as paths, not both")
    arch, weights = _nets(tuple(entries), shape, data)  # type: ignore[arg-type]
    return arch, weights
