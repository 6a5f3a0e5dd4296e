"""Annotation progress: every label stored the moment it is made, in a SQLite database beside the job.

One transaction per label (WAL mode, synchronous=NORMAL: a commit is durable once the WAL is synced at the next
checkpoint, so killing the server loses nothing; only a power cut can lose the last moments, which the page still
holds until acknowledged), so an annotator resumes where they stopped. Several annotators can work on one job at
once: pixels are handed out by claiming them for one annotator with a lease that every action of that annotator,
and the page's heartbeat, renews; a lease left without either for `lease_seconds` (60 s) lapses and its pixels
return to the pool, and a page that closes gives its pixels back at once (`release`). A pixel is labelled at most
once; its labeller may change the class (review) or undo it (the pixel goes back to them).

Tables: `pixels` (the job's pixels in job order, with the current claim), `labels` (one row per labelled pixel;
`seq` orders an annotator's labels for undo;
`suggested` is the model's class shown for the pixel, NULL when none was, and `accepted` whether the annotator took
it with the accept key, both added to older databases when opened), `skips` (images an annotator chose to do
last), `meta` (the job's fingerprint, and when and why the job was closed).

A new database is built under a temporary name and linked into place, so a file at `path` is always a complete
progress database; an existing file that is not one (empty, corrupt, another job's) is refused, never rebuilt.
Once a job's labels were ingested into a round the job is closed (`close`), and every change is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pixelpick.annotation.jobs import Job, load_job
from pixelpick.errors import (
    AnnotationJobError,
    JobClosedError,
    PixelConflictError,
    ProgressDatabaseError,
    SubmissionRejectedError,
)
from pixelpick.io import remove_stale_temporaries, write_parquet

if TYPE_CHECKING:  # pandas costs the annotator's server 100 MB: imported by the functions that make tables
    import pandas as pd

DEFAULT_LEASE_SECONDS = 60.0  # the page renews its leases every 15 s while it is open
DEFAULT_BUSY_TIMEOUT = 30.0  # how long an operation waits for another writer before "database is locked"
MAX_SECONDS_PER_PIXEL = 24 * 3600.0  # a longer "time per click" is a clock error, not an annotator
ANNOTATOR_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pixels (
    id INTEGER PRIMARY KEY,              -- position in the job
    image_id TEXT NOT NULL, y INTEGER NOT NULL, x INTEGER NOT NULL,
    claimed_by TEXT, lease_until REAL,   -- unix seconds
    UNIQUE (image_id, y, x));
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    pixel_id INTEGER NOT NULL UNIQUE REFERENCES pixels (id),
    class_id INTEGER NOT NULL, annotator TEXT NOT NULL, seconds REAL NOT NULL,
    time TEXT NOT NULL,                  -- ISO 8601, UTC
    submission_id TEXT NOT NULL UNIQUE,
    suggested INTEGER, accepted INTEGER);
CREATE TABLE IF NOT EXISTS skips (annotator TEXT NOT NULL, image_id TEXT NOT NULL, PRIMARY KEY (annotator, image_id));
"""
_TABLES = {"meta", "pixels", "labels", "skips"}
_ADDED_COLUMNS = {"suggested": "INTEGER", "accepted": "INTEGER"}  # labels columns newer databases have


class PixelRef(NamedTuple):
    image_id: str
    y: int
    x: int


@dataclass(frozen=True)
class Submission:
    """One key press: `annotator` gives `class_id` (or the ignore index: unsure) to a pixel."""

    annotator: str
    image_id: str
    y: int
    x: int
    class_id: int
    seconds: float  # from the pixel being shown to the key press, measured in the page
    submission_id: str  # chosen by the page; a retry of the same submission is stored once
    suggested: int | None = None  # the model's class for the pixel, as the server suggested it (None: none)
    accepted: bool = False  # the annotator took the suggestion with the accept key


class ClosedInfo(NamedTuple):
    """When a job was closed (UTC) and why."""

    closed_at: datetime
    note: str


def default_progress_path(job_path: str | Path) -> Path:
    """Where a job's progress lives: `batch.json` -> `batch.progress.sqlite`, beside it."""
    job_path = Path(job_path)
    return job_path.with_name(f"{job_path.stem}.progress.sqlite")


class ProgressStore:
    """The labels and claims of one job, in the SQLite file `path` (created on first use)."""

    def __init__(
        self,
        path: str | Path,
        job: Job,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.job = job
        self.lease_seconds = lease_seconds
        self.busy_timeout = busy_timeout
        self._clock = clock
        self._sizes = {image.image_id: (image.height, image.width) for image in job.images}
        pixels = [(image.image_id, y, x) for image in job.images for y, x in image.pixels]
        self._pixel_ids = {pixel: pixel_id for pixel_id, pixel in enumerate(pixels)}
        # mode=rw: a database deleted while in use is an error, not silently replaced by an empty one.
        self._uri = f"{self.path.resolve().as_uri()}?mode=rw"
        if not self.path.exists():
            self._create()
        self._check()

    # --- set-up ------------------------------------------------------------------------------------------------

    def _create(self) -> None:
        """Build the database under a temporary name and link it into place, unless another process was first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            connection = sqlite3.connect(tmp, isolation_level=None)
            try:
                connection.execute("PRAGMA journal_mode=WAL")  # persistent: readers never block the writer
                connection.executescript(_SCHEMA)
                connection.execute("BEGIN")
                connection.execute(
                    "INSERT INTO meta VALUES ('job', ?), ('job_id', ?)", (self._fingerprint(), self.job.job_id)
                )
                connection.executemany(
                    "INSERT INTO pixels (id, image_id, y, x) VALUES (?, ?, ?, ?)",
                    ((pixel_id, *pixel) for pixel, pixel_id in self._pixel_ids.items()),
                )
                connection.execute("COMMIT")
            finally:
                connection.close()  # the last connection checkpoints the WAL into the file and removes it
            os.link(tmp, self.path)  # unlike a rename, never replaces a database another process just made
        except FileExistsError:
            pass
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _check(self) -> None:
        """Refuse, naming the file, anything but this job's progress database."""
        where = f"progress database {self.path}"
        if self.path.stat().st_size == 0:
            raise ProgressDatabaseError(
                f"{where} is empty (0 bytes), e.g. from an interrupted copy; restore it from a backup, "
                "or delete it to start the job afresh"
            )
        try:
            with self._transaction() as db:
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not _TABLES <= tables:
                    raise ProgressDatabaseError(
                        f"{where} is not a PixelPick progress database (it lacks the tables "
                        f"{sorted(_TABLES - tables)})"
                    )
                problems = [row[0] for row in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise ProgressDatabaseError(f"{where} is corrupt: {problems[0]}")
                meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('job', 'job_id')").fetchall())
                columns = {row[1] for row in db.execute("PRAGMA table_info(labels)")}
                for name, kind in _ADDED_COLUMNS.items():
                    if name not in columns:  # a database from before suggestions: their labels had none
                        db.execute(f"ALTER TABLE labels ADD COLUMN {name} {kind}")
        except sqlite3.DatabaseError as error:
            raise ProgressDatabaseError(f"{where} cannot be opened: {_describe_database_error(error)}") from None
        if "job" not in meta:
            raise ProgressDatabaseError(f"{where} is not a PixelPick progress database (it names no job)")
        if meta["job"] != self._fingerprint():
            raise ProgressDatabaseError(
                f"{where} belongs to job {meta.get('job_id')!r} with other pixels, "
                f"not to job {self.job.job_id!r}; use a separate database per job"
            )

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.job.job_id.encode())
        for pixel in self._pixel_ids:
            digest.update(repr(pixel).encode())
        return digest.hexdigest()

    @contextmanager
    def _transaction(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One connection per operation (threads and processes can share the file); BEGIN IMMEDIATE serialises
        writers, so a claim or a label is checked and written without anyone else in between. Reads take no
        write lock (`write=False`): in WAL mode they see a consistent snapshot and never wait for a writer."""
        connection = sqlite3.connect(self._uri, uri=True, timeout=self.busy_timeout, isolation_level=None)
        try:
            # NORMAL in WAL mode: no fsync per commit (the slowest part of storing a label), still safe when the
            # process dies; the WAL is synced at checkpoints.
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        finally:
            connection.close()

    # --- closing -----------------------------------------------------------------------------------------------

    def close(self, note: str) -> ClosedInfo:
        """Close the job, e.g. once its labels were ingested into a round: every later change is refused.

        `note` says why (shown to annotators). Closing a closed job keeps the first time and note.
        """
        if not isinstance(note, str) or not note.strip():
            raise AnnotationJobError(
                f"closing job {self.job.job_id!r} needs a note saying why, e.g. 'ingested into round 3'"
            )
        with self._transaction() as db:
            closed = self._closed(db)
            if closed is None:
                closed = ClosedInfo(datetime.now(UTC).replace(microsecond=0), note.strip())
                stored = {"closed_at": closed.closed_at.isoformat(), "note": closed.note}
                db.execute("INSERT INTO meta VALUES ('closed', ?)", (json.dumps(stored),))
        return closed

    def closed_info(self) -> ClosedInfo | None:
        """When and why the job was closed, or None while it is open."""
        with self._transaction(write=False) as db:
            return self._closed(db)

    @staticmethod
    def _closed(db: sqlite3.Connection) -> ClosedInfo | None:
        row = db.execute("SELECT value FROM meta WHERE key = 'closed'").fetchone()
        if row is None:
            return None
        stored = json.loads(row[0])
        return ClosedInfo(datetime.fromisoformat(stored["closed_at"]), stored["note"])

    def _refuse_if_closed(self, db: sqlite3.Connection) -> None:
        # Checked inside each change's own transaction, so no change slips in after the job was closed.
        closed = self._closed(db)
        if closed is not None:
            raise JobClosedError(
                f"job {self.job.job_id!r} was ingested and is closed since "
                f"{closed.closed_at:%Y-%m-%d %H:%M} UTC ({closed.note}); it accepts no more labels",
                closed_at=closed.closed_at,
                note=closed.note,
            )

    # --- handing out pixels ------------------------------------------------------------------------------------

    def claim(self, annotator: str, count: int, *, max_held: int | None = None) -> list[PixelRef]:
        """The unlabelled pixels `annotator` holds, topped up from the pool to at least `count`, in job order.

        New pixels come first from images the annotator has not skipped and nobody else is working on. With
        `max_held`, nobody is topped up beyond that many unlabelled pixels, so one name cannot take every pixel.
        """
        self._check_annotator(annotator)
        now = self._clock()
        with self._transaction() as db:
            self._refuse_if_closed(db)
            self._renew_leases(db, annotator, now)
            held = self._held(db, annotator)
            wanted = (count if max_held is None else min(count, max_held)) - len(held)
            if wanted > 0:
                free = db.execute(
                    """SELECT p.id FROM pixels p LEFT JOIN labels l ON l.pixel_id = p.id
                       WHERE l.pixel_id IS NULL AND (p.claimed_by IS NULL OR p.lease_until < :now)
                       ORDER BY p.image_id IN (SELECT image_id FROM skips WHERE annotator = :me),
                                p.image_id IN (SELECT image_id FROM pixels
                                               WHERE claimed_by != :me AND lease_until >= :now),
                                p.id
                       LIMIT :wanted""",
                    {"now": now, "me": annotator, "wanted": wanted},
                ).fetchall()
                db.executemany(
                    "UPDATE pixels SET claimed_by = ?, lease_until = ? WHERE id = ?",
                    ((annotator, now + self.lease_seconds, pixel_id) for (pixel_id,) in free),
                )
                held += self._pixels(db, [pixel_id for (pixel_id,) in free])
        return held

    def _held(self, db: sqlite3.Connection, annotator: str) -> list[PixelRef]:
        rows = db.execute(
            """SELECT p.image_id, p.y, p.x FROM pixels p LEFT JOIN labels l ON l.pixel_id = p.id
               WHERE p.claimed_by = ? AND l.pixel_id IS NULL ORDER BY p.id""",
            (annotator,),
        )
        return [PixelRef(*row) for row in rows]

    def _pixels(self, db: sqlite3.Connection, pixel_ids: list[int]) -> list[PixelRef]:
        query = "SELECT image_id, y, x FROM pixels WHERE id = ?"
        return [PixelRef(*db.execute(query, (pixel_id,)).fetchone()) for pixel_id in pixel_ids]

    def _renew_leases(self, db: sqlite3.Connection, annotator: str, now: float) -> None:
        db.execute(
            "UPDATE pixels SET lease_until = ? WHERE claimed_by = ? AND id NOT IN (SELECT pixel_id FROM labels)",
            (now + self.lease_seconds, annotator),
        )

    def skip_image(self, annotator: str, image_id: str) -> int:
        """Give back `annotator`'s claims on `image_id` and hand them its pixels only after every other image.

        Returns the number of pixels given back.
        """
        self._check_annotator(annotator)
        if image_id not in self._sizes:
            raise SubmissionRejectedError(f"image {image_id!r} is not in job {self.job.job_id!r}")
        with self._transaction() as db:
            self._refuse_if_closed(db)
            db.execute("INSERT OR IGNORE INTO skips VALUES (?, ?)", (annotator, image_id))
            released = db.execute(
                """UPDATE pixels SET claimed_by = NULL, lease_until = NULL
                   WHERE claimed_by = ? AND image_id = ? AND id NOT IN (SELECT pixel_id FROM labels)""",
                (annotator, image_id),
            ).rowcount
        return released

    def release(self, annotator: str) -> int:
        """Give back every unlabelled pixel `annotator` holds (their page closed); returns how many."""
        self._check_annotator(annotator)
        with self._transaction() as db:
            return db.execute(
                """UPDATE pixels SET claimed_by = NULL, lease_until = NULL
                   WHERE claimed_by = ? AND id NOT IN (SELECT pixel_id FROM labels)""",
                (annotator,),
            ).rowcount

    def heartbeat(self, annotator: str) -> None:
        """`annotator`'s page is still open: their pixels stay theirs for another `lease_seconds`."""
        self._check_annotator(annotator)
        with self._transaction() as db:
            self._renew_leases(db, annotator, self._clock())

    def next_release(self, annotator: str) -> float | None:
        """Seconds until the first pixel someone else holds comes back to the pool unless they label or renew it;
        None when nobody else holds one."""
        now = self._clock()
        with self._transaction(write=False) as db:
            (until,) = db.execute(
                """SELECT MIN(p.lease_until) FROM pixels p LEFT JOIN labels l ON l.pixel_id = p.id
                   WHERE l.pixel_id IS NULL AND p.claimed_by != ? AND p.lease_until >= ?""",
                (annotator, now),
            ).fetchone()
        return None if until is None else max(until - now, 0.0)

    def counts(self, image_id: str | None = None) -> tuple[int, int | None]:
        """(pixels labelled in the job, in `image_id` or None), read in one snapshot."""
        with self._transaction(write=False) as db:
            (done,) = db.execute("SELECT COUNT(*) FROM labels").fetchone()
            if image_id is None:
                return done, None
            (in_image,) = db.execute(
                "SELECT COUNT(*) FROM labels l JOIN pixels p ON p.id = l.pixel_id WHERE p.image_id = ?", (image_id,)
            ).fetchone()
        return done, in_image

    def suggestion_stats(self) -> dict[str, float | int | None]:
        """How the job was labelled: labels, mean seconds per label, how many had a suggestion, how many of those
        were accepted with the accept key (and their share), and how many ended in the suggested class anyway."""
        with self._transaction(write=False) as db:
            labels, seconds, suggested, accepted, agreed = db.execute(
                """SELECT COUNT(*), AVG(seconds), COUNT(suggested), COALESCE(SUM(accepted), 0),
                          COALESCE(SUM(class_id = suggested), 0) FROM labels"""
            ).fetchone()
        return {
            "labels": labels,
            "seconds_per_label": seconds,
            "suggested": suggested,
            "accepted": accepted,
            "acceptance_rate": accepted / suggested if suggested else None,
            "agreement_rate": agreed / suggested if suggested else None,
        }

    # --- labels ------------------------------------------------------------------------------------------------

    def record(self, submission: Submission) -> bool:
        """Store a new label; True when stored now, False when this exact submission was stored before (a retry).

        Raises SubmissionRejectedError for a pixel, class or value the job does not allow and PixelConflictError
        when the pixel is labelled already or held by another annotator; nothing is stored then.
        """
        pixel_id = self._check_submission(submission)
        now = self._clock()
        with self._transaction() as db:
            existing = db.execute(
                "SELECT annotator, submission_id FROM labels WHERE pixel_id = ?", (pixel_id,)
            ).fetchone()
            if existing is not None and existing[1] == submission.submission_id:
                return False  # a retry of a label stored before, even before the job was closed
            self._refuse_if_closed(db)
            if existing is not None:
                raise PixelConflictError(f"{_describe(submission)} is already labelled by {existing[0]!r}")
            holder, lease_until = db.execute(
                "SELECT claimed_by, lease_until FROM pixels WHERE id = ?", (pixel_id,)
            ).fetchone()
            if holder not in (None, submission.annotator) and lease_until >= now:
                raise PixelConflictError(f"{_describe(submission)} is assigned to annotator {holder!r}")
            if db.execute("SELECT 1 FROM labels WHERE submission_id = ?", (submission.submission_id,)).fetchone():
                raise PixelConflictError(
                    f"submission id {submission.submission_id!r} was already used for another pixel"
                )
            db.execute(
                "INSERT INTO labels (pixel_id, class_id, annotator, seconds, time, submission_id, suggested, accepted) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (pixel_id, submission.class_id, submission.annotator, submission.seconds, _utc_now(),
                 submission.submission_id, submission.suggested,
                 None if submission.suggested is None else int(submission.accepted)),
            )
            db.execute("UPDATE pixels SET claimed_by = ? WHERE id = ?", (submission.annotator, pixel_id))
            self._renew_leases(db, submission.annotator, now)
        return True

    def record_many(self, labels: pd.DataFrame, *, origin: str) -> tuple[int, int]:
        """Store labels made in another tool (rows of LABEL_COLUMNS) in one transaction: all of them or none.

        A row repeating a stored label exactly (same pixel, class and annotator) is skipped, so importing the same
        export twice changes nothing. A pixel already labelled otherwise, or labelled by two rows, is refused with
        PixelConflictError, as are stray pixels and classes (SubmissionRejectedError); nothing is stored then.
        `origin` ("label-studio", "cvat") names the tool in the labels' submission ids.
        Returns (stored now, already there).
        """
        checked = []
        seen: set[int] = set()
        for row in labels.itertuples(index=False):
            submission = Submission(
                annotator=str(row.annotator), image_id=str(row.image_id), y=int(row.y), x=int(row.x),
                class_id=int(row.class_id), seconds=float(row.seconds),
                submission_id=origin,
            )
            pixel_id = self._check_submission(submission)
            if pixel_id in seen:
                raise PixelConflictError(f"{_describe(submission)} is given more than one label")
            seen.add(pixel_id)
            missing = row.time is None or row.time != row.time  # None, or NaT (which equals nothing)
            stamp = _utc_now() if missing else row.time.isoformat(timespec="microseconds")
            checked.append((pixel_id, submission, stamp))
        stored = 0
        with self._transaction() as db:
            self._refuse_if_closed(db)
            for pixel_id, submission, stamp in checked:
                existing = db.execute(
                    "SELECT class_id, annotator FROM labels WHERE pixel_id = ?", (pixel_id,)
                ).fetchone()
                if existing == (submission.class_id, submission.annotator):
                    continue
                if existing is not None:
                    raise PixelConflictError(
                        f"{_describe(submission)} is already labelled class {existing[0]} by {existing[1]!r} "
                        f"in {self.path.name}; nothing was imported"
                    )
                db.execute(
                    "INSERT INTO labels (pixel_id, class_id, annotator, seconds, time, submission_id) "
                    "VALUES (?,?,?,?,?,?)",
                    (pixel_id, submission.class_id, submission.annotator, submission.seconds, stamp,
                     f"{origin}-{pixel_id}"),
                )
                db.execute("UPDATE pixels SET claimed_by = ?, lease_until = NULL WHERE id = ?",
                           (submission.annotator, pixel_id))
                stored += 1
        return stored, len(checked) - stored

    def relabel(self, submission: Submission) -> None:
        """Change the class of a pixel `submission.annotator` labelled before (reviewing with 'back')."""
        pixel_id = self._check_submission(submission)
        with self._transaction() as db:
            self._refuse_if_closed(db)
            existing = db.execute("SELECT annotator FROM labels WHERE pixel_id = ?", (pixel_id,)).fetchone()
            if existing is None:
                raise PixelConflictError(f"{_describe(submission)} has no label to change")
            if existing[0] != submission.annotator:
                raise PixelConflictError(
                    f"{_describe(submission)} was labelled by {existing[0]!r}; only they can change it"
                )
            # A changed label is the annotator's own choice, not an accepted suggestion.
            db.execute(
                "UPDATE labels SET class_id = ?, seconds = ?, time = ?, "
                "accepted = CASE WHEN suggested IS NULL THEN NULL ELSE ? END WHERE pixel_id = ?",
                (submission.class_id, submission.seconds, _utc_now(), int(submission.accepted), pixel_id),
            )
            self._renew_leases(db, submission.annotator, self._clock())

    def undo(self, annotator: str, expected: PixelRef | None = None) -> PixelRef:
        """Delete `annotator`'s most recent label and give its pixel back to them; returns that pixel.

        With `expected`, the page says which pixel it believes is the last one: a mismatch raises
        PixelConflictError, and an `expected` pixel that is already unlabelled and held by the annotator counts as
        undone (a retried request). Relabelling does not change which label is the most recent.
        """
        self._check_annotator(annotator)
        now = self._clock()
        with self._transaction() as db:
            self._refuse_if_closed(db)
            last = db.execute(
                """SELECT l.pixel_id, p.image_id, p.y, p.x FROM labels l JOIN pixels p ON p.id = l.pixel_id
                   WHERE l.annotator = ? ORDER BY l.seq DESC LIMIT 1""",
                (annotator,),
            ).fetchone()
            if expected is not None and (last is None or PixelRef(*last[1:]) != expected):
                if self._already_undone(db, annotator, expected):
                    return PixelRef(*expected)
                found = "no label" if last is None else f"image {last[1]!r} y={last[2]} x={last[3]}"
                raise PixelConflictError(f"cannot undo: your last label is {found}, not the pixel shown")
            if last is None:
                raise PixelConflictError(f"annotator {annotator!r} has no label to undo")
            db.execute("DELETE FROM labels WHERE pixel_id = ?", (last[0],))
            db.execute(
                "UPDATE pixels SET claimed_by = ?, lease_until = ? WHERE id = ?",
                (annotator, now + self.lease_seconds, last[0]),
            )
            self._renew_leases(db, annotator, now)
        return PixelRef(*last[1:])

    def _already_undone(self, db: sqlite3.Connection, annotator: str, pixel: PixelRef) -> bool:
        pixel_id = self._pixel_ids.get(tuple(pixel))
        row = db.execute(
            """SELECT p.claimed_by, l.pixel_id FROM pixels p LEFT JOIN labels l ON l.pixel_id = p.id
               WHERE p.id = ?""",
            (pixel_id,),
        ).fetchone()
        return row is not None and row[0] == annotator and row[1] is None

    def _check_submission(self, submission: Submission) -> int:
        """The pixel's id, after checking everything that does not depend on stored state."""
        self._check_annotator(submission.annotator)
        job_id, image_id, y, x = self.job.job_id, submission.image_id, submission.y, submission.x
        if image_id not in self._sizes:
            raise SubmissionRejectedError(f"image {image_id!r} is not in job {job_id!r}")
        height, width = self._sizes[image_id]
        if not (0 <= y < height and 0 <= x < width):
            raise SubmissionRejectedError(
                f"pixel (y={y}, x={x}) is out of bounds of image {image_id!r} ({height}x{width})"
            )
        if (image_id, y, x) not in self._pixel_ids:
            raise SubmissionRejectedError(f"{_describe(submission)} was not queried in job {job_id!r}")
        num_classes, ignore_index = len(self.job.classes), self.job.ignore_index
        if not (0 <= submission.class_id < num_classes or submission.class_id == ignore_index):
            raise SubmissionRejectedError(
                f"class {submission.class_id} does not exist: classes are 0..{num_classes - 1}, "
                f"or {ignore_index} for unsure"
            )
        if not (math.isfinite(submission.seconds) and 0 <= submission.seconds <= MAX_SECONDS_PER_PIXEL):
            raise SubmissionRejectedError(
                f"seconds={submission.seconds} must be between 0 and {MAX_SECONDS_PER_PIXEL:.0f}"
            )
        if not submission.submission_id or len(submission.submission_id) > 64:
            raise SubmissionRejectedError("submission_id must be 1 to 64 characters")
        if submission.accepted and submission.class_id != submission.suggested:
            raise SubmissionRejectedError(
                f"{_describe(submission)} accepts a suggestion, but "
                + ("none was made for it" if submission.suggested is None
                   else f"the suggestion is class {submission.suggested}, not {submission.class_id}")
            )
        return self._pixel_ids[(image_id, y, x)]

    @staticmethod
    def _check_annotator(annotator: str) -> None:
        if not ANNOTATOR_PATTERN.match(annotator):
            raise SubmissionRejectedError(
                f"annotator name {annotator!r} must be 1-64 letters, digits or . _ @ - "
                "(starting with a letter or digit)"
            )

    # --- reading progress --------------------------------------------------------------------------------------

    def done_count(self, image_id: str | None = None) -> int:
        """How many pixels are labelled (unsure included), in the whole job or in one image."""
        with self._transaction(write=False) as db:
            query = "SELECT COUNT(*) FROM labels l JOIN pixels p ON p.id = l.pixel_id"
            if image_id is None:
                return db.execute(query).fetchone()[0]
            return db.execute(query + " WHERE p.image_id = ?", (image_id,)).fetchone()[0]

    def done_by_image(self) -> dict[str, int]:
        """Labelled pixels per image, for images with at least one."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT p.image_id, COUNT(*) FROM labels l JOIN pixels p ON p.id = l.pixel_id GROUP BY p.image_id"
            )
            return dict(rows.fetchall())

    def history(self, annotator: str, limit: int = 50) -> list[dict[str, object]]:
        """`annotator`'s most recent labels, oldest first: image_id, y, x, class_id."""
        with self._transaction(write=False) as db:
            rows = db.execute(
                """SELECT p.image_id, p.y, p.x, l.class_id FROM labels l JOIN pixels p ON p.id = l.pixel_id
                   WHERE l.annotator = ? ORDER BY l.seq DESC LIMIT ?""",
                (annotator, limit),
            ).fetchall()
        return [{"image_id": image_id, "y": y, "x": x, "class_id": class_id} for image_id, y, x, class_id in rows[::-1]]

    def annotator_seconds(self, annotator: str) -> tuple[int, float]:
        """(labels made, their total seconds) by `annotator`."""
        with self._transaction(write=False) as db:
            count, total = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(seconds), 0) FROM labels WHERE annotator = ?", (annotator,)
            ).fetchone()
        return count, total

    def is_complete(self) -> bool:
        """True when every pixel of the job is labelled (unsure counts as labelled)."""
        return self.done_count() == len(self._pixel_ids)

    def completed_labels(self) -> pd.DataFrame:
        """Every stored label in LABEL_COLUMNS, in job order: source "human", round from the job, UTC time."""
        import pandas as pd

        from pixelpick.labels import label_frame

        with self._transaction(write=False) as db:
            rows = db.execute(
                """SELECT p.image_id, p.y, p.x, l.class_id, l.annotator, l.seconds, l.time
                   FROM labels l JOIN pixels p ON p.id = l.pixel_id ORDER BY p.id"""
            ).fetchall()
        for row, values in enumerate(rows):
            self._check_stored_label(row, values)
        found = pd.DataFrame(rows, columns=["image_id", "y", "x", "class_id", "annotator", "seconds", "time"])
        return label_frame(
            {
                **{name: found[name].tolist() for name in ("image_id", "y", "x", "class_id", "annotator", "seconds")},
                "round": [self.job.round] * len(found),
                "source": ["human"] * len(found),
                "time": [datetime.fromisoformat(stamp) for stamp in found["time"]],
            }
        )

    def _check_stored_label(self, row: int, values: tuple) -> None:
        """Refuse a stored label whose values are not what `record` stores: SQLite keeps whatever an edited file
        holds (2.5 or 'sky' in an INTEGER column), and Arrow would truncate 2.5 to class 2."""
        image_id, y, x, class_id, annotator, seconds, stamp = values
        num_classes, ignore_index = len(self.job.classes), self.job.ignore_index
        problem = None
        if type(class_id) is not int:
            problem = "class_id", f"{class_id!r} is {type(class_id).__name__}, not an integer class id"
        elif not (0 <= class_id < num_classes or class_id == ignore_index):
            problem = "class_id", f"{class_id} is not a class of the job (0..{num_classes - 1}, or {ignore_index})"
        elif type(annotator) is not str or not ANNOTATOR_PATTERN.match(annotator):
            problem = "annotator", f"{annotator!r} is not an annotator name"
        elif type(seconds) not in (int, float) or not (
                math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS_PER_PIXEL):
            problem = "seconds", f"{seconds!r} is not a number of seconds in [0, {MAX_SECONDS_PER_PIXEL:.0f}]"
        elif not _is_utc_stamp(stamp):
            problem = "time", f"{stamp!r} is not an ISO 8601 time with a time zone"
        if problem is not None:
            column, why = problem
            raise ProgressDatabaseError(
                f"progress database {self.path}: column labels.{column} in row {row} (pixel {image_id!r} y={y} "
                f"x={x}): {why}; nothing was ingested")


def _is_utc_stamp(stamp: object) -> bool:
    if type(stamp) is not str:
        return False
    try:
        return datetime.fromisoformat(stamp).tzinfo is not None
    except ValueError:
        return False


def _describe(submission: Submission) -> str:
    return f"pixel (y={submission.y}, x={submission.x}) of image {submission.image_id!r}"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def ingest_job_labels(
    job_path: str | Path, progress_db: str | Path, out_path: str | Path, *, allow_incomplete: bool = False
) -> Path:
    """Write a job's labels as a Parquet batch in LABEL_COLUMNS at `out_path` (atomically) and return the path.

    The labels are checked against the job again (every pixel queried, once, with a valid class). A job without
    labels, a progress database that is missing, empty, corrupt or another job's, and an unfinished job (unless
    `allow_incomplete`) raise AnnotationJobError and write nothing. The caller appends the batch to the
    LabelStore, then closes the job (`ProgressStore.close`).
    """
    job = load_job(job_path)
    if not Path(progress_db).is_file():
        raise ProgressDatabaseError(
            f"progress database {progress_db} does not exist; nobody has labelled job {job.job_id!r}"
        )
    store = ProgressStore(progress_db, job)
    labels = store.completed_labels()
    if labels.empty:
        raise AnnotationJobError(f"job {job.job_id!r} has no labels yet in {progress_db}; there is nothing to ingest")
    if not allow_incomplete and not store.is_complete():
        raise AnnotationJobError(
            f"job {job.job_id!r} is unfinished: {job.num_pixels - len(labels)} of {job.num_pixels} pixels "
            "have no label (pass allow_incomplete to ingest what is there)"
        )
    check_labels_against_job(labels, job)
    return write_parquet(labels, out_path)


def _describe_database_error(error: sqlite3.DatabaseError) -> str:
    message = str(error)
    if "file is not a database" in message or "malformed" in message:
        return f"it is corrupt or not an SQLite database ({message})"
    return message


def check_labels_against_job(labels: pd.DataFrame, job: Job) -> None:
    """Raise AnnotationJobError unless every label is a queried pixel of `job`, labelled once, with a valid class."""
    queried = {(image.image_id, y, x) for image in job.images for y, x in image.pixels}
    keys = list(zip(labels["image_id"], labels["y"].astype(int), labels["x"].astype(int), strict=True))
    stray = [key for key in keys if key not in queried]
    if stray:
        raise AnnotationJobError(
            f"{len(stray)} labels are for pixels job {job.job_id!r} did not query, e.g. {stray[0]}"
        )
    if len(set(keys)) != len(keys):
        raise AnnotationJobError(f"labels of job {job.job_id!r} give some pixel more than one label")
    valid = labels["class_id"].between(0, len(job.classes) - 1) | (labels["class_id"] == job.ignore_index)
    if not valid.all():
        raise AnnotationJobError(
            f"labels of job {job.job_id!r} hold class ids {sorted(set(labels.loc[~valid, 'class_id']))} "
            "that are not in the job"
        )
