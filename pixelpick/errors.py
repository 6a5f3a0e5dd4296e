"""Exceptions raised by PixelPick. Each names the offending input so a user can fix it."""


class PixelPickError(Exception):
    """Base class for every error PixelPick raises on bad input."""


class SettingsError(PixelPickError):
    """params.yaml (or an override) holds an invalid value; the message names the key."""


class AcquisitionError(PixelPickError):
    """An unknown acquisition strategy, or probabilities/scores it cannot rank."""


class AnnotationError(PixelPickError):
    """A query the simulated annotator cannot answer (pixel outside the mask, mask value out of range)."""


class LabelFileError(PixelPickError):
    """A labels Parquet file is unreadable or does not follow the label schema; the message names the file."""


class LabelValidationError(PixelPickError):
    """A batch of labels was rejected whole; names the first bad row, the reason and how many rows are bad."""

    def __init__(self, message: str, *, row: object = None, reason: str = "", n_bad: int = 0) -> None:
        super().__init__(message)
        self.row = row  # the batch index label of the first bad row; None for a batch-level problem
        self.reason = reason or message
        self.n_bad = n_bad


class UnknownArchitectureError(PixelPickError):
    """A model architecture name that is not in models.ARCHITECTURES; the message lists the valid names."""


class PretrainedWeightsError(PixelPickError):
    """A pretrained-weights file is unreadable or none of its tensors fit the model; the message names the file."""


class TransformInputError(PixelPickError):
    """An image, mask or set of labelled pixels that augmentation cannot use (wrong shape, pixel outside the image)."""


class DatasetError(PixelPickError):
    """A dataset cannot be opened as configured: unknown name or split, missing folder, conflicting generated data."""


class UnknownImageError(DatasetError):
    """An image id that is not in the dataset split; the message names the id."""


class CorruptImageError(DatasetError):
    """An image file PIL cannot decode, or one that is not 8-bit colour/grey; the message names the file."""


class MissingMaskError(DatasetError):
    """Ground truth was asked for where there is none (a split without masks, or one missing mask file)."""


class InvalidMaskError(DatasetError):
    """A mask file that is unreadable, of the wrong size or mode, or holds values outside the label space."""


class ClassesFileError(DatasetError):
    """A classes file (YAML/JSON) that is malformed or inconsistent; the message names the file and the entry."""


class AnnotationJobError(PixelPickError):
    """An annotation job file or query table that is malformed or inconsistent; the message names the field."""


class KeyBindingError(PixelPickError):
    """A class key binding that is invalid or collides with another class or a navigation key; names both."""


class SubmissionRejectedError(PixelPickError):
    """An annotator's submission the job does not allow (pixel not queried, unknown class); nothing was stored."""


class PixelConflictError(SubmissionRejectedError):
    """A submission that clashes with stored progress: the pixel is labelled already or held by another annotator."""


class AnnotatorConfigError(PixelPickError):
    """The web annotator cannot start as configured (a public host without a token, images missing from the root)."""


class BenchmarkError(PixelPickError):
    """A benchmark run directory that holds another recipe's run."""


class ProgressDatabaseError(AnnotationJobError):
    """A progress database that cannot be used (empty, corrupt, not a progress database, another job's); names it."""


class LabelImportError(AnnotationJobError):
    """A labelling tool's export (Label Studio, CVAT) that cannot become a job's labels; nothing was stored."""


class JobClosedError(PixelConflictError):
    """A change to a job whose labels were ingested into a round: the job is closed and accepts no more changes."""

    def __init__(self, message: str, *, closed_at: object = None, note: str = "") -> None:
        super().__init__(message)
        self.closed_at = closed_at  # when the job was closed (a UTC datetime)
        self.note = note  # why, as given to ProgressStore.close


class CampaignError(PixelPickError):
    """A campaign that cannot be opened as asked (other settings than its record, data that cannot hold it)."""


class LabelSpaceError(CampaignError):
    """A classes file that removes, renames or reorders a class a round used, or gives its key to another class;
    the message names the file, the class and the rounds."""


class CheckpointError(PixelPickError):
    """A model file that is missing, unreadable or not a PixelPick checkpoint; the message names the file."""


class CampaignLockedError(PixelPickError):
    """Another process is running this campaign's rounds; the message names it."""


class StepInputError(PixelPickError):
    """A step was given input it cannot use (an empty label batch, say); the message names the file."""


class DistributedTrainingError(PixelPickError):
    """A distributed training run failed; the message gives the processes' last words."""


class PredictionInputError(PixelPickError):
    """Images that cannot be predicted on (wrong shape or type); the message says what was expected."""


class DiskFullError(PixelPickError):
    """A write failed because its filesystem is full; the message names the file and what to free."""
