"""Zoo training: batched equals one-by-one, seeds reproduce, reruns resume."""

import dataclasses

import numpy as np
import pytest
import torch

from deepalign.core.data import DataCfg, Split, load_dataset
from deepalign.core.lmc import evaluate_networks
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.zoo.build import (
    init_network,
    is_done,
    make_arch,
    manifest_digest,
    network_fingerprint,
    plan,
    train_batched,
    train_chunk,
    train_one,
    write_manifest,
)
from tests.configs import net_cfg

CPU = torch.device("cpu")


def small_net(kind="mlp", epochs=2, n=(3, 1, 1)):
    counts = dict(zip(("n_train", "n_val", "n_test"), n))
    return net_cfg(kind, **counts, epochs=epochs, batch_size=32)  # mlp 8-8, cnn 4-4 strides 1-2


def subset(split: Split, n: int) -> Split:
    return Split(split.x[:n], split.y[:n])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_batched_training_matches_one_by_one(digits, kind, optimizer):
    net = small_net(kind)
    if optimizer == "sgd":
        net = dataclasses.replace(net, optimizer="sgd", momentum=0.9, lr=0.05)
    arch, data = make_arch(net, digits), subset(digits.train, 200)
    seeds = [5, 6, 7]
    start = [init_network(arch, s) for s in seeds]
    batched = train_batched(arch, stack(start), data, net, seeds, CPU, progress=False)
    for b, seed in enumerate(seeds):
        alone = train_one(arch, start[b], data, net, seed)
        for x, y in zip(batched[b].tensors(), alone.tensors(), strict=True):
            assert torch.allclose(x, y, atol=1e-4)
    moved = max((x - y).abs().max() for x, y in zip(batched[0].tensors(), start[0].tensors()))
    assert moved > 1e-2  # training did something


def test_same_seeds_give_the_same_networks(digits):
    net = small_net()
    arch, data = make_arch(net, digits), subset(digits.train, 200)
    runs = [
        train_batched(
            arch,
            stack([init_network(arch, s) for s in (1, 2)]),
            data,
            net,
            [1, 2],
            CPU,
            progress=False,
        )
        for _ in range(2)
    ]
    assert all(torch.equal(x, y) for x, y in zip(runs[0].tensors(), runs[1].tensors()))
    other = init_network(arch, 3)
    assert not torch.equal(other.named["0.weight"], init_network(arch, 1).named["0.weight"])


def test_sgd_with_momentum_trains_as_torchs_own_sgd(digits):
    """The batched zoo trainer under SGD with momentum ends where `torch.optim.SGD` on each
    network's own module does (`train_one`); twin: without momentum it ends elsewhere."""
    sgd = dataclasses.replace(small_net(), optimizer="sgd", momentum=0.9, lr=0.05)
    arch, data = make_arch(sgd, digits), subset(digits.train, 200)
    start = stack([init_network(arch, s) for s in (1, 2)])
    batched = train_batched(arch, start, data, sgd, [1, 2], CPU, progress=False)
    for b, seed in enumerate((1, 2)):
        one = train_one(arch, start[b], data, sgd, seed)
        torch.testing.assert_close(batched[b].flatten(), one.flatten(), atol=1e-4, rtol=1e-4)
    plain = dataclasses.replace(sgd, momentum=0.0)
    other = train_batched(arch, start, data, plain, [1, 2], CPU, progress=False)
    assert not torch.allclose(other.flatten(), batched.flatten(), atol=1e-3)


def test_trained_networks_learn_digits(digits):
    net = small_net(epochs=15)
    arch = make_arch(net, digits)
    trained = train_batched(
        arch,
        stack([init_network(arch, s) for s in (0, 1)]),
        digits.train,
        net,
        [0, 1],
        CPU,
        progress=False,
    )
    _, acc = evaluate_networks(arch, trained, digits.test)
    assert acc.min() > 0.85


def test_rerun_trains_only_missing_networks(tmp_path, digits):
    net = small_net(epochs=1)
    arch, jobs = make_arch(net, digits), plan(tmp_path, net, seed=10)
    cfg = DataCfg("digits", "data", False, 0, 0.1, 0.2)
    fps = {j.index: network_fingerprint(arch, net, cfg, j.seed) for j in jobs}
    records = train_chunk(arch, jobs, digits, net, fps, CPU, progress=False)
    assert [r["split"] for r in records] == ["train", "train", "train", "val", "test"]
    assert all(is_done(j, fps[j.index]) for j in jobs)
    jobs[2].path.unlink()
    jobs[3].path.write_bytes(b"interrupted")
    assert [j.index for j in jobs if not is_done(j, fps[j.index])] == [2, 3]
    changed = network_fingerprint(arch, small_net(epochs=2), cfg, jobs[0].seed)
    assert not is_done(jobs[0], changed)  # other settings -> retrain

    manifest = write_manifest(tmp_path, "mlp", arch, records)
    digest = manifest_digest(manifest)
    assert not [k for r in records for k in r if "seconds" in k]  # no timings: same bytes
    assert manifest_digest(write_manifest(tmp_path, "mlp", arch, records)) == digest
    records[1]["test_acc"] += 1e-6  # other weights: twin
    assert manifest_digest(write_manifest(tmp_path, "mlp", arch, records)) != digest


def test_digits_split_is_fixed_and_disjoint():
    cfg = DataCfg("digits", "data", False, 0, 0.1, 0.2)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert torch.equal(a.test.x, b.test.x)
    assert len(a.train.y) + len(a.val.y) + len(a.test.y) == 1797
    other = load_dataset(DataCfg("digits", "data", False, 1, 0.1, 0.2))
    assert not torch.equal(a.test.y, other.test.y)


def test_digits_read_from_the_file_are_scikit_learns(monkeypatch):
    from sklearn.datasets import load_digits

    import deepalign.core.data as data_module

    bunch = load_digits()
    images, labels = data_module.digits_arrays()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    monkeypatch.setattr(data_module.importlib.util, "find_spec", lambda name: None)
    images, labels = data_module.digits_arrays()  # no file found: through load_digits
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)


def test_missing_torchvision_folder_is_named(tmp_path):
    cfg = DataCfg("mnist", str(tmp_path / "nowhere"), False, 0, 0.1, 0.0)
    with pytest.raises(DeepAlignError, match="nowhere.*missing.*download: true"):
        load_dataset(cfg)


def test_unknown_dataset_lists_known():
    with pytest.raises(DeepAlignError, match="known: digits, mnist"):
        load_dataset(DataCfg("svhn", "data", False, 0, 0.1, 0.2))
