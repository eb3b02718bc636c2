"""The scaling study reuses the zoo recipe and the default zoo's val and test networks."""

import torch

from deepalign.core.data import DataCfg
from deepalign.core.weightspace import stack
from deepalign.evaluation.study import build_train_networks, study_zoo
from deepalign.zoo.build import ZooCfg, init_network, make_arch, train_batched
from deepalign.zoo.store import Zoo
from tests.configs import net_cfg

DIGITS = DataCfg("digits", "data", False, 0, 0.1, 0.2)
NET = net_cfg("mlp", hidden=[8, 8], n_train=3, n_val=1, n_test=1, epochs=2)


def test_study_networks_are_the_zoo_recipe_for_more_seeds(tmp_path, digits):
    cfg = ZooCfg(seed=5, chunk_size=2, device="cpu", archs={"mlp": NET})
    nets = build_train_networks(tmp_path / "mlp", NET, cfg, DIGITS, digits, 4)
    assert nets.batch_size == 4 and len(list((tmp_path / "mlp").glob("net-*.pt"))) == 4
    arch = make_arch(NET, digits)
    zoo_way = train_batched(
        arch,
        stack([init_network(arch, s) for s in (5, 6, 7)]),
        digits.train,
        NET,
        [5, 6, 7],
        torch.device("cpu"),
        progress=False,
    )
    for x, y in zip(nets[:3].tensors(), zoo_way.tensors()):  # network j trains from seed + j
        assert torch.allclose(x, y, atol=1e-5)
    again = build_train_networks(tmp_path / "mlp", NET, cfg, DIGITS, digits, 4)  # read back
    assert all(torch.equal(x, y) for x, y in zip(nets.tensors(), again.tensors()))

    records = [{"split": s} for s in ("train", "train", "val", "test", "test")]
    base = Zoo(arch, records, stack([init_network(arch, s) for s in range(100, 105)]))
    mixed = study_zoo(nets[:2], base)
    assert [r["split"] for r in mixed.records] == ["train", "train", "val", "test", "test"]
    assert torch.equal(mixed.nets.named["0.weight"][2:], base.nets.named["0.weight"][2:])
    assert torch.equal(mixed.nets.named["0.weight"][:2], nets.named["0.weight"][:2])
    assert not torch.equal(mixed.nets.named["0.weight"][:2], base.nets.named["0.weight"][:2])
