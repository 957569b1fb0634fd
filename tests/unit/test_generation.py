"""A task's output encoded off the event loop: started from the pipeline thread
(``Generation.encode_in``) and taken up by the worker's loop (``Generation.encoded``)."""

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PIL import Image

from services.inference.pipeline import Generation


def _generation() -> Generation:
    frames = [(Image.new("RGB", (8, 8), (n, 0, 0)), f"frame {n}") for n in range(3)]
    return Generation(seeds=[1, 2, 3], frames=frames)


class _Counted(ThreadPoolExecutor):
    """Remembers the threads its calls ran on."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="encode-test")
        self.ran_on: list[str] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        def on_record() -> Any:
            self.ran_on.append(threading.current_thread().name)
            return fn(*args, **kwargs)

        return super().submit(on_record)


async def test_an_encoding_started_early_is_the_one_taken_up() -> None:
    executor = _Counted()
    generation = _generation()
    generation.encode_in(executor)
    generation.encode_in(executor)  # once only
    pngs = await generation.encoded()
    executor.shutdown()
    assert _generation().images == pngs
    assert 1 == len(executor.ran_on)
    assert executor.ran_on[0].startswith("encode-test")


class _Watched(Generation):
    """Remembers the threads its images were encoded on."""

    encoded_on: list[threading.Thread]

    @property
    def images(self) -> list[bytes]:
        self.encoded_on.append(threading.current_thread())
        return [b"png"]


async def test_without_an_early_start_it_is_encoded_in_a_thread() -> None:
    generation = _Watched(seeds=[1])
    generation.encoded_on = []
    assert [b"png"] == await generation.encoded()
    assert 1 == len(generation.encoded_on)
    assert threading.current_thread() is not generation.encoded_on[0], "off the loop"
