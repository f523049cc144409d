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
    level: float | None = None  # how far it trained, in the study's resource


@dataclass(frozen=True)
class JobRow:
    trial: int
    level: float
    source: int | None
    params: dict
    values: list
    seconds: float


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
            sa.Column("level", sa.Float), sa.Column("updated", sa.Float))
        self.jobs_table = sa.Table(
            "polytrain_jobs", meta, sa.Column("study", sa.String(200), primary_key=True),
            sa.Column("sequence", sa.Integer, primary_key=True), sa.Column("trial", sa.Integer, nullable=False),
            sa.Column("level", sa.Float, nullable=False), sa.Column("source", sa.Integer),
            sa.Column("params", sa.Text, nullable=False), sa.Column("job_values", sa.Text, nullable=False),
            sa.Column("seconds", sa.Float, nullable=False), sa.Column("state", sa.String(16), nullable=False))
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
                         json.loads(r.trial_values) if r.trial_values is not None else None, r.seconds, r.directory,
                         r.level) for r in found]

    def jobs(self) -> list[JobRow]:
        """The jobs that ended, in the order they ended (failed ones are run again on resume)."""
        with self.engine.connect() as db:
            found = db.execute(self.sa.select(self.jobs_table).where(self.jobs_table.c.study == self.name,
                                                                     self.jobs_table.c.state == "complete")
                               .order_by(self.jobs_table.c.sequence)).all()
        return [JobRow(r.trial, r.level, r.source, json.loads(r.params), json.loads(r.job_values), r.seconds)
                for r in found]

    def record_job(self, trial: int, level: float, source: int | None, params: dict, values: list,
                   seconds: float, state: str) -> None:
        """A job that ended, and its trial's row: the latest values, how far it trained, the seconds summed."""
        sa, t = self.sa, self.trials
        with self.lock, self.engine.begin() as db:
            count = db.execute(sa.select(sa.func.count()).select_from(self.jobs_table)
                               .where(self.jobs_table.c.study == self.name)).scalar()
            db.execute(self.jobs_table.insert().values(
                study=self.name, sequence=count, trial=trial, level=level, source=source, params=json.dumps(params),
                job_values=json.dumps(values), seconds=seconds, state=state))
            spent = db.execute(sa.select(t.c.seconds).where(t.c.study == self.name, t.c.number == trial)).scalar()
            db.execute(t.update().where(t.c.study == self.name, t.c.number == trial).values(
                state=state, trial_values=json.dumps(values), seconds=(spent or 0.0) + seconds,
                level=level if state == "complete" else None, updated=time.time()))

    def add(self, number: int, params: dict, seed: int, directory: str) -> None:
        with self.lock, self.engine.begin() as db:
            db.execute(self.trials.insert().values(study=self.name, number=number, state="waiting",
                                                   params=json.dumps(params), seed=seed, directory=directory,
                                                   updated=time.time()))

    def mark(self, number: int, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"trial state {state!r}; expected one of {', '.join(STATES)}")
        with self.lock, self.engine.begin() as db:
            db.execute(self.trials.update().where(self.trials.c.study == self.name, self.trials.c.number == number)
                       .values(state=state, updated=time.time()))

    def close(self) -> None:
        self.engine.dispose()
