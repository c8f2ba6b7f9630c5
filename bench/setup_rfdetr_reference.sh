#!/usr/bin/env bash
# RF-DETR's own code in a scratch dir outside the repository, for bench/rfdetr_step.py and
# bench/rfdetr_trajectory.py (their harness: bench/rfdetr_reference.py). Nothing of RF-DETR is
# copied into raydetr.
#
#   bench/setup_rfdetr_reference.sh /path/to/rf-detr-clone [/tmp/rfdetr-ref]
#   make rfdetr-reference RFDETR_REPO=/path/to/rf-detr-clone
#
# Makes DEST/src (git archive of RF-DETR 1.4.1, commit 35ac6ab, the `rfdetr` package only) and
# DEST/venv (torch==2.13.0 and pycocotools as raydetr pins them, transformers<5, peft, pydantic,
# numpy, scipy, safetensors, pyyaml; no torchvision: the harness stands in for the two functions
# the model uses). raydetr's own model code is imported there too (bench/rfdetr_profile.py,
# `rfdetr_reference.py compare`): its post-processing encodes masks with pycocotools.
set -euo pipefail
REPO_DIR=${1:?usage: $0 /path/to/rf-detr-clone [dest]}
DEST=${2:-/tmp/rfdetr-ref}
COMMIT=${RFDETR_COMMIT:-35ac6ab64634e188bbb0fa3fc5135132f0df45fc}
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TORCH=$(grep -E '^torch==' "$HERE/constraints.txt")
COCO=$(grep -E '^pycocotools==' "$HERE/constraints.txt")

git -C "$REPO_DIR" cat-file -e "$COMMIT^{commit}" || {
  echo "$REPO_DIR has no commit $COMMIT: git -C $REPO_DIR fetch origin" >&2; exit 1; }
rm -rf "$DEST/src"
mkdir -p "$DEST/src"
git -C "$REPO_DIR" archive "$COMMIT" rfdetr | tar -x -C "$DEST/src"
test -x "$DEST/venv/bin/python" || "$PY" -m venv "$DEST/venv"
"$DEST/venv/bin/python" -m pip install -q "$TORCH" "$COCO" "transformers>4,<5" peft pydantic numpy scipy safetensors pyyaml
"$DEST/venv/bin/python" "$HERE/bench/rfdetr_reference.py" --rfdetr-src "$DEST/src" check
# the harness imports raydetr's model and loss in this venv too: fail here, not in a bench
PYTHONPATH="$HERE" "$DEST/venv/bin/python" -c "import raydetr.model.build, raydetr.config; print('raydetr imports in', '$DEST/venv')"
