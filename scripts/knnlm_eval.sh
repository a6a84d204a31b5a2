#!/usr/bin/env bash
# The kNN-LM on the shipped demo-base with no training (README "kNN-LM on demo-base"):
# the grouped stdlib test split, then long documents of kinds the base never saw
# (Perl modules and their POD documentation, C headers), every token up to 32K per
# document, base vs base + kNN-LM at the defaults (tuned on the stdlib valid split).
# Usage: bash scripts/knnlm_eval.sh OUT_DIR [extra --set ...]
# VARIANTS="base knnlm knn knn+knnlm" also runs the training-free kNN memory read in the
# last layer (KNN, below) alone and with the kNN-LM; MAX_DOCS=10 takes the first 10
# documents of each corpus (default: all); BATCH streams at a time (default 2).
set -euo pipefail
out=${1:?usage: knnlm_eval.sh OUT_DIR}; shift
mkdir -p "$out"
[ -d data/stdlib-byte-grouped ] || memformers data build --group-by-package \
    --split 0.8,0.1,0.1 --out data/stdlib-byte-grouped --quiet
bash "$(dirname "$0")/unseen_corpora.sh" "$out"
common=(--split test --max-docs "${MAX_DOCS:-0}" --no-progress
        --set data.eval_max_doc_tokens=32768 --set "data.batch_size=${BATCH:-2}")
# the kNN memory with no training: read in layers 2 (pretrained normalised) and 3 (its own
# q.k/sqrt(d)), one softmax with the local window (configs/compare/knn-lastlayer-cpu.toml)
KNN=(--set "model.knn.layers=[2,3]" --set "model.knn.normalize=[2]"
     --set model.knn.combine=joint --set model.knn.gate_init=-3 --set model.knn.capacity=16384)
KNNLM=(--set model.knnlm.capacity=65536)
for corpus in data/stdlib-byte-grouped "$out/corpus-perl" "$out/corpus-cheaders"; do
    name=$(basename "$corpus")
    for variant in ${VARIANTS:-base knnlm}; do
        case $variant in
            base) extra=() ;;
            knnlm) extra=("${KNNLM[@]}" "$@") ;;
            knn) extra=("${KNN[@]}") ;;
            knn+knnlm) extra=("${KNN[@]}" "${KNNLM[@]}" "$@") ;;
            *) echo "unknown variant $variant"; exit 2 ;;
        esac
        /usr/bin/time -f "%e s" memformers eval demo-base "${common[@]}" \
            --set "data.corpus=$corpus" "${extra[@]}" > "$out/$name-$variant.txt" 2>&1
        mv eval-demo-base-test.json "$out/$name-$variant.json"
        echo "$name $variant: $(head -1 "$out/$name-$variant.txt")"
    done
done
