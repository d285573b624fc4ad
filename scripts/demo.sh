#!/usr/bin/env bash
# The main job: trains a small CNN on scikit-learn's digits with torch_batchnorm and with
# torch.nn.BatchNorm side by side and prints both loss curves.
source "$(dirname "$0")/setup_env.sh"
cd "$TBN_ROOT"
python examples/train_digits.py "$@"
