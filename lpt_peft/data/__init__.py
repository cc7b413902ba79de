"""Long-tailed data sets, sampling profiles and LPT image preprocessing.

Data sets are built by name through a registry: `create_dataset(name, **options)`, `list_datasets()`,
`@register_dataset(name)` for a new one (docs/extending.md); any Hub id or local folder `datasets.load_dataset`
reads is a data set too (`hfds/<id or path>`, see `lpt_peft.data.hub`).

These names load on first access (most need `pip install 'lpt-peft[train]'`), so that inference, which uses
only `lpt_peft.data.transforms`, works with the core install.
"""

from lpt_peft._extras import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lpt_peft.data.benchmarks": [
            "check_imagefolder_layout",
            "check_images_decode",
            "drop_unreadable_images",
            "find_unreadable_images",
            "load_cifar100_lt",
            "load_imagefolder_lt",
            "load_imagenet_lt",
            "load_inaturalist2018",
            "load_places_lt",
            "load_split_file_dataset",
            "read_split_file",
        ],
        "lpt_peft.data.fashion_mnist": [
            "FASHION_MNIST_CLASSES",
            "load_fashion_mnist",
            "load_fashion_mnist_lt",
            "read_idx",
        ],
        "lpt_peft.data.hub": ["load_hub_dataset"],
        "lpt_peft.data.mnist": ["MNIST_CLASSES", "load_mnist", "mnist_lt"],
        "lpt_peft.data.mnist_family": [
            "ANIMAL_MNIST_CLASSES",
            "MNIST_FAMILY_CLASSES",
            "load_animal_mnist",
            "mnist_family_lt",
        ],
        "lpt_peft.data.long_tail": [
            "LongTailDataset",
            "count_labels",
            "dataset_from_uint8_arrays",
            "infer_num_classes",
            "labels_as_numpy",
            "long_tail_counts",
            "make_long_tailed",
        ],
        "lpt_peft.data.registry": [
            "create_dataset",
            "dataset_from_args",
            "dataset_options",
            "dataset_options_from_args",
            "list_datasets",
            "register_dataset",
        ],
        "lpt_peft.data.seeding": ["seed_from_keys", "torch_generator"],
        "lpt_peft.data.synthetic": ["make_synthetic_long_tail"],
        "lpt_peft.data.transforms": ["LPTImageTransform", "TransformedImageDataset", "decode_image", "to_rgb"],
    },
)
