"""Bad input is refused with a ValueError that names the problem."""

from __future__ import annotations

import pytest
import torch
from cases import correlated_hessian, weights

import latticequant as lq

QUANTIZERS = [lq.gptq_quantize, lq.babai_quantize, lq.rtn_quantize]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"order": "sideways"}, "order"),
        ({"order": torch.tensor([0.0, 1.0])}, "order"),
        ({"scale_method": "l1"}, "scale_method"),
        ({"damp": -0.1}, "damp"),
        ({"damp": float("inf")}, "damp must be a finite"),
        ({"damp": float("nan")}, "damp must be a finite"),
        ({"mse_norm": -1.0}, "mse_norm must be a finite positive"),
        ({"mse_norm": 0}, "mse_norm must be a finite positive"),
        ({"mse_norm": float("nan")}, "mse_norm must be a finite positive"),
        ({"block_size": 0}, "block_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lq.QuantConfig(**kwargs)


@pytest.mark.parametrize("quantize", QUANTIZERS)
def test_bad_tensors(quantize):
    H = correlated_hessian(8)
    W = weights(3, 8)
    cfg = lq.QuantConfig(bits=4, group_size=-1)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W contains NaN or Inf"):
        quantize(Wn, H, cfg)
    Hi = H.clone()
    Hi[1, 2] = float("inf")
    with pytest.raises(ValueError, match="H contains NaN or Inf"):
        quantize(W, Hi, cfg)
    with pytest.raises(ValueError, match="square"):
        quantize(W, H[:, :7], cfg)
    with pytest.raises(ValueError, match="d_in"):
        quantize(W, correlated_hessian(9), cfg)
    with pytest.raises(ValueError, match="2-D"):
        quantize(W[0], H, cfg)


@pytest.mark.parametrize("quantize", QUANTIZERS)
def test_order_must_be_a_permutation(quantize):
    H = correlated_hessian(6)
    W = weights(2, 6)
    for bad in (torch.tensor([0, 1, 2, 3, 4, 4]), torch.tensor([0, 1, 2]), torch.arange(1, 7)):
        with pytest.raises(ValueError, match="permutation|entries"):
            quantize(W, H, lq.QuantConfig(group_size=-1, order=bad))
