"""The encoder over the permutation spec: permuting any group's units of a network permutes
that group's features and nothing else, on an MLP, a CNN, a ResNet with BatchNorm, a residual
MLP with LayerNorm and a SIREN; an encoder that pools asymmetrically fails the same check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from deepalign.core.permspec import apply_permutation, random_permutation
from deepalign.core.weightspace import stack
from deepalign.errors import DeepAlignError
from deepalign.methods.deep_align import spec as spec_encoder
from deepalign.methods.deep_align.spec import SpecEncoder, canonical, roles_of
from deepalign.usermodel import network_arch


class ResNetBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 8, 8) -> (N, 10)
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(h + self.bn2(self.c2(torch.relu(self.bn1(self.c1(h))))))
        return self.head(h.mean((2, 3)))


class ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(64, 8), nn.LayerNorm(8)
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)
        self.out_norm, self.head = nn.LayerNorm(8), nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:  # (N, 64) -> (N, 10)
        h = self.inp(x)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(self.out_norm(h))


class Siren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 10), nn.Linear(10, 10), nn.Linear(10, 1)

    def forward(self, x: Tensor) -> Tensor:  # (N, 2) coordinates -> (N, 1)
        return self.c(torch.sin(30.0 * self.b(torch.sin(30.0 * self.a(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 10)
    )


def cnn() -> nn.Module:
    convs = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=1)]
    return nn.Sequential(*convs, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


NETWORKS = {  # name -> (builder, input shape)
    "mlp": (mlp, (64,)),
    "cnn": (cnn, (1, 8, 8)),
    "resnet_bn": (ResNetBN, (1, 8, 8)),
    "resmlp_ln": (ResMLP, (64,)),
    "siren": (Siren, (2,)),
}


def batch_of(name: str, seeds=(0, 1)):
    """The architecture and a batch of randomly initialised networks, BatchNorm statistics
    randomised too (so that they are features worth permuting)."""
    build, shape = NETWORKS[name]
    nets = []
    for s in seeds:
        torch.manual_seed(s)
        net = build()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        nets.append(net)
    arch = network_arch(nets[0], shape)
    states = [{k: v for k, v in n.state_dict().items() if v.is_floating_point()} for n in nets]
    return arch, stack([arch.weightspace(s) for s in states])


def encoder_for(arch, ws) -> SpecEncoder:
    torch.manual_seed(0)
    shapes = {k: tuple(t.shape[1:]) for k, t in ws.named.items()}
    return SpecEncoder(arch.spec, shapes, dim=8, rounds=2)


def moves_with_its_units(name: str, seed: int) -> bool:
    """Whether every group's features of the permuted networks are the original features of
    the units each position now holds."""
    arch, ws = batch_of(name)
    encoder = encoder_for(arch, ws)
    perm = random_permutation(arch.spec, torch.Generator().manual_seed(seed), batch=2)
    with torch.no_grad():
        before, after = encoder(ws), encoder(apply_permutation(ws, perm, arch.spec))
    return all(
        torch.allclose(b, torch.gather(f, 1, perm[g].unsqueeze(-1).expand_as(f)), atol=1e-5)
        for g, f, b in zip(arch.spec.groups, before, after)
    )


@pytest.mark.parametrize("name", list(NETWORKS))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_features_move_with_the_units_of_every_group(name, seed):
    assert moves_with_its_units(name, seed)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_an_asymmetric_pooling_breaks_it(monkeypatch, name):
    """The twin: pool by the first unit instead of the mean and the check fails."""
    monkeypatch.setattr(spec_encoder, "_pool", lambda x, dim: x.select(dim, 0))
    assert not moves_with_its_units(name, seed=1)


def test_the_features_see_the_weights():
    """Another network gives other features (the encoder is not blind to its input)."""
    arch, ws = batch_of("resnet_bn")
    _, other = batch_of("resnet_bn", seeds=(2, 3))
    encoder = encoder_for(arch, ws)
    with torch.no_grad():
        assert not any(torch.allclose(a, b) for a, b in zip(encoder(ws), encoder(other)))


def test_roles_follow_the_spec():
    """A conv weight is an edge set with its kernel as features; the Linear after Flatten
    reads each channel's 16 positions as features of the edge; biases are unit features; the
    output bias belongs to the whole network."""
    arch, ws = batch_of("cnn")
    shapes = {k: tuple(t.shape[1:]) for k, t in ws.named.items()}
    roles = {r.key: r for r in roles_of(arch.spec, shapes)}
    g0, g1 = arch.spec.groups
    assert (roles["2.weight"].groups, roles["2.weight"].features) == ((g1, g0), 9)
    assert (roles["5.weight"].groups, roles["5.weight"].blocks) == ((g1,), (16,))
    assert roles["5.weight"].features == 10 * 16
    assert roles["0.bias"].groups == (g0,) and roles["5.bias"].groups == ()
    x = canonical(ws.named["5.weight"], roles["5.weight"], dict(arch.spec.sizes))
    assert x.shape == (2, 6, 160)
    # unit c's features are the 16 positions of channel c in every output's row
    want = ws.named["5.weight"][0].reshape(10, 6, 16)[:, 3].flatten()
    assert torch.equal(x[0, 3], want)


def test_a_concatenation_is_refused_naming_the_tensor():
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(64, 4), nn.Linear(64, 5), nn.Linear(9, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1))

    arch = network_arch(Cat(), (64,))
    shapes = {k: tuple(t.shape) for k, t in Cat().state_dict().items()}
    with pytest.raises(DeepAlignError, match="'head.weight' axis 1 holds runs of"):
        roles_of(arch.spec, shapes)
