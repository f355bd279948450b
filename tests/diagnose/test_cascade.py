"""The uncertain-band cascade of the nodule classifier: mirror views only where the first view is unsure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from p2ch_luna.diagnose import classify
from p2ch_luna.diagnose import cli as diagnose_cli
from p2ch_luna.errors import UsageError
from p2ch_luna.io.ct import extract_chunk
from p2ch_luna.models import build_model

CPU = torch.device("cpu")
BAND = classify.DEFAULT_FLIP_BAND
THRESHOLD = 0.5


class CountingModel(torch.nn.Module):
    """The wrapped model, keeping a copy of every chunk it was given."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.input_shape = model.input_shape
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(x.detach().contiguous().clone())
        return self.model(x)

    def passes(self, chunk: torch.Tensor) -> int:
        """How many of the seen inputs were ``chunk`` (1, I, R, C) or one of its mirror images."""
        views = [chunk, chunk.flip(2), chunk.flip(3), chunk.flip((2, 3))]
        return sum(any(torch.equal(seen, view) for view in views) for seen in self.seen)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """A seeded classifier, a random volume and fixed candidate centres; the classifier's head is scaled
    and shifted so that its probabilities on these chunks spread over (0, 1) around 0.5."""
    torch.manual_seed(26)
    model = build_model("luna", input_shape=[16, 16, 16]).eval()
    rng = np.random.default_rng(26)
    hu = rng.normal(-400, 400, size=(28, 48, 48)).clip(-1000, 1000).astype(np.int16)
    centers = np.stack(np.meshgrid([9, 18], [10, 20, 30, 38], [10, 20, 30, 38], indexing="ij"), -1).reshape(-1, 3)
    chunks = torch.stack([torch.from_numpy(extract_chunk(hu, center, model.input_shape)).float()[None]
                          for center in centers])
    with torch.no_grad():
        logits = model(chunks)
        margin = (logits[:, 1] - logits[:, 0]).median()
        model.head_linear.weight.div_(20.0)
        model.head_linear.bias.copy_(torch.tensor([0.0, -margin.item() / 20.0]))
    return hu, centers, model


def test_the_cascade_gives_the_findings_of_all_views_and_one_pass_outside_the_band(case) -> None:
    hu, centers, model = case
    single = classify.classify_chunks(hu, centers, model, 4, CPU)
    every = classify.classify_chunks(hu, centers, model, 4, CPU, flips=True)
    inside = (single >= BAND[0]) & (single <= BAND[1])
    assert 0 < inside.sum() < len(centers) - 2 and (single < BAND[0]).any()
    counting = CountingModel(model)
    cascade = classify.classify_chunks(hu, centers, counting, 4, CPU, flips=True, flip_band=BAND)
    assert np.array_equal(cascade >= THRESHOLD, every >= THRESHOLD)
    np.testing.assert_allclose(cascade[inside], every[inside], atol=1e-6)
    np.testing.assert_allclose(cascade[~inside], single[~inside], atol=1e-6)
    chunks = [torch.from_numpy(extract_chunk(hu, center, model.input_shape)).float()[None] for center in centers]
    passes = np.array([counting.passes(chunk) for chunk in chunks])
    assert np.array_equal(passes, np.where(inside, 4, 1))
    assert len(counting.seen) == len(centers) + 3 * inside.sum()


def test_the_full_band_and_no_flips_keep_their_one_pass(case) -> None:
    hu, centers, model = case
    counting = CountingModel(model)
    every = classify.classify_chunks(hu, centers, counting, 4, CPU, flips=True, flip_band=classify.ALL_VIEWS_BAND)
    assert len(counting.seen) == 4 * len(centers)
    counting.seen.clear()
    single = classify.classify_chunks(hu, centers, counting, 4, CPU, flips=False, flip_band=BAND)
    assert len(counting.seen) == len(centers)
    assert not np.allclose(every, single)


@pytest.mark.parametrize("text", ["0.9,0.1", "-0.1,0.5", "0.2,1.5", "0.5", "0.1,0.2,0.3", "low,high", ""])
def test_bad_flip_bands_are_one_line_usage_errors(text: str, capsys) -> None:
    with pytest.raises(UsageError, match="--flip-band"):
        classify.parse_flip_band(text)
    assert diagnose_cli.main(["--ct", "no-such-ct", f"--flip-band={text}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--flip-band" in error and len(error.splitlines()) == 1


def test_good_flip_bands_parse() -> None:
    assert classify.parse_flip_band("0,1") == classify.ALL_VIEWS_BAND
    assert classify.parse_flip_band("0.1,0.9") == (0.1, 0.9)
    assert classify.parse_flip_band("0.5,0.5") == (0.5, 0.5)
