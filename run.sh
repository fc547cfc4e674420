#!/usr/bin/env bash
# One entry point for a fresh machine: sets everything up on first use, then runs.
#   ./run.sh demo    short SPARO-DINO pre-training on Fashion-MNIST, then its k-NN accuracy
#   ./run.sh test    the test suite
#   ./run.sh setup   only install (virtualenv in .venv, requirements, Fashion-MNIST)
# SPARO_VENV=DIR picks another virtualenv folder.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SPARO_VENV:-.venv}
PY="$VENV/bin/python"

setup_python() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.requirements.sha256" want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "Installing requirements into $VENV (first run: a few minutes)..."
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

setup_fashion_mnist() {
  local system=/usr/share/datasets/fashion-mnist local_dir=.data/fashion-mnist
  if [ -n "${FASHION_MNIST_DIR:-}" ] && [ -e "$FASHION_MNIST_DIR/train-labels-idx1-ubyte.gz" ]; then return; fi
  if [ -e "$system/train-labels-idx1-ubyte.gz" ]; then return; fi
  if [ -e "$local_dir/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz" ]; then
    export FASHION_MNIST_DIR="$PWD/$local_dir/usr/share/datasets/fashion-mnist"; return
  fi
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    mkdir -p "$local_dir" && (cd "$local_dir" && apt-get download dataset-fashion-mnist \
      && dpkg-deb -x dataset-fashion-mnist_*.deb .)
    export FASHION_MNIST_DIR="$PWD/$local_dir/usr/share/datasets/fashion-mnist"
  fi
}

setup_python
setup_fashion_mnist
export PYTHONUNBUFFERED=1
case "${1:-}" in
  demo)
    shift
    out=${DEMO_OUTPUT_DIR:-runs/demo}
    # ends with what training bought: 20-NN top-1 of raw pixels, untrained and trained network
    "$PY" main_dino_sparo.py --config configs/cpu_demo.yaml --output_dir "$out" "$@"
    "$PY" plot_runs.py "$out" --output "$out/run.png"
    # the checkpoint in the stand-alone evaluator: the same bank and queries, the same 20-NN figure
    "$PY" eval_knn.py --pretrained_weights "$out/checkpoint.pth" --data_path fashion_mnist \
      --nb_knn 10 20 --train_subset 10000 --num_workers 0
    ;;
  test) shift; "$PY" -m pytest "$@" ;;
  setup) echo "Ready: $VENV, Fashion-MNIST." ;;
  *) echo "usage: ./run.sh {demo|test|setup} [extra arguments]" >&2; exit 2 ;;
esac
