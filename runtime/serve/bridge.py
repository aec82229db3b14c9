"""From the event loop to the scheduler thread and back: a request's events as an async iterator.

The scheduler thread calls the request's sink; the sink hands each event to the event loop with
call_soon_threadsafe, so the engine thread never waits on a client and a slow client only fills
its own queue.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from kvc.errors import GenerationError, KvcError
from kvc.runtime.sampling import SamplingParams
from kvc.runtime.scheduler import PromptTooLong, QueueFull, Scheduler
from kvc.runtime.serve.errors import ApiError, bad_request, overloaded
from kvc.runtime.serving_request import RequestEvent


class RequestStream:
    def __init__(self, scheduler: Scheduler, prompt_ids: Sequence[int], params: SamplingParams, timeout_s: float):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[RequestEvent] = asyncio.Queue()

        def sink(event: RequestEvent) -> None:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        try:
            self.request = scheduler.new_request(prompt_ids, params, sink, timeout_s)
            scheduler.submit(self.request)
        except PromptTooLong as exc:
            raise bad_request(str(exc), param="prompt", code="context_length_exceeded") from None
        except QueueFull as exc:
            raise overloaded(str(exc)) from None
        except GenerationError as exc:  # new_request's checks are about the prompt's ids
            raise bad_request(str(exc), param="prompt") from None
        except KvcError as exc:  # shutting down
            raise ApiError(503, str(exc), type_="server_error") from None

    def cancel(self) -> None:
        self.request.cancel()

    async def events(self) -> AsyncIterator[RequestEvent]:
        while True:
            event = await self._events.get()
            yield event
            if event.end is not None:
                return

    async def cancel_on_disconnect(self, is_disconnected, poll_s: float = 0.25) -> None:
        """For non-streamed responses: end the request when the client hangs up."""
        while self.request.end is None:
            if await is_disconnected():
                self.cancel()
                return
            await asyncio.sleep(poll_s)
