"""Dataset readers for the formats users have, plus the built-in offline sets.

- `digits`: scikit-learn's UCI handwritten digits (built in, nothing to download);
- `cifar`: CIFAR-10/100 python batches, read with a restricted unpickler;
- `folder`: ImageFolder trees, decoded with Pillow;
- `transforms`: the DeiT augmentations (random resized crop, flip, mixup, cutmix, random erasing,
  label smoothing, normalisation) written with torch ops.
"""

from hybridzoo.data.cifar import load_cifar, read_cifar_batch, safe_load_pickle
from hybridzoo.data.digits import DIGITS_CLASSES, TensorImageDataset, load_digits_split
from hybridzoo.data.folder import ImageFolder, load_image
from hybridzoo.data.transforms import (EvalTransform, Mixup, RandomErasing, SoftTargetCrossEntropy, TrainTransform,
                                       one_hot)

__all__ = ["load_cifar", "read_cifar_batch", "safe_load_pickle", "DIGITS_CLASSES", "TensorImageDataset",
           "load_digits_split", "ImageFolder", "load_image", "EvalTransform", "Mixup", "RandomErasing",
           "SoftTargetCrossEntropy", "TrainTransform", "one_hot"]
