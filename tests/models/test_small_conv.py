"""small_conv: the Triton 3x3x3 convolution and its gradients against torch's, and LunaModel on it.

On a machine without CUDA the kernels run in Triton's interpreter (conftest
sets ``TRITON_INTERPRET=1`` there), on small volumes; with CUDA they run
compiled, in float32 and under bfloat16 autocast too.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from p2ch_luna.kernels import support as kernel_support
from p2ch_luna.models import LunaModel, small_conv
from p2ch_luna.models.classifier import LunaConv3d

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
needs_kernels = pytest.mark.skipif(small_conv.kernels() is None, reason="needs Triton: the optional [triton] extra (pip install '.[triton]'; .ci/run installs it)")


def _kernel_devices() -> list[torch.device]:
    return [device for device in DEVICES if device.type == "cuda" or small_conv.interpreting()]


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last_3d)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).norm() / expected.detach().double().norm())


def test_weight_matrix_round_trip_and_padding() -> None:
    weight = torch.randn(8, 3, 3, 3, 3)
    matrix = small_conv.weight_matrix(weight, 16)
    assert matrix.shape == (27 * 3, 16)
    assert torch.equal(matrix[:, 8:], torch.zeros(81, 8))
    # row tap * C + c, tap = dz * 9 + dy * 3 + dx
    assert matrix[(1 * 9 + 2 * 3 + 0) * 3 + 0, 5] == weight[5, 0, 1, 2, 0]
    assert matrix[4 * 3 + 2, 7] == weight[7, 2, 0, 1, 1]
    torch.testing.assert_close(small_conv.weight_from_matrix(matrix, 8, 3), weight, rtol=0, atol=0)


def test_input_gradient_weight_makes_the_transposed_convolution() -> None:
    """The input gradient of a zero-padded 3x3x3 convolution is the convolution of the output gradient with the
    channel-swapped, mirrored weights: what the backward pass runs through the forward kernel."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, 3, dtype=torch.float64)
    grad = torch.randn(2, 6, 5, 7, 4, dtype=torch.float64)
    expected = torch.nn.functional.conv_transpose3d(grad, weight, padding=1)
    actual = torch.nn.functional.conv3d(grad, small_conv.input_gradient_weight(weight), padding=1)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("blocks, splits, expected", [(100, 10, 16), (100, 100, 1), (7, 1, 8), (1, 50, 1),
                                                       (1000, 3, 512)])
def test_split_size_is_a_power_of_two_covering_the_blocks(blocks: int, splits: int, expected: int) -> None:
    size = small_conv.split_size(blocks, splits)
    assert size == expected
    assert -(-blocks // size) <= splits


def test_shape_applies_only_to_the_kernels_convolution() -> None:
    assert small_conv.shape_applies(torch.nn.Conv3d(1, 8, 3, padding=1))
    assert not small_conv.shape_applies(torch.nn.Conv3d(1, 8, 3, padding=0))
    assert not small_conv.shape_applies(torch.nn.Conv3d(1, 8, 3, padding=1, stride=2))
    assert not small_conv.shape_applies(torch.nn.Conv3d(8, 8, 3, padding=1, groups=2))
    assert not small_conv.shape_applies(torch.nn.Conv3d(1, 8, 3, padding=1, padding_mode="reflect"))
    assert not small_conv.shape_applies(torch.nn.Conv3d(1, 8, 5, padding=1))


def test_runs_on_needs_the_interpreter_for_cpu_tensors_and_a_supported_type(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1, 1, 4, 4, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not small_conv.runs_on(x, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert small_conv.runs_on(x, 8) == (small_conv.kernels() is not None)
    assert not small_conv.runs_on(x.double(), 8)
    assert not small_conv.runs_on(torch.zeros(1, 1, 4, 4), 8)


def test_tile_choice_caches_one_tile_per_problem() -> None:
    choice = small_conv.TileChoice()
    launched = []
    tiles = [small_conv.Tile(64, 32), small_conv.Tile(128, 32)]

    def expected() -> torch.Tensor:
        raise AssertionError("unchecked devices compute no reference")
    assert choice.choose(("k", 1), tiles, launched.append, torch.device("cpu"), 1 << 30, expected) == tiles[0]
    assert choice.choose(("k", 1), tiles[::-1], launched.append, torch.device("cpu"), 1 << 30, expected) == tiles[0]
    assert launched == []  # off CUDA nothing is timed or checked
    assert small_conv.usable_tiles(small_conv.FORWARD_TILES, 27) == [
        tile for tile in small_conv.FORWARD_TILES if tile.block_r == 32]


def test_fastest_agreeing_tile_never_picks_a_tile_with_another_result(caplog: pytest.LogCaptureFixture) -> None:
    """A candidate whose result differs from torch's (a miscompiled kernel) is left out, however fast, the
    first tile too; rounding-sized differences and non-finite data do not exclude one; None when none agrees."""
    tiles = [small_conv.Tile(64, 32), small_conv.Tile(128, 32), small_conv.Tile(128, 64), small_conv.Tile(256, 32)]
    base = torch.linspace(-1, 1, 1000)
    results = {tiles[0]: base, tiles[1]: base * (1 + 1e-3), tiles[2]: -base, tiles[3]: base + 1e-4}
    times = {tiles[0]: 4.0, tiles[1]: 2.0, tiles[2]: 1.0, tiles[3]: 3.0}
    with caplog.at_level("WARNING", logger="p2ch_luna.models.small_conv"):
        best = small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base, times.__getitem__)
    assert best == tiles[1]
    assert "disagrees with torch" in caplog.text and repr(tiles[2]) in caplog.text
    results[tiles[1]] = base * 1.5
    assert small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base, times.__getitem__) == tiles[3]
    assert small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base) == tiles[0]  # untimed: the first
    results[tiles[0]] = base * 0.5  # the plainest form is no reference: it is checked like the rest
    assert small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base, times.__getitem__) == tiles[3]
    assert small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base) == tiles[3]
    assert small_conv.fastest_agreeing_tile(tiles, results.__getitem__, base * 3, times.__getitem__) is None
    nans = {tile: torch.full((3,), float("nan")) for tile in tiles}
    assert small_conv.fastest_agreeing_tile(tiles, nans.__getitem__, base[:3], times.__getitem__) == tiles[2]

    def out_of_resources(tile: small_conv.Tile) -> torch.Tensor:
        if tile == tiles[2]:
            raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
        return base
    with caplog.at_level("WARNING", logger="p2ch_luna.models.small_conv"):
        assert small_conv.fastest_agreeing_tile(tiles, out_of_resources, base, times.__getitem__) == tiles[1]
    assert "does not run here" in caplog.text


def test_relative_difference_compares_volumes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked float64 sums give the whole tensors' relative difference, whatever the memory layouts."""
    monkeypatch.setattr(kernel_support, "DIFFERENCE_CHUNK", 7)
    generator = torch.Generator().manual_seed(5)
    expected = torch.randn(2, 3, 4, 5, 6, generator=generator)
    got = _channels_last(expected + 0.1 * torch.randn(expected.shape, generator=generator)).bfloat16()
    assert kernel_support.relative_difference(got, expected) == pytest.approx(_relative_error(got, expected), rel=1e-9)
    assert kernel_support.relative_difference(expected, expected) == 0.0
    matrix = torch.randn(54, 5, generator=generator)
    assert kernel_support.relative_difference(matrix * 2, matrix) == pytest.approx(1.0)


class _FaultyKernels:
    """The kernels module with one launch form miscompiled: the outputs at ``outputs[kernel]`` (the position
    of that output among the launch's arguments) come out negated."""

    ALL_OUTPUTS = {"conv3x3x3_kernel": 3, "conv3x3x3_weight_grad_kernel": 2}

    def __init__(self, faulty: small_conv.Tile, outputs: dict[str, int] | None = None) -> None:
        self.real, self.faulty = small_conv.kernels(), faulty
        self.outputs = self.ALL_OUTPUTS if outputs is None else outputs

    def __getattr__(self, name: str) -> object:
        kernel, output = getattr(self.real, name), self.outputs.get(name)
        faulty = self.faulty

        class Launcher:
            def __getitem__(self, grid: tuple) -> Callable[..., None]:
                def launch(*args: torch.Tensor, **options: object) -> None:
                    kernel[grid](*args, **options)
                    if output is not None and (options["BLOCK_M"], options["BLOCK_R"], options["BITMASK"]) == (
                            faulty.block_m, faulty.block_r, faulty.bitmask):
                        args[output].neg_()
                return launch
        return Launcher()


@needs_kernels
def test_a_miscompiled_form_is_never_used_and_torch_stands_in_when_no_form_is_right(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With the check on (as on CUDA), a form computing wrong at the real problem is skipped for a right one;
    where every form is wrong, torch computes that problem, values and all gradients stay correct."""
    good, bad = small_conv.Tile(64, 32), small_conv.Tile(128, 64)
    faulty_kernels = _FaultyKernels(bad)
    monkeypatch.setattr(small_conv, "kernels", lambda: faulty_kernels)
    for device in _kernel_devices():
        for tiles, chosen in [((bad, good), good), ((bad,), None)]:
            monkeypatch.setattr(small_conv, "FORWARD_TILES", tiles)
            monkeypatch.setattr(small_conv, "WEIGHT_GRAD_TILES", tiles)
            monkeypatch.setattr(small_conv, "TILE_CHOICE", small_conv.TileChoice(checked_device_types=("cpu", "cuda")))
            generator = torch.Generator(device=device).manual_seed(11)
            x = _channels_last(torch.randn(2, 4, 3, 5, 4, device=device, generator=generator)).requires_grad_()
            weight = torch.randn(6, 4, 3, 3, 3, device=device, generator=generator).requires_grad_()
            bias = torch.randn(6, device=device, generator=generator).requires_grad_()
            with torch.backends.cudnn.flags(allow_tf32=False), \
                    caplog.at_level("WARNING", logger="p2ch_luna.models.small_conv"):
                y = small_conv.convolution(x, weight, bias, True)
                upstream = torch.randn(y.shape, device=device, generator=generator)
                grads = torch.autograd.grad(y, [x, weight, bias], upstream)
            expected = torch.nn.functional.conv3d(x.double(), weight.double(), bias.double(), padding=1).relu()
            assert _relative_error(y, expected) < 1e-5
            for grad, expected_grad in zip(grads, torch.autograd.grad(expected, [x, weight, bias],
                                                                      upstream.double())):
                assert _relative_error(grad, expected_grad) < 1e-5
            assert set(small_conv.TILE_CHOICE.chosen.values()) == {chosen}
            assert "disagrees with torch" in caplog.text
            assert ("no launch form reproduces torch's result" in caplog.text) == (chosen is None)
            caplog.clear()


@needs_kernels
def test_a_form_with_a_wrong_bias_gradient_alone_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The weight-gradient kernel's bias gradient is checked on its own, not hidden in the weights' norm."""
    good, bad = small_conv.Tile(64, 32), small_conv.Tile(128, 64)
    faulty_kernels = _FaultyKernels(bad, {"conv3x3x3_weight_grad_kernel": 3})  # the bias partial sums
    monkeypatch.setattr(small_conv, "kernels", lambda: faulty_kernels)
    monkeypatch.setattr(small_conv, "FORWARD_TILES", (bad, good))
    monkeypatch.setattr(small_conv, "WEIGHT_GRAD_TILES", (bad, good))
    for device in _kernel_devices():
        monkeypatch.setattr(small_conv, "TILE_CHOICE", small_conv.TileChoice(checked_device_types=("cpu", "cuda")))
        generator = torch.Generator(device=device).manual_seed(12)
        x = _channels_last(torch.randn(2, 4, 3, 5, 4, device=device, generator=generator))
        weight = torch.randn(6, 4, 3, 3, 3, device=device, generator=generator).requires_grad_()
        bias = torch.randn(6, device=device, generator=generator).requires_grad_()
        with torch.backends.cudnn.flags(allow_tf32=False):
            y = small_conv.convolution(x, weight, bias, False)
            upstream = torch.randn(y.shape, device=device, generator=generator)
            weight_grad, bias_grad = torch.autograd.grad(y, [weight, bias], upstream)
        torch.testing.assert_close(bias_grad, upstream.sum((0, 2, 3, 4)), rtol=1e-5, atol=1e-4)
        chosen = {key[0]: tile for key, tile in small_conv.TILE_CHOICE.chosen.items()}
        assert chosen == {"forward": bad, "weight_grad": good}


@needs_kernels
@pytest.mark.parametrize("in_channels, out_channels", [(1, 8), (8, 8), (8, 16), (16, 8), (3, 5)])
@pytest.mark.parametrize("bias_kind", ["none", "vector", "map"])
@pytest.mark.parametrize("rectify", [False, True])
def test_convolution_and_gradients_match_conv3d(in_channels: int, out_channels: int, bias_kind: str,
                                                rectify: bool) -> None:
    """Values and the gradients of input, weights and bias, float32, against float64 conv3d; a volume whose
    voxel count is no multiple of any tile, so the edges and the last tile's mask are exercised."""
    for device in _kernel_devices():
        generator = torch.Generator(device=device).manual_seed(in_channels * 100 + out_channels)
        shape = (2, in_channels, 5, 7, 6)
        x = _channels_last(torch.randn(shape, device=device, generator=generator)).requires_grad_()
        weight = torch.randn(out_channels, in_channels, 3, 3, 3, device=device, generator=generator)
        weight.requires_grad_()
        bias = {"none": None, "vector": torch.randn(out_channels, device=device, generator=generator),
                "map": torch.randn(1, out_channels, 5, 7, 6, device=device, generator=generator)}[bias_kind]
        if bias is not None:
            bias.requires_grad_()
        inputs = [t for t in (x, weight, bias) if t is not None]
        with torch.backends.cudnn.flags(allow_tf32=False):
            y = small_conv.convolution(x, weight, bias, rectify)
        expected = torch.nn.functional.conv3d(x.double(), weight.double(), None, padding=1)
        if bias is not None:
            expected = expected + (bias.double() if bias.dim() > 1 else bias.double().view(1, -1, 1, 1, 1))
        if rectify:
            expected = expected.relu()
        assert y.is_contiguous(memory_format=torch.channels_last_3d) and y.dtype == torch.float32
        assert _relative_error(y, expected) < 1e-5
        upstream = torch.randn(expected.shape, device=device, generator=generator, dtype=torch.float64)
        with torch.backends.cudnn.flags(allow_tf32=False):
            grads = torch.autograd.grad(y, inputs, upstream.float())
        expected_grads = torch.autograd.grad(expected, inputs, upstream)
        for name, grad, expected_grad in zip(["x", "weight", "bias"], grads, expected_grads):
            assert grad.shape == expected_grad.shape and grad.dtype == torch.float32, name
            assert _relative_error(grad, expected_grad) < 1e-5, name


@needs_kernels
@pytest.mark.parametrize("tile", sorted(set(small_conv.FORWARD_TILES + small_conv.WEIGHT_GRAD_TILES), key=repr))
def test_every_tile_computes_the_same_convolution(tile: small_conv.Tile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate tile (bit-mask gather, narrow output, reduction blocks wider than the reduction) for all
    three kernels, on an odd channel count in and out and a volume that is mostly border."""
    monkeypatch.setattr(small_conv, "FORWARD_TILES", (tile,))
    monkeypatch.setattr(small_conv, "WEIGHT_GRAD_TILES", (tile,))
    monkeypatch.setattr(small_conv, "TILE_CHOICE", small_conv.TileChoice())
    for device in _kernel_devices():
        generator = torch.Generator(device=device).manual_seed(7)
        x = _channels_last(torch.randn(2, 3, 5, 7, 6, device=device, generator=generator)).requires_grad_()
        weight = torch.randn(5, 3, 3, 3, 3, device=device, generator=generator).requires_grad_()
        bias = torch.randn(5, device=device, generator=generator).requires_grad_()
        with torch.backends.cudnn.flags(allow_tf32=False):
            y = small_conv.convolution(x, weight, bias, True)
            upstream = torch.randn(y.shape, device=device, generator=generator)
            grads = torch.autograd.grad(y, [x, weight, bias], upstream)
        expected = torch.nn.functional.conv3d(x.double(), weight.double(), bias.double(), padding=1).relu()
        assert _relative_error(y, expected) < 1e-5
        for grad, expected_grad in zip(grads, torch.autograd.grad(expected, [x, weight, bias], upstream.double())):
            assert _relative_error(grad, expected_grad) < 1e-5
        assert set(small_conv.TILE_CHOICE.chosen.values()) == {tile}


@needs_kernels
def test_convolution_without_gradients_and_first_layer_input() -> None:
    """No autograd graph when nothing needs a gradient; a 1-channel input that needs none gets no input
    gradient (the first layer in training) while the weights still do."""
    for device in _kernel_devices():
        x = torch.randn(1, 1, 4, 5, 3, device=device)
        weight = torch.randn(8, 1, 3, 3, 3, device=device)
        with torch.backends.cudnn.flags(allow_tf32=False):
            y = small_conv.convolution(x, weight)
            assert y.grad_fn is None
            torch.testing.assert_close(y, torch.nn.functional.conv3d(x, weight, padding=1), rtol=1e-4, atol=1e-4)
            weight.requires_grad_()
            y = small_conv.convolution(x, weight, None, True)
            (grad,) = torch.autograd.grad(y.sum(), [weight])
            expected = torch.nn.functional.conv3d(x, weight, padding=1).relu().sum()
            torch.testing.assert_close(grad, torch.autograd.grad(expected, [weight])[0], rtol=1e-4, atol=1e-4)


@needs_kernels
def test_works_on_checks_the_kernels_once_and_reports_failures(monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The once-per-device self-test passes where the kernels run, and turns them off, with a warning, where
    they fail to build or compute wrong."""
    for device in _kernel_devices():
        small_conv.works_on.cache_clear()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):  # as diagnosis calls it
            assert small_conv.works_on(device)
        small_conv.works_on.cache_clear()
        real_forward_pass = small_conv.forward_pass
        monkeypatch.setattr(small_conv, "forward_pass",
                            lambda x, weight, bias, rectify: real_forward_pass(x, weight * 1.01, bias, rectify))
        with caplog.at_level("WARNING", logger="p2ch_luna.models.small_conv"):
            assert not small_conv.works_on(device)
        assert "compute wrong" in caplog.text
        small_conv.works_on.cache_clear()

        def broken(*args: object) -> None:
            raise RuntimeError("Failed to find C compiler")

        monkeypatch.setattr(small_conv, "forward_pass", broken)
        with caplog.at_level("WARNING", logger="p2ch_luna.models.small_conv"):
            assert not small_conv.works_on(device)
        assert "Failed to find C compiler" in caplog.text
        monkeypatch.undo()
        small_conv.works_on.cache_clear()


@needs_kernels
@pytest.mark.parametrize("trainable", ["bias", "weight", "input"])
def test_gradients_of_one_trainable_input_alone(trainable: str) -> None:
    """Frozen layers (fine-tuning freezes the early blocks): only the inputs that need a gradient get one."""
    for device in _kernel_devices():
        generator = torch.Generator(device=device).manual_seed(3)
        tensors = {"input": _channels_last(torch.randn(2, 8, 3, 4, 5, device=device, generator=generator)),
                   "weight": torch.randn(8, 8, 3, 3, 3, device=device, generator=generator),
                   "bias": torch.randn(8, device=device, generator=generator)}
        tensors[trainable].requires_grad_()
        with torch.backends.cudnn.flags(allow_tf32=False):
            y = small_conv.convolution(tensors["input"], tensors["weight"], tensors["bias"], True)
        expected = torch.nn.functional.conv3d(tensors["input"], tensors["weight"], tensors["bias"], padding=1).relu()
        upstream = torch.randn(y.shape, device=device, generator=generator)
        (grad,) = torch.autograd.grad(y, [tensors[trainable]], upstream)
        (expected_grad,) = torch.autograd.grad(expected, [tensors[trainable]], upstream)
        assert _relative_error(grad, expected_grad) < 1e-5


@needs_kernels
def test_convolution_rejects_mismatched_weights() -> None:
    with pytest.raises(ValueError, match=r"expected \(K, 2, 3, 3, 3\) weights"):
        small_conv.convolution(torch.zeros(1, 2, 3, 3, 3), torch.zeros(4, 3, 3, 3, 3))


@needs_kernels
@pytest.mark.parametrize("fold", [False, True])
def test_luna_model_on_the_kernels_matches_the_plain_model(fold: bool) -> None:
    """Every LunaConv3d on the Triton kernels against none, in training (folded input batch norm or not):
    logits, every parameter's gradient and the running statistics."""
    for device in _kernel_devices():
        torch.manual_seed(0)
        plain = LunaModel(conv_channels=4, depth=2, input_shape=(4, 8, 8)).to(device)
        fast = LunaModel(conv_channels=4, depth=2, input_shape=(4, 8, 8)).to(device)
        fast.load_state_dict(plain.state_dict())
        convs = [module for module in fast.modules() if isinstance(module, LunaConv3d)]
        assert len(convs) == 4
        for conv in convs:
            conv.triton = True
        for model in (plain, fast):
            model.fold_input_normalisation = fold
        inputs = torch.randn(3, 1, 4, 8, 8, device=device) * 300 - 500
        assert all(conv.uses_triton(_channels_last(torch.zeros(1, conv.in_channels, 2, 2, 2, device=device)))
                   for conv in convs)
        results = []
        for model in (plain, fast):
            with torch.backends.cudnn.flags(allow_tf32=False):
                logits = model(inputs)
                torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1], device=device)).backward()
            results.append((logits.detach(), {name: p.grad for name, p in model.named_parameters()}))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
        for name, grad in results[0][1].items():
            assert _relative_error(results[1][1][name], grad) < 1e-4, name
        torch.testing.assert_close(fast.state_dict(), plain.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available() or small_conv.kernels() is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("in_channels, out_channels", [(1, 8), (8, 8), (16, 32), (64, 64)])
def test_bfloat16_autocast_convolution_is_as_close_to_float64_as_cudnn(in_channels: int, out_channels: int) -> None:
    """Under bfloat16 autocast the kernels compute in bfloat16, as cuDNN does, and their outputs and gradients
    lie no farther from the float64 result than cuDNN's (bfloat16 rounding flips some ReLU gates, so both
    are percents off in the gradients); odd sizes, a batch of several volumes."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(1)
    x = _channels_last(torch.randn(3, in_channels, 9, 10, 11, device=device, generator=generator))
    x.requires_grad_(in_channels > 1)
    weight = (torch.randn(out_channels, in_channels, 3, 3, 3, device=device, generator=generator) * 0.1)
    bias = torch.randn(out_channels, device=device, generator=generator)
    weight.requires_grad_()
    bias.requires_grad_()
    inputs = [t for t in (x, weight, bias) if t.requires_grad]
    expected = torch.nn.functional.conv3d(x.double(), weight.double(), bias.double(), padding=1).relu()
    upstream = torch.randn(expected.shape, device=device, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    errors = {}
    for name, convolve in [("triton", lambda: small_conv.convolution(x, weight, bias, True)),
                           ("cudnn", lambda: torch.nn.functional.conv3d(x, weight, bias, padding=1).relu())]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = convolve()
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y, inputs, upstream.to(y.dtype))
        assert [grad.dtype for grad in grads] == [tensor.dtype for tensor in inputs]
        errors[name] = [_relative_error(y, expected)] + [
            _relative_error(grad, expected_grad) for grad, expected_grad in zip(grads, expected_grads)]
    assert max(errors["triton"]) < 0.1
    for triton_error, cudnn_error in zip(errors["triton"], errors["cudnn"]):
        assert triton_error < 1.5 * cudnn_error + 2e-3, errors
