"""ir/gpu_matmul.py: the split (3xTF32) products are a float32-class approximation of the product, the dispatch mode
routes a graph's float32 mm/addmm through them only where asked, and a compile records the choice. On the CPU the
three products stay float32, so these tests check the split and the routing; the TF32 speed and the GPU error are
bench/scale.py's and tests/passes/test_gptq_cuda.py's."""
import pytest
import torch

from cli_util import run
from dcc.ir import gpu_matmul
from tiny_models import decoder_config, one_thread, save_tiny  # noqa: F401  (one_thread: an autouse fixture)


def test_the_split_product_is_within_float32_class_error():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=g) * torch.logspace(-3, 3, 300)
    b = torch.randn(300, 48, generator=g)
    exact = (a.double() @ b.double())
    err = (gpu_matmul.mm3(a, b).double() - exact).norm() / exact.norm()
    assert err < 1e-6


def test_the_single_tf32_product_has_tf32_class_error():
    """mm1: one product of the operands cut to TF32's 10 mantissa bits (exact products in float32): an error of the
    order of 2^-11, well above float32's and 3xtf32's."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 300, generator=g) * torch.logspace(-3, 3, 300)
    b = torch.randn(300, 48, generator=g)
    exact = (a.double() @ b.double())
    err = float((gpu_matmul.mm1(a, b).double() - exact).norm() / exact.norm())
    assert 1e-5 < err < 2e-3
    cut = gpu_matmul.tf32_part(a).double() @ gpu_matmul.tf32_part(b).double()
    assert float((gpu_matmul.mm1(a, b).double() - cut).norm() / cut.norm()) < 1e-6   # what it computes: the cut


def test_the_mode_routes_float32_mm_and_addmm_only(monkeypatch):
    monkeypatch.setattr(gpu_matmul, "_cpu_too", True)
    lin = torch.nn.Linear(32, 16)
    x = torch.randn(8, 32)
    with gpu_matmul.using("3xtf32"), gpu_matmul.products() as mode:
        y = lin(x)                                     # addmm
        z = x @ lin.weight.T                           # mm
        h = x.double() @ lin.weight.double().T         # float64: left alone
    assert mode.calls == 2
    with gpu_matmul.using("tf32"), gpu_matmul.products() as one:
        y1 = lin(x)
    assert one.calls == 1 and torch.equal(y1, gpu_matmul.mm1(x, lin.weight.T) + lin.bias)
    assert torch.allclose(y, lin(x), rtol=1e-5, atol=1e-6) and torch.allclose(z, x @ lin.weight.T, rtol=1e-5,
                                                                               atol=1e-6)
    assert h.dtype == torch.float64
    with gpu_matmul.products() as none:   # fp32, the default: no mode at all
        lin(x)
    assert none is None


def test_a_wrong_mode_is_refused():
    with pytest.raises(ValueError, match="--gpu-matmul 'tf16': one of fp32, 3xtf32"):
        gpu_matmul.check("tf16")


def test_a_compile_with_split_products_records_them(tmp_path, monkeypatch):
    """--gpu-matmul 3xtf32 routes the graph runs' products (here on the CPU, where they stay float32) and says so
    in the manifest; the default routes and records nothing."""
    import json
    monkeypatch.setattr(gpu_matmul, "_cpu_too", True)
    calls, real = [], gpu_matmul.mm3
    monkeypatch.setattr(gpu_matmul, "mm3", lambda a, b: calls.append(1) or real(a, b))
    save_tiny(tmp_path / "m", decoder_config("llama", layers=1))
    (tmp_path / "c.txt").write_text(" ".join(str((7 * i + 3) % 100) for i in range(2 * 32)))
    for mode in ("fp32", "3xtf32"):
        code, text = run("compile", tmp_path / "m", "--algo", "awq", "--group-size", "64", "--calib",
                         tmp_path / "c.txt", "--calib-chunks", "2", "--calib-seq-len", "32", "-o", tmp_path / mode,
                         "-q", "--gpu-matmul", mode)
        assert code == 0, text
        calib = json.loads((tmp_path / mode / "dcc.json").read_text())["recipe"]["calibration"]
        assert calib.get("gpu_matmul") == (None if mode == "fp32" else mode)
        # the block's 7 linears in the collection run and in the output run; none in the fp32 compile
        assert len(calls) == (0 if mode == "fp32" else 14)


def test_the_preservation_checks_run_float32_products(monkeypatch):
    """A function-preservation check compares two block runs to 1e-3, which one TF32 product alone nearly spends:
    call_block runs at float32 whatever the compile's mode, and the mode is back after it."""
    from dcc.passes._model_parts import call_block

    class Ctx:
        def forward(self, samples, hidden):
            with gpu_matmul.products() as mode:
                return mode

    monkeypatch.setattr(gpu_matmul, "_cpu_too", True)
    with gpu_matmul.using("tf32"):
        assert call_block(None, Ctx()) is None
        with gpu_matmul.products() as mode:
            assert mode is not None
