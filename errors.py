"""Bad input a user can fix: UserError, and how a script reports it (run_main: one line on
stderr, exit status 2), with the helpers that keep such a line short (capped, shown, short_list).
The ground floor of the import tree: it imports no project module."""
from __future__ import annotations

import errno
import reprlib
import sys
from typing import Any, Callable, List


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with a non-zero exit."""


MAX_MESSAGE_CHARS = 2000  # a message quoting a huge value stays one readable line
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def run_main(main: Callable[[], Any]) -> None:
    """Run a script's main(); a UserError, or a full or read-only disk met by a writer without
    its own message, becomes one clear line and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {capped(user_error_message(error))}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if error.errno not in DISK_ERRORS:
            raise
        print(f"error: cannot write{f' {error.filename}' if error.filename else ''}: {error.strerror}; "
              f"free space (or use a writable folder) and rerun", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def capped(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """message, cut to `limit` characters with a note of how much was left out."""
    return message if len(message) <= limit else \
        f"{message[:limit]}... ({len(message) - limit} more characters left out)"


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """repr() of a value read from a user's file for an error message, bounded in size and in
    work (a YAML alias bomb's value is a small graph whose full repr is gigabytes)."""
    return _SHOWN.repr(value)


def user_error_message(error: UserError) -> str:
    """The one-line message of a UserError, also when a DataLoader worker raised it (the
    DataLoader re-raises it with the worker's traceback folded into the message)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1].strip()
    return last.split("UserError: ", 1)[1] if "UserError: " in last else lines[0]


def short_list(keys: List[str], limit: int = 5) -> str:
    """The first `limit` keys, comma-separated, and how many more there are."""
    listed = ", ".join(keys[:limit])
    return listed + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
