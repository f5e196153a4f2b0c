"""Datasets: scan the layouts users bring, decode and check every image up front, captions and their tricks,
aspect-ratio buckets, the latent cache, and the report that says what was done with every file."""
from .buckets import Bucketer, cover_size, crop_offsets, make_bucket_resolutions
from .captions import CaptionTricks, apply_trigger, clip_overflow, read_caption
from .command import dataset_report, run_dataset_command
from .dataset import Dataset, Draw, ImageRecord, load_dataset
from .images import IMAGE_EXTENSIONS, ImageProblem, decode_image
from .latent_cache import LatentCache, latent_key
from .report import DatasetError, DatasetReport
from .scan import scan_dataset

__all__ = [
    "Bucketer", "CaptionTricks", "Dataset", "DatasetError", "DatasetReport", "Draw", "IMAGE_EXTENSIONS",
    "ImageProblem", "ImageRecord", "LatentCache", "apply_trigger", "clip_overflow", "cover_size", "crop_offsets",
    "dataset_report", "decode_image", "latent_key", "load_dataset", "make_bucket_resolutions", "read_caption",
    "run_dataset_command", "scan_dataset",
]
