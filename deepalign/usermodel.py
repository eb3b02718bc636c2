"""From a user's network to its architecture: the one path the command line, the Python API and
the stages take. A network is an `nn.Module`, a callable that builds one with no arguments, a
reference to such a callable (`pkg.module:callable` or `path/to/file.py:callable`), or the
state_dict of a plain `nn.Sequential` (its architecture read from the shapes)."""

from __future__ import annotations

import copy
import glob
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import Tensor, nn

from deepalign.core.arch import Arch, ModuleArch, check_fits, check_same_arch
from deepalign.core.chain import Chain, arch_of, infer_arch, resolve_input
from deepalign.core.data import Dataset
from deepalign.core.weightspace import check_same_shapes
from deepalign.errors import DeepAlignError, UsageError
from deepalign.io import Checkpoint, load_checkpoint

FALLBACK_SIDE = 32  # image side used to trace a conv network when no data set says it
GIVE_SHAPE = "give the input shape (--input-shape 1,8,8 for the CLI, input_shape= in Python)"
Network = nn.Module | Callable[[], nn.Module] | str | Mapping[str, Tensor]


def is_reference(text: str) -> bool:
    """Whether a --model value names a callable (`x:y`) rather than a checkpoint file."""
    head, sep, tail = text.rpartition(":")
    return bool(sep and head and tail.isidentifier())


def _cwd_on_path() -> None:
    """`--model mynets:build` finds mynets.py in the current folder, as `python -c` would."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def reference_source(text: str) -> Path | None:
    """The source file a reference reads (for the input guard): `file.py`, or the file the
    dotted module is found in (its parent packages imported, the module itself not)."""
    head = text.rpartition(":")[0]
    if head.endswith(".py"):
        return Path(head)
    _cwd_on_path()
    try:
        spec = importlib.util.find_spec(head)
    except Exception:  # a parent package that fails to import: reported when it is built
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") else None


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise DeepAlignError(f"{path}: no such Python file for --model")
    spec = importlib.util.spec_from_file_location(f"_deepalign_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise DeepAlignError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _import(head: str) -> object:
    """The module `head` names (a .py file, or a dotted name found from the current folder
    too); its own errors (a syntax error, a failed import) as one line naming it."""
    try:
        if head.endswith(".py"):
            return _import_file(Path(head))
        _cwd_on_path()
        return importlib.import_module(head)
    except DeepAlignError:
        raise
    except SyntaxError as e:
        raise DeepAlignError(f"--model: {head}: syntax error at line {e.lineno} ({e.msg})") from e
    except Exception as e:  # the user's code runs on import
        raise DeepAlignError(f"--model: cannot import '{head}' ({type(e).__name__}: {e})") from e


def build_module(text: str) -> nn.Module:
    """Import `text`'s module and call its callable with no arguments."""
    if not is_reference(text):
        raise UsageError(f"--model: '{text}' is neither a checkpoint nor pkg.module:callable")
    head, _, name = text.rpartition(":")
    factory = getattr(_import(head), name, None)
    if not callable(factory):
        raise DeepAlignError(f"--model: '{head}' has no callable '{name}'")
    try:
        return _called(factory, text)
    except DeepAlignError as e:
        raise DeepAlignError(f"--model: {e}") from e


def _called(factory: Callable[[], object], name: str) -> nn.Module:
    try:
        module = factory()
    except Exception as e:  # the user's code
        raise DeepAlignError(f"{name}() failed ({type(e).__name__}: {e})") from e
    if not isinstance(module, nn.Module):
        raise DeepAlignError(f"{name}() returned {type(module).__name__}, not a module")
    return module


def guess_input_shape(module: nn.Module) -> tuple[int, ...]:
    """One example's shape from the first layer: (C, 32, 32) for a conv, (features,) for a
    Linear. Only the tracing needs it; `--input-shape` or `--data` say it exactly."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            return (layer.in_channels, *[FALLBACK_SIDE] * (layer.weight.ndim - 2))
        if isinstance(layer, nn.Linear):
            return (layer.in_features,)
    raise DeepAlignError(f"{type(module).__name__}: no Linear or Conv layer; {GIVE_SHAPE}")


def input_shape_for(
    module: nn.Module, given: tuple[int, ...] | None, data: Dataset | None
) -> tuple[tuple[int, ...], bool]:
    """One example's shape, and whether it was guessed: given, else the data set's (flattened
    for a Linear first layer), else guessed from the first layer."""
    if given:
        return tuple(given), False
    guess = guess_input_shape(module)
    if data is None:
        return guess, True
    images = tuple(data.image_shape)
    return ((math.prod(images),) if len(guess) == 1 else images), False


def state_arch(
    state: Mapping[str, Tensor], input_shape: tuple[int, ...] | None, data: Dataset | None
) -> Chain:
    """The architecture of a plain `nn.Sequential`'s state_dict, completed for the images of
    `input_shape` or of `data` where it has convolutions."""
    arch = infer_arch(dict(state))
    images = tuple(input_shape) if input_shape else data.image_shape if data else None
    return resolve_input(arch, images) if images and len(images) == 3 else arch


def module_arch(
    module: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    data: Dataset | None = None,
    name: str | None = None,
) -> Arch:
    """The architecture of `module`: a chain where it is a plain Sequential, else traced as it
    is (residual and normalisation layers included); its spec traced here, so a refusal after
    a guessed input shape says so."""
    shape, guessed = input_shape_for(module, input_shape, data)
    try:
        arch: Arch = arch_of(module, shape)
    except DeepAlignError:
        copied = copy.deepcopy(module).float().eval()
        arch = ModuleArch(copied, shape, name or type(module).__name__)
    try:
        arch.spec  # noqa: B018  (traced once, here, where the input shape is known)
    except DeepAlignError as e:
        if not guessed:
            raise
        shown_shape = "x".join(map(str, shape))
        raise DeepAlignError(
            f"{e} (input shape {shown_shape} was guessed from the first layer; {GIVE_SHAPE})"
        ) from e
    return arch


def network_arch(
    network: Network,
    input_shape: tuple[int, ...] | None = None,
    data: Dataset | None = None,
    name: str | None = None,
) -> Arch:
    """The architecture of any network the library takes (see the module docstring)."""
    if isinstance(network, str):
        return module_arch(build_module(network), input_shape, data, name or network)
    if isinstance(network, Mapping):
        return state_arch(network, input_shape, data)
    if not isinstance(network, nn.Module) and callable(network):
        label = name or getattr(network, "__name__", "the callable")
        return module_arch(_called(network, label), input_shape, data, name)
    if not isinstance(network, nn.Module):
        kind = type(network).__name__
        raise DeepAlignError(f"expected an nn.Module, a callable or a state_dict, got {kind}")
    return module_arch(network, input_shape, data, name)


def expand_paths(entries: list[str | Path], skip: tuple[Path, ...] = ()) -> list[Path]:
    """Checkpoint files from files, folders (their `*.pt` files, sorted; training states
    `*.state.pt` and the files `skip`, a command's outputs, left out) and glob patterns
    (matches sorted, the same left out); an entry naming nothing is one line."""
    left_out = {p.resolve() for p in skip}
    found: list[Path] = []
    for entry in map(Path, entries):
        if entry.is_dir():
            files = sorted(p for p in entry.glob("*.pt") if not p.name.endswith(".state.pt"))
        elif entry.exists() or not glob.has_magic(str(entry)):
            files = [entry]
        else:
            files = sorted(Path(p) for p in glob.glob(str(entry)))
        if files != [entry]:  # a folder or a glob
            files = [p for p in files if p.resolve() not in left_out]
        if not files:
            raise DeepAlignError(f"{entry}: no checkpoint files (*.pt) found")
        found += files
    return found


def load_alike(paths: list[Path], given: Arch | None) -> list[Checkpoint]:
    """Every network; a bare state_dict takes the architecture another one records."""
    nets = [load_checkpoint(p, given) for p in paths]
    known = next((n.arch for n in nets if not n.arch_inferred), None)
    if given is None and known is not None:
        nets = [load_checkpoint(p, known) if n.arch_inferred else n for p, n in zip(paths, nets)]
    return nets


def load_networks(
    paths: list[Path], data: Dataset | None = None, given: Arch | None = None
) -> tuple[list[Checkpoint], Arch]:
    """Networks checked alike (tensors and the whole architecture record); with data, an
    inferred architecture is completed and every network checked against the data set."""
    nets = load_alike(paths, given)
    for path, net in zip(paths[1:], nets[1:]):
        check_same_shapes(nets[0].ws, net.ws, (str(paths[0]), str(path)))
        check_same_arch(nets[0].arch, net.arch, (str(paths[0]), str(path)))
    arch = nets[0].arch
    if data is None:
        return nets, arch
    try:
        if nets[0].arch_inferred and isinstance(arch, Chain):
            arch = resolve_input(arch, data.image_shape)
        check_fits(arch, data.image_shape, data.n_classes, data.name)
    except DeepAlignError as e:
        raise DeepAlignError(f"{paths[0]}: {e}") from e
    return nets, arch
