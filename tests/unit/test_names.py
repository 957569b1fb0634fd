import pytest

from proto import names


def test_model_key_is_readable_slug_plus_hash() -> None:
    key = names.model_key("dreamshaper_7.safetensors")
    assert key.startswith("dreamshaper_7-")
    assert names.is_model_key(key)


def test_model_key_is_stable_and_distinguishes_folders() -> None:
    assert names.model_key("a b.safetensors") == names.model_key("a b.safetensors")
    assert names.model_key("x/a_b.safetensors") != names.model_key("y/a_b.safetensors")


@pytest.mark.parametrize(
    "name",
    ["Ünïcödé model.safetensors", "日本語.safetensors", "..", "a.b.c*>", "x" * 300],
)
def test_model_key_is_subject_safe(name: str) -> None:
    key = names.model_key(name)
    assert names.is_model_key(key)
    assert not set(". *>") & set(key)


def test_subjects_streams_and_consumers() -> None:
    assert "sd.task.m-123abc" == names.task_subject("m-123abc")
    assert "sd_m-123abc" == names.consumer_name("m-123abc")
    assert "sd.event.t1.progress" == names.event_subject("t1", "progress")
    assert "sd.event.t1.>" == names.task_events_filter("t1")
    assert "sd.cancel.t1" == names.cancel_subject("t1")
    assert "images/alice/t1_2.png" == names.image_key("alice", "t1", 2)


@pytest.mark.parametrize("task_id", ["a.b", "a*", ">", "", "a b", "../x"])
def test_task_ids_that_would_break_subjects_are_refused(task_id: str) -> None:
    with pytest.raises(ValueError, match="task id"):
        names.event_subject(task_id, "started")


def test_chosen_task_ids_are_scoped_per_user() -> None:
    alice, bob = names.scoped_task_id("alice", "x"), names.scoped_task_id("bob", "x")
    assert alice != bob
    assert alice == names.scoped_task_id("alice", "x")
    # Shaped like a generated id: subject- and key-safe.
    assert 24 == len(alice)
    assert alice == names.check_task_id(alice)
