"""Hadamard (and random orthogonal) rotations for QuaRot-style rotation of the residual stream (Ashkboos et al. 2024),
for sizes that are not powers of two: Sylvester, Paley I / Paley II (Paley 1933, over GF(q), q a prime power) and
Kronecker products of those, all built from the math at call time."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["hadamard_matrix", "orthogonal_hadamard", "random_hadamard", "random_orthogonal", "rotation_matrix",
           "is_constructible", "hadamard_construction"]

ROTATION_KINDS = ("hadamard", "random_hadamard", "random")


# ---------------------------------------------------------------------------------------------------------------------
# Number theory helpers
# ---------------------------------------------------------------------------------------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q == p**k and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


# ---------------------------------------------------------------------------------------------------------------------
# The finite field GF(q), q = p**k, and its quadratic character
# ---------------------------------------------------------------------------------------------------------------------
# An element of GF(p**k) is a polynomial of degree < k over GF(p) (coefficients c_0..c_{k-1}), numbered by the integer
# sum c_i p**i. Addition is coefficient-wise mod p; multiplication is polynomial multiplication mod a monic irreducible
# polynomial f of degree k. For k == 1 this is plain arithmetic mod p.

def _poly_mod(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of a by the monic polynomial b over GF(p); coefficient lists are lowest degree first."""
    a = a[:]
    while len(a) >= len(b):
        c = a[-1] % p
        if c:
            shift = len(a) - len(b)
            for i, bi in enumerate(b):
                a[shift + i] = (a[shift + i] - c * bi) % p
        a.pop()
    return a


def _monic_polys(degree: int, p: int):
    """All monic polynomials of the given degree over GF(p), lowest degree first."""
    for idx in range(p ** degree):
        coeffs = [(idx // p ** i) % p for i in range(degree)]
        yield coeffs + [1]


def _irreducible_poly(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p): no monic factor of degree 1..k//2 (trial division)."""
    for f in _monic_polys(k, p):
        if f[0] == 0:  # divisible by x
            continue
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic_polys(d, p)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen: one always exists


@lru_cache(maxsize=8)
def _gf_tables(q: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(digits, chi, p) for GF(q): digits[x] are the k base-p coefficients of element x, chi[x] is the quadratic
    character (0 at 0, +1 on the nonzero squares, -1 on the non-squares)."""
    p, k = _prime_power(q)
    x = np.arange(q, dtype=np.int64)
    digits = np.stack([(x // p ** i) % p for i in range(k)], axis=1)  # [q, k]
    if k == 1:
        squares = (x * x) % p
    else:
        f = _irreducible_poly(p, k)
        prod = np.zeros((q, 2 * k - 1), dtype=np.int64)  # x*x as a polynomial of degree <= 2k-2
        for i in range(k):
            for j in range(k):
                prod[:, i + j] += digits[:, i] * digits[:, j]
        prod %= p
        for top in range(2 * k - 2, k - 1, -1):  # reduce by f from the top degree down (f monic)
            c = prod[:, top].copy()
            for i in range(k + 1):
                prod[:, top - k + i] = (prod[:, top - k + i] - c * f[i]) % p
        squares = prod[:, :k] @ (p ** np.arange(k, dtype=np.int64))
    chi = -np.ones(q, dtype=np.int8)
    chi[squares] = 1
    chi[0] = 0
    return digits, chi, p


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix Q[i, j] = chi(a_j - a_i) over GF(q): every row has (q-1)/2 entries +1 and (q-1)/2 entries -1,
    Q J = J Q = 0 and Q Q^T = q I - J; chi(-1) = (-1)**((q-1)/2), so Q is symmetric for q = 1 mod 4 and skew for
    q = 3 mod 4."""
    digits, chi, p = _gf_tables(q)
    k = digits.shape[1]
    Q = np.empty((q, q), dtype=np.int8)
    if k == 1:  # circulant: a_j - a_i = (j - i) mod q
        for i in range(q):
            Q[i] = np.roll(chi, i)
    else:
        weights = p ** np.arange(k, dtype=np.int64)
        for i in range(q):
            Q[i] = chi[((digits - digits[i]) % p) @ weights]
    return Q


# ---------------------------------------------------------------------------------------------------------------------
# Constructions (int8 numpy, entries +-1)
# ---------------------------------------------------------------------------------------------------------------------

def _sylvester(n: int) -> np.ndarray:
    """H_{2m} = [[H_m, H_m], [H_m, -H_m]], from H_1 = [1]."""
    H = np.ones((1, 1), dtype=np.int8)
    while H.shape[0] < n:
        H = np.block([[H, H], [H, -H]])
    return H


def _paley1(q: int) -> np.ndarray:
    """Paley I, q = 3 mod 4, order q + 1. S = [[0, 1^T], [-1, Q]] is skew with S S^T = q I (the border fixes Q Q^T =
    q I - J and Q 1 = 0), so H = I + S has H H^T = I + S + S^T + S S^T = (q + 1) I."""
    n = q + 1
    S = np.zeros((n, n), dtype=np.int8)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + np.eye(n, dtype=np.int8)


def _paley2(q: int) -> np.ndarray:
    """Paley II, q = 1 mod 4, order 2(q + 1). C = [[0, 1^T], [1, Q]] is a symmetric conference matrix (C C^T = q I, zero
    diagonal); replacing each 0 by [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]] gives a Hadamard matrix:
    H H^T = 2 C C^T + 2 I + C (x) (A B^T + B A^T) = 2(q + 1) I as A B^T is skew and C symmetric."""
    m = q + 1
    C = np.zeros((m, m), dtype=np.int8)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    A = np.array([[1, 1], [1, -1]], dtype=np.int8)
    B = np.array([[1, -1], [-1, -1]], dtype=np.int8)
    return np.kron(C, A) + np.kron(np.eye(m, dtype=np.int8), B)


def _direct(n: int):
    """A construction of order n that needs no Kronecker product, or None."""
    if _is_power_of_two(n):
        return ("sylvester", n)
    if n % 4:
        return None
    pk = _prime_power(n - 1)
    if pk and (n - 1) % 4 == 3:
        return ("paley1", n - 1)
    pk = _prime_power(n // 2 - 1)
    if pk and (n // 2 - 1) % 4 == 1:
        return ("paley2", n // 2 - 1)
    return None


@lru_cache(maxsize=None)
def _recipe(n: int):
    """How to build a Hadamard matrix of order n, or None. Hadamard orders are 1, 2 and multiples of 4.

    Preference: Sylvester; else K (x) Sylvester(2^t) with the smallest directly-constructible (Paley) core K, t >= 0
    (the shape fast Hadamard-transform kernels use, as QuaRot / DeepCompressor do); else a product of several Paley
    orders and a power of two (e.g. 1904 = 28 * 68), searched recursively (memoised)."""
    if n < 1:
        return None
    if _is_power_of_two(n):
        return ("sylvester", n)
    if n % 4:
        return None
    t = (n & -n).bit_length() - 1  # largest t with 2^t | n
    for s in range(t, -1, -1):  # smallest core first: 5120 = paley1(19) x sylvester(256), not paley1(5119)
        core = _direct(n >> s)
        if core is not None:
            return core if s == 0 else ("kron", core, ("sylvester", 1 << s))
    # Otherwise n = 2^s * (product of two or more Paley orders), e.g. 1904 = 28 * 68: peel off the smallest Paley
    # factor a of the odd-ish part m and recurse on m / a (complete: any Kronecker tree of Sylvester and Paley factors
    # is such a product, and its smallest Paley factor is <= sqrt(m)).
    for s in range(t, -1, -1):
        m = n >> s
        for a in range(12, math.isqrt(m) + 1, 4):
            if m % a == 0 and not _is_power_of_two(a):
                ra, rb = _direct(a), _recipe(m // a)
                if ra is not None and rb is not None:
                    r = ("kron", ra, rb)
                    return r if s == 0 else ("kron", r, ("sylvester", 1 << s))
    return None


def _build(recipe) -> np.ndarray:
    kind = recipe[0]
    if kind == "sylvester":
        return _sylvester(recipe[1])
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return np.kron(_build(recipe[1]), _build(recipe[2]))  # (H_a H_a^T) (x) (H_b H_b^T) = ab I


def _describe(recipe) -> str:
    if recipe[0] == "kron":
        return f"{_describe(recipe[1])} x {_describe(recipe[2])}"
    return f"{recipe[0]}({recipe[1]})"


@lru_cache(maxsize=4)
def _hadamard_np(n: int) -> np.ndarray:
    H = _build(_recipe(n))
    H.setflags(write=False)
    return H


def _not_constructible(n: int) -> ValueError:
    if not isinstance(n, int) or n < 1:
        why = "n must be a positive integer"
    elif n > 2 and n % 4:
        why = "Hadamard matrices exist only for n = 1, 2 or a multiple of 4"
    else:
        why = ("not a power of 2, not a Paley I order q+1 (q = 3 mod 4 prime power) nor a Paley II order 2(q+1) "
               "(q = 1 mod 4 prime power), and no factorization into such orders")
    return ValueError(f"no Hadamard matrix construction for size {n} ({why})")


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------

def is_constructible(n: int) -> bool:
    """Whether hadamard_matrix(n) can build a Hadamard matrix of order n."""
    return isinstance(n, int) and n >= 1 and _recipe(n) is not None


def hadamard_construction(n: int) -> str:
    """Human-readable recipe, e.g. hadamard_construction(576) == 'paley2(17) x sylvester(16)'."""
    if not is_constructible(n):
        raise _not_constructible(n)
    return _describe(_recipe(n))


def hadamard_matrix(n: int) -> torch.Tensor:
    """float64 [n, n] with entries +-1 and H H^T = n I. Raises ValueError when n is not constructible."""
    if not is_constructible(n):
        raise _not_constructible(n)
    return torch.from_numpy(_hadamard_np(n).astype(np.float64))


def orthogonal_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """hadamard_matrix(n) / sqrt(n): orthogonal, every entry +-1/sqrt(n)."""
    return (hadamard_matrix(n) / math.sqrt(n)).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """orthogonal_hadamard(n) @ diag(s), s random +-1 from a torch.Generator seeded with seed (QuIP#-style)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    return (orthogonal_hadamard(n) * signs[None, :]).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, columns' signs fixed so diag(R) > 0."""
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.sign(torch.diagonal(R))
    d[d == 0] = 1
    return (Q * d[None, :]).to(dtype)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """float64 [n, n] orthogonal rotation: kind 'hadamard' (deterministic), 'random_hadamard' (Hadamard with random
    column signs) or 'random' (Haar-random orthogonal, any n)."""
    if kind not in ROTATION_KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; expected one of {ROTATION_KINDS}")
    if kind == "random":
        return random_orthogonal(n, seed)
    if not is_constructible(n):
        e = _not_constructible(n)
        raise ValueError(f"rotation kind {kind!r} needs a Hadamard matrix of size {n}: {e}; "
                         f"use kind='random' for this size") from None
    if kind == "hadamard":
        return orthogonal_hadamard(n)
    return random_hadamard(n, seed)
