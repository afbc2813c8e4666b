"""What the hooks write on disk, and how it is read back: a delivery (a file in pending/,
or one hook's share of a journal line), a delivery file's name, and a journal line; and a
hook's key, which names the hook in each of them.

A delivery names its hook by a key of the hook's target (``hook_key``), never by the
command or URL itself: whoever can write the spool cannot make the daemon run anything the
settings do not list.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kinod.config import HookSettings
from kinod.models import Sidecar, is_valid_job_id

HOOK_SCHEMA = "kinod.hook/1"
MAX_DELIVERY_BYTES = 16 << 20  # a sidecar's result is the plugin's; a bigger file is no delivery
_BREAKS = re.compile(rb"\n *")
_KEY_CHARS = frozenset("0123456789abcdef")


class Delivery(BaseModel):
    """A delivery file: which hook to tell, how many attempts it has had, and the sidecar as
    it was when the job ended (a later run's sidecar may have replaced it in the outbox)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["kinod.hook/1"] = Field(default=HOOK_SCHEMA, alias="schema")
    hook: str = Field(pattern=r"^[0-9a-f]{16}$")
    attempts: int = Field(default=0, ge=0)
    sidecar: Sidecar

    @field_validator("sidecar")
    @classmethod
    def _ended_job(cls, sidecar: Sidecar) -> Sidecar:
        # The id names the job's log file: it must be a valid id, never a path.
        if not is_valid_job_id(sidecar.id):
            raise ValueError("the sidecar's id is not a job id")
        if not sidecar.state.is_terminal:
            raise ValueError("the job has not ended")
        return sidecar

    def to_json(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode() + b"\n"


def hook_key(hook: HookSettings) -> str:
    """A hook's name in delivery files: the same for the same target across restarts and
    reloads, whatever its filters, retries or timeout."""
    target = json.dumps({"run": hook.run, "url": hook.url}, sort_keys=True)
    return hashlib.sha256(target.encode()).hexdigest()[:16]


def keyed(hooks: list[HookSettings]) -> list[tuple[str, HookSettings]]:
    """The hooks with their keys, in the settings' order."""
    return [(hook_key(hook), hook) for hook in hooks]


def matching_hooks(hooks: list[HookSettings], sidecar: Sidecar) -> dict[str, HookSettings]:
    """The hooks to tell of this end, by key; two entries with one target are told once."""
    found: dict[str, HookSettings] = {}
    for hook in hooks:
        if sidecar.state.value in hook.on and (hook.types is None or sidecar.type in hook.types):
            found.setdefault(hook_key(hook), hook)
    return found


def delivery_name(due_ns: int, key: str, job_id: str) -> str:
    return f"{due_ns:020d}.{key}.{job_id}.json"


def parse_name(name: str) -> tuple[int, str] | None:
    """A delivery file's due time and hook key; None for a name kinod did not make."""
    due, _, rest = name.partition(".")
    key, _, rest = rest.partition(".")
    if (len(due) != 20 or not due.isdigit() or len(key) != 16 or not set(key) <= _KEY_CHARS
            or not rest.endswith(".json")):
        return None
    return int(due), key


def journal_line(keys: list[str], sidecar: Sidecar, data: bytes | None = None) -> bytes:
    """One journal line: the hooks to tell, and the sidecar as written (``data``, its
    indented JSON: its line breaks are only whitespace, so taking them out keeps it the
    same JSON, on one line)."""
    body = _BREAKS.sub(b"", data if data is not None else sidecar.to_json())
    return b'{"hooks":' + json.dumps(keys).encode() + b',"sidecar":' + body + b"}\n"


def parse_line(raw: bytes) -> list[Delivery] | None:
    """The deliveries of a journal line; None for a line that is none."""
    try:
        record = json.loads(raw)
        keys, body = record["hooks"], record["sidecar"]
        if not isinstance(keys, list) or not keys:
            return None
        sidecar = Sidecar.model_validate(body)
        return [Delivery(hook=key, sidecar=sidecar) for key in dict.fromkeys(keys)]
    except (ValueError, TypeError, KeyError, RecursionError, ValidationError):
        return None
