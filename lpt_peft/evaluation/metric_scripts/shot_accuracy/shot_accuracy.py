"""Long-tailed top-1 accuracy: overall and many / medium / few-shot accuracy as an `evaluate` metric."""

import datasets
import evaluate

from lpt_peft.evaluation.metrics import shot_accuracy

_DESCRIPTION = """
Top-1 accuracy of a long-tailed classifier, overall and split into many-shot (more than 100 training images),
medium-shot (20 to 100) and few-shot (fewer than 20) classes. A group's accuracy is the accuracy over the test samples
whose true class is in the group. The `author` grouping counts classes with exactly 20 training images as few-shot, as
the official LPT code does. Thin wrapper around `lpt_peft.evaluation.metrics.shot_accuracy`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class indices.
    references (`list` of `int`): True class indices.
    train_class_counts (`list` of `int`): Number of training images of each class (index = class id).
    grouping (`str`, defaults to `"standard"`): `"standard"` (few n < 20) or `"author"` (few n <= 20).

Returns:
    overall, many, medium, few (`float`): accuracies in percent; `nan` for a group without test samples.
    per_class (`list` of `float`): accuracy of each class in percent, `nan` for a class without test samples.
    per_class_count (`list` of `int`): test samples of each class.
    num_samples (`int`): number of evaluated samples.

Example:
    >>> metric = lpt_peft.evaluation.metrics.load_shot_accuracy_metric(keep_in_memory=True)
    >>> metric.compute(predictions=[0, 1, 2], references=[0, 1, 1], train_class_counts=[200, 50, 5])["medium"]
    50.0
"""

_CITATION = """
@inproceedings{dong2023lpt,
  title={{LPT}: Long-tailed Prompt Tuning for Image Classification},
  author={Dong, Bowen and Zhou, Pan and Yan, Shuicheng and Zuo, Wangmeng},
  booktitle={International Conference on Learning Representations},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ShotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            # numpy keeps _compute vectorised instead of handing it Python lists of every sample.
            format="numpy",
        )

    def _compute(self, predictions, references, train_class_counts=None, grouping="standard"):
        if train_class_counts is None:
            raise ValueError(
                "shot_accuracy needs the training class counts: call "
                "compute(..., train_class_counts=[n_0, n_1, ...]) with the number of training images of each class."
            )
        return shot_accuracy(predictions, references, train_class_counts, grouping=grouping)
