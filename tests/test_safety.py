"""Image safety: a tiny ViT classifier loaded through the real transformers code, and the bot's decision.

The tiny classifiers have their final layer pinned (zero weights, log-probability biases), so
every image gets exactly the class probabilities a test asks for; the verdicts must follow them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bot.content_rules import (
    SafetyAction,
    SafetyPolicy,
    flagged_labels,
    safety_action,
    spoiler_filename,
    tile_verdicts,
)
from bot.settings import BotSettings
from workers.safety import SafetyChecker, parse_labels
from workers.schema import (
    EngineReport,
    ErrorCode,
    ImageOut,
    JobResult,
    Layout,
    SafetyVerdict,
    Timings,
    WorkerError,
)
from workers.settings import WorkerSettings
from workers.tiny_safety import make_tiny_safety_classifier


def images(count: int = 3) -> list[Image.Image]:
    """Different sizes and modes, as results and member uploads come."""
    shapes = [((96, 64), "RGB", (200, 30, 30)), ((40, 40), "L", 128), ((64, 80), "RGBA", (0, 0, 255, 128))]
    return [Image.new(mode, size, colour) for size, mode, colour in shapes[:count]]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny classifiers saved with save_pretrained, one per pinned outcome."""
    root = tmp_path_factory.mktemp("safety")
    return {
        "nsfw_wins": make_tiny_safety_classifier(root / "a", probabilities={"normal": 0.1, "nsfw": 0.9}),
        "normal_wins": make_tiny_safety_classifier(root / "b", probabilities={"normal": 0.8, "nsfw": 0.2}),
        "borderline": make_tiny_safety_classifier(root / "c", probabilities={"normal": 0.3, "nsfw": 0.7}),
        "five": make_tiny_safety_classifier(
            root / "d",
            labels=("drawings", "hentai", "neutral", "porn", "sexy"),
            probabilities={"drawings": 0.05, "hentai": 0.25, "neutral": 0.4, "porn": 0.25, "sexy": 0.05},
        ),
        "multi": make_tiny_safety_classifier(
            root / "e",
            labels=("normal", "nsfw", "violence"),
            probabilities={"normal": 0.9, "nsfw": 0.6, "violence": 0.3},
            multi_label=True,
        ),
        "random": make_tiny_safety_classifier(root / "f"),
    }


@pytest.mark.slow
def test_unsafe_label_winning_flags_every_image(models: dict[str, Path]) -> None:
    """When the classifier says nsfw (0.9), each image's verdict is nsfw, 0.9, unsafe."""
    checker = SafetyChecker.load(models["nsfw_wins"])
    verdicts = checker.classify(images())
    assert len(verdicts) == 3
    for verdict in verdicts:
        assert verdict.label == "nsfw" and verdict.unsafe
        assert verdict.score == pytest.approx(0.9, abs=1e-4)


@pytest.mark.slow
def test_safe_label_winning_flags_nothing(models: dict[str, Path]) -> None:
    """When normal wins (0.8), the verdict is normal with the nsfw probability (0.2) as score."""
    verdicts = SafetyChecker.load(models["normal_wins"]).classify(images())
    assert [v.label for v in verdicts] == ["normal"] * 3
    assert not any(v.unsafe for v in verdicts)
    assert all(v.score == pytest.approx(0.2, abs=1e-4) for v in verdicts)


@pytest.mark.slow
def test_threshold_decides(models: dict[str, Path]) -> None:
    """An image at 0.7 nsfw is flagged at thresholds 0.6 and 0.69, not at 0.71 or 0.8."""
    assert SafetyChecker.load(models["borderline"], threshold=0.6).classify(images(1))[0].unsafe
    assert SafetyChecker.load(models["borderline"], threshold=0.69).classify(images(1))[0].unsafe
    assert not SafetyChecker.load(models["borderline"], threshold=0.71).classify(images(1))[0].unsafe
    verdict = SafetyChecker.load(models["borderline"], threshold=0.8).classify(images(1))[0]
    assert verdict.label == "nsfw" and not verdict.unsafe


@pytest.mark.slow
def test_unsafe_labels_are_summed_and_configurable(models: dict[str, Path]) -> None:
    """hentai 0.25 + porn 0.25 = 0.5 flags an image whose top label is neutral; only porn does not."""
    default = SafetyChecker.load(models["five"]).classify(images(1))[0]
    assert default.label == "neutral" and default.unsafe
    assert default.score == pytest.approx(0.5, abs=1e-4)
    porn_only = SafetyChecker.load(models["five"], unsafe_labels=["PORN"]).classify(images(1))[0]
    assert porn_only.score == pytest.approx(0.25, abs=1e-4) and not porn_only.unsafe
    wide = SafetyChecker.load(models["five"], unsafe_labels=parse_labels("porn,hentai,sexy"))
    assert wide.classify(images(1))[0].score == pytest.approx(0.55, abs=1e-4)


@pytest.mark.slow
def test_multi_label_classifier_uses_sigmoid_and_the_largest(models: dict[str, Path]) -> None:
    """A multi-label model's score is the largest unsafe probability (0.6), not a softmax share."""
    checker = SafetyChecker.load(models["multi"], unsafe_labels=["nsfw", "violence"])
    verdict = checker.classify(images(1))[0]
    assert verdict.label == "normal"
    assert verdict.score == pytest.approx(0.6, abs=1e-4) and verdict.unsafe


@pytest.mark.slow
def test_random_classifier_gives_valid_verdicts(models: dict[str, Path]) -> None:
    """Unpinned random weights still give one well-formed verdict per image, the same each run."""
    checker = SafetyChecker.load(models["random"])
    first, again = checker.classify(images()), checker.classify(images())
    assert first == again
    assert all(v.label in {"normal", "nsfw"} and 0 <= v.score <= 1 for v in first)
    assert checker.classify([]) == []


@pytest.mark.slow
def test_labels_without_an_unsafe_one_are_refused(models: dict[str, Path]) -> None:
    """A classifier none of whose labels is unsafe would pass everything: loading it fails."""
    with pytest.raises(WorkerError) as info:
        SafetyChecker.load(models["nsfw_wins"], unsafe_labels=["gore"])
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "SAFETY_UNSAFE_LABELS" in info.value.message


def test_missing_model_is_unavailable(tmp_path: Path) -> None:
    """A folder without a classifier is a clean ENGINE_UNAVAILABLE, not a traceback."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkerError) as info:
        SafetyChecker.load(tmp_path / "empty")
    assert info.value.code is ErrorCode.ENGINE_UNAVAILABLE
    assert "could not be loaded" in info.value.message


def test_the_soft_time_limit_while_loading_is_not_a_broken_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job ran out of time: the task reports a TIMEOUT, not "could not be loaded"."""
    import transformers
    from celery.exceptions import SoftTimeLimitExceeded

    def out_of_time(*args: object, **kwargs: object) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        SafetyChecker.load(tmp_path)


@pytest.mark.slow
def test_from_settings(models: dict[str, Path]) -> None:
    """Unset SAFETY_MODEL means no checker; set, the settings' threshold and labels apply."""
    assert SafetyChecker.from_settings(WorkerSettings(_env_file=None)) is None
    settings = WorkerSettings(
        _env_file=None,
        safety_model=str(models["borderline"]),
        safety_threshold=0.75,
        safety_unsafe_labels="NSFW",
    )
    checker = SafetyChecker.from_settings(settings)
    assert checker is not None and checker.threshold == 0.75
    assert not checker.classify(images(1))[0].unsafe


def test_verdicts_travel_in_the_result_message() -> None:
    """JobResult carries one verdict per image through JSON; old results without it still validate."""
    result = JobResult(
        job_id="j1",
        layout=Layout.GRID,
        image=ImageOut(data_b64="", width=2, height=2),
        tile_width=1,
        tile_height=1,
        seed=1,
        timings=Timings(generation_s=1, total_s=1),
        report=EngineReport(engine="sdxl", model="tiny"),
        safety=[SafetyVerdict(label="nsfw", score=0.9, unsafe=True)],
    )
    data = result.model_dump(mode="json")
    assert JobResult.model_validate(data).safety == result.safety
    del data["safety"]
    assert JobResult.model_validate(data).safety == []


# --- the bot's decision ------------------------------------------------------------------------

SAFE = SafetyVerdict(label="normal", score=0.1, unsafe=False)
FLAGGED = SafetyVerdict(label="nsfw", score=0.9, unsafe=True)


@pytest.mark.parametrize(
    ("verdicts", "nsfw_channel", "policy", "expected"),
    [
        ([SAFE, SAFE], False, SafetyPolicy("block"), SafetyAction.ALLOW),
        ([], False, SafetyPolicy("block"), SafetyAction.ALLOW),  # no classifier ran
        ([SAFE, FLAGGED], False, SafetyPolicy("block"), SafetyAction.BLOCK),
        ([SAFE, FLAGGED], False, SafetyPolicy("spoiler"), SafetyAction.SPOILER),
        ([FLAGGED], True, SafetyPolicy("block", allow_nsfw_channels=True), SafetyAction.ALLOW),
        ([FLAGGED], True, SafetyPolicy("spoiler", allow_nsfw_channels=True), SafetyAction.ALLOW),
        ([FLAGGED], True, SafetyPolicy("block", allow_nsfw_channels=False), SafetyAction.BLOCK),
        ([FLAGGED], True, SafetyPolicy("spoiler", allow_nsfw_channels=False), SafetyAction.SPOILER),
    ],
)
def test_safety_action(
    verdicts: list[SafetyVerdict], nsfw_channel: bool, policy: SafetyPolicy, expected: SafetyAction
) -> None:
    """Safe results are posted; flagged ones too in allowed NSFW channels, else spoilered or blocked."""
    assert safety_action(verdicts, nsfw_channel, policy) is expected


def test_policy_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAFETY_ACTION and SAFETY_ALLOW_NSFW_CHANNELS make the policy; the defaults block and allow NSFW."""
    assert SafetyPolicy.from_settings(BotSettings(_env_file=None)) == SafetyPolicy("block", True)
    monkeypatch.setenv("SAFETY_ACTION", "spoiler")
    monkeypatch.setenv("SAFETY_ALLOW_NSFW_CHANNELS", "false")
    assert SafetyPolicy.from_settings(BotSettings(_env_file=None)) == SafetyPolicy("spoiler", False)


def test_tile_verdicts_pick_the_upscaled_tile() -> None:
    """U2 of a grid whose second tile is flagged is flagged; U1 is not; mismatched lists count whole."""
    grid = [SAFE, FLAGGED, SAFE, SAFE]
    assert tile_verdicts(grid, 2) == [FLAGGED]
    assert safety_action(tile_verdicts(grid, 1), False, SafetyPolicy()) is SafetyAction.ALLOW
    assert tile_verdicts([FLAGGED], 3) == [FLAGGED]
    assert tile_verdicts([], 1) == []


def test_spoiler_filename_and_labels() -> None:
    """Discord blurs files named SPOILER_*; the prefix is added once. Flagged labels list each once."""
    assert spoiler_filename("grid.png") == "SPOILER_grid.png"
    assert spoiler_filename("SPOILER_grid.png") == "SPOILER_grid.png"
    assert flagged_labels([SAFE, FLAGGED, FLAGGED]) == ["nsfw"]
