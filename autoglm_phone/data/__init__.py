"""Datasets for autoglm_phone."""

from autoglm_phone.data.synthetic import (
    SyntheticDataset,
    SyntheticSpec,
    build_synthetic,
    load_split,
    num_distinct_captions,
    parse_caption,
)

__all__ = [
    "SyntheticDataset",
    "SyntheticSpec",
    "build_synthetic",
    "load_split",
    "num_distinct_captions",
    "parse_caption",
]
