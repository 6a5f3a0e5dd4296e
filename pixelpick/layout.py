"""Where a campaign keeps its files. Every path of a campaign is named here and nowhere else.

    <campaign>/                      data/runs/<name>/ by default
      params.yaml                    the campaign's settings, recorded when it started (every step reads them)
      label_space.json               the classes its rounds have used (folder datasets; see pixelpick.label_space)
      dvc.yaml, dvc.lock             its pipeline (a copy of the project's top-level dvc.yaml: each step as a DVC
                                     stage over the rounds) and what ran
      pipeline-rounds.yaml           the folder the pipeline runs in (.), the rounds it lists and each one's files
                                     (written from the recipe)
      step-settings.yaml             the values of the settings each step reads, by stage (derived from params.yaml)
      labels/rNN.parquet             human label batches, one per round (DVC-tracked inputs, `rNN.parquet.dvc`)
      pools/rNN.csv                  the images round NN drew from, as they were when it started, each with the
                                     round since which it has been so (history, in git)
      pools/rNN.classes.json         the classes it labelled with (classes may be appended later)
      progress.csv, progress.png     mIoU against labelled pixels, one row per evaluated round
      rounds/rNN/
        queries.parquet              the pixels round NN asked for (image_id, y, x, score, round)
        annotations.parquet          the simulated annotator's answers (simulated campaigns only)
        labels.parquet               the label snapshot: snapshot NN-1 plus this round's batch
        model.pt                     the model trained on that snapshot (a self-describing checkpoint)
        metrics.json                 mIoU and per-class IoU on the evaluation split (or why it was not measured)
        probs.zarr                   the previous model's probabilities and scores (a regenerable intermediate)
        job.json                     the round's annotation job (human campaigns), its progress database beside it
        train.resume.pt              while training: its state every few epochs, so a killed run continues
        train.distributed.json       what data-parallel training's first process measured (train.processes > 1)
        steps/<step>.json            what each step last ran on (its input key) and made (output digests, seconds)
        steps/finished.json          the round's step keys once it was versioned and registered (its model version)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RoundFiles:
    """The files of one round."""

    dir: Path

    @property
    def queries(self) -> Path:
        return self.dir / "queries.parquet"

    @property
    def annotations(self) -> Path:
        return self.dir / "annotations.parquet"

    @property
    def snapshot(self) -> Path:
        return self.dir / "labels.parquet"

    @property
    def model(self) -> Path:
        return self.dir / "model.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def labelling(self) -> Path:
        """How people labelled a human round: labels, seconds per label, suggestions accepted (`collect_labels`)."""
        return self.dir / "labelling.json"

    @property
    def probs(self) -> Path:
        return self.dir / "probs.zarr"

    @property
    def job(self) -> Path:
        return self.dir / "job.json"

    @property
    def training_state(self) -> Path:
        """Training's resume point while the round's model is being trained (removed once it is done)."""
        return self.dir / "train.resume.pt"

    @property
    def distributed_input(self) -> Path:
        """The train step's input, pickled, for the processes of data-parallel training (removed once they end)."""
        return self.dir / "train.distributed.pickle"

    @property
    def distributed_report(self) -> Path:
        """What the first process of data-parallel training measured, for the process that launched it."""
        return self.dir / "train.distributed.json"

    def step_record(self, step: str) -> Path:
        return self.dir / "steps" / f"{step}.json"

    @property
    def finished(self) -> Path:
        """Written when the round has been versioned and registered: what a no-op run compares against."""
        return self.dir / "steps" / "finished.json"


@dataclass(frozen=True)
class CampaignLayout:
    """The folder of one campaign."""

    dir: Path

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def params(self) -> Path:
        return self.dir / "params.yaml"

    @property
    def pipeline(self) -> Path:
        return self.dir / "dvc.yaml"

    @property
    def pipeline_rounds(self) -> Path:
        return self.dir / "pipeline-rounds.yaml"

    @property
    def step_settings(self) -> Path:
        return self.dir / "step-settings.yaml"

    @property
    def pipeline_lock(self) -> Path:
        """DVC's record of what each stage last ran on and made."""
        return self.dir / "dvc.lock"

    @property
    def gitignore(self) -> Path:
        return self.dir / ".gitignore"

    @property
    def lock(self) -> Path:
        return self.dir / ".lock"

    @property
    def progress_table(self) -> Path:
        return self.dir / "progress.csv"

    @property
    def progress_plot(self) -> Path:
        return self.dir / "progress.png"

    @property
    def label_space(self) -> Path:
        """The classes the campaign has used, and since which round (`pixelpick.label_space`)."""
        return self.dir / "label_space.json"

    def probability_store(self, round_id: int, store_url: str | None = None) -> str:
        """Where round `round_id`'s probability store lives: its round folder (`probs.zarr`), or under `store_url`
        (`campaign.store_url`: a shared path or any fsspec URL), in a folder of the campaign and the round."""
        if store_url is None:
            return str(self.round(round_id).probs)
        return f"{store_url.rstrip('/')}/{self.name}/{round_name(round_id)}/probs.zarr"

    def pool(self, round_id: int) -> Path:
        """The round's pool manifest: the images it drew from (id, content md5, size, since), frozen when it
        started."""
        return self.dir / "pools" / f"{round_name(round_id)}.csv"

    def pool_classes(self, round_id: int) -> Path:
        """The classes the round labels with, frozen with its pool (campaigns whose classes come from a file)."""
        return self.dir / "pools" / f"{round_name(round_id)}.classes.json"

    def batch(self, round_id: int) -> Path:
        """Where a human round's labels land as a batch file."""
        return self.dir / "labels" / f"{round_name(round_id)}.parquet"

    def records(self) -> list[Path]:
        """The files of the campaign that git keeps (those that exist): its settings, pipeline, what ran, progress,
        classes, frozen pools and the `.dvc` files of its label batches. Its rounds' files are DVC's."""
        records = [self.params, self.pipeline, self.pipeline_rounds, self.step_settings, self.pipeline_lock,
                   self.gitignore, self.progress_table,
                   self.progress_plot, self.label_space, *sorted((self.dir / "labels").glob("*.dvc")),
                   *sorted((self.dir / "pools").glob("*"))]
        return [path for path in records if path.is_file()]

    def round(self, round_id: int) -> RoundFiles:
        return RoundFiles(self.dir / "rounds" / round_name(round_id))

    def rounds_present(self) -> list[int]:
        """The rounds that have a folder, in order."""
        folders = (self.dir / "rounds").glob("r[0-9][0-9]*")
        return sorted(int(folder.name[1:]) for folder in folders if folder.name[1:].isdigit())


def round_name(round_id: int) -> str:
    return f"r{round_id:02d}"
