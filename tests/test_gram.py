"""The float64 Gram on CPU (BLAS syrk over float64 chunks) against an exact float64 matmul,
and against the blocked baddbmm path it replaces: tall, wide, conv stacks, many chunks."""
import pytest
import torch

import net_esd

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (3, 50, 70), (4, 70, 50), (1, 257, 33)])
@pytest.mark.parametrize("chunk_elements", [net_esd._GRAM_CHUNK_ELEMENTS, 1000])
def test_the_syrk_gram_is_the_float64_gram_lower_triangle(shape, chunk_elements, monkeypatch):
    monkeypatch.setattr(net_esd, "_GRAM_CHUNK_ELEMENTS", chunk_elements)  # 1000: dozens of chunks
    torch.manual_seed(0)
    weight = torch.randn(*shape) * torch.logspace(-3, 1, shape[-1])  # columns of very different scale
    mats = weight if weight.ndim == 3 else weight.unsqueeze(0)
    w64 = mats.double()
    exact = w64.mT @ w64 if mats.shape[-2] >= mats.shape[-1] else w64 @ w64.mT
    monkeypatch.setattr(net_esd, "USE_SYRK", True)
    syrk = net_esd._gram_matrices(mats, torch.float64, CPU)
    monkeypatch.setattr(net_esd, "USE_SYRK", False)
    blocked = net_esd._gram_matrices(mats, torch.float64, CPU)
    scale = exact.abs().amax()
    assert syrk.shape == exact.shape and syrk.dtype == torch.float64
    assert float((torch.tril(syrk) - torch.tril(exact)).abs().amax() / scale) < 1e-13
    assert float((torch.tril(blocked) - torch.tril(exact)).abs().amax() / scale) < 1e-13
    assert torch.allclose(torch.linalg.eigvalsh(syrk, UPLO="L"), torch.linalg.eigvalsh(exact), rtol=0,
                          atol=1e-12 * float(scale))


def test_layer_eigenvalues_are_the_same_through_syrk_and_the_blocked_gram(monkeypatch):
    torch.manual_seed(1)
    weight = torch.randn(400, 96) @ torch.randn(96, 96)
    monkeypatch.setattr(net_esd, "USE_SYRK", True)
    with_syrk = net_esd.layer_eigenvalues(weight, "linear")
    monkeypatch.setattr(net_esd, "USE_SYRK", False)
    blocked = net_esd.layer_eigenvalues(weight, "linear")
    reference = (torch.linalg.svdvals(weight.double()) ** 2).flip(0).numpy()
    assert abs(with_syrk - reference).max() <= 1e-10 * reference[-1]
    assert abs(with_syrk - blocked).max() <= 1e-10 * reference[-1]
