import pytest
import torch

from dcc.ir import hadamard as had
from dcc.ir.hadamard import (hadamard_construction, hadamard_matrix, is_constructible, orthogonal_hadamard,
                             random_hadamard, random_orthogonal, rotation_matrix)

SIZES = [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 64, 108, 128, 576, 1536, 3072, 5120]


def _assert_hadamard(H: torch.Tensor, n: int) -> None:
    assert H.shape == (n, n)
    assert bool(((H == 1) | (H == -1)).all())
    # Exact integer check done in float32 for speed: every product is +-1 and every partial sum an integer of magnitude
    # <= n < 2**24, so each float32 operation is exact whatever the summation order.
    Hf = H.to(torch.float32)
    assert torch.equal(Hf @ Hf.T, n * torch.eye(n, dtype=torch.float32))


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_matrix_exact(n):
    assert is_constructible(n)
    H = hadamard_matrix(n)
    assert H.dtype == torch.float64
    _assert_hadamard(H, n)


def test_model_sizes_use_small_core_times_sylvester():
    assert hadamard_construction(576) == "paley2(17) x sylvester(16)"
    assert hadamard_construction(1536) == "paley1(11) x sylvester(128)"
    assert hadamard_construction(3072) == "paley1(11) x sylvester(256)"
    assert hadamard_construction(5120) == "paley1(19) x sylvester(256)"
    assert hadamard_construction(4096) == "sylvester(4096)"


@pytest.mark.parametrize("kind,q", [("paley1", 3), ("paley1", 7), ("paley1", 27), ("paley1", 243), ("paley1", 343),
                                    ("paley2", 5), ("paley2", 9), ("paley2", 25), ("paley2", 49), ("paley2", 81),
                                    ("paley2", 125)])
def test_paley_over_prime_and_prime_power_fields(kind, q):
    H = torch.from_numpy(getattr(had, f"_{kind}")(q).astype("float64"))
    _assert_hadamard(H, q + 1 if kind == "paley1" else 2 * (q + 1))


def test_jacobsthal_symmetry():
    for q, sym in [(13, 1), (25, 1), (11, -1), (27, -1)]:
        Q = torch.from_numpy(had._jacobsthal(q).astype("int64"))
        assert torch.equal(Q.T, sym * Q)
        assert torch.equal(Q.sum(1), torch.zeros(q, dtype=torch.int64))
        assert torch.equal(Q @ Q.T, q * torch.eye(q, dtype=torch.int64) - torch.ones(q, q, dtype=torch.int64))


def test_product_of_paley_orders():
    # 1904 = 2^4 * 7 * 17: no core * 2^t with a single Paley core (1903 = 11 * 173, 951 = 3 * 317, 475, 237 not prime
    # powers), but 28 * 68 = Paley I(27) (x) Paley I(67) works; 27 also exercises GF(3^3).
    assert hadamard_construction(1904) == "paley1(27) x paley1(67)"
    _assert_hadamard(hadamard_matrix(1904), 1904)


@pytest.mark.parametrize("n", [12, 20, 36, 576])
def test_orthogonal_hadamard(n):
    R = orthogonal_hadamard(n)
    assert R.dtype == torch.float64
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(R.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-15, rtol=0)
    assert orthogonal_hadamard(n, dtype=torch.float32).dtype == torch.float32


def test_random_hadamard_deterministic_and_seeded():
    n = 576
    a, b, c = random_hadamard(n, seed=0), random_hadamard(n, seed=0), random_hadamard(n, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # columns of the Hadamard matrix with random signs
    signs = (a * orthogonal_hadamard(n)).sum(0)  # a = R diag(s) with R orthogonal -> column sums of a * R are s
    assert torch.allclose(signs.abs(), torch.ones(n, dtype=torch.float64), atol=1e-12, rtol=0)


def test_random_orthogonal():
    a, b, c = random_orthogonal(172, 3), random_orthogonal(172, 3), random_orthogonal(172, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(172, dtype=torch.float64), atol=1e-12, rtol=0)
    assert random_orthogonal(6, 0, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", [3, 6, 10, 92, 172, 0])
def test_not_constructible_raises_naming_n(n):
    assert not is_constructible(n)
    with pytest.raises(ValueError, match=rf"size {n}\b"):
        hadamard_matrix(n)


def test_rotation_matrix_kinds():
    n = 20
    H = rotation_matrix(n)
    assert torch.equal(H, orthogonal_hadamard(n))
    assert torch.equal(rotation_matrix(n, "random_hadamard", seed=5), random_hadamard(n, 5))
    assert torch.equal(rotation_matrix(n, "random", seed=5), random_orthogonal(n, 5))
    for kind in ("hadamard", "random_hadamard"):
        with pytest.raises(ValueError, match=r"\b172\b.*kind='random'"):
            rotation_matrix(172, kind)
    R = rotation_matrix(172, "random", seed=0)
    assert torch.allclose(R @ R.T, torch.eye(172, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="unknown rotation kind"):
        rotation_matrix(n, "givens")
