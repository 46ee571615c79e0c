"""A command to run: argv list (never a shell string), working dir, extra environment."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from umm.errors import UmmError


@dataclass
class Command:
    argv: List[str]
    cwd: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)  # added on top of os.environ

    def shell(self) -> str:
        """The copy-pasteable shell line that does the same (quoted; for printing only)."""
        line = shlex.join(self.argv)
        if self.env:
            line = shlex.join(["env", *(f"{k}={v}" for k, v in self.env.items())]) + " " + line
        if self.cwd:
            line = f"cd {shlex.quote(self.cwd)} && {line}"
        return line


class LaunchError(UmmError, RuntimeError):
    """A launched process failed; ``exit_code`` is its exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
