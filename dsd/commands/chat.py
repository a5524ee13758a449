"""dsd chat: talk to the running daemon (interactive, or one question and exit)."""
from __future__ import annotations

import sys
import time

from dsd.commands._sampling_args import add_sampling_arguments, sampling_kwargs

HELP = "chat with the running daemon (streaming; `dsd chat \"question\"` answers once)"

COMMANDS_HELP = """commands:
  /reset               forget the conversation (keeps the system message)
  /system TEXT         set the system message (and reset)
  /set NAME VALUE      sampling parameter, e.g. /set temperature 0.7, /set max_tokens 200
  /show                show the system message and sampling parameters
  /help                this text
  /quit                leave (or Ctrl-D)
multi-line input: end a line with \\ to continue it, or wrap the text in triple quotes \"\"\"."""


def add_arguments(p) -> None:
    p.add_argument("question", nargs="?", default=None,
                   help="ask once and exit (reads stdin when it is not a terminal and no question is given)")
    p.add_argument("--system", "-s", default=None, help="system message")
    p.add_argument("--instance", default=None)
    p.add_argument("--no-stats", action="store_true", help="do not print tokens/s after answers")
    add_sampling_arguments(p)


def _coerce(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class ChatSession:
    """Conversation state and command handling, separate from the terminal for testing."""

    def __init__(self, client, system: str | None, params: dict, out=sys.stdout, err=sys.stderr,
                 stats: bool = True):
        self.client, self.system, self.params = client, system, dict(params)
        self.history: list[dict] = []
        self.out, self.err, self.stats = out, err, stats

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + self.history

    def command(self, line: str) -> bool:
        """Handle a /command; returns False to quit."""
        parts = line.strip().split(None, 2)
        cmd = parts[0].lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/reset":
            self.history.clear()
            print("[conversation reset]", file=self.err)
        elif cmd == "/system":
            self.system = line.strip()[len(parts[0]):].strip() or None
            self.history.clear()
            print(f"[system message {'set' if self.system else 'cleared'}; conversation reset]", file=self.err)
        elif cmd == "/set":
            if len(parts) < 3:
                print("usage: /set NAME VALUE (e.g. /set temperature 0.7)", file=self.err)
            else:
                name = parts[1].replace("-", "_")
                self.params[name] = _coerce(parts[2])
                if name == "stop" and isinstance(self.params[name], str):
                    self.params[name] = [self.params[name]]
                print(f"[{name} = {self.params[name]!r}]", file=self.err)
        elif cmd == "/show":
            print(f"system: {self.system!r}\nparams: {self.params}\nturns: {len(self.history) // 2}",
                  file=self.err)
        elif cmd == "/help":
            print(COMMANDS_HELP, file=self.err)
        else:
            print(f"unknown command {cmd}; /help lists them", file=self.err)
        return True

    def ask(self, text: str) -> str:
        from dsd.client import InvalidRequest

        self.history.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        t_first = None
        pieces = []
        last = None
        thinking = False   # the model's reasoning is shown apart: dimmed, or after "thinking: "
        tty = getattr(self.out, "isatty", lambda: False)()
        try:
            for ch in self.client.chat(self.messages(), stream=True, **self.params):
                if t_first is None:
                    t_first = time.perf_counter()
                if getattr(ch, "reasoning", "") and not thinking:
                    self.out.write("\x1b[2m" if tty else "thinking: ")
                    thinking = True
                if getattr(ch, "reasoning", ""):
                    self.out.write(ch.reasoning)
                if thinking and (ch.text or ch.tool_calls or ch.finish_reason):
                    self.out.write("\x1b[0m\n" if tty else "\n")
                    thinking = False
                for call in getattr(ch, "tool_calls", None) or ():
                    self.out.write(f"[tool call {call['name']}({call['arguments']})]\n")
                pieces.append(ch.text)
                self.out.write(ch.text)
                self.out.flush()
                last = ch
        except InvalidRequest as e:
            self.history.pop()
            if "unknown sampling parameter" in str(e) or "sampling parameter" in str(e):
                print(f"\n[error: {e}]", file=self.err)
                return ""
            raise
        except BaseException:
            self.history.pop()
            raise
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        if self.stats and last is not None:
            t1 = time.perf_counter()
            n = last.completion_tokens or 0
            dec = (n - 1) / (t1 - t_first) if n > 1 and t1 > t_first else 0.0
            print(f"[{n} tokens, {dec:.1f} tok/s, first token after {t_first - t0:.2f}s, "
                  f"finish: {last.finish_reason}]", file=self.err)
        return answer

    def repl(self, prompt_fn) -> int:
        """Read messages and commands until EOF or /quit.  A request the daemon fails (a worker
        died, the daemon is busy, a timeout) is reported and the session goes on."""
        from dsd.client import RequestFailed

        while True:
            text = read_message(prompt_fn)
            if text is None:
                print(file=self.err)
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            try:
                self.ask(text)
            except KeyboardInterrupt:
                print("\n[interrupted]", file=self.err)
            except RequestFailed as e:
                wait = getattr(e, "retry_after", None)
                print(f"\n[error: {e}" + (f"; retry in {wait:g} s" if wait else "") + "]", file=self.err)


def read_message(prompt_fn) -> str | None:
    """One user message from prompt_fn (input-like): backslash continuation or triple quotes."""
    try:
        line = prompt_fn(">>> ")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        body = [line.strip()[3:]]
        if body[0].endswith('"""') and len(line.strip()) >= 6:
            return body[0][:-3]
        while True:
            try:
                nxt = prompt_fn("... ")
            except EOFError:
                break
            if nxt.rstrip().endswith('"""'):
                body.append(nxt.rstrip()[:-3])
                break
            body.append(nxt)
        return "\n".join(body).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(prompt_fn("... "))
        except EOFError:
            break
    return "\n".join(lines)


def run(args) -> int:
    from dsd.client import Client

    client = Client(instance=args.instance)
    params = sampling_kwargs(args)
    question = args.question
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read().strip()
    session = ChatSession(client, args.system, params, stats=not args.no_stats and sys.stderr.isatty()
                          if question is not None else not args.no_stats)
    if question is not None:
        session.ask(question)
        return 0
    client.status()  # fail early with DaemonNotRunning
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    info = client.model_info()
    print(f"dsd chat with {info['name']} ({info['architecture']}, {info['nodes']} node(s)); "
          f"/help for commands, Ctrl-D to quit", file=sys.stderr)
    return session.repl(input)
