"""Reading Blender's output as it renders: frames, samples, saved files, errors, and what of
it goes into the job's log."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .command import FRAME_TAG, VERSION_TAG

# Cycles: "Fra:12 Mem:9.9M ... | Scene, ViewLayer | Sample 5/32"; Eevee: "... | Rendering
# 26 / 64 samples". Both start with "Fra:<frame>".
_STATUS = re.compile(r"^Fra:(-?\d+)\b")
_CYCLES_SAMPLE = re.compile(r"\| Sample (\d+)/(\d+)")
_EEVEE_SAMPLE = re.compile(r"\| Rendering (\d+) / (\d+) samples")
_SAVED = re.compile(r"^Saved: '(.*)'")
# After each saved frame: " Time: 00:00.23 (Saving: 00:00.17)", or "01:02:03.45".
_TIME = re.compile(r"^\s*Time: (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)")

MAX_LOGGED_LINES = 2000  # of Blender's output, per job; status lines are throttled too


@dataclass
class FrameDone:
    frame: int
    file: str
    render_time_s: float | None = None


@dataclass
class BlenderOutput:
    """What Blender has said so far about a render of ``frames``."""

    frames: list[int]
    log: Callable[[str, str], None]  # (level, line): into the job's log
    log_interval_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    version: str | None = None
    paths: dict[int, str] = field(default_factory=dict)  # frame -> where Blender writes it
    done: list[FrameDone] = field(default_factory=list)
    last_error: str | None = None
    current: int | None = None  # the frame being rendered
    sample: tuple[int, int] | None = None
    _last_status: int | None = None  # the frame of the last status line
    _logged: int = 0
    _status_logged_at: float | None = None

    def feed(self, line: str) -> bool:
        """Take one line; True if the progress it shows changed."""
        line = line.rstrip()
        if line.startswith(FRAME_TAG):
            frame, _, path = line[len(FRAME_TAG):].partition(" ")
            if frame.lstrip("-").isdigit():
                self.paths[int(frame)] = path
            return False
        if line.startswith(VERSION_TAG):
            self.version = line[len(VERSION_TAG):].strip() or None
            self._log("INFO", f"Blender {self.version}")
            return False
        status = _STATUS.match(line)
        if status is not None:
            return self._status(line, int(status.group(1)))
        # Blender's own lines are DEBUG: the job's log keeps them, the daemon's shows errors.
        self._log("WARNING" if line.startswith("Error") else "DEBUG", line)
        saved = _SAVED.match(line)
        if saved is not None:
            frame = self.current if self.current is not None else self._last_status
            if frame is None:
                frame = self._next_frame()
            if self.done and self.done[-1].frame == frame:
                return False  # another file of the same frame (a File Output node's)
            self.done.append(FrameDone(frame, saved.group(1)))
            self.current, self.sample = None, None
            return True
        timing = _TIME.match(line)
        if timing is not None and self.done and self.done[-1].render_time_s is None:
            hours, minutes, seconds = timing.groups()
            self.done[-1].render_time_s = round(
                int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds), 3)
        if line.startswith("Error:"):
            self.last_error = line[len("Error:"):].strip() or line
        return False

    def _status(self, line: str, frame: int) -> bool:
        now = self.clock()
        if (self._status_logged_at is None or now - self._status_logged_at >= self.log_interval_s
                or frame != self.current):
            self._status_logged_at = now
            self._log("DEBUG", line)
        changed = frame != self.current
        self.current = self._last_status = frame
        found = _CYCLES_SAMPLE.search(line) or _EEVEE_SAMPLE.search(line)
        if found is not None:
            sample = (int(found.group(1)), int(found.group(2)))
            changed = changed or sample != self.sample
            self.sample = sample
        return changed

    def _next_frame(self) -> int:
        index = len(self.done)
        return self.frames[index] if index < len(self.frames) else -1

    def _log(self, level: str, line: str) -> None:
        if not line.strip() or self._logged > MAX_LOGGED_LINES:
            return
        self._logged += 1
        if self._logged > MAX_LOGGED_LINES:
            line, level = (f"(Blender's further output is not logged: more than "
                           f"{MAX_LOGGED_LINES} lines)"), "INFO"
        self.log(level, line)

    # --- progress -----------------------------------------------------------------------

    def percent(self) -> float:
        """Frames done plus the fraction of the current frame, below 100 until checked."""
        total = len(self.frames)
        fraction = 0.0
        if self.current is not None and self.sample is not None and self.sample[1] > 0:
            fraction = min(1.0, self.sample[0] / self.sample[1])
        return min(99.0, (min(len(self.done), total) + fraction) * 100.0 / total)

    def message(self) -> str:
        """``frame 12 (3/250), sample 5/32``."""
        total = len(self.frames)
        if len(self.done) >= total:
            return f"{total}/{total} frame(s) rendered"
        frame = self.current if self.current is not None else self._next_frame()
        position = min(len(self.done) + 1, total)
        text = f"frame {frame} ({position}/{total})"
        if self.current is not None and self.sample is not None:
            text += f", sample {self.sample[0]}/{self.sample[1]}"
        return text
