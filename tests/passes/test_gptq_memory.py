"""dcc/passes/gptq.py's memory-saving forms give the bits of the plain formulas: the inverse Hessian's factor from a
damped-in-place H (and its retries), and the permuted H with dead columns."""
import torch

from dcc.passes.gptq import _inverse_hessian_chol, hessian


def _plain(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The textbook form: H + c I, factor, inverse, factor of the inverse; more damping until H is definite."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(10):
        try:
            l = torch.linalg.cholesky(h + (damp + 0.01 * attempt) * mean_diag * eye)
        except torch.linalg.LinAlgError:
            continue
        return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise AssertionError("not definite")


def test_inverse_factor_is_bit_identical_and_takes_h():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 48, generator=g)
    h = hessian(x)
    box = [h.clone()]
    u = _inverse_hessian_chol(box, 0.01)
    assert box == []                      # the function owns H now
    assert torch.equal(u, _plain(h, 0.01))


def test_retry_with_more_damping_rewrites_the_diagonal_from_the_original():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    h = a @ a.T
    h.diagonal().sub_(float(torch.linalg.eigvalsh(h)[0]) + 0.02 * float(h.diagonal().mean()))   # indefinite
    try:
        torch.linalg.cholesky(h + 0.01 * float(h.diagonal().mean()) * torch.eye(16, dtype=torch.float64))
        raise AssertionError("the first damping should not be enough")
    except torch.linalg.LinAlgError:
        pass
    u = _inverse_hessian_chol([h.clone()], 0.01)
    assert torch.equal(u, _plain(h, 0.01))


def test_gptq_with_dead_columns_and_act_order_matches_the_plain_formulas(monkeypatch):
    """gptq_quantize permutes H by index_select and sets the dead diagonal after the permutation; the plain form
    sets H[dead, dead] = 1 first and permutes with h[perm][:, perm]. Compare the factor the sweep receives."""
    import dcc.passes.gptq as gptq
    from dcc.ir.formats import QuantSpec
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 64, generator=g)
    x[:, [5, 40]] = 0.0   # two inputs no token reads
    w = torch.randn(32, 64, generator=g)
    h = hessian(x)
    seen = {}
    real = gptq._sweep

    def spy(w_, u, *args):
        seen["u"] = u.clone()
        return real(w_, u, *args)
    monkeypatch.setattr(gptq, "_sweep", spy)
    spec = QuantSpec("int4", symmetric=False, group_size=16)
    cfg = gptq.GptqConfig(act_order=True, static_groups=True)
    gptq.gptq_quantize(w, None, spec, cfg, h=h)
    h0 = h.clone()
    dead = torch.diagonal(h0) == 0
    assert int(dead.sum()) == 2
    h0[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(h0), descending=True)
    want = _plain(h0[perm][:, perm], cfg.damp).float()
    assert torch.equal(seen["u"], want)
    assert torch.equal(h, hessian(x))   # the caller's H is not changed
