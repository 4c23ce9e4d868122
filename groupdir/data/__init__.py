"""DIR data sets: the field's CSV layout and its validation, the synthetic generator, torch loaders."""

from groupdir.data.dir_format import DataError, DIRTable, read_dir_table, resolve_csv
from groupdir.data.loaders import DIRImageDataset, make_loader

__all__ = ["DataError", "DIRTable", "read_dir_table", "resolve_csv", "DIRImageDataset", "make_loader"]
