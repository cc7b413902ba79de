"""Long-tailed data sets, sampling profiles and LPT image preprocessing.

Data sets are built by name through a registry: `create_dataset(name, **options)`, `list_datasets()`,
`@register_dataset(name)` for a new one (docs/extending.md); any Hub id or local folder `datasets.load_dataset`
reads is a data set too (`hfds/<id or path>`, see `lpt_peft.data.hub`).
"""

from lpt_peft.data.benchmarks import (
    check_imagefolder_layout,
    check_images_decode,
    drop_unreadable_images,
    find_unreadable_images,
    load_cifar100_lt,
    load_imagefolder_lt,
    load_imagenet_lt,
    load_inaturalist2018,
    load_places_lt,
    load_split_file_dataset,
    read_split_file,
)
from lpt_peft.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, load_fashion_mnist_lt, read_idx
from lpt_peft.data.hub import load_hub_dataset
from lpt_peft.data.long_tail import (
    LongTailDataset,
    count_labels,
    dataset_from_uint8_arrays,
    infer_num_classes,
    labels_as_numpy,
    long_tail_counts,
    make_long_tailed,
)
from lpt_peft.data.mnist import MNIST_CLASSES, load_mnist, mnist_lt
from lpt_peft.data.mnist_family import (
    ANIMAL_MNIST_CLASSES,
    MNIST_FAMILY_CLASSES,
    load_animal_mnist,
    mnist_family_lt,
)
from lpt_peft.data.registry import (
    create_dataset,
    dataset_from_args,
    dataset_options,
    dataset_options_from_args,
    list_datasets,
    register_dataset,
)
from lpt_peft.data.seeding import seed_from_keys, torch_generator
from lpt_peft.data.synthetic import make_synthetic_long_tail
from lpt_peft.data.transforms import LPTImageTransform, TransformedImageDataset, decode_image, to_rgb

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "MNIST_FAMILY_CLASSES",
    "LPTImageTransform",
    "LongTailDataset",
    "TransformedImageDataset",
    "check_images_decode",
    "check_imagefolder_layout",
    "drop_unreadable_images",
    "find_unreadable_images",
    "count_labels",
    "create_dataset",
    "dataset_from_args",
    "dataset_options",
    "dataset_options_from_args",
    "dataset_from_uint8_arrays",
    "decode_image",
    "infer_num_classes",
    "labels_as_numpy",
    "list_datasets",
    "load_cifar100_lt",
    "load_fashion_mnist",
    "load_animal_mnist",
    "load_fashion_mnist_lt",
    "load_mnist",
    "load_hub_dataset",
    "load_imagefolder_lt",
    "load_imagenet_lt",
    "load_inaturalist2018",
    "load_places_lt",
    "load_split_file_dataset",
    "long_tail_counts",
    "make_long_tailed",
    "make_synthetic_long_tail",
    "mnist_family_lt",
    "mnist_lt",
    "read_idx",
    "read_split_file",
    "register_dataset",
    "seed_from_keys",
    "to_rgb",
    "torch_generator",
]
