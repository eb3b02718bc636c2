"""Bad input gets one clear error naming the culprit, and nothing half-written."""

import pytest
import torch
from torch import nn

from deepalign.core.chain import arch_of
from deepalign.errors import DeepAlignError
from deepalign.io import (
    atomic_path,
    fingerprint,
    load_checkpoint,
    load_current,
    save_checkpoint,
    save_current,
)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)

    def forward(self, x):
        return x + self.inner(x)


def save(path, obj):
    torch.save(obj, path)
    return path


def write_text(path, text):
    path.write_text(text)
    return path


def test_round_trip_keeps_arch_weights_and_meta(tmp_path, mlp):
    arch, ws = mlp
    path = tmp_path / "net.pt"
    save_checkpoint(path, arch, ws, {"seed": 3})
    ckpt = load_checkpoint(path)
    assert ckpt.arch == arch and ckpt.meta == {"seed": 3} and not ckpt.arch_inferred
    assert all(torch.equal(a, b) for a, b in zip(ckpt.ws.tensors(), ws.tensors(), strict=True))


def test_plain_state_dict_is_accepted(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    ckpt = load_checkpoint(save(tmp_path / "plain.pt", model.state_dict()))
    assert ckpt.arch_inferred and ckpt.arch.weight_shapes() == ((6, 4), (3, 6))


def test_a_layer_without_bias_is_a_chain_with_an_optional_bias(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3))
    ckpt = load_checkpoint(save(tmp_path / "plain.pt", model.state_dict()))
    assert set(ckpt.ws.named) == {"0.weight", "2.weight", "2.bias"}
    assert tuple(ckpt.arch.spec.acting("h0")) == (("0.weight", 0, 1, 0), ("2.weight", 1, 1, 0))
    x = torch.randn(5, 4)
    rebuilt = ckpt.arch.build()
    rebuilt.load_state_dict(ckpt.arch.state_dict(ckpt.ws))
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: write_text(p, "not a checkpoint"), "not a torch checkpoint"),
        (
            lambda p: save(
                p, {"0.weight": torch.full((3, 4), float("nan")), "0.bias": torch.zeros(3)}
            ),
            "tensor '0.weight' holds NaN or inf",
        ),
        (
            lambda p: save(p, nn.Sequential(nn.Linear(5, 5), Residual()).state_dict()),
            "'1.inner.weight' is not a plain nn.Sequential",
        ),
        (
            lambda p: save(p, nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)).state_dict()),
            "normalisation layer's, not a plain Sequential's: give the module with --model",
        ),
        (lambda p: save(p, [1, 2, 3]), "not a state_dict"),
    ],
    ids=["text", "nan", "residual", "batchnorm", "list"],
)
def test_bad_checkpoints_name_the_culprit(tmp_path, make, message):
    path = make(tmp_path / "bad.pt")
    with pytest.raises(DeepAlignError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_checkpoint_is_rejected(tmp_path, mlp):
    arch, ws = mlp
    good = tmp_path / "good.pt"
    save_checkpoint(good, arch, ws)
    bad = tmp_path / "cut.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DeepAlignError, match="cut.pt"):
        load_checkpoint(bad)


def test_unsupported_module_is_named():
    with pytest.raises(DeepAlignError, match="module 1 is Residual: unsupported"):
        arch_of(nn.Sequential(nn.Linear(5, 5), Residual()), (5,))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_follows_settings_and_code():
    from deepalign.zoo.build import TRAINING_CODE

    record = {"seed": 1}
    base = fingerprint(record, TRAINING_CODE)
    assert fingerprint({"seed": 1}, TRAINING_CODE) == base  # same settings, same code
    assert fingerprint({"seed": 2}, TRAINING_CODE) != base
    assert fingerprint(record, TRAINING_CODE[1:]) != base  # twin: the code counts


def test_a_result_is_reused_only_under_its_fingerprint(tmp_path):
    for name in ("run.pt", "marks.json"):
        path = tmp_path / name
        assert load_current(path, "a") is None  # missing
        save_current(path, {"marks": {"1": [2, 0.5]}}, "a")
        assert load_current(path, "a")["marks"] == {"1": [2, 0.5]}
        assert load_current(path, "b") is None  # other settings or code: redo
        path.write_bytes(path.read_bytes()[:10])
        assert load_current(path, "a") is None  # truncated: redo
