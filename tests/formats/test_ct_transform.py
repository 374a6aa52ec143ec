"""compressed-tensors' transform_config: the matrix we rotate in is the one the package builds,
the config we write is what it serialises, and what we cannot run is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch

from latticequant.formats import FormatError
from latticequant.formats.ct_transform import (
    MAX_BLOCK,
    check_stored_matrix,
    ct_hadamard_rotation,
    hadamard_block,
    online_block,
    online_transform,
    rotates_input,
    stored_matrix_key,
    transform_config_dict,
)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.transform import (  # noqa: E402
    TransformConfig,
    apply_transform_config,
    deterministic_hadamard_matrix,
)

# the protocol model's sizes (SmolLM2-135M: hidden 576 = 9 x 64, intermediate 1536 = 3 x 512),
# powers of two, and the tiny test models'
SIZES = (64, 128, 576, 1536, 96, 192)


class _One(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(n, 4, bias=False, dtype=torch.float64)


@pytest.mark.parametrize("n", SIZES)
def test_the_rotation_is_what_compressed_tensors_applies(n):
    """Our config applied by the package's own apply_transform_config: its online transform
    on the identity is our matrix, its factory matrix is its Sylvester of the block's order."""
    config = transform_config_dict({"layer": n})
    (scheme,) = config["config_groups"].values()
    scheme["precision"] = "torch.float64"  # compare without float32 rounding
    model = _One(n)
    W = model.layer.weight.detach().clone()
    apply_transform_config(model, TransformConfig.model_validate(config))
    b = hadamard_block(n)
    transform = getattr(model.layer, f"hadamard_{b}_input")
    eye = torch.eye(n, dtype=torch.float64)
    R = ct_hadamard_rotation(n).matrix()
    # x -> x R, to float64 rounding: the order of the package's products follows the CPU's
    # kernels, so the last bit of an entry may differ from one machine to the next
    torch.testing.assert_close(transform(eye), R, rtol=0, atol=1e-15)
    assert torch.equal(transform.weight, deterministic_hadamard_matrix(b, torch.float64))
    assert b == n // {64: 1, 128: 1, 576: 9, 1536: 3, 96: 3, 192: 3}[n]
    # the weight side it fused (weight_input, inverse) is W R: what our stored weights hold
    assert torch.allclose(model.layer.weight, W @ R, atol=1e-12, rtol=0)
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(model.layer(x), x @ W.T, atol=1e-10, rtol=0)  # hook: x -> x R


def test_blocks_are_capped_at_what_vllms_kernel_takes():
    assert hadamard_block(1 << 16) == MAX_BLOCK == 1 << 15
    assert hadamard_block(3 << 20) == MAX_BLOCK
    assert hadamard_block(1536) == 512


def test_the_config_is_what_the_package_serialises():
    rotated = {"m.0.down": 1536, "m.1.down": 1536, "m.0.q": 64, "m.0.o": 576}
    config = transform_config_dict(rotated)
    assert TransformConfig.model_validate(config).model_dump() == config
    groups = config["config_groups"]
    assert set(groups) == {"hadamard_64", "hadamard_512"}
    assert groups["hadamard_512"]["head_dim"] == 512
    assert groups["hadamard_64"]["head_dim"] == 64  # 576 = 9 blocks of 64 beside a 64
    assert groups["hadamard_512"]["apply"][0]["targets"] == ["m.0.down", "m.1.down"]
    assert transform_config_dict({"x": 128})["config_groups"]["hadamard_128"]["head_dim"] is None
    assert transform_config_dict({}) == {}


def _file(**scheme_changes) -> dict:
    config = transform_config_dict({"model.layers.0.mlp.down_proj": 1536})
    (scheme,) = config["config_groups"].values()
    scheme.update(scheme_changes)
    return {"transform_config": config}


def test_the_transform_of_a_layer_is_read_back():
    fc = _file()
    t = online_transform(fc, "model.layers.0.mlp.down_proj", 1536)
    assert (t.scheme, t.block) == ("hadamard_512", 512)
    assert online_transform(fc, "model.layers.0.mlp.up_proj", 576) is None
    assert rotates_input(fc, "model.layers.0.mlp.down_proj")
    assert not rotates_input(fc, "model.layers.1.mlp.down_proj")
    assert online_transform({"transform_config": {}}, "x", 8) is None
    assert online_transform({}, "x", 8) is None


def test_regex_and_class_targets_match_as_the_package_matches():
    """llm-compressor's SpinQuant R4 targets ``re:.*down_proj$``; QuIP targets ``Linear`` and
    ignores ``lm_head``."""
    fc = _file()
    (scheme,) = fc["transform_config"]["config_groups"].values()
    for args in scheme["apply"]:
        args["targets"] = ["Linear"]
        args["ignore"] = ["re:.*up_proj$"]
    assert online_transform(fc, "model.layers.3.mlp.down_proj", 1536).block == 512
    assert online_transform(fc, "model.layers.3.mlp.up_proj", 576) is None
    for args in scheme["apply"]:
        args["targets"], args["ignore"] = ["re:.*down_proj$"], []
    assert online_transform(fc, "model.layers.7.mlp.down_proj", 1536).block == 512


def _without_weight_input(fc: dict) -> dict:
    fc = copy.deepcopy(fc)
    (scheme,) = fc["transform_config"]["config_groups"].values()
    scheme["apply"] = scheme["apply"][:1]
    return fc


def _twice(fc: dict) -> dict:
    fc = copy.deepcopy(fc)
    groups = fc["transform_config"]["config_groups"]
    groups["again"] = copy.deepcopy(groups["hadamard_512"])
    return fc


def _output(fc: dict) -> dict:
    fc = copy.deepcopy(fc)
    (scheme,) = fc["transform_config"]["config_groups"].values()
    scheme["apply"][0]["location"] = "output"
    return fc


@pytest.mark.parametrize(
    "file_config, match",
    [
        (_file(type="other"), "of type 'other'; latticequant runs 'hadamard'"),
        (_file(type="random-matrix", head_dim=1000), "blocks of 1000 to 1536 inputs"),
        (_file(randomize=True), "randomize"),
        (_file(head_dim=48), "order 48 on 1536 inputs"),
        (_file(head_dim=1024), "order 1024 on 1536 inputs"),
        (_without_weight_input(_file()), "no 'weight_input' entry"),
        (_twice(_file()), "rotates its input twice"),
        (_output(_file()), "'output' transform"),
        ({"transform_config": {"config_groups": [1]}}, "no config_groups mapping"),
    ],
    ids=(
        "other-type matrix-1000 randomize head-48 head-1024 no-weight-input twice output malformed"
    ).split(),
)
def test_what_we_cannot_run_is_refused_in_one_line(file_config, match):
    with pytest.raises(FormatError, match=match) as err:
        online_transform(file_config, "model.layers.0.mlp.down_proj", 1536)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard", "random-matrix"])
@pytest.mark.parametrize("inverse", [False, True])
def test_a_stored_matrix_runs_as_the_package_runs_it(kind, inverse):
    """The matrix the package's factory made for a layer, as a checkpoint stores it, applied by
    ``online_block`` block by block, equals the package's online transform on that layer
    (two blocks of ``head_dim``; 48 is no power of two, so ``hadamard`` takes 32)."""
    n, head = (96, 48) if kind != "hadamard" else (96, 32)
    scheme = {
        "type": kind,
        "apply": [
            {"targets": ["layer"], "location": "input", "inverse": inverse},
            {"targets": ["layer"], "location": "weight_input", "inverse": not inverse},
        ],
        "head_dim": head,
        "precision": "torch.float64",
    }
    fc = {"transform_config": {"config_groups": {"v": scheme}}}
    model = _One(n)
    apply_transform_config(model, TransformConfig.model_validate(fc["transform_config"]))
    module = model.layer.v_input
    stored = module.weight.detach()  # what saving the model writes for v_input.weight
    transform = online_transform(fc, "layer", n)
    assert (transform.type, transform.block, transform.inverse) == (kind, head, inverse)
    check_stored_matrix(stored, transform)
    x = torch.randn(3, n, dtype=torch.float64)
    ours = (x.reshape(3, n // head, head) @ online_block(stored, transform)).reshape(3, n)
    assert torch.allclose(ours, module(x), atol=1e-12, rtol=0)


def test_the_matrix_shared_by_a_size_is_found_for_every_layer():
    """Saving keeps one copy of the matrix the package shares among a scheme's layers of one
    size: the layers without their own read it; two different ones leave it unsaid."""
    fc = _file(type="random-hadamard", head_dim=None)
    (scheme,) = fc["transform_config"]["config_groups"].values()
    for args in scheme["apply"]:
        args["targets"] = ["Linear"]
    t = online_transform(fc, "b.down", 1536)
    m = torch.ones(1536, 1536, dtype=torch.float64)
    key = "{}.hadamard_512_input.weight".format
    tensors = {key("a.down"): m, key("a.q"): m[:8, :8]}
    assert stored_matrix_key(tensors, "b.down", t) == key("a.down")
    tensors[key("b.down")] = m
    assert stored_matrix_key(tensors, "b.down", t) == key("b.down")
    tensors[key("c.down")] = -m
    assert stored_matrix_key(tensors, "b.down", t) == key("b.down")
    with pytest.raises(FormatError, match="different matrices of size 1536"):
        stored_matrix_key(tensors, "d.down", t)
    assert stored_matrix_key({}, "b.down", t) is None


def test_a_stored_hadamard_matrix_must_be_the_one_readers_build():
    t = online_transform(_file(), "model.layers.0.mlp.down_proj", 1536)
    H = deterministic_hadamard_matrix(512, torch.float64)
    check_stored_matrix(H, t)
    check_stored_matrix(H.float(), t)
    signs = torch.ones(512, dtype=torch.float64)
    signs[7] = -1
    for bad, match in [
        (H * signs, "not the Sylvester Hadamard"),
        (H[:256, :256], r"float \[512, 512\] matrix"),
        (H.to(torch.int32), r"float \[512, 512\] matrix"),
        (H * float("nan"), "non-finite"),
    ]:
        with pytest.raises(FormatError, match=match) as err:
            check_stored_matrix(bad, t)
        assert "\n" not in str(err.value)
