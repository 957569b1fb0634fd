"""Cross-request batching on the tiny checkpoint: each task gets what it would alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")


from proto import GenerateImage  # noqa: E402
from proto.commands import Txt2ImgTask  # noqa: E402
from services.inference.batched import Member  # noqa: E402
from services.inference.batching import batch_key  # noqa: E402
from services.inference.pipeline import DiffusersPipeline, Generation  # noqa: E402
from tests.fixtures.tiny_runner import (  # noqa: E402
    BATCH_TOLERANCE,
    max_difference,
    tiny_command,
    tiny_runner,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def runner(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersPipeline:
    return tiny_runner(tiny_checkpoint, tmp_path_factory.mktemp("cache"), preview_interval_s=0)


def _alone(runner: DiffusersPipeline, command: GenerateImage) -> Generation:
    return runner.generate(command, {}, lambda *_: None, lambda: False)


class Recorder:
    """One member's callbacks, recorded."""

    def __init__(self, command: GenerateImage, stop_at: int | None = None) -> None:
        self.steps: list[tuple[int, int, int]] = []
        self.previews = 0
        self.cancelled_at: int | None = None
        self.stop_at = stop_at
        self.member = Member(
            command=command,
            on_step=self.on_step,
            should_stop=self.should_stop,
            should_skip=lambda: False,
            on_cancelled=self.on_cancelled,
        )

    def on_step(self, job: int, step: int, total: int, preview: bytes | None) -> None:
        self.steps.append((job, step, total))
        self.previews += preview is not None

    def should_stop(self) -> bool:
        return self.stop_at is not None and len(self.steps) >= self.stop_at

    def on_cancelled(self) -> None:
        self.cancelled_at = len(self.steps)


def test_batched_images_equal_unbatched(runner: DiffusersPipeline) -> None:
    commands = [
        tiny_command("a", prompt="a cat", seed=11),
        tiny_command("b", prompt="a dog on a hill", seed=12, batch_size=2),
        tiny_command("c", prompt="(a red fox:1.3)", seed=13, n_iter=2),  # own encoder
        tiny_command("d", prompt="a cat", negative_prompt="blurry", seed=14),
    ]
    assert len({batch_key(c) for c in commands}) == 1, "all four are compatible"
    recorders = [Recorder(c) for c in commands]
    runner.generate_batch([r.member for r in recorders])
    for command, recorder in zip(commands, recorders, strict=True):
        batched = recorder.member.outcome
        assert isinstance(batched, Generation), batched
        alone = _alone(runner, command)
        assert alone.seeds == batched.seeds
        assert max_difference(alone, batched) <= BATCH_TOLERANCE, command.task_id
        assert alone.info["infotexts"] == batched.info["infotexts"]
        assert isinstance(command, Txt2ImgTask)
        request = command.request
        expected = [(j, s, 3) for j in range(request.n_iter) for s in (1, 2, 3)]
        assert expected == recorder.steps, "each task gets its own progress"


def test_a_different_seed_is_a_different_image_in_the_same_batch(
    runner: DiffusersPipeline,
) -> None:
    """The premise of the equality test: rows do differ, so equality is not vacuous."""
    recorders = [Recorder(tiny_command(t, seed=s)) for t, s in (("x", 1), ("y", 2))]
    runner.generate_batch([r.member for r in recorders])
    first, second = (r.member.outcome for r in recorders)
    assert isinstance(first, Generation)
    assert isinstance(second, Generation)
    assert max_difference(first, second) > 10


def test_cancelling_one_task_leaves_the_others(runner: DiffusersPipeline) -> None:
    keep = Recorder(tiny_command("keep", seed=21, steps=4))
    cancel = Recorder(tiny_command("cancel", seed=22, steps=4), stop_at=2)
    runner.generate_batch([keep.member, cancel.member])
    assert cancel.member.cancelled
    assert 2 == cancel.cancelled_at, "dropped at the step boundary after its cancel"
    assert cancel.member.outcome is None
    assert isinstance(keep.member.outcome, Generation)
    alone = _alone(runner, keep.member.command)
    assert max_difference(alone, keep.member.outcome) <= BATCH_TOLERANCE
    assert 4 == len(keep.steps)


def test_all_cancelled_stops_the_call(runner: DiffusersPipeline) -> None:
    recorders = [Recorder(tiny_command(t, steps=20), stop_at=1) for t in ("p", "q")]
    runner.generate_batch([r.member for r in recorders])
    assert all(r.member.cancelled for r in recorders)
    assert all(len(r.steps) == 1 for r in recorders), "no step after everyone left"


def test_a_bad_embedding_fails_its_own_task_only(runner: DiffusersPipeline, tmp_path: Path) -> None:
    from proto.commands import AdapterRef

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a safetensors file")
    good = Recorder(tiny_command("good", seed=3))
    broken = Recorder(
        tiny_command("broken", seed=4, embeddings=[AdapterRef(name="bad", path=str(bad))])
    )
    runner.generate_batch([good.member, broken.member])
    assert isinstance(good.member.outcome, Generation)
    failure = broken.member.outcome
    assert not isinstance(failure, Generation)
    assert failure is not None
    assert "embedding_failed" == failure.code


def test_previews_show_each_tasks_own_rows(runner: DiffusersPipeline) -> None:
    every: dict[str, Any] = {"show_progress_every_n_steps": 1}
    recorders = [
        Recorder(tiny_command(t, seed=s, override_settings=every)) for t, s in (("m", 1), ("n", 99))
    ]
    runner.generate_batch([r.member for r in recorders])
    assert [3, 3] == [r.previews for r in recorders]


def test_out_of_memory_retries_as_smaller_batches(
    runner: DiffusersPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call with more than two rows runs out of memory (injected): the batch is split
    until the calls fit, and every task still gets its own image."""
    real = runner._run_job
    calls: list[int] = []

    def tight_memory(*args: Any, **kwargs: Any) -> Any:
        rows = len(args[2])
        calls.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "_run_job", tight_memory)
    commands = [tiny_command(t, seed=s) for t, s in (("o1", 1), ("o2", 2), ("o3", 3), ("o4", 4))]
    recorders = [Recorder(c) for c in commands]
    runner.generate_batch([r.member for r in recorders])
    assert [4, 2, 2] == calls
    monkeypatch.undo()
    for command, recorder in zip(commands, recorders, strict=True):
        outcome = recorder.member.outcome
        assert isinstance(outcome, Generation), outcome
        assert max_difference(_alone(runner, command), outcome) <= BATCH_TOLERANCE


def test_out_of_memory_of_a_single_task_is_its_error(
    runner: DiffusersPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(runner, "_run_job", no_memory)
    recorders = [Recorder(tiny_command(t)) for t in ("z1", "z2")]
    with pytest.raises(torch.OutOfMemoryError):
        runner.generate_batch([r.member for r in recorders])
