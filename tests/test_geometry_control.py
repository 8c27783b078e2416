"""The geometry control target (support/geometry_control.py) against naive float64 references:
each row's permutation, the preserved mass profile, the loss and its gradients, masks, levels."""
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from support.geometry_control import (control_generator, control_level_losses,  # noqa: E402
                                      control_permutation, control_targets)


def naive_sigma(P, t, K):
    """The docstring's sigma_i, one row, in plain Python."""
    s = [int(P[k]) for k in range(K)]
    v = s.index(t)
    s[v], s[t] = s[t], t
    return s


def naive_q(z, C, tau):
    """Eq. 5 for l2 with explicit loops, float64."""
    d = [sum((float(z[j]) - float(c[j])) ** 2 for j in range(len(z))) for c in C]
    w = [math.exp(-(x - min(d)) / tau) for x in d]
    return [x / sum(w) for x in w]


@pytest.mark.parametrize("K", [1, 2, 7, 64])
def test_permutation_matches_the_definition_and_fixes_the_code(K):
    n = 40
    t = torch.randint(K, (n,), generator=torch.Generator().manual_seed(1))
    sigma = control_permutation(t, K, control_generator(5))
    P = torch.randperm(K, generator=control_generator(5))   # the same draw, replayed by hand
    for i in range(n):
        assert sigma[i].tolist() == naive_sigma(P, int(t[i]), K)
        assert sorted(sigma[i].tolist()) == list(range(K))      # a permutation
        assert int(sigma[i, t[i]]) == int(t[i])                 # the VQ code keeps its mass


def test_targets_keep_the_mass_profile_and_move_the_neighbors():
    N, K = 300, 512
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, K, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    t = q.argmax(-1)
    qt = control_targets(q, t, control_generator(3))
    assert torch.equal(qt, q.gather(1, control_permutation(t, K, control_generator(3))))
    assert torch.equal(qt.sort(-1).values, q.sort(-1).values)  # same values per row, exactly
    assert torch.equal(qt.gather(1, t[:, None]), q.gather(1, t[:, None]))
    H = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(H(qt), H(q), rtol=1e-12, atol=1e-12)
    # the second-largest mass lands on a code unrelated to q's second code
    second = q.topk(2, -1).indices[:, 1]
    assert (qt.topk(2, -1).indices[:, 1] == second).float().mean() < 0.05
    # ... and is spread over the codes: every row's receiving code drawn near-uniformly
    recv = qt.topk(2, -1).indices[:, 1]
    assert recv.unique().numel() > 0.4 * N


def test_draws_replay_from_the_seed_and_differ_between_seeds():
    t = torch.randint(100, (50,), generator=torch.Generator().manual_seed(2))
    a = control_permutation(t, 100, control_generator(11))
    assert torch.equal(a, control_permutation(t, 100, control_generator(11)))
    assert not torch.equal(a, control_permutation(t, 100, control_generator(12)))


def test_receiving_codes_are_uniform_over_draws():
    """For one row, the code that receives a fixed non-VQ code's mass is uniform over the K - 1
    other codes across seeds (chi-square, loose bound)."""
    K, draws = 16, 4000
    t = torch.tensor([3])
    counts = torch.zeros(K)
    for s in range(draws):
        sigma = control_permutation(t, K, control_generator(s))[0]
        counts[int((sigma == 7).nonzero())] += 1   # which code k gets q[7]
    assert counts[3] == 0
    others = torch.cat([counts[:3], counts[4:]])
    expected = draws / (K - 1)
    chi2 = float(((others - expected) ** 2 / expected).sum())
    assert chi2 < 45, chi2   # 14 degrees of freedom: P(chi2 > 45) ~ 4e-5


@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_gradients_match_a_naive_float64_reference(masked):
    torch.manual_seed(0)
    B, T, L, H, K, D = 2, 3, 2, 5, 9, 3
    hidden = torch.randn(B, T, L, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(K, H, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(K, dtype=torch.float64, requires_grad=True)
    books = torch.randn(L, K, D, dtype=torch.float64)
    lat = torch.randn(B, T, L, D, dtype=torch.float64)
    codes = torch.randint(K, (B, T, L))
    mask = torch.rand(B, T, L) < 0.6 if masked else None
    taus = [0.7, 0.3]
    sums = control_level_losses(hidden, weight, bias, lat, books, taus, codes, "l2", mask, control_generator(9))
    (sums * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()

    g = control_generator(9)
    want, gh = [], torch.zeros_like(hidden)
    gw, gb = torch.zeros_like(weight), torch.zeros_like(bias)
    hid, lt, cd = hidden.detach().reshape(-1, L, H), lat.reshape(-1, L, D), codes.reshape(-1, L)
    keep = torch.ones(B * T, L, dtype=torch.bool) if mask is None else mask.reshape(-1, L)
    ghf = gh.view(-1, L, H)
    for lvl in range(L):
        rows = keep[:, lvl].nonzero().flatten().tolist()
        P = torch.randperm(K, generator=g)
        total = 0.0
        for j, i in enumerate(rows):
            q = naive_q(lt[i, lvl], books[lvl], taus[lvl])
            s = naive_sigma(P, int(cd[i, lvl]), K)
            qt = [q[s[k]] for k in range(K)]
            logit = [float(hid[i, lvl] @ weight.detach()[k] + bias.detach()[k]) for k in range(K)]
            m = max(logit)
            lse = m + math.log(sum(math.exp(x - m) for x in logit))
            total += sum(qt[k] * (lse - logit[k]) for k in range(K))
            p = [math.exp(x - lse) for x in logit]
            dl = torch.tensor([p[k] - qt[k] for k in range(K)], dtype=torch.float64) * (lvl + 1)  # Eq. 11
            ghf[i, lvl] = dl @ weight.detach()
            gw += dl[:, None] * hid[i, lvl][None]
            gb += dl
        want.append(total)
    torch.testing.assert_close(sums.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hidden.grad, gh, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(weight.grad, gw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(bias.grad, gb, rtol=1e-9, atol=1e-10)
