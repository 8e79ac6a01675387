"""The exceptions the CLI turns into a message without a traceback: a mistake a user can fix (exit 2), and a stop
the user asked for (exit 0)."""

from __future__ import annotations

import shlex


def command_line(*words: object) -> str:
    """A command a message tells the user to run, quoted as a shell reads it. Every call is a suggestion that
    tests/test_advice.py finds in the source and runs."""
    return shlex.join(str(word) for word in words)


class UserError(Exception):
    """A problem with the user's input (file, folder, config key) that they can fix; printed without a traceback."""


class NotFound(UserError):
    """A thing the user named (a project, a photo, a run) that is not there; a web API answers it 404."""


class Problems:
    """Every problem one pass of checks finds, so that one run of a command reports them all: `check` runs a check
    and keeps its UserError; `raise_if_any` raises one UserError with them all (a single one as it was worded)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, or None with its UserError kept."""
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            self.found.append(str(e))
            return None

    def passes(self, fn, *args, **kwargs) -> bool:
        """Whether `fn(*args, **kwargs)` raised no UserError (kept if it did): for checks that later ones depend on."""
        before = len(self.found)
        self.check(fn, *args, **kwargs)
        return len(self.found) == before

    def raise_if_any(self, command: str) -> None:
        """`command`: the dreambooth command the problems are of, e.g. 'generate'."""
        if len(self.found) == 1:
            raise UserError(self.found[0])
        if self.found:
            listed = "\n  - ".join(p.replace("\n", "\n    ") for p in self.found)
            raise UserError(f"`dreambooth {command}` has {len(self.found)} problems; nothing was loaded or written:"
                            f"\n  - {listed}")


class TrainingStopped(Exception):
    """A stop the user asked for (Ctrl-C, SIGTERM), after its checkpoint was saved: not an error, the CLI exits 0.

    The training loop knows the step and the checkpoint; the command that ran it knows how to continue (the same
    command line with what resumes it), and says so with `continued_by`."""

    def __init__(self, step: int, checkpoint, continue_with: str | None = None):
        self.step, self.checkpoint, self.continue_with = step, checkpoint, continue_with
        text = f"stopped at step {step} as asked: the checkpoint is {checkpoint}."
        super().__init__(text + (f" Continue where it stopped with `{continue_with}`." if continue_with else ""))

    def continued_by(self, command: str) -> TrainingStopped:
        """The same stop, saying which command continues it."""
        return TrainingStopped(self.step, self.checkpoint, command)
