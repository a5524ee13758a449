"""Issue 17 (points 6/11 seen from `dsd chat`): a request the daemon fails (worker death, busy,
timeout) is reported in the session, which goes on; the history stays consistent."""
from __future__ import annotations

import io

from dsd.client import Chunk, DaemonBusy, RequestFailed
from dsd.commands.chat import ChatSession


class FlakyClient:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = []

    def chat(self, messages, stream=False, **params):
        self.calls.append(list(messages))
        if self.failures:
            raise self.failures.pop(0)
        yield Chunk("ok", "stop", 3, 1)


def test_repl_reports_failures_and_goes_on():
    busy = DaemonBusy("the daemon is busy: 80 requests in flight")
    busy.retry_after = 4.0
    died = RequestFailed("worker 0 (pid 9) died while serving this request; retry the request")
    fc = FlakyClient([busy, died])
    out, err = io.StringIO(), io.StringIO()
    s = ChatSession(fc, None, {}, out=out, err=err)
    lines = iter(["one", "two", "three"])

    def prompt(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert s.repl(prompt) == 0
    e = err.getvalue()
    assert "[error: the daemon is busy: 80 requests in flight; retry in 4 s]" in e
    assert "[error: worker 0 (pid 9) died" in e
    assert out.getvalue() == "ok\n"
    # failed turns left no trace: the third request carries only its own message
    assert fc.calls[2] == [{"role": "user", "content": "three"}]
    assert s.history == [{"role": "user", "content": "three"}, {"role": "assistant", "content": "ok"}]
