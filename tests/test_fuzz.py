"""Fuzzing the two things users hand us: params files and checkpoint records.

Whatever hypothesis generates (random types, values and nesting, in every section and every
record), loading ends in success or in one DeepAlignError of one bounded line: never another
exception, never a hang.
"""

import copy
import math
import os
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepalign.cli import app
from deepalign.config import parse_params, read_params
from deepalign.core.chain import cnn_arch, mlp_arch
from deepalign.errors import DeepAlignError
from deepalign.io import FORMAT, save_checkpoint
from deepalign.zoo.build import init_network
from flows.pipeline import check_params
from tests.helpers import ROOT, runner

PARAMS = read_params(ROOT / "params.yaml")
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "50")),  # more for a long hunt
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["relu", "naive", "weight_matching", "digits", "cpu", "mlp", "cnn"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def key_paths(tree, prefix=()):
    """Every key path of a nested mapping."""
    for key, value in tree.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from key_paths(value, (*prefix, key))


PATHS = list(key_paths(PARAMS))


def one_line_error(e: DeepAlignError) -> None:
    message = str(e)
    assert "\n" not in message and len(message) < 3000, message


@FUZZ
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PATHS), values, st.sampled_from(["set", "delete", "add"])),
        min_size=1,
        max_size=3,
    )
)
def test_edited_params_load_or_fail_in_one_line(edits):
    tree = copy.deepcopy(PARAMS)
    for path, value, how in edits:
        node = tree
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if how == "set":
            node[path[-1]] = value
        elif how == "delete":
            node.pop(path[-1], None)
        else:
            node[f"{path[-1]}_x"] = value
    try:
        check_params(parse_params(yaml.safe_dump(tree)), Path("fuzzed.yaml"))
    except DeepAlignError as e:
        one_line_error(e)


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_parses_or_fails_in_one_line(text):
    try:
        check_params(parse_params(text), Path("fuzzed.yaml"))
    except DeepAlignError as e:
        one_line_error(e)


@FUZZ
@given(
    prefix=st.sampled_from(["", "zoo:\n  archs:\n    ", "a: &a ", "b: "]),
    body=st.text(alphabet="[]{}:,&*!<>-? \n'\"|abc01.", max_size=200),
)
def test_yaml_punctuation_parses_or_fails_in_one_line(prefix, body):
    try:
        check_params(parse_params(prefix + body), Path("fuzzed.yaml"))
    except DeepAlignError as e:
        one_line_error(e)


# --- checkpoint records -------------------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
]
tensors = st.builds(
    lambda dtype, shape, fill: torch.full(shape, fill).to(dtype),
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 5), max_size=5).map(tuple),
    st.sampled_from([0.0, 1.0, -2.5, math.inf, math.nan]),
)
record_values = st.one_of(values, tensors)
keys = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["0.weight", "0.bias", "2.weight", "2.bias", "1.running_mean"]),
    st.integers(-3, 3),
    st.tuples(st.text(max_size=3), st.integers(0, 3)),
)


def real_blob(kind: str) -> dict:
    arch = (
        mlp_arch(64, [6], 10, "relu")
        if kind == "mlp"
        else cnn_arch((1, 8, 8), [3], [2], 10, "tanh")
    )
    path = Path("/tmp") / f"fuzz-{kind}.pt"
    save_checkpoint(path, arch, init_network(arch, 0))
    return torch.load(path, weights_only=True)


BLOBS = {kind: real_blob(kind) for kind in ("mlp", "cnn")}
FIELDS = ["kind", "in_dim", "out_dim", "kernel", "stride", "padding", "extra"]


@st.composite
def checkpoints(draw):
    blob = copy.deepcopy(BLOBS[draw(st.sampled_from(["mlp", "cnn"]))])
    for _ in range(draw(st.integers(1, 4))):
        part = draw(st.sampled_from(["module", "shape", "state", "meta", "format", "drop"]))
        modules = blob.get("arch", {}).get("modules", [])
        if part == "module" and modules:
            i = draw(st.integers(0, len(modules) - 1))
            modules[i][draw(st.sampled_from(FIELDS))] = draw(values)
        elif part == "shape" and "arch" in blob:
            blob["arch"]["input_shape"] = draw(values)
        elif part == "state" and "state_dict" in blob:
            blob["state_dict"][draw(keys)] = draw(record_values)
        elif part == "meta":
            blob["meta"] = draw(values)
        elif part == "format":
            blob["format"] = draw(st.sampled_from([FORMAT, "deepalign/0", None]))
        else:
            blob.pop(draw(st.sampled_from(["arch", "state_dict", "meta"])), None)
    bare = draw(st.booleans())
    return blob["state_dict"] if bare and "state_dict" in blob else blob


@FUZZ
@given(blob=checkpoints())
def test_any_checkpoint_record_loads_or_fails_in_one_line(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "net.pt"
    torch.save(blob, path)
    result = runner.invoke(app, ["info", str(path)], terminal_width=200)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    if result.exit_code != 0:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), (
            result.output
        )
