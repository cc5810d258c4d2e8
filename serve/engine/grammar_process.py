"""Grammar compiles in a child process that is killed when one runs too long (the server's way).

xgrammar's compile cannot be interrupted in a thread, and a spec within every limit of
packserve.engine.grammar_limits may still compile for minutes (shapes nobody has found yet). In a child
process the compile is bounded: past `timeout` the child is killed (and a fresh one started for the next spec),
and the request gets a 400. The child compiles with the server's tokenizer info (sent as JSON at start) and
sends the compiled grammar back serialized; the parent deserializes it against its own tokenizer info.

Cost: the child imports xgrammar (and with it torch: ~3.5 s on 2 CPU cores, ~300 MB), once per child; the
compiled grammar crosses a pipe as JSON (a few KB for common schemas).
"""

from __future__ import annotations

import json
import re
import select
import struct
import subprocess
import sys
import threading

from packserve.engine.request import GuidedSpec, ParameterError

START_TIMEOUT = 120.0  # seconds for a child's imports (xgrammar imports torch: ~3.5 s on 2 idle cores)


def compile_spec(compiler, spec: GuidedSpec):
    """spec compiled by an xgrammar GrammarCompiler; ParameterError naming the field when it does not compile."""
    try:
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.value, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(spec.value)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
        return compiler.compile_grammar(spec.value)
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError with the parser's message
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        message = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", message)  # xgrammar's "[time] file.cc:94: " prefix
        raise ParameterError(f"the {spec.kind.replace('_', ' ')} does not compile: {message[:300]}",
                             spec.param) from None


def choice_grammar(choices: list[str]) -> str:
    """GBNF accepting exactly one of the strings (JSON string escapes are valid GBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _send(stream, payload: bytes) -> None:
    stream.write(struct.pack("<Q", len(payload)) + payload)
    stream.flush()


def _recv(stream) -> bytes | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    n = struct.unpack("<Q", head)[0]
    data = stream.read(n)
    return data if len(data) == n else None


def main() -> None:
    """The child: tokenizer info, then per message a spec (JSON [kind, value, param]); replies b"o" + the
    compiled grammar's JSON, or b"e" + the error message."""
    import xgrammar as xgr

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    info = _recv(inp)
    if info is None:
        return
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(info.decode()), max_threads=1,
                                   cache_enabled=False)
    _send(out, b"r")  # ready: the parent's compile timeouts start now
    while (msg := _recv(inp)) is not None:
        spec = GuidedSpec(*json.loads(msg))
        try:
            _send(out, b"o" + compile_spec(compiler, spec).serialize_json().encode())
        except ParameterError as e:
            _send(out, b"e" + e.message.encode())


class CompileProcess:
    """One child compiling one spec at a time (callers serialize on it); restarted after a kill. The child is
    `python -m packserve.engine.grammar_process`, talking length-prefixed messages over its stdin/stdout."""

    def __init__(self, info, timeout: float, start_now: bool = True):
        """start_now: start the child in the background at once (else at its first compile)."""
        self.info, self.timeout = info, timeout
        self._info_json = info.serialize_json().encode()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        if start_now:
            threading.Thread(target=self._warm, daemon=True, name="grammar-compiler-start").start()

    def _warm(self) -> None:
        """Start the child now, so the first compile does not wait for its imports."""
        with self._lock:
            if self._proc is None:
                try:
                    self._start()
                except (ParameterError, OSError):
                    pass  # the first compile tries again

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "packserve.engine.grammar_process"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        _send(self._proc.stdin, self._info_json)
        ready, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        if not ready or _recv(self._proc.stdout) != b"r":
            self._kill()
            raise ParameterError("the grammar compiler did not start", None)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc.stdin.close()
            self._proc.stdout.close()
        self._proc = None

    def compile(self, spec: GuidedSpec):
        """The compiled grammar (an xgrammar CompiledGrammar of `info`); ParameterError when it does not compile
        or takes longer than the timeout (the child is killed then)."""
        import xgrammar as xgr

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._kill()
                self._start()
            try:
                _send(self._proc.stdin, json.dumps([spec.kind, spec.value, spec.param]).encode())
                # The first compile of a fresh child also waits for its start-up (imports).
                ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
                reply = _recv(self._proc.stdout) if ready else b"t"
            except (OSError, ValueError):  # the child died (e.g. a crash inside the compiler)
                reply = None
            if reply is None or reply == b"t":
                self._kill()
                what = spec.kind.replace("_", " ")
                raise ParameterError(f"the {what} did not compile within {self.timeout:.0f} s; simplify it"
                                     if reply == b"t" else f"the {what} crashed the grammar compiler", spec.param)
        if reply[:1] == b"e":
            raise ParameterError(reply[1:].decode(), spec.param)
        return xgr.CompiledGrammar.deserialize_json(reply[1:].decode(), self.info)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        with self._lock:
            self._kill()


if __name__ == "__main__":
    main()
