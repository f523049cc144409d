"""A study's trials in a real database: SQLite by default (a file in the study's directory), any SQLAlchemy URL
(PostgreSQL, MySQL) to share one study between machines.

A trial row holds its number, its hyper-parameters and seed (fixed when it is created, so a resumed or
replayed study runs the same trials), its state (waiting, running, complete, failed), its objective values
and its cost. Opening a study whose process was killed puts its running trials back to waiting; finished
ones are kept.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from polytrain.config import ConfigError

STATES = ("waiting", "running", "complete", "failed")


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str
    params: dict
    seed: int
    values: list | None
    seconds: float | None
    directory: str


class Study:
    """One named study in the database at `url`; its spec (base settings, space, sampler, objectives) is stored
    with it, and reopening it with another spec is refused."""

    def __init__(self, url: str, name: str, spec: dict) -> None:
        import sqlalchemy as sa

        self.sa = sa
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as error:
            raise ConfigError(f"--storage {url!r} is not a database URL SQLAlchemy can open ({error}); "
                              f"expected e.g. sqlite:///study.db or postgresql://host/db") from None
        self.lock = threading.Lock()  # trials finish on several threads; one writer at a time
        meta = sa.MetaData()
        self.studies = sa.Table("polytrain_studies", meta, sa.Column("name", sa.String(200), primary_key=True),
                                sa.Column("spec", sa.Text, nullable=False), sa.Column("created", sa.Float))
        self.trials = sa.Table(
            "polytrain_trials", meta,
            sa.Column("study", sa.String(200), primary_key=True), sa.Column("number", sa.Integer, primary_key=True),
            sa.Column("state", sa.String(16), nullable=False), sa.Column("params", sa.Text, nullable=False),
            sa.Column("seed", sa.BigInteger, nullable=False), sa.Column("trial_values", sa.Text),
            sa.Column("seconds", sa.Float), sa.Column("directory", sa.Text, nullable=False),
            sa.Column("updated", sa.Float))
        meta.create_all(self.engine)
        self.name = name
        stored_spec = json.loads(json.dumps(spec))
        with self.engine.begin() as db:
            row = db.execute(sa.select(self.studies.c.spec).where(self.studies.c.name == name)).first()
            if row is None:
                db.execute(self.studies.insert().values(name=name, spec=json.dumps(stored_spec), created=time.time()))
            elif json.loads(row.spec) != stored_spec:
                raise ConfigError(f"study {name!r} in {url} was created with other settings; give the same ones "
                                  f"or another --study name")

    def requeue_running(self) -> int:
        """Trials left running by a killed study go back to waiting; returns how many."""
        with self.lock, self.engine.begin() as db:
            done = db.execute(self.trials.update().where(self.trials.c.study == self.name,
                                                         self.trials.c.state == "running")
                              .values(state="waiting", updated=time.time()))
            return done.rowcount

    def rows(self) -> list[TrialRow]:
        with self.engine.connect() as db:
            found = db.execute(self.sa.select(self.trials).where(self.trials.c.study == self.name)
                               .order_by(self.trials.c.number)).all()
        return [TrialRow(r.number, r.state, json.loads(r.params), r.seed,
                         json.loads(r.trial_values) if r.trial_values is not None else None, r.seconds, r.directory)
                for r in found]

    def add(self, number: int, params: dict, seed: int, directory: str) -> None:
        with self.lock, self.engine.begin() as db:
            db.execute(self.trials.insert().values(study=self.name, number=number, state="waiting",
                                                   params=json.dumps(params), seed=seed, directory=directory,
                                                   updated=time.time()))

    def mark(self, number: int, state: str, values: list | None = None, seconds: float | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"trial state {state!r}; expected one of {', '.join(STATES)}")
        with self.lock, self.engine.begin() as db:
            db.execute(self.trials.update().where(self.trials.c.study == self.name, self.trials.c.number == number)
                       .values(state=state, trial_values=json.dumps(values) if values is not None else None,
                               seconds=seconds, updated=time.time()))

    def close(self) -> None:
        self.engine.dispose()
