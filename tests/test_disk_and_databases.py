"""A full disk and a vanished MLflow database: one line naming the path and what to free, no traceback; the next
run, once space is back, ends with the same files as a run that never failed."""

from __future__ import annotations

import errno
import os

import pandas as pd
import pytest

from flows import cli
from pixelpick.campaign import open_campaign
from pixelpick.errors import DiskFullError
from pixelpick.io import write_parquet
from tests.conftest import TINY_PARAMS


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "table.parquet")
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _full)
    with pytest.raises(DiskFullError) as refused:
        write_parquet(pd.DataFrame({"a": [2]}), path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "MiB free" in message and "free space" in message
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_step_on_a_full_disk_is_one_line_and_the_rerun_recovers(tmp_path, monkeypatch, capsys):
    for name in ("full", "reference"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.yaml").write_text(TINY_PARAMS)
    campaign = open_campaign(tmp_path / "full" / "params.yaml")
    reference = open_campaign(tmp_path / "reference" / "params.yaml")
    step = ["step", "query", "--round", "0", "--campaign-dir"]

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _full)
        with pytest.raises(SystemExit) as stopped:
            cli.main([*step, str(campaign.layout.dir)])
    assert stopped.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # The round's first write is its frozen pool, then its queries: whichever the disk refused is named.
    assert len(errors) == 1 and "the disk is full: writing" in errors[0] and "pools/r00.csv" in errors[0], err
    assert "Traceback" not in err and not campaign.files(0).queries.exists() and not campaign.layout.pool(0).exists()

    cli.main([*step, str(campaign.layout.dir)])  # space is back
    cli.main([*step, str(reference.layout.dir)])
    assert pd.read_parquet(campaign.files(0).queries).equals(pd.read_parquet(reference.files(0).queries))


@pytest.mark.parametrize("what", ["deleted", "emptied", "deleted-while-open"])
def test_a_vanished_mlflow_database_is_one_line_naming_it(tmp_path, monkeypatch, what):
    import sqlalchemy

    database = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    if what == "emptied":
        database.write_bytes(b"")
    elif what == "deleted":
        database.parent.joinpath("gone").mkdir()
        database = tmp_path / "gone" / "sub" / "mlflow.db"  # a folder that vanished: SQLite cannot even create it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    engine = sqlalchemy.create_engine(f"sqlite:///{database}")
    with pytest.raises(sqlalchemy.exc.OperationalError) as failed, engine.connect() as connection:
        if what == "deleted-while-open":  # a long run's open connection then reads the file as read-only
            connection.execute(sqlalchemy.text("CREATE TABLE experiments (id INTEGER)"))
            connection.commit()
            database.unlink()
            connection.execute(sqlalchemy.text("INSERT INTO experiments VALUES (1)"))
        connection.execute(sqlalchemy.text("SELECT * FROM experiments"))
    try:
        raise RuntimeError("logging the round failed") from failed.value
    except RuntimeError as wrapped:
        message = cli._one_line(wrapped)
    assert message is not None and "\n" not in message and str(database) in message
    assert ("has lost its tables" if what == "emptied" else "is gone") in message
